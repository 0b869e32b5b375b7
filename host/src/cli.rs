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
    /// Run an ONNX file in tract and ONNX Runtime and compare their logits and accuracies.
    CheckOnnx(commands::check_onnx::CheckOnnxArgs),
}

impl Cli {
    /// Runs the chosen verb.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Variation(args) => commands::variation::run(&args),
            Command::CheckOnnx(args) => commands::check_onnx::run(&args),
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
