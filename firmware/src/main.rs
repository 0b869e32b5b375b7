//! The nvcim firmware image for QEMU `mps2-an386` (Cortex-M4F).
//!
//! Boot: read the semihosting command line, run the verb (`selftest`, `check`, `run`), print
//! the memory report, exit through the semihosting extended exit with a code from
//! [`nvcim_firmware::exit::ExitCode`]. Panics and HardFaults print and exit with their own codes.
//!
//! On any other target this binary is a stub that says how to build the real one, so the
//! workspace's host builds never need the Cortex-M linker script.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod board;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "nvcim-firmware runs on the Cortex-M4F: build it with `cargo build -p nvcim-firmware \
         --target thumbv7em-none-eabihf --profile firmware` and run it with `nvcim firmware`"
    );
    std::process::exit(2);
}
