//! The benchmarks' Python: the `.venv-bench` environment with PyTorch, which `bench` runs its
//! references in and `wheel` tests the torch helpers in.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

/// Where the PyTorch reference environment lives (created on demand, never by the tests).
pub(crate) const BENCH_VENV: &str = ".venv-bench";

/// The Python of the benchmark venv, created with `packages` installed when missing.
pub fn bench_python(root: &Path, packages: &[&str]) -> Result<PathBuf> {
    let venv = root.join(BENCH_VENV);
    let python = venv.join("bin").join("python");
    if !python.exists() {
        crate::step(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            &format!("python3 -m venv {BENCH_VENV}"),
        )?;
    }
    let probe = format!(
        "import {}",
        packages
            .iter()
            .map(|p| p.replace('-', "_"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ok = Command::new(&python)
        .args(["-c", &probe])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        crate::step(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(packages),
            &format!(
                "pip install {} (benchmark reference only)",
                packages.join(" ")
            ),
        )?;
    }
    Ok(python)
}
