//! The two ways of running the firmware's Monte Carlo loop besides QEMU, and the comparison
//! with the host: [`simulate`] runs the firmware's portable loop in process, [`host_counts`]
//! recomputes every run with the host's integer engine ([`crate::engine::int::int_run`]), and
//! [`compare`] checks the firmware's `run R correct C of N` lines against those counts.

use anyhow::{Result, bail};
use nvcim_firmware::{
    args::{Command, parse},
    mc,
    stats::{Accumulator, RunLine},
};
use nvcim_shared::{format::Model, tile::Plain};

/// The portable Monte Carlo loop in process: the lines the firmware prints.
pub fn simulate(blob: &[u8], words: &[String]) -> Result<Vec<String>> {
    let line = format!("nvcim-firmware {}", words.join(" "));
    let Command::Run(a) = parse(&line).map_err(|e| anyhow::anyhow!("{e}"))? else {
        bail!("not a `run` command line: {line}");
    };
    let model = Model::parse(blob).map_err(|e| anyhow::anyhow!("invalid packed model: {e}"))?;
    let plan = mc::plan(&model, &a).map_err(|e| anyhow::anyhow!("{e}"))?;
    let need = mc::needs(&plan);
    let (mut state, mut act, mut patch, mut logits) = (
        vec![0i16; need.state],
        vec![0u8; need.scratch.act_bytes],
        vec![0i16; need.scratch.patch],
        vec![0i32; need.scratch.logits],
    );
    let mut bufs = mc::Buffers {
        state: &mut state,
        act: &mut act,
        patch: &mut patch,
        logits: &mut logits,
    };
    let mut out = String::new();
    mc::run::<Plain>(&plan, &mut bufs, &mut out, &mut mc::NoClock)
        .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The host integer engine's correct count of every run, computed independently of the
/// firmware's loop (same plan: variation, path, tiles, seed).
pub fn host_counts(blob: &[u8], words: &[String]) -> Result<Vec<u32>> {
    let line = format!("nvcim {}", words.join(" "));
    let Command::Run(a) = parse(&line).map_err(|e| anyhow::anyhow!("{e}"))? else {
        bail!("not a `run` command line: {line}");
    };
    let model = Model::parse(blob).map_err(|e| anyhow::anyhow!("invalid packed model: {e}"))?;
    let plan = mc::plan(&model, &a).map_err(|e| anyhow::anyhow!("{e}"))?;
    (0..plan.mc)
        .map(|r| {
            let c =
                crate::engine::int::int_run(&plan.model, plan.path, &plan.variation, plan.seed, r)?;
            Ok(c as u32)
        })
        .collect()
}

/// The comparison of the firmware's lines with the host's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// Runs whose correct counts agree.
    pub agreeing: usize,
    /// Runs expected.
    pub runs: usize,
    /// Each disagreement, as a sentence.
    pub problems: Vec<String>,
}

/// Compares the firmware's `run` and `summary` lines with the host's counts.
pub fn compare(lines: &[String], host: &[u32], total: u32) -> Agreement {
    let mut problems = Vec::new();
    let mut agreeing = 0;
    let mut acc = Accumulator::new(total);
    for (r, &c) in host.iter().enumerate() {
        acc.push(c);
        let want = RunLine {
            run: r as u32,
            correct: c,
            total,
        }
        .to_string();
        let prefix = format!("run {r} correct ");
        match lines.iter().find(|l| l.starts_with(&prefix)) {
            Some(l) if *l == want => agreeing += 1,
            Some(l) => problems.push(format!("firmware `{l}`, host `{want}`")),
            None => problems.push(format!("no firmware line for run {r} (host `{want}`)")),
        }
    }
    let extra = lines.iter().filter(|l| l.starts_with("run ")).count();
    if extra != host.len() {
        problems.push(format!(
            "firmware printed {extra} run lines, expected {}",
            host.len()
        ));
    }
    if let Some(s) = acc.summary() {
        let want = s.to_string();
        match lines.iter().find(|l| l.starts_with("summary ")) {
            Some(l) if *l == want => {}
            Some(l) => problems.push(format!("firmware `{l}`, host `{want}`")),
            None => problems.push(format!("no firmware summary line (host `{want}`)")),
        }
    }
    Agreement {
        agreeing,
        runs: host.len(),
        problems,
    }
}

/// The lines of the Monte Carlo output the two paths must print identically.
pub fn mc_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("config ") || l.starts_with("run ") || l.starts_with("summary "))
        .cloned()
        .collect()
}
