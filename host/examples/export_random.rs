//! Exports a random-weight VGG-8 or ResNet-18 from the IR to ONNX, for trying `nvcim check-onnx`
//! and deployment tools before a trained checkpoint exists.
//!
//! `cargo run --release -p nvcim --example export_random -- vgg8|resnet18 CHANNELS WIDTH OUT.onnx [--fold] [--qdq]`

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use nvcim::{
    ir::{Network, RandomArch},
    onnx::export::{ExportOptions, export},
};
use nvcim_shared::quant::QuantConfig;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, channels, width, out, flags @ ..] = args.as_slice() else {
        bail!("usage: export_random vgg8|resnet18 CHANNELS WIDTH OUT.onnx [--fold] [--qdq]");
    };
    let spec = RandomArch::new(
        channels.parse().context("CHANNELS")?,
        width.parse().context("WIDTH")?,
    );
    let net = match arch.as_str() {
        "vgg8" => Network::vgg8(&spec)?,
        "resnet18" => Network::resnet18(&spec)?,
        other => bail!("unknown architecture `{other}`"),
    };
    let opts = ExportOptions {
        fold_batchnorm: flags.iter().any(|f| f == "--fold"),
        qdq: flags
            .iter()
            .any(|f| f == "--qdq")
            .then_some(QuantConfig::DEFAULT),
        noisy: None,
    };
    let out = PathBuf::from(out);
    export(&net, &opts, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
