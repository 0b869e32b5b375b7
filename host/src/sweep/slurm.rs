//! The Slurm scripts of `nvcim sweep PLAN --emit slurm`: a job array with one cell per task, a
//! merge job that depends on it, and `submit.sh` that submits both.
//!
//! What makes them work on a real cluster, not only here:
//! - every path in them is absolute, and the tasks `--chdir` to the directory the scripts were
//!   written from, so relative paths in the plan (`data_dir`) mean what they mean locally;
//! - the binary is `$NVCIM_BIN` when set at submission (`sbatch --export=ALL,NVCIM_BIN=...`),
//!   else the one that wrote the scripts, and a task says clearly when it is not executable;
//! - `partition`, `time`, `gres`, `cpus_per_task`, `mem`, `account` and free `directives` of the
//!   plan's `[slurm]` table become `#SBATCH` lines;
//! - each task logs to `OUT/logs/<job>-<array job>_<task>.out` (the directory is created when the
//!   scripts are written: Slurm does not create it), beside the cell's own `train.log` and
//!   `eval.log`;
//! - exit codes propagate: a task `exec`s `nvcim sweep --cell i`, which exits non-zero when its
//!   cell fails, so the task is FAILED in `sacct`; the merge job (`nvcim sweep --merge`, after
//!   every task, `afterany`) writes the tables of the finished cells and exits non-zero naming
//!   each missing cell, its array index and its log.

use std::{fmt::Write as _, path::Path};

use anyhow::{Result, bail};

use super::Plan;

/// The folder under the sweep's output directory that holds the Slurm logs.
pub const LOG_DIR: &str = "logs";

/// Quotes an argument for a POSIX shell when needed.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,=:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command line as shell text, `program args...`.
pub fn shell_line(program: &str, args: &[String]) -> String {
    std::iter::once(shell_quote(program))
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `#SBATCH` lines of the plan's `[slurm]` table (`array`: for the array job, else the merge
/// job, which takes only partition, time and account).
fn directives(plan: &Plan, array: bool) -> Vec<String> {
    let s = &plan.slurm;
    let mut d = Vec::new();
    let mut opt = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            d.push(format!("--{k}={v}"));
        }
    };
    opt("partition", &s.partition);
    opt("account", &s.account);
    if array {
        opt("time", &s.time);
        opt("gres", &s.gres);
        opt("mem", &s.mem);
        let cpus = s.cpus_per_task.or_else(|| {
            // The historical default, unless free directives already set the cores or a GPU.
            (!s.directives.iter().any(|x| x.starts_with("--gres"))
                && s.gres.is_none()
                && !s
                    .directives
                    .iter()
                    .any(|x| x.starts_with("--cpus-per-task")))
            .then_some(8)
        });
        if let Some(c) = cpus {
            d.push(format!("--cpus-per-task={c}"));
        }
        d.extend(s.directives.iter().cloned());
    } else {
        // The merge job reads JSON and draws a few plots: minutes at most.
        d.push("--time=00:30:00".into());
        d.push("--cpus-per-task=1".into());
    }
    d
}

/// `--chdir` to the directory the scripts were written from, so that relative paths in the plan
/// (`data_dir`, `train_args`) mean in a task what they mean in a local `nvcim sweep`.
fn chdir_line(w: &mut String, workdir: &Path) -> Result<()> {
    let d = workdir.display().to_string();
    if d.chars().any(|c| c.is_whitespace() || c == '"') {
        bail!(
            "the working directory {d} has a space or quote, which `#SBATCH --chdir` cannot \
             carry; write the scripts from a directory without one"
        );
    }
    writeln!(w, "#SBATCH --chdir={d}")?;
    Ok(())
}

/// The lines that pick the binary: `$NVCIM_BIN` or the one that wrote the script.
fn binary_lines(w: &mut String, nvcim: &str) -> Result<()> {
    writeln!(
        w,
        "NVCIM=\"${{NVCIM_BIN:-{}}}\"",
        nvcim.replace('"', "\\\"")
    )?;
    writeln!(w, "if [ ! -x \"$NVCIM\" ]; then")?;
    writeln!(
        w,
        "    echo \"nvcim: the binary $NVCIM is not executable on $(hostname); submit with \
         sbatch --export=ALL,NVCIM_BIN=/path/to/nvcim\" >&2"
    )?;
    writeln!(w, "    exit 2")?;
    writeln!(w, "fi")?;
    Ok(())
}

/// The Slurm job-array script: array task `i` runs cell `i` (train, then eval), skipping
/// finished work exactly as a local sweep does, by running `nvcim sweep PLAN --cell i --resume`.
pub fn slurm_script(
    plan: &Plan,
    plan_path: &Path,
    out: &Path,
    workdir: &Path,
    nvcim: &str,
    n_cells: usize,
) -> Result<String> {
    if n_cells == 0 {
        bail!("the plan has no cells");
    }
    let plan_arg = shell_quote(&plan_path.display().to_string());
    let out_arg = shell_quote(&out.display().to_string());
    let logs = shell_quote(&out.join(LOG_DIR).display().to_string());
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "#!/bin/bash")?;
    writeln!(
        w,
        "# Slurm job array for the nvcim sweep plan `{}`: one cell per array task.",
        plan.name
    )?;
    writeln!(w, "# Submit both jobs: bash {out_arg}/submit.sh")?;
    writeln!(
        w,
        "# One task again:   sbatch --array=I {out_arg}/sweep.sbatch"
    )?;
    writeln!(w, "#SBATCH --job-name=nvcim-{}", plan.name)?;
    writeln!(w, "#SBATCH --array=0-{}", n_cells - 1)?;
    writeln!(w, "#SBATCH --output={logs}/%x-%A_%a.out")?;
    chdir_line(w, workdir)?;
    for d in directives(plan, true) {
        writeln!(w, "#SBATCH {d}")?;
    }
    writeln!(w, "set -euo pipefail")?;
    binary_lines(w, nvcim)?;
    writeln!(
        w,
        "echo \"nvcim sweep {}: array task $SLURM_ARRAY_TASK_ID of job ${{SLURM_ARRAY_JOB_ID:-?}} on $(hostname)\"",
        plan.name
    )?;
    writeln!(
        w,
        "exec \"$NVCIM\" sweep {plan_arg} --out {out_arg} --cell \"$SLURM_ARRAY_TASK_ID\" --resume"
    )?;
    Ok(s)
}

/// The merge job: `nvcim sweep PLAN --merge`, the tables of every finished cell; it exits
/// non-zero naming the cells that are missing (their tables are still written).
pub fn merge_script(
    plan: &Plan,
    plan_path: &Path,
    out: &Path,
    workdir: &Path,
    nvcim: &str,
) -> Result<String> {
    let plan_arg = shell_quote(&plan_path.display().to_string());
    let out_arg = shell_quote(&out.display().to_string());
    let logs = shell_quote(&out.join(LOG_DIR).display().to_string());
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "#!/bin/bash")?;
    writeln!(
        w,
        "# Merge step of the nvcim sweep `{}`: the paper's tables from every finished cell.",
        plan.name
    )?;
    writeln!(w, "#SBATCH --job-name=nvcim-{}-merge", plan.name)?;
    writeln!(w, "#SBATCH --output={logs}/%x-%j.out")?;
    chdir_line(w, workdir)?;
    for d in directives(plan, false) {
        writeln!(w, "#SBATCH {d}")?;
    }
    writeln!(w, "set -euo pipefail")?;
    binary_lines(w, nvcim)?;
    writeln!(
        w,
        "exec \"$NVCIM\" sweep {plan_arg} --out {out_arg} --merge"
    )?;
    Ok(s)
}

/// `submit.sh`: submits the array, then the merge job with `afterany` on it; prints both ids
/// as `submitted array job J (N cells) and merge job M`.
pub fn submit_script(out: &Path, n_cells: usize) -> Result<String> {
    let out_arg = shell_quote(&out.display().to_string());
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "#!/bin/bash")?;
    writeln!(
        w,
        "# Submits the sweep's job array and its merge job; extra arguments go to both sbatch calls."
    )?;
    writeln!(w, "set -euo pipefail")?;
    writeln!(w, "jid=$(sbatch --parsable \"$@\" {out_arg}/sweep.sbatch)")?;
    writeln!(w, "jid=${{jid%%;*}}")?;
    writeln!(
        w,
        "mid=$(sbatch --parsable \"$@\" --dependency=afterany:\"$jid\" {out_arg}/merge.sbatch)"
    )?;
    writeln!(w, "mid=${{mid%%;*}}")?;
    writeln!(
        w,
        "echo \"submitted array job $jid ({n_cells} cells) and merge job $mid\""
    )?;
    writeln!(
        w,
        "echo \"follow: squeue -j $jid,$mid; logs in {}\"",
        out.join(LOG_DIR).display()
    )?;
    Ok(s)
}
