//! `nvcim sweep PLAN.toml`: run a grid of train + eval cells (see [`crate::sweep`]).
//!
//! Each cell runs `nvcim train` and then `nvcim eval` as subprocesses of this same binary, with
//! their output in `CELL/train.log` and `CELL/eval.log`. Finished cells (`eval/eval.json`) are
//! skipped; a cell whose training stopped part-way is continued with `nvcim train --resume` when
//! `--resume` is given (and refused otherwise, so nothing is silently overwritten). A failing
//! cell does not stop the others; the sweep exits non-zero at the end if any failed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};

use crate::sweep::{
    Cell, CellState, Plan, TRAIN_DONE, cell_state, eval_command, merge_script, shell_line,
    slurm_script, train_command,
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
    /// The nvcim binary the cells run (default: this one).
    #[arg(long, value_name = "PATH")]
    pub nvcim: Option<PathBuf>,
}

/// What happened to a cell.
#[derive(Debug)]
enum Outcome {
    Skipped,
    Ran,
    Failed(anyhow::Error),
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
    if args.dry_run {
        println!(
            "plan {}: {} cells in {}",
            plan.name,
            cells.len(),
            out.display()
        );
        for (i, cell) in &selected {
            let dir = cell.dir(&out);
            let state = cell_state(&dir);
            println!("[{i}] {} ({})", cell.name(), state_name(state));
            for cmd in commands(&plan, cell, &dir, state, args.resume) {
                println!("    {}", shell_line(&nvcim.display().to_string(), &cmd));
            }
        }
        return Ok(());
    }

    fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the sweep directory --out {}", out.display()))?;
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<Outcome>>> =
        Mutex::new((0..selected.len()).map(|_| None).collect());
    let worker = || {
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(i, cell)) = selected.get(k) else {
                return;
            };
            let o = run_cell(&plan, cell, &out, &nvcim, args.resume, i);
            outcomes.lock().expect("no worker panics holding the lock")[k] = Some(o);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..args.jobs.min(selected.len()) {
            s.spawn(worker);
        }
        worker();
    });
    let outcomes = outcomes.into_inner().expect("workers finished");
    let (mut ran, mut skipped, mut failed) = (0, 0, Vec::new());
    for ((i, cell), o) in selected.iter().zip(outcomes) {
        match o.expect("every cell was visited") {
            Outcome::Ran => ran += 1,
            Outcome::Skipped => skipped += 1,
            Outcome::Failed(e) => failed.push(format!("[{i}] {}: {e:#}", cell.name())),
        }
    }
    println!(
        "sweep {}: {ran} cells run, {skipped} already finished, {} failed ({})",
        plan.name,
        failed.len(),
        out.display()
    );
    if !failed.is_empty() {
        bail!("{} cells failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

fn state_name(s: CellState) -> &'static str {
    match s {
        CellState::New => "new",
        CellState::PartialTraining => "training incomplete",
        CellState::Trained => "trained, not evaluated",
        CellState::Finished => "finished, skipped",
    }
}

/// The commands a cell in state `state` still needs.
fn commands(
    plan: &Plan,
    cell: &Cell,
    dir: &Path,
    state: CellState,
    resume: bool,
) -> Vec<Vec<String>> {
    match state {
        CellState::Finished => vec![],
        CellState::Trained => vec![eval_command(plan, dir)],
        CellState::New | CellState::PartialTraining => vec![
            train_command(
                plan,
                cell,
                dir,
                resume && state == CellState::PartialTraining,
            ),
            eval_command(plan, dir),
        ],
    }
}

fn run_cell(
    plan: &Plan,
    cell: &Cell,
    out: &Path,
    nvcim: &Path,
    resume: bool,
    index: usize,
) -> Outcome {
    let dir = cell.dir(out);
    let state = cell_state(&dir);
    if state == CellState::Finished {
        eprintln!("[{index}] {}: finished, skipped", cell.name());
        return Outcome::Skipped;
    }
    let result = (|| -> Result<()> {
        if state == CellState::PartialTraining && !resume {
            bail!(
                "its training stopped part-way in {}; pass --resume to continue it, or delete the directory to start over",
                dir.join("train").display()
            );
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if state != CellState::Trained {
            let args = train_command(plan, cell, &dir, state == CellState::PartialTraining);
            eprintln!("[{index}] {}: train", cell.name());
            run_logged(nvcim, &args, &dir.join("train.log"))?;
            fs::write(dir.join(TRAIN_DONE), "")
                .with_context(|| format!("writing {}", dir.join(TRAIN_DONE).display()))?;
        }
        eprintln!("[{index}] {}: eval", cell.name());
        run_logged(nvcim, &eval_command(plan, &dir), &dir.join("eval.log"))?;
        Ok(())
    })();
    match result {
        Ok(()) => Outcome::Ran,
        Err(e) => {
            eprintln!("[{index}] {}: FAILED: {e:#}", cell.name());
            Outcome::Failed(e)
        }
    }
}

/// Runs `program args`, both output streams appended to `log`; fails on a non-zero exit.
fn run_logged(program: &Path, args: &[String], log: &Path) -> Result<()> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let line = shell_line(&program.display().to_string(), args);
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicating the log handle")?)
        .stderr(file)
        .status()
        .with_context(|| format!("starting `{line}`"))?;
    ensure!(
        status.success(),
        "`{line}` failed ({status}); see {}",
        log.display()
    );
    Ok(())
}

fn emit_slurm(plan: &Plan, plan_path: &Path, out: &Path, nvcim: &Path, n: usize) -> Result<()> {
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create the sweep directory --out {}", out.display()))?;
    // Array tasks may start in another directory: absolute paths.
    let abs = |p: &Path| -> Result<PathBuf> {
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    let (plan_abs, out_abs) = (abs(plan_path)?, abs(out)?);
    let nv = nvcim.display().to_string();
    let script = slurm_script(plan, &plan_abs, &out_abs, &nv, n)?;
    let merge = merge_script(plan, &out_abs, &nv)?;
    let (s, m) = (out.join("sweep.sbatch"), out.join("merge.sbatch"));
    fs::write(&s, script).with_context(|| format!("writing {}", s.display()))?;
    fs::write(&m, merge).with_context(|| format!("writing {}", m.display()))?;
    println!("{} cells: wrote {} and {}", n, s.display(), m.display());
    println!(
        "submit: jid=$(sbatch --parsable {}) && sbatch --dependency=afterany:$jid {}",
        s.display(),
        m.display()
    );
    Ok(())
}
