//! The command line: one subcommand per verb, each dispatched to `commands::<verb>::run`.

use clap::{Parser, Subcommand};

use crate::commands;

/// nvcim: robust neural networks for non-volatile compute-in-memory accelerators.
#[derive(Debug, Parser)]
#[command(name = "nvcim", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// The verb to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relate sigma to weight noise: analytic and sampled effective weight-noise std.
    Variation(commands::variation::VariationArgs),
    /// Monte Carlo robustness evaluation of a checkpoint (float or integer CiM engine).
    Eval(commands::eval::EvalArgs),
    /// Pack a checkpoint into the integer CiM engine's model file (for the firmware).
    Pack(commands::pack::PackArgs),
    /// Export a checkpoint's backbone as ONNX.
    Export(commands::export::ExportArgs),
    /// Run a grid of train + eval cells from a plan (locally, or emit a Slurm job array).
    Sweep(commands::sweep::SweepArgs),
    /// Merge evaluation results into the paper's tables (Markdown, CSV, PNG).
    Report(commands::report::ReportArgs),
    /// Train VGG-8, ResNet-18 or any CNN in ONNX with vanilla, noise injection, NFT or NFT-OVF.
    Train(commands::train::TrainArgs),
    /// Search the feedback weight alpha over {1, 0.1, 0.01, 0.001, 0.0001} by noisy validation accuracy.
    AlphaSearch(commands::alpha_search::AlphaSearchArgs),
    /// Run an ONNX file in tract and ONNX Runtime and compare their logits and accuracies.
    CheckOnnx(commands::check_onnx::CheckOnnxArgs),
    /// Run a packed model on the firmware (QEMU or simulated), checked against the host engine.
    Firmware(commands::firmware::FirmwareArgs),
    /// Import PyTorch (.pt/.pth) or safetensors weights into a backbone.
    Import(commands::import::ImportArgs),
}

impl Cli {
    /// Runs the chosen verb.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Variation(args) => commands::variation::run(&args),
            Command::Eval(args) => commands::eval::run(&args),
            Command::Pack(args) => commands::pack::run(&args),
            Command::Export(args) => commands::export::run(&args),
            Command::Sweep(args) => commands::sweep::run(&args),
            Command::Report(args) => commands::report::run(&args),
            Command::Train(args) => commands::train::run(&args),
            Command::AlphaSearch(args) => commands::alpha_search::run(&args),
            Command::CheckOnnx(args) => commands::check_onnx::run(&args),
            Command::Firmware(args) => commands::firmware::run(&args),
            Command::Import(args) => commands::import::run(&args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
