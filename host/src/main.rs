use std::process::ExitCode;

use clap::Parser;
use nvcim::cli::Cli;

fn main() -> ExitCode {
    // Burn's default device is the first GPU backend compiled in (wgpu, in this build), and Burn
    // loads a saved optimizer state (`--resume`) onto it before moving it to the model's device.
    // nvcim's compute device is `--backend`'s alone, so Burn's default is pinned to flex: no
    // Vulkan start-up, and no failure on a machine without a Vulkan driver.
    // SAFETY: nothing else runs yet (no thread has been started), so no `getenv` races this.
    unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    match Cli::parse().run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
