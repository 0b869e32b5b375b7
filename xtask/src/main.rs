//! `cargo xtask`: the project's automation — setup, test, demo, bench.
//!
//! ```text
//! cargo xtask setup          install what a fresh Debian machine lacks (apt, rustup target, venv)
//! cargo xtask test           setup, fmt, clippy, the whole test suite, no_std and firmware builds
//! cargo xtask demo           the main job: a small end-to-end experiment
//! cargo xtask bench [WHAT]   benchmarks (variation, engine, train, layers, eval, onnx, export, firmware, python)
//! cargo xtask cluster-test   nvcim sweep --emit slurm on a real one-node Slurm cluster
//! cargo xtask wheel          the Python package's wheel (maturin), installed into .venv
//! ```

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

mod bench;
mod cluster;
mod demo;
mod docs;
mod python;
mod setup;
mod wheel;

const USAGE: &str = "usage: cargo xtask <setup | test | demo | cluster-test | wheel | bench [variation|engine|train|layers|eval|onnx|export|firmware|python|all]>";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let root = root();
    env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(&root),
        Some("test") => test(&root),
        Some("demo") => demo(&root),
        Some("cluster-test") => {
            setup::run(&root)?;
            cargo(&BUILD)?;
            cluster::run(&root, &nvcim_binary(&root))
        }
        Some("wheel") => {
            setup::run(&root)?;
            wheel::build(&root).map(drop)
        }
        Some("bench") => bench(&root, &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

/// The workspace root (the parent of this crate's manifest directory). `cargo run` (the
/// `cargo xtask` alias) sets `CARGO_MANIFEST_DIR` for the process, which follows the checkout
/// it runs in; the compile-time value is only the fallback, because a target directory shared
/// by two checkouts (as `.ci/run` allows) can hand one of them an `xtask` built in the other.
fn root() -> PathBuf {
    let dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The build of the binaries that `demo` and `bench` run: the release profile and the
/// workspace's feature set (xtask itself runs from the dev profile, so it is left out).
/// `cargo test --release --workspace ...` builds the same artifacts (host/Cargo.toml lists the
/// dev dependencies' features as normal ones), which the `one build` step of `cargo xtask test`
/// checks. The Python package is left out and built by maturin alone (`cargo xtask wheel`):
/// PyO3's build script declares `rerun-if-env-changed` on `PATH` and Python's variables, and with
/// the package in these builds PyO3 recompiled between the test step and this build (seen
/// 2026-12-05; the exact variable was not pinned down).
pub(crate) const BUILD: [&str; 9] = [
    "build",
    "--release",
    "--workspace",
    "--exclude",
    "nvcim-firmware",
    "--exclude",
    "xtask",
    "--exclude",
    "nvcim-python",
];

/// The cargo target directory in use.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The `nvcim` binary of [`BUILD`].
pub(crate) fn nvcim_binary(root: &Path) -> PathBuf {
    target_dir(root).join("release").join("nvcim")
}

/// Checks that [`BUILD`] right after the test suite compiles nothing: the binary the tests ran
/// is the one the demo and the benches run (one build, not two).
fn one_build() -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let label = format!("cargo {} (one build: nothing may compile)", BUILD.join(" "));
    eprintln!("\n==> {label}");
    let t = Instant::now();
    let out = Command::new(cargo)
        .args(BUILD)
        .arg("--message-format=json")
        .output()
        .with_context(|| format!("starting `{label}`"))?;
    if !out.status.success() {
        bail!(
            "`{label}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rebuilt: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"fresh\":false"))
        .filter_map(|l| {
            let start = l.find("\"package_id\":\"")? + 14;
            l[start..].split('"').next()
        })
        .collect();
    if !rebuilt.is_empty() {
        bail!(
            "the release build after the tests recompiled {} crates ({}): the dev and the normal \
             dependency graphs unify to different features; list the dev dependencies' extra \
             features as normal dependencies in host/Cargo.toml",
            rebuilt.len(),
            rebuilt.join(", ")
        );
    }
    eprintln!(
        "<== {label}: nothing rebuilt in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `cargo` with `args`, printing the command, failing on a non-zero exit.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step(
        Command::new(cargo).args(args),
        &format!("cargo {}", args.join(" ")),
    )
}

/// Runs a command, printing it and its duration; fails on a non-zero exit.
pub(crate) fn step(cmd: &mut Command, label: &str) -> Result<()> {
    eprintln!("\n==> {label}");
    let t = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting `{label}`"))?;
    eprintln!(
        "<== {label}: {status} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("`{label}` failed ({status})");
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    let t = Instant::now();
    setup::run(root)?;
    cargo(&["fmt", "--all", "--check"])?;
    // The workspace, the Python package included (not a default member: building it links
    // libpython; checking it does not).
    cargo(&[
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "nvcim-firmware",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "clippy",
        "--release",
        "-p",
        "nvcim-firmware",
        "--target",
        "thumbv7em-none-eabihf",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "nvcim-firmware",
        "--exclude",
        "nvcim-python",
    ])?;
    one_build()?;
    cluster::run(root, &nvcim_binary(root))?;
    wheel::test(root, &nvcim_binary(root))?;
    // The library's documentation: its crate-level example runs with the doc tests above, and
    // no intra-doc link of the `nvcim` crate may be broken.
    let cargo_bin = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step(
        Command::new(cargo_bin)
            .args(["doc", "--release", "--no-deps", "-p", "nvcim"])
            .env(
                "RUSTDOCFLAGS",
                "-D rustdoc::broken_intra_doc_links -D rustdoc::private_intra_doc_links",
            ),
        "cargo doc --release --no-deps -p nvcim (broken or private intra-doc links are errors)",
    )?;
    cargo(&["test", "--release", "-p", "nvcim-firmware", "--lib"])?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "nvcim-shared",
        "--target",
        "thumbv7em-none-eabihf",
    ])?;
    eprintln!(
        "\nall checks passed in {:.1} min",
        t.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn demo(root: &Path) -> Result<()> {
    demo::run(root)
}

fn bench(root: &Path, what: &[String]) -> Result<()> {
    match what.first().map(String::as_str).unwrap_or("all") {
        "variation" => bench::variation(root),
        "engine" => bench::engine(root),
        "train" => bench::train(root),
        "layers" => bench::layers(root),
        "eval" => bench::eval(root),
        "onnx" => bench::onnx(root),
        "export" => bench::export(),
        "firmware" => bench::firmware(root),
        "python" => bench::python(root),
        "all" => bench::variation(root)
            .and_then(|()| bench::engine(root))
            .and_then(|()| bench::train(root))
            .and_then(|()| bench::layers(root))
            .and_then(|()| bench::eval(root))
            .and_then(|()| bench::onnx(root))
            .and_then(|()| bench::export())
            .and_then(|()| bench::firmware(root))
            .and_then(|()| bench::python(root)),
        other => bail!("unknown benchmark `{other}`\n{USAGE}"),
    }
}
