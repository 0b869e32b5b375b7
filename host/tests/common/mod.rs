//! Helpers shared by the integration tests: a tiny learnable IDX data set and the binary.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nvcim::data::idx;
use nvcim::onnx::venv_python;

/// A learnable 10-class toy set: class k lights rows 2k+4..2k+6 of a 28x28 image, plus noise.
pub fn write_idx(dir: &Path, train: usize, test: usize) {
    let mut state = 12345u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    for (stem, n) in [("train", train), ("t10k", test)] {
        let mut img = Vec::with_capacity(n * 784);
        let mut lab = Vec::with_capacity(n);
        for i in 0..n {
            let k = (i * 7 + (next() as usize % 3)) % 10;
            lab.push(k as u8);
            for y in 0..28 {
                for _x in 0..28 {
                    let base = if (2 * k + 4..2 * k + 6).contains(&y) {
                        215
                    } else {
                        20
                    };
                    img.push((base + next() % 40) as u8);
                }
            }
        }
        std::fs::write(
            dir.join(format!("{stem}-images-idx3-ubyte")),
            idx::encode(&[n, 28, 28], &img),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{stem}-labels-idx1-ubyte")),
            idx::encode(&[n], &lab),
        )
        .unwrap();
    }
}

pub fn nvcim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(args)
        .output()
        .expect("runs nvcim")
}

/// Runs `onnx.checker.check_model(full_check=True)` on every file with the `.venv` Python.
pub fn check_with_onnx_checker(files: &[PathBuf]) {
    let out = run_checker(files);
    assert!(
        out.status.success(),
        "onnx.checker failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        files.len()
    );
}

pub fn run_checker(files: &[PathBuf]) -> std::process::Output {
    let python = venv_python()
        .unwrap_or_else(|e| panic!("{e:#}; the ONNX tests need it (run `cargo xtask setup`)"));
    let script = "import sys, onnx\nfor p in sys.argv[1:]:\n    onnx.checker.check_model(onnx.load(p), full_check=True)\n    print('ok', p)\n";
    Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .expect("running the venv python")
}
