//! ONNX: export of a [`crate::ir::Network`], import of any CNN file into one, running files in
//! tract and ONNX Runtime, and their cross-check.
//!
//! - [`export`]: IR -> `ModelProto` (prost types from `tract_onnx::pb`), BatchNorm folded or
//!   kept, QDQ weights, one sampled noisy instance, provenance in `metadata_props`.
//! - [`run`]: [`run::TractRunner`] and [`run::OrtRunner`] (ONNX Runtime loaded at run time
//!   from `ORT_DYLIB_PATH` or the repository's `.venv`, see [`locate_ort`]).
//! - [`check`]: the two runtimes on the same images, their differences and accuracies, and a
//!   hook for reference logits (Burn's).
//! - [`import`]: an ONNX CNN (as PyTorch exports it) into a [`crate::ir::Network`], for the
//!   float and integer engines, the packed format and the firmware; [`data`]: its images,
//!   brought to its input and normalized as the file or the user says.
//! - The tract engine of `nvcim eval --onnx --engine tract` (the file's Conv/Gemm/MatMul weight
//!   initializers perturbed) is [`crate::engine::onnx`].

pub mod check;
pub mod data;
pub mod export;
pub mod import;
pub mod run;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use tract_onnx::pb::{ModelProto, tensor_shape_proto::dimension, type_proto};

/// Reads and decodes an ONNX file; a missing, truncated or corrupt file is an error naming it.
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = fs::read(path).with_context(|| format!("reading ONNX file {}", path.display()))?;
    decode_model(&bytes, &path.display().to_string())
}

/// Decodes ONNX bytes; `what` names their origin in errors.
pub fn decode_model(bytes: &[u8], what: &str) -> Result<ModelProto> {
    ensure!(!bytes.is_empty(), "ONNX file {what} is empty");
    let model = ModelProto::decode(bytes).with_context(|| {
        format!("ONNX file {what} is not a valid ONNX model (truncated or corrupt protobuf)")
    })?;
    ensure!(
        model.graph.is_some(),
        "ONNX file {what} has no graph (truncated or not an ONNX model)"
    );
    Ok(model)
}

/// Encodes a model and writes it atomically: a temporary file beside `path`, synced, then renamed.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<()> {
    crate::fsx::write_atomic(path, &model.encode_to_vec())
}

/// The first graph input and output of a model and the input's per-image shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Name of the image input.
    pub input: String,
    /// Name of the logits output.
    pub output: String,
    /// `[C, H, W]` of one image (the batch dimension may be anything).
    pub image: [usize; 3],
}

impl ModelInfo {
    /// Reads the names and the `[N, C, H, W]` input shape; `what` names the file in errors.
    pub fn of(model: &ModelProto, what: &str) -> Result<ModelInfo> {
        let graph = model.graph.as_ref().context("model has no graph")?;
        let inits: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !inits.contains(i.name.as_str()))
            .collect();
        ensure!(
            inputs.len() == 1,
            "{what}: expected one image input, found {}",
            inputs.len()
        );
        let output = graph
            .output
            .first()
            .with_context(|| format!("{what}: the graph has no output"))?;
        let input = inputs[0];
        let shape = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        };
        let dims: Vec<Option<usize>> = shape
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let image = match dims.as_slice() {
            [_, Some(c), Some(h), Some(w)] => [*c, *h, *w],
            _ => bail!(
                "{what}: input `{}` must be [batch, C, H, W] with fixed C, H, W; found {dims:?}",
                input.name
            ),
        };
        Ok(ModelInfo {
            input: input.name.clone(),
            output: output.name.clone(),
            image,
        })
    }
}

/// The repository root this binary was built from (where `.venv` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The `.venv` directories searched: `./.venv`, then the repository's.
fn venvs() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(".venv")];
    let repo = repo_root().join(".venv");
    if !v.contains(&repo) {
        v.push(repo);
    }
    v
}

/// Finds ONNX Runtime's shared library: `ORT_DYLIB_PATH` if set, else
/// `.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.<version>` (the newest,
/// in `./.venv` or the repository's).
pub fn locate_ort() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "ORT_DYLIB_PATH={} is not a file; point it at libonnxruntime.so.<version>",
            p.display()
        );
        return Ok(p);
    }
    let mut found: Vec<PathBuf> = Vec::new();
    for venv in venvs() {
        let Ok(libs) = fs::read_dir(venv.join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            if !py.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            let capi = py.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = fs::read_dir(&capi) else {
                continue;
            };
            found.extend(files.flatten().map(|f| f.path()).filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with("libonnxruntime.so."))
                    .unwrap_or(false)
            }));
        }
        if !found.is_empty() {
            break;
        }
    }
    found.sort_by_key(|p| version_key(p));
    let lib = found.pop().with_context(|| {
        format!(
            "ONNX Runtime not found: run `cargo xtask setup` (it installs PyPI's onnxruntime into \
             {}) or set ORT_DYLIB_PATH to libonnxruntime.so.<version>",
            repo_root().join(".venv").display()
        )
    })?;
    Ok(lib.canonicalize().unwrap_or(lib))
}

fn version_key(p: &Path) -> Vec<u64> {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    name.trim_start_matches("libonnxruntime.so.")
        .split('.')
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The `.venv` Python that has `onnx` and `onnxruntime` (for the format's own checker).
pub fn venv_python() -> Result<PathBuf> {
    venvs()
        .into_iter()
        .map(|v| v.join("bin/python"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no Python virtual environment at {}: run `cargo xtask setup`",
                repo_root().join(".venv").display()
            )
        })
}

/// The model's normalization from its metadata (identity when absent).
fn normalization(
    model: &tract_onnx::pb::ModelProto,
    channels: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = import::file_normalization(model, channels)?
        .unwrap_or_else(|| crate::ir::Normalization::identity(channels));
    Ok((n.mean, n.std))
}

/// The first `limit` test images, prepared for the model, and their labels.
pub fn idx_images(
    dir: &Path,
    model: &tract_onnx::pb::ModelProto,
    info: &ModelInfo,
    limit: usize,
) -> Result<(Vec<f32>, Vec<u32>)> {
    idx_split_images(
        dir,
        "t10k",
        model,
        info,
        |n| Ok((0..limit.min(n)).collect()),
    )
}

/// [`idx_images`] of the IDX split `split` (`t10k` or `train`) in `dir`: the images `choose`
/// picks out of the split's count, in its order.
pub fn idx_split_images(
    dir: &Path,
    split: &str,
    model: &tract_onnx::pb::ModelProto,
    info: &ModelInfo,
    choose: impl FnOnce(usize) -> Result<Vec<usize>>,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let find = |stem: &str| {
        crate::data::idx::find(dir, stem).with_context(|| {
            format!(
                "no {stem}[.gz] in {}; pass --data-dir with MNIST-style IDX {} files (e.g. \
                 /usr/share/datasets/fashion-mnist after `cargo xtask setup`)",
                dir.display(),
                if split == "train" { "training" } else { "test" }
            )
        })
    };
    let ip = find(&format!("{split}-images-idx3-ubyte"))?;
    let (img, labels) =
        crate::data::idx::read_pair(&ip, &find(&format!("{split}-labels-idx1-ubyte"))?)?;
    let (mut idims, mut pixels) = (img.dims, img.data);
    let [c, h, w] = info.image;
    // A model trained with the authors' preprocessing (`nvcim.preprocess = resize`) sees its
    // 28x28 images resized, not padded.
    let resize = model
        .metadata_props
        .iter()
        .find(|p| p.key == "nvcim.preprocess")
        .is_some_and(|p| p.value == "resize");
    if resize && (idims[1], idims[2]) != (h, w) && h == w && idims[1] <= h && idims[2] <= w {
        pixels = crate::data::resize_bilinear(&pixels, idims[1], idims[2], h);
        idims = vec![idims[0], h, w];
    }
    let (rows, cols) = (idims[1], idims[2]);
    ensure!(
        rows <= h && cols <= w,
        "{}: {rows}x{cols} images do not fit the model's {h}x{w} input",
        ip.display()
    );
    let (top, left) = ((h - rows) / 2, (w - cols) / 2);
    let (mean, std) = normalization(model, c)?;
    let picked = choose(idims[0])?;
    let n = picked.len();
    let mut x = vec![0.0f32; n * c * h * w];
    for (i, &k) in picked.iter().enumerate() {
        ensure!(
            k < idims[0],
            "image {k} of {} in {}",
            idims[0],
            ip.display()
        );
        let img = &pixels[k * rows * cols..(k + 1) * rows * cols];
        for ch in 0..c {
            let plane = &mut x[(i * c + ch) * h * w..(i * c + ch + 1) * h * w];
            plane.fill((0.0 - mean[ch]) / std[ch]);
            for r in 0..rows {
                for col in 0..cols {
                    let p = f32::from(img[r * cols + col]) / 255.0;
                    plane[(top + r) * w + left + col] = (p - mean[ch]) / std[ch];
                }
            }
        }
    }
    Ok((x, picked.iter().map(|&k| u32::from(labels[k])).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_bytes_name_the_file() {
        let err = decode_model(&[0xff, 0xff, 0xff], "bad.onnx").unwrap_err();
        assert!(format!("{err:#}").contains("bad.onnx"));
        let err = decode_model(&[], "empty.onnx").unwrap_err();
        assert!(format!("{err:#}").contains("empty.onnx"));
    }

    #[test]
    fn ort_versions_sort_numerically() {
        let mut v = [
            PathBuf::from("libonnxruntime.so.1.9.0"),
            PathBuf::from("libonnxruntime.so.1.32.0"),
        ];
        v.sort_by_key(|p| version_key(p));
        assert!(v[1].ends_with("libonnxruntime.so.1.32.0"));
    }
}
