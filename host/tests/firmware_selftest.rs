//! Boots the firmware in QEMU: the kernel self-test (bit-exact SMLAD, fewer instructions per
//! MAC than plain Rust), and every documented exit path (bad arguments, blob validation,
//! panic, HardFault).
//!
//! Skips, saying so, only when `qemu-system-arm` is not installed (`cargo xtask setup`
//! installs it).

use std::{path::PathBuf, time::Duration};

use nvcim::firmware::{
    Build, ExitCode, Memory, QemuOutput, QemuRun, find_qemu, firmware_elf, kernel_benches,
};

fn firmware() -> Option<PathBuf> {
    if let Err(e) = find_qemu() {
        println!("SKIPPED: {e:#}");
        return None;
    }
    Some(firmware_elf(Build::Always).expect("building the firmware"))
}

fn boot(elf: &PathBuf, args: &[&str], blob: Option<&std::path::Path>) -> QemuOutput {
    let mut run = QemuRun::new(elf)
        .args(args.iter().copied())
        .timeout(Duration::from_secs(120));
    if let Some(b) = blob {
        run = run.blob(b);
    }
    run.run().expect("running QEMU")
}

#[test]
fn selftest_is_bit_exact_and_smlad_is_cheaper() {
    let Some(elf) = firmware() else { return };
    let out = boot(&elf, &["selftest", "--seed", "7", "--cases", "8"], None);
    let text = out.lines.join("\n");
    assert_eq!(
        out.exit_code(),
        Some(ExitCode::Ok),
        "{text}\n{}",
        out.stderr
    );
    for kernel in ["dot_i8", "dot_i16"] {
        let l = out
            .line(&format!("selftest {kernel} "))
            .unwrap_or_else(|| panic!("no {kernel} line:\n{text}"));
        assert!(l.ends_with("comparisons bit-exact"), "{l}");
        let n: u32 = l
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .expect("a count");
        assert!(n > 1000, "{l}");
    }
    // The assembly tile programmer against `program_layer`: 4 cases x 5 lengths x 6 sigmas x
    // 2 profiles x 2 alignments.
    let l = out
        .line("selftest program ")
        .unwrap_or_else(|| panic!("no program line:\n{text}"));
    assert_eq!(l, "selftest program 480 comparisons bit-exact");
    assert!(out.line("selftest ok").is_some(), "{text}");
    assert!(out.line("memory code ").is_some(), "{text}");

    let benches = kernel_benches(&out.lines).expect("bench lines parse");
    for kernel in ["dot_i8", "dot_i16"] {
        for len in [256usize, 4096] {
            let get = |variant: &str| {
                benches
                    .iter()
                    .find(|b| b.name == kernel && b.variant == variant && b.len == Some(len))
                    .unwrap_or_else(|| panic!("no {kernel} {variant} len {len} bench:\n{text}"))
                    .per_op
            };
            let (plain, smlad) = (get("plain"), get("smlad"));
            assert!(
                smlad > 0.0 && smlad < plain,
                "{kernel} len {len}: smlad {smlad} vs plain {plain}"
            );
        }
    }
}

#[test]
fn exit_codes_reach_the_shell() {
    let Some(elf) = firmware() else { return };
    let cases: [(&[&str], ExitCode, &str); 4] = [
        (
            &["fly"],
            ExitCode::BadArguments,
            "error: unknown verb `fly`",
        ),
        (
            &["run", "--sigma", "-1"],
            ExitCode::BadArguments,
            "error: bad value `-1` for `--sigma`",
        ),
        (&["crash", "panic"], ExitCode::Panic, "panic: "),
        (
            &["crash", "hardfault"],
            ExitCode::HardFault,
            "HardFault at pc ",
        ),
    ];
    for (args, code, line) in cases {
        let out = boot(&elf, args, None);
        assert_eq!(out.exit_code(), Some(code), "{args:?}: {:?}", out.lines);
        assert!(
            out.lines.iter().any(|l| l.starts_with(line)),
            "{args:?}: {:?}",
            out.lines
        );
    }
}

#[test]
fn a_hung_firmware_is_killed_at_the_timeout() {
    let Some(elf) = firmware() else { return };
    let started = std::time::Instant::now();
    let err = QemuRun::new(&elf)
        .args(["crash", "hang"])
        .timeout(Duration::from_secs(2))
        .run()
        .expect_err("a hang must time out");
    assert!(
        format!("{err:#}").contains("did not finish within 2s"),
        "{err:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn blob_is_validated_and_reported() {
    let Some(elf) = firmware() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let image = nvcim_firmware::testmodel::small(8);
    let good = dir.path().join("good.cimb");
    std::fs::write(&good, &image).unwrap();

    let out = boot(&elf, &["check"], Some(&good));
    assert_eq!(out.exit_code(), Some(ExitCode::Ok), "{:?}", out.lines);
    let line = out.line("blob ok").expect("a blob line");
    assert!(
        line.starts_with(&format!("blob ok model {} B ops 6 layers 4 ", image.len())),
        "{line}"
    );
    assert!(line.ends_with("test images 8 classes 4"), "{line}");
    let mem = Memory::last(&out.lines).expect("a memory line");
    assert_eq!(mem.psram, image.len() as u64);
    assert!(
        mem.code > 1024 && mem.code < 4 << 20 && mem.stack > 0,
        "{mem:?}"
    );

    // No blob at all, then one flipped byte: the documented code and message, no hang.
    let out = boot(&elf, &["check"], None);
    assert_eq!(
        out.exit_code(),
        Some(ExitCode::BlobInvalid),
        "{:?}",
        out.lines
    );
    assert!(
        out.line("error: blob: not a packed nvcim model").is_some(),
        "{:?}",
        out.lines
    );
    let mut bad = image.clone();
    bad[200] ^= 0x01;
    let flipped = dir.path().join("flipped.cimb");
    std::fs::write(&flipped, &bad).unwrap();
    let out = boot(&elf, &["check"], Some(&flipped));
    assert_eq!(
        out.exit_code(),
        Some(ExitCode::BlobInvalid),
        "{:?}",
        out.lines
    );
    assert!(
        out.line("error: blob: packed model is corrupt: CRC-32")
            .is_some(),
        "{:?}",
        out.lines
    );

    // A header claiming more than PSRAM holds: "does not fit".
    let mut huge = image;
    huge[72..76].copy_from_slice(&(20u32 << 20).to_le_bytes());
    let big = dir.path().join("huge.cimb");
    std::fs::write(&big, &huge).unwrap();
    let out = boot(&elf, &["check"], Some(&big));
    assert_eq!(
        out.exit_code(),
        Some(ExitCode::DoesNotFit),
        "{:?}",
        out.lines
    );
}
