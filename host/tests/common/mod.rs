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

/// Asserts that an exported graph is a backbone only: no node, output or initializer name
/// mentions an exit, and it has `layers` Conv/Gemm nodes (one per backbone weight layer).
pub fn assert_backbone_only(model: &tract_onnx::pb::ModelProto, layers: usize) {
    let g = model.graph.as_ref().expect("a graph");
    for name in g
        .node
        .iter()
        .map(|n| &n.name)
        .chain(g.initializer.iter().map(|t| &t.name))
        .chain(g.node.iter().flat_map(|n| &n.output))
    {
        assert!(
            !name.to_lowercase().contains("exit"),
            "`{name}` in the graph"
        );
    }
    let found = g
        .node
        .iter()
        .filter(|n| n.op_type == "Conv" || n.op_type == "Gemm")
        .count();
    assert_eq!(found, layers, "Conv/Gemm nodes");
}

/// Compares `text` with the golden file `path`, rewriting it first under `NVCIM_BLESS=1`.
pub fn golden(path: &Path, text: &str) {
    if std::env::var_os("NVCIM_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("a parent directory")).unwrap();
        std::fs::write(path, text).unwrap();
        println!("blessed {}", path.display());
    }
    let want = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with NVCIM_BLESS=1 cargo test --release --workspace \
             --exclude nvcim-firmware --exclude nvcim-python --test firmware_run",
            path.display()
        )
    });
    assert_eq!(text, want, "lines differ from {}", path.display());
}

/// Runs `tests/models/make_models.py` (the `.venv` Python's `onnx`) with `args`.
pub fn make_models(args: &[&str]) -> Output {
    let py = venv_python().unwrap_or_else(|e| panic!("{e:#} (run `cargo xtask setup`)"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models/make_models.py");
    Command::new(py).arg(script).args(args).output().unwrap()
}

/// A directory holding the importer's five test models and a small IDX data set in `data/`
/// (96 training, 48 test images), made once per test binary.
pub fn onnx_fixtures() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = make_models(&[dir.path().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "make_models.py failed:\n{}",
            text(&out)
        );
        std::fs::create_dir(dir.path().join("data")).unwrap();
        write_idx(&dir.path().join("data"), 96, 48);
        dir
    })
    .path()
}

/// The largest `|a - b|` of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A process's stdout and stderr, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
