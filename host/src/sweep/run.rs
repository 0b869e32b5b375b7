//! Running a plan's cells on this machine (`nvcim sweep PLAN`), listing them (`--dry-run`) and
//! writing the Slurm scripts (`--emit slurm`).
//!
//! Each cell runs `nvcim train` and then `nvcim eval` as subprocesses of the given binary, with
//! their output in `CELL/train.log` and `CELL/eval.log`. Finished cells (`eval/eval.json`) are
//! skipped; a cell whose training stopped part-way is continued with `nvcim train --resume` when
//! `resume` is set (and refused otherwise, so nothing is silently overwritten). A failing cell
//! does not stop the others; the sweep fails at the end if any failed.

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

use super::{
    Cell, CellState, Plan, TRAIN_DONE, cell_state, eval_command,
    slurm::{merge_script, shell_line, slurm_script},
    train_command,
};

/// What happened to a cell.
#[derive(Debug)]
enum Outcome {
    Skipped,
    Ran,
    Failed(anyhow::Error),
}

/// Lists `selected` cells of `plan` with their state and the commands they still need.
pub fn dry_run(
    plan: &Plan,
    out: &Path,
    nvcim: &Path,
    selected: &[(usize, &Cell)],
    resume: bool,
) -> Result<()> {
    println!(
        "plan {}: {} cells in {}",
        plan.name,
        plan.cells().len(),
        out.display()
    );
    for (i, cell) in selected {
        let dir = cell.dir(out);
        let state = cell_state(&dir);
        println!("[{i}] {} ({})", cell.name(), state_name(state));
        for cmd in commands(plan, cell, &dir, state, resume) {
            println!("    {}", shell_line(&nvcim.display().to_string(), &cmd));
        }
    }
    Ok(())
}

/// Runs `selected` cells of `plan` in `out` on `jobs` workers with the binary `nvcim`.
pub fn run_cells(
    plan: &Plan,
    out: &Path,
    nvcim: &Path,
    selected: &[(usize, &Cell)],
    jobs: usize,
    resume: bool,
) -> Result<()> {
    fs::create_dir_all(out)
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
            let o = run_cell(plan, cell, out, nvcim, resume, i);
            outcomes.lock().expect("no worker panics holding the lock")[k] = Some(o);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..jobs.min(selected.len()) {
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
        CellState::Trained => vec![eval_command(plan, cell, dir)],
        CellState::New | CellState::PartialTraining => vec![
            train_command(
                plan,
                cell,
                dir,
                resume && state == CellState::PartialTraining,
            ),
            eval_command(plan, cell, dir),
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
        run_logged(
            nvcim,
            &eval_command(plan, cell, &dir),
            &dir.join("eval.log"),
        )?;
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

/// Writes `sweep.sbatch` (one array task per cell) and `merge.sbatch` into `out`.
pub fn emit_slurm(plan: &Plan, plan_path: &Path, out: &Path, nvcim: &Path, n: usize) -> Result<()> {
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
