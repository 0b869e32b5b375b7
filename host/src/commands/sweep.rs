//! `nvcim sweep PLAN.toml`: run a grid of train + eval cells (see [`crate::sweep`] and
//! [`crate::sweep::run`]).
//!
//! Each cell runs `nvcim train` and then `nvcim eval` as subprocesses of this same binary, with
//! their output in `CELL/train.log` and `CELL/eval.log`. Finished cells (`eval/eval.json`) are
//! skipped; a cell whose training stopped part-way is continued with `nvcim train --resume` when
//! `--resume` is given (and refused otherwise, so nothing is silently overwritten). A failing
//! cell does not stop the others; the sweep exits non-zero at the end if any failed.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};

use crate::sweep::{
    Cell, Plan,
    run::{dry_run, emit_slurm, merge, run_cells},
};

/// What `--emit` writes instead of running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// A Slurm job-array script (one cell per array task) and the merge job.
    Slurm,
}

/// Arguments of `nvcim sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// The plan (TOML; see `plans/`).
    pub plan: PathBuf,
    /// Output directory (default: the plan's `out`, else `runs/<name>`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Cells run at the same time.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// List the cells, their state and the commands that would run; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue cells whose training stopped part-way (`nvcim train --resume`).
    #[arg(long)]
    pub resume: bool,
    /// Run only the cell with this index (what a Slurm array task does).
    #[arg(long, value_name = "INDEX")]
    pub cell: Option<usize>,
    /// Write a cluster script into the output directory instead of running.
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// Merge instead of running: the report of every finished cell into OUT/report; fails
    /// naming the cells that are missing (what the Slurm merge job runs).
    #[arg(long, conflicts_with_all = ["emit", "dry_run", "cell"])]
    pub merge: bool,
    /// The nvcim binary the cells run (default: this one).
    #[arg(long, value_name = "PATH")]
    pub nvcim: Option<PathBuf>,
}

/// Runs `nvcim sweep`.
pub fn run(args: &SweepArgs) -> Result<()> {
    let plan = Plan::load(&args.plan)?;
    let out = plan.out_dir(args.out.as_deref());
    let cells = plan.cells();
    ensure!(args.jobs > 0, "--jobs must be at least 1");
    let nvcim = match &args.nvcim {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the nvcim binary")?,
    };
    let selected: Vec<(usize, &Cell)> = match args.cell {
        Some(i) => {
            ensure!(
                i < cells.len(),
                "--cell {i} is out of range: the plan has {} cells (0..{})",
                cells.len(),
                cells.len().saturating_sub(1)
            );
            vec![(i, &cells[i])]
        }
        None => cells.iter().enumerate().collect(),
    };

    if let Some(Emit::Slurm) = args.emit {
        return emit_slurm(&plan, &args.plan, &out, &nvcim, cells.len());
    }
    if args.merge {
        return merge(&plan, &out);
    }
    if args.dry_run {
        return dry_run(&plan, &out, &nvcim, &selected, args.resume);
    }

    run_cells(
        &plan,
        &out,
        &nvcim,
        &selected,
        args.jobs,
        args.resume,
        args.cell.is_some(),
    )
}
