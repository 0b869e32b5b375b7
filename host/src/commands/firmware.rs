//! `nvcim firmware run`: Monte Carlo inference of a packed model on the firmware, emulated
//! (QEMU, the real Cortex-M4F image) or simulated (the firmware's portable loop in process),
//! compared run by run with the host's integer engine.
//!
//! Both paths print the firmware's lines (`config`, `run R correct C of N`, `summary ...`);
//! this verb parses them, recomputes every run on the host with the integer engine of `nvcim
//! eval --engine int` (`engine::int::int_run`), prints the agreement and fails on any difference.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use nvcim_shared::format::Model;

use crate::{
    firmware::{
        Build, ExitCode, Memory, QemuRun,
        compare::{compare, host_counts, mc_lines, simulate},
        firmware_elf,
    },
    options::{DeviceProfile, Unit},
};

/// `nvcim firmware ...`
#[derive(Debug, Args)]
pub struct FirmwareArgs {
    /// What to run on the firmware.
    #[command(subcommand)]
    pub command: FirmwareCommand,
}

/// The firmware verbs.
#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Monte Carlo inference of a packed model on the firmware, checked against the host engine.
    Run(RunArgs),
    /// Instruction counts in QEMU (`-icount shift=0`) on VGG-8 w0.25 with random weights.
    Bench(BenchArgs),
}

/// `nvcim firmware bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Test images per run.
    #[arg(long, default_value_t = 2)]
    pub images: usize,
    /// Monte Carlo runs.
    #[arg(long, default_value_t = 1)]
    pub mc: u32,
    /// Device sigma (range convention).
    #[arg(long, default_value_t = 0.4)]
    pub sigma: f32,
    /// Kill QEMU after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// `nvcim firmware run MODEL.cimb --mc N --sigma S [--seed K] [--emulated | --simulated]`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The packed model (`.cimb`, with its test batch).
    pub model: PathBuf,
    /// Monte Carlo runs.
    #[arg(long, default_value_t = 5)]
    pub mc: u32,
    /// Device sigma (default: the model's packed sigma), in the convention of --sigma-unit.
    #[arg(long)]
    pub sigma: Option<f32>,
    /// Sigma convention (default: the model's).
    #[arg(long = "sigma-unit", value_enum)]
    pub unit: Option<Unit>,
    /// Variation profile (default: the model's).
    #[arg(long, value_enum)]
    pub profile: Option<DeviceProfile>,
    /// Seed of the variation streams (seed, run, layer).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Crossbar tile rows (default: the model's).
    #[arg(long)]
    pub tile_rows: Option<u32>,
    /// Crossbar tile columns (default: the model's).
    #[arg(long)]
    pub tile_cols: Option<u32>,
    /// ADC bits, 2..=16 (default: ideal ADC, the collapsed fast path).
    #[arg(long)]
    pub adc_bits: Option<u8>,
    /// Boot the Cortex-M4F firmware in QEMU (the default).
    #[arg(long, conflicts_with = "simulated")]
    pub emulated: bool,
    /// Run the firmware's portable loop in this process instead.
    #[arg(long)]
    pub simulated: bool,
    /// Kill QEMU after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Not supported by the firmware (refused with an explanation): BatchNorm is folded into
    /// the packed requantization records, and the firmware has no training images to
    /// re-estimate it from. Use `nvcim eval --engine int --bn-recalibrate N` on the host.
    #[arg(long, value_name = "N")]
    pub bn_recalibrate: Option<usize>,
}

/// Dispatches `nvcim firmware ...`.
pub fn run(args: &FirmwareArgs) -> Result<()> {
    match &args.command {
        FirmwareCommand::Run(a) => run_mc(a),
        FirmwareCommand::Bench(a) => bench(a),
    }
}

impl RunArgs {
    /// The firmware's `-append` words for these options (also parsed for the simulated path,
    /// so both paths read the options the same way).
    pub fn firmware_words(&self) -> Vec<String> {
        let mut w = vec![
            "run".to_string(),
            "--mc".into(),
            self.mc.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        let mut flag = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                w.push(name.to_string());
                w.push(v);
            }
        };
        flag("--sigma", self.sigma.map(|s| s.to_string()));
        flag(
            "--sigma-unit",
            self.unit.map(|u| match u {
                Unit::Range => "range".into(),
                Unit::Level => "level".into(),
            }),
        );
        flag(
            "--profile",
            self.profile
                .map(|p| nvcim_shared::variation::Profile::from(p).name().to_string()),
        );
        flag("--tile-rows", self.tile_rows.map(|v| v.to_string()));
        flag("--tile-cols", self.tile_cols.map(|v| v.to_string()));
        flag("--adc-bits", self.adc_bits.map(|v| v.to_string()));
        w
    }
}

fn run_mc(a: &RunArgs) -> Result<()> {
    if let Some(n) = a.bn_recalibrate {
        bail!(
            "--bn-recalibrate {n}: the firmware cannot recalibrate BatchNorm (the packed model \
             folds it into fixed requantization records and carries no training images); run \
             `nvcim eval RUN_DIR --engine int --bn-recalibrate {n}` on the host, which computes \
             the same integer arithmetic with each run's recalibrated records"
        );
    }
    ensure!(a.mc > 0, "--mc must be at least 1");
    let blob = std::fs::read(&a.model)
        .with_context(|| format!("reading packed model {}", a.model.display()))?;
    let model = Model::parse(&blob)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("parsing packed model {}", a.model.display()))?;
    let total = model.test_len() as u32;
    ensure!(
        total > 0,
        "{} has no test batch; pack it with test images",
        a.model.display()
    );
    let words = a.firmware_words();
    let (lines, how) = if a.simulated {
        (simulate(&blob, &words)?, "simulated")
    } else {
        let elf = firmware_elf(Build::Always)?;
        let out = QemuRun::new(&elf)
            .args(words.iter().map(String::as_str))
            .blob(&a.model)
            .timeout(Duration::from_secs(a.timeout_s))
            .run()?;
        if out.exit_code() != Some(ExitCode::Ok) {
            bail!(
                "the firmware exited with {} ({}):\n{}",
                out.code,
                out.exit_code().map_or("unknown code", ExitCode::describe),
                out.lines.join("\n")
            );
        }
        for l in out
            .lines
            .iter()
            .filter(|l| l.starts_with("insn ") || l.starts_with("memory model "))
        {
            println!("{l}");
        }
        if let Some(m) = Memory::last(&out.lines) {
            println!(
                "memory code {} B ram {} B stack {} B psram {} B",
                m.code, m.ram, m.stack, m.psram
            );
        }
        (out.lines, "emulated")
    };
    for l in mc_lines(&lines) {
        println!("{l}");
    }
    let host = host_counts(&blob, &words)?;
    let agreement = compare(&lines, &host, total);
    println!(
        "agreement {how} vs host engine: {} of {} runs identical{}",
        agreement.agreeing,
        agreement.runs,
        if agreement.problems.is_empty() {
            ", summary identical"
        } else {
            ""
        }
    );
    if !agreement.problems.is_empty() {
        bail!(
            "the firmware disagrees with the host engine:\n{}",
            agreement.problems.join("\n")
        );
    }
    Ok(())
}

/// Packs VGG-8 w0.25 (random weights), runs it on the emulated firmware and prints the
/// instruction figures the firmware reports: per sampled device deviation while programming,
/// per image and per MAC of the conv/linear layers while classifying (the whole inference:
/// patch gathers, requantization and pooling included).
fn bench(a: &BenchArgs) -> Result<()> {
    ensure!(
        a.images > 0 && a.mc > 0,
        "--images and --mc must be at least 1"
    );
    let blob = nvcim_firmware::testmodel::vgg8_w025(a.images, a.sigma)
        .map_err(|e| anyhow::anyhow!("packing VGG-8 w0.25: {e}"))?;
    let dir = std::env::temp_dir().join(format!("nvcim-fw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("vgg8_w025.cimb");
    std::fs::write(&path, &blob).with_context(|| format!("writing {}", path.display()))?;
    let elf = firmware_elf(Build::Always)?;
    let words = [
        "run".to_string(),
        "--mc".into(),
        a.mc.to_string(),
        "--sigma".into(),
        a.sigma.to_string(),
    ];
    let out = QemuRun::new(&elf)
        .args(words.iter().map(String::as_str))
        .blob(&path)
        .timeout(Duration::from_secs(a.timeout_s))
        .run();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if out.exit_code() != Some(ExitCode::Ok) {
        bail!(
            "the firmware exited with {}:\n{}",
            out.code,
            out.lines.join("\n")
        );
    }
    println!(
        "model VGG-8 w0.25 1x32x32, {} B packed, sigma {} range",
        blob.len(),
        a.sigma
    );
    for l in out
        .lines
        .iter()
        .filter(|l| l.starts_with("insn ") || l.starts_with("memory ") || l.starts_with("blob ok"))
    {
        println!("{l}");
    }
    Ok(())
}
