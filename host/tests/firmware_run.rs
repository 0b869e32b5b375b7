//! Monte Carlo inference on the firmware (issue 7): a small conv model packed here and the
//! checked-in reference model (`models/`), booted in
//! QEMU with mc 5 under two seeds and sigmas, every run's correct count and the summary equal
//! to the host integer engine's; the simulated path prints the same lines; a flipped byte is
//! exit 3 with the parser's message, without a hang.
//!
//! The expected lines are also a golden file, `firmware/tests/expected/run_small.txt`; rewrite
//! it with `NVCIM_BLESS=1 cargo test -p nvcim --release --test firmware_run` only in a commit
//! that says why the numbers changed.
//!
//! The QEMU parts skip, saying so, only when `qemu-system-arm` is not installed.

use std::{path::Path, process::Command, time::Duration};

use nvcim::firmware::{
    Build, ExitCode, Memory, QemuOutput, QemuRun,
    compare::{compare, host_counts, mc_lines, simulate},
    find_qemu, firmware_elf,
};
use nvcim_firmware::testmodel;

mod common;

const IMAGES: usize = 32;
/// (seed, sigma) of the two configurations.
const CONFIGS: [(u64, &str); 2] = [(7, "0.3"), (2026, "0.6")];

fn words(seed: u64, sigma: &str) -> Vec<String> {
    [
        "run",
        "--mc",
        "5",
        "--seed",
        &seed.to_string(),
        "--sigma",
        sigma,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn boot(elf: &Path, words: &[String], blob: &Path) -> QemuOutput {
    QemuRun::new(elf)
        .args(words.iter().map(String::as_str))
        .blob(blob)
        .timeout(Duration::from_secs(120))
        .run()
        .expect("running QEMU")
}

fn golden() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware/tests/expected/run_small.txt")
}

/// The simulated lines of both configurations, compared with the golden file (or written to
/// it under `NVCIM_BLESS=1`), and each run checked against the host engine.
#[test]
fn simulated_runs_match_the_host_engine_and_the_golden_file() {
    let blob = testmodel::small(IMAGES);
    let mut all = Vec::new();
    for (seed, sigma) in CONFIGS {
        let w = words(seed, sigma);
        let lines = simulate(&blob, &w).unwrap();
        let host = host_counts(&blob, &w).unwrap();
        let a = compare(&lines, &host, IMAGES as u32);
        assert!(
            a.problems.is_empty(),
            "{:?}\n{}",
            a.problems,
            lines.join("\n")
        );
        assert_eq!(a.agreeing, 5);
        all.extend(mc_lines(&lines));
    }
    let text = all.join("\n") + "\n";
    common::golden(&golden(), &text);
    // The noise moves the counts: some summary has a non-zero spread.
    assert!(
        all.iter()
            .any(|l| l.starts_with("summary ") && !l.contains("std 0.0000")),
        "{text}"
    );
}

#[test]
fn emulated_runs_equal_the_host_engine_and_the_simulation() {
    if let Err(e) = find_qemu() {
        println!("SKIPPED: {e:#}");
        return;
    }
    let elf = firmware_elf(Build::Always).expect("building the firmware");
    let dir = tempfile::tempdir().unwrap();
    let blob = testmodel::small(IMAGES);
    let path = dir.path().join("small.cimb");
    std::fs::write(&path, &blob).unwrap();
    for (seed, sigma) in CONFIGS {
        let w = words(seed, sigma);
        let out = boot(&elf, &w, &path);
        let text = out.lines.join("\n");
        assert_eq!(
            out.exit_code(),
            Some(ExitCode::Ok),
            "{text}\n{}",
            out.stderr
        );
        let host = host_counts(&blob, &w).unwrap();
        let a = compare(&out.lines, &host, IMAGES as u32);
        assert!(a.problems.is_empty(), "{:?}\n{text}", a.problems);
        assert_eq!(a.agreeing, 5, "{text}");
        assert_eq!(mc_lines(&out.lines), simulate(&blob, &w).unwrap(), "{text}");
        let mem = Memory::last(&out.lines).expect("a memory line");
        let weights = nvcim_shared::format::Model::parse(&blob)
            .unwrap()
            .weight_count();
        assert!(mem.psram >= (blob.len() + 2 * weights) as u64, "{mem:?}");
        assert!(
            out.line("insn infer ").is_some() && out.line("insn program ").is_some(),
            "{text}"
        );
    }

    // One flipped byte: exit 3 with the parser's message, no hang.
    let mut bad = blob.clone();
    bad[blob.len() / 2] ^= 0x04;
    let flipped = dir.path().join("flipped.cimb");
    std::fs::write(&flipped, &bad).unwrap();
    let out = boot(&elf, &words(7, "0.3"), &flipped);
    assert_eq!(
        out.exit_code(),
        Some(ExitCode::BlobInvalid),
        "{:?}",
        out.lines
    );
    assert!(
        out.lines
            .iter()
            .any(|l| l.starts_with("error: blob: packed model is corrupt: CRC-32")),
        "{:?}",
        out.lines
    );

    // The verb, end to end: emulated and simulated both agree and say so, on the collapsed
    // path and on the sliced path through a 6-bit ADC on 16-row tiles.
    for how in [
        &["--emulated"][..],
        &["--simulated"],
        &["--emulated", "--adc-bits", "6", "--tile-rows", "16"],
        &["--simulated", "--adc-bits", "6", "--tile-rows", "16"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_nvcim"))
            .args(["firmware", "run"])
            .arg(&path)
            .args(["--mc", "3", "--sigma", "0.5", "--seed", "3"])
            .args(how)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{how:?}: {stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.contains("3 of 3 runs identical, summary identical"),
            "{how:?}: {stdout}"
        );
    }
}

/// The checked-in reference model (`models/`, VGG-8 w0.25 trained by nvcim with nft), the
/// model-card configuration and another seed and sigma: QEMU exits 0, every run and the summary
/// equal the host integer engine's, and the lines equal the golden file
/// `firmware/tests/expected/run_reference.txt` (rewritten only under `NVCIM_BLESS=1`).
#[test]
fn reference_model_in_qemu_equals_the_host_and_the_golden_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("models/vgg8-w0.25-fmnist-nft.cimb");
    let blob = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let model = nvcim_shared::format::Model::parse(&blob).expect("the reference model parses");
    let images = model.test_len() as u32;
    assert!(images >= 16, "the reference model carries its test batch");
    if let Err(e) = find_qemu() {
        println!("SKIPPED: {e:#}");
        return;
    }
    let elf = firmware_elf(Build::Always).expect("building the firmware");
    let mut all = Vec::new();
    for (seed, sigma) in [(1, "0.4"), (2027, "0.6")] {
        let w = words(seed, sigma);
        let out = QemuRun::new(&elf)
            .args(w.iter().map(String::as_str))
            .blob(&path)
            .timeout(Duration::from_secs(600))
            .run()
            .expect("running QEMU");
        let text = out.lines.join("\n");
        assert_eq!(
            out.exit_code(),
            Some(ExitCode::Ok),
            "{text}\n{}",
            out.stderr
        );
        let host = host_counts(&blob, &w).unwrap();
        let a = compare(&out.lines, &host, images);
        assert!(a.problems.is_empty(), "{:?}\n{text}", a.problems);
        assert_eq!(a.agreeing, 5, "{text}");
        all.extend(mc_lines(&out.lines));
    }
    let text = all.join("\n") + "\n";
    common::golden(
        &root.join("firmware/tests/expected/run_reference.txt"),
        &text,
    );
}
