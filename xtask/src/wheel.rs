//! `cargo xtask wheel`: the Python package (`python/`, PyO3 abi3) built into a wheel by maturin
//! in `.venv` and installed there; `cargo xtask test` then runs its pytest suite against the
//! installed wheel and the `nvcim` binary of the same build.
//!
//! The torch helpers (`nvcim.torch`) are tested where torch is installed: in `.venv-bench` (the
//! benchmarks' venv, when it exists; the wheel is installed there too). In `.venv`, which has
//! no torch, pytest skips them and says so.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The crates only the Python package depends on: all a wheel build after the workspace's own
/// build ([`crate::BUILD`]) may compile (see [`test`]).
const PYTHON_ONLY: [&str; 9] = [
    "pyo3",
    "pyo3-build-config",
    "pyo3-ffi",
    "pyo3-macros",
    "pyo3-macros-backend",
    "numpy",
    "rustc-hash",
    "target-lexicon",
    "nvcim-python",
];

/// Builds the wheel into `<target>/wheels` and installs it into `.venv`; returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    build_listing(root).map(|(wheel, _)| wheel)
}

/// [`build`], also returning the crates cargo compiled for it (its `Compiling` lines).
fn build_listing(root: &Path) -> Result<(PathBuf, Vec<String>)> {
    let python = venv_python(root, ".venv")?;
    let out = crate::target_dir(root).join("wheels");
    if out.is_dir() {
        for e in fs::read_dir(&out).with_context(|| format!("listing {}", out.display()))? {
            let p = e?.path();
            if is_our_wheel(&p) {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    let label = "maturin build --release (python/, abi3 wheel)";
    eprintln!("\n==> {label}");
    let t = std::time::Instant::now();
    let output = Command::new(&python)
        .args(["-m", "maturin", "build", "--release", "--manifest-path"])
        .arg(root.join("python").join("Cargo.toml"))
        .arg("--interpreter")
        .arg(&python)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{label}`"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    eprint!("{log}");
    eprintln!(
        "<== {label}: {} in {:.1} s",
        output.status,
        t.elapsed().as_secs_f64()
    );
    if !output.status.success() {
        bail!(
            "`{label}` failed ({}); `cargo xtask setup` installs maturin into .venv",
            output.status
        );
    }
    let compiled = log
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("Compiling "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let wheel = fs::read_dir(&out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| is_our_wheel(p))
        .with_context(|| format!("maturin wrote no nvcim wheel into {}", out.display()))?;
    install(&python, &wheel)?;
    eprintln!("    wheel: {}", wheel.display());
    Ok((wheel, compiled))
}

fn is_our_wheel(p: &Path) -> bool {
    p.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n.starts_with("nvcim-") && n.ends_with(".whl"))
}

/// `pip install --force-reinstall` of the wheel alone (numpy is already there).
fn install(python: &Path, wheel: &Path) -> Result<()> {
    crate::step(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(wheel),
        &format!("pip install {} ({})", wheel.display(), python.display()),
    )
}

fn venv_python(root: &Path, venv: &str) -> Result<PathBuf> {
    let p = root.join(venv).join("bin").join("python");
    if !p.is_file() {
        bail!(
            "{} is missing: run `cargo xtask setup` (it creates {venv})",
            p.display()
        );
    }
    Ok(p)
}

/// Whether `python` imports `module`.
fn imports(python: &Path, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds and installs the wheel, then runs `python/tests` with pytest against it and `nvcim`
/// (the binary of the same build): in `.venv`, and the torch tests in `.venv-bench` when it has
/// torch.
///
/// Run after the workspace's build, the wheel's build must compile only the crates the Python
/// package alone depends on ([`PYTHON_ONLY`]): one build, not two (`shared/Cargo.toml` unifies
/// syn's features with PyO3's for that).
pub fn test(root: &Path, nvcim: &Path) -> Result<()> {
    let (wheel, compiled) = build_listing(root)?;
    let again: Vec<&String> = compiled
        .iter()
        .filter(|c| !PYTHON_ONLY.contains(&c.as_str()))
        .collect();
    if !again.is_empty() {
        bail!(
            "the wheel's build compiled {} crates that the workspace's build had already compiled \
             ({}): the Python package's dependency graph turns on other features of them; \
             unify the features (see shared/Cargo.toml's build-dependencies)",
            again.len(),
            again
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "    one build: the wheel compiled only {} ({} crates)",
        compiled.join(", "),
        compiled.len()
    );
    let python = venv_python(root, ".venv")?;
    let pytest = |python: &Path, what: &str, args: &[&str]| {
        crate::step(
            Command::new(python)
                .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"])
                .args(args)
                .current_dir(root)
                .env("NVCIM_BIN", nvcim),
            &format!("pytest python/tests ({what})"),
        )
    };
    pytest(&python, ".venv: numpy only", &["python/tests"])?;
    let bench = root
        .join(crate::python::BENCH_VENV)
        .join("bin")
        .join("python");
    if bench.is_file() && imports(&bench, "torch") {
        // torch is there (the train/eval benchmarks' reference); pytest is a quick install.
        let bench = crate::python::bench_python(root, &["torch", "numpy", "pytest"])?;
        install(&bench, &wheel)?;
        pytest(
            &bench,
            ".venv-bench: with torch",
            &["python/tests/test_torch.py"],
        )?;
    } else {
        eprintln!(
            "    nvcim.torch: torch is not in .venv (tests never install it), and there is no \
             .venv-bench with torch: its tests were skipped; `cargo xtask bench train` makes \
             .venv-bench, after which this step runs them there"
        );
    }
    Ok(())
}
