//! The Slurm scripts of `nvcim sweep PLAN --emit slurm`: a job array with one cell per task,
//! and a merge job that depends on it.

use std::{fmt::Write as _, path::Path};

use anyhow::{Result, bail};

use super::Plan;

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

/// The Slurm job-array script: array task `i` runs cell `i` (train, then eval), skipping
/// finished work exactly as a local sweep does, by running `nvcim sweep PLAN --cell i`.
/// The merge step (`nvcim report`) is printed for a dependent job.
pub fn slurm_script(
    plan: &Plan,
    plan_path: &Path,
    out: &Path,
    nvcim: &str,
    n_cells: usize,
) -> Result<String> {
    if n_cells == 0 {
        bail!("the plan has no cells");
    }
    let plan_arg = shell_quote(&plan_path.display().to_string());
    let out_arg = shell_quote(&out.display().to_string());
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "#!/bin/bash")?;
    writeln!(
        w,
        "# Slurm job array for the nvcim sweep plan `{}`: one cell per array task.",
        plan.name
    )?;
    writeln!(
        w,
        "# Submit:  jid=$(sbatch --parsable {out_arg}/sweep.sbatch)"
    )?;
    writeln!(
        w,
        "# Merge:   sbatch --dependency=afterany:$jid {out_arg}/merge.sbatch"
    )?;
    writeln!(w, "#SBATCH --job-name=nvcim-{}", plan.name)?;
    writeln!(w, "#SBATCH --array=0-{}", n_cells - 1)?;
    writeln!(w, "#SBATCH --output={out_arg}/slurm-%A_%a.out")?;
    if plan.slurm.directives.is_empty() {
        writeln!(w, "#SBATCH --cpus-per-task=8")?;
    }
    for d in &plan.slurm.directives {
        writeln!(w, "#SBATCH {d}")?;
    }
    writeln!(w, "set -euo pipefail")?;
    writeln!(
        w,
        "exec {} sweep {plan_arg} --out {out_arg} --cell \"$SLURM_ARRAY_TASK_ID\" --resume",
        shell_quote(nvcim)
    )?;
    Ok(s)
}

/// The merge job: `nvcim report` over every cell's evaluation (cells that failed are skipped
/// with a warning, so one failed array task does not lose the others' tables).
pub fn merge_script(plan: &Plan, out: &Path, nvcim: &str) -> Result<String> {
    let out_arg = shell_quote(&out.display().to_string());
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "#!/bin/bash")?;
    writeln!(
        w,
        "# Merge step of the nvcim sweep `{}`: the paper's tables from every cell.",
        plan.name
    )?;
    writeln!(w, "#SBATCH --job-name=nvcim-{}-report", plan.name)?;
    writeln!(w, "#SBATCH --output={out_arg}/slurm-report-%j.out")?;
    writeln!(w, "set -euo pipefail")?;
    writeln!(
        w,
        "exec {} report {out_arg}/*/eval --out {out_arg}/report --allow-missing",
        shell_quote(nvcim)
    )?;
    Ok(s)
}
