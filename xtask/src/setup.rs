//! `cargo xtask setup`: installs what a fresh Debian machine lacks, idempotently.
//!
//! - Debian packages `qemu-system-arm` (the Cortex-M4F board for the firmware) and
//!   `dataset-fashion-mnist` (the demo's data), `slurm-wlm` and `munge` (the one-node cluster
//!   test), `mesa-vulkan-drivers` (lavapipe, the Vulkan device the wgpu backend's test runs on)
//!   through apt-get, as root; otherwise it prints the exact command and fails.
//! - The rustup target `thumbv7em-none-eabihf` for the pinned toolchain (rustup does not add the
//!   targets of `rust-toolchain.toml` to a toolchain that is already installed).
//! - A Python virtual environment `.venv` with PyPI's `onnx` (the format's own checker) and
//!   `onnxruntime` (whose `libonnxruntime.so.<version>` the host loads through `ort`); see
//!   [`python_venv`].

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Debian packages the project needs, with what each is for.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-arm",
        "QEMU's mps2-an386 board for the Cortex-M4F firmware",
    ),
    (
        "dataset-fashion-mnist",
        "Fashion-MNIST under /usr/share/datasets/fashion-mnist",
    ),
    (
        "slurm-wlm",
        "slurmctld, slurmd and the clients for the one-node cluster test",
    ),
    (
        "munge",
        "Slurm's authentication daemon for the cluster test",
    ),
    (
        "mesa-vulkan-drivers",
        "Mesa's lavapipe, Vulkan on the CPU: the test of `--backend wgpu` where there is no GPU",
    ),
];

const TARGET: &str = "thumbv7em-none-eabihf";

/// Runs the whole setup.
pub fn run(root: &Path) -> Result<()> {
    eprintln!("==> setup");
    apt()?;
    rust_target()?;
    python_venv(root)?;
    eprintln!("<== setup: everything is in place");
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(p, _)| !dpkg_installed(p))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        eprintln!(
            "    apt: {} already installed",
            APT_PACKAGES
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    for (p, why) in APT_PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("    apt: missing {p} ({why})");
    }
    let cmd = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root; run:\n    sudo sh -c '{cmd}'\nthen run the xtask again"
        );
    }
    crate::step(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    crate::step(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", missing.join(" ")),
    )?;
    eprintln!("    apt: installed {}", missing.join(", "));
    Ok(())
}

fn rust_target() -> Result<()> {
    let toolchain = toolchain()?;
    let out = Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", &toolchain])
        .output()
        .context("running `rustup target list` (is rustup installed?)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        eprintln!("    rustup: {TARGET} already installed for {toolchain}");
        return Ok(());
    }
    crate::step(
        Command::new("rustup").args(["target", "add", TARGET, "--toolchain", &toolchain]),
        &format!("rustup target add {TARGET} --toolchain {toolchain}"),
    )
}

/// The channel pinned in rust-toolchain.toml.
fn toolchain() -> Result<String> {
    let text =
        std::fs::read_to_string("rust-toolchain.toml").context("reading rust-toolchain.toml")?;
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("channel")
                .and_then(|r| r.trim().strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
        })
        .context("rust-toolchain.toml names no channel")
}

// ---------------------------------------------------------------------------------------------
// Python virtual environment for ONNX (checker + ONNX Runtime library)
// ---------------------------------------------------------------------------------------------

/// PyPI packages of `.venv`: what each is for.
const PY_PACKAGES: &[(&str, &str)] = &[
    (
        "onnx",
        "onnx.checker.check_model(full_check=True) in the ONNX tests",
    ),
    (
        "onnxruntime",
        "libonnxruntime.so, loaded by the host through `ort` (load-dynamic)",
    ),
    ("numpy", "the Python package's arrays (its one dependency)"),
    (
        "maturin",
        "builds the Python package's wheel (`cargo xtask wheel`)",
    ),
    ("pytest", "the Python package's tests"),
];

/// Creates `root/.venv` with [`PY_PACKAGES`] unless they import already (idempotent and quick
/// when present), then prints the ONNX Runtime library path for `ORT_DYLIB_PATH`.
fn python_venv(root: &Path) -> Result<()> {
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let imports = PY_PACKAGES
        .iter()
        .map(|p| p.0)
        .collect::<Vec<_>>()
        .join(", ");
    let present = python.is_file()
        && Command::new(&python)
            .args(["-c", &format!("import {imports}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if present {
        eprintln!(
            "    venv: {imports} already installed in {}",
            venv.display()
        );
    } else {
        for (p, why) in PY_PACKAGES {
            eprintln!("    venv: installing {p} ({why})");
        }
        if !python.is_file() {
            crate::step(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                &format!("python3 -m venv {}", venv.display()),
            )
            .context("creating the virtual environment (Debian: apt-get install python3-venv)")?;
        }
        crate::step(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(PY_PACKAGES.iter().map(|p| p.0)),
            &format!("pip install {}", imports.replace(", ", " ")),
        )?;
    }
    let lib = ort_library(&venv).with_context(|| {
        format!(
            "onnxruntime is installed but no libonnxruntime.so.<version> was found under {}",
            venv.display()
        )
    })?;
    eprintln!("    onnxruntime: ORT_DYLIB_PATH={}", lib.display());
    Ok(())
}

/// `lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.<version>` under `venv`.
fn ort_library(venv: &Path) -> Option<std::path::PathBuf> {
    let mut found = Vec::new();
    for py in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
        if !py.file_name().to_string_lossy().starts_with("python3") {
            continue;
        }
        let capi = py.path().join("site-packages/onnxruntime/capi");
        for f in std::fs::read_dir(capi).into_iter().flatten().flatten() {
            if f.file_name()
                .to_string_lossy()
                .starts_with("libonnxruntime.so.")
            {
                found.push(f.path());
            }
        }
    }
    // Numeric version order (1.32 after 1.9).
    found.sort_by_key(|p| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_start_matches("libonnxruntime.so.")
            .split('.')
            .map(|s| s.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    found.pop()
}
