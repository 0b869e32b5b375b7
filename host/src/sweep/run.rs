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

use std::os::unix::fs::PermissionsExt as _;

use crate::fsx::{self, DirLock, LOCK_FILE};

use super::{
    Cell, CellState, Plan, TRAIN_DONE, cell_state, eval_command,
    slurm::{LOG_DIR, merge_script, shell_line, slurm_script, submit_script},
    train_command,
};

/// What happened to a cell.
#[derive(Debug)]
enum Outcome {
    Skipped,
    Ran,
    /// Another live process holds the cell's lock (named).
    Busy(String),
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
///
/// A cell is run by one process at a time: its directory's lock ([`DirLock`]) is taken first,
/// and a cell another live process holds is left to it (reported as busy; a failure when
/// `busy_fails`, as for the one cell of a Slurm array task).
pub fn run_cells(
    plan: &Plan,
    out: &Path,
    nvcim: &Path,
    selected: &[(usize, &Cell)],
    jobs: usize,
    resume: bool,
    busy_fails: bool,
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
    let (mut ran, mut skipped, mut busy, mut failed) = (0, 0, 0, Vec::new());
    for ((i, cell), o) in selected.iter().zip(outcomes) {
        match o.expect("every cell was visited") {
            Outcome::Ran => ran += 1,
            Outcome::Skipped => skipped += 1,
            Outcome::Busy(holder) if busy_fails => failed.push(format!(
                "[{i}] {}: being run by another process ({holder})",
                cell.name()
            )),
            Outcome::Busy(_) => busy += 1,
            Outcome::Failed(e) => failed.push(format!("[{i}] {}: {e:#}", cell.name())),
        }
    }
    println!(
        "sweep {}: {ran} cells run, {skipped} already finished, {busy} left to another process, \
         {} failed ({})",
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
    if cell_state(&dir) == CellState::Finished {
        eprintln!("[{index}] {}: finished, skipped", cell.name());
        return Outcome::Skipped;
    }
    let lock = match DirLock::try_acquire(&dir) {
        Ok(Some(l)) => l,
        Ok(None) => {
            let holder = fs::read_to_string(dir.join(LOCK_FILE)).unwrap_or_default();
            let holder = holder.trim().to_string();
            eprintln!(
                "[{index}] {}: being run by another process ({holder}), left to it",
                cell.name()
            );
            return Outcome::Busy(holder);
        }
        Err(e) => return Outcome::Failed(e),
    };
    if let Some(h) = lock.stale_holder() {
        eprintln!(
            "[{index}] {}: taking over the cell from {h}, which ended without finishing it",
            cell.name()
        );
    }
    // Another process may have finished the cell between the first look and the lock.
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
            crate::fsx::write_atomic(&dir.join(TRAIN_DONE), b"")?;
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

/// Writes `sweep.sbatch` (one array task per cell), `merge.sbatch` and `submit.sh` into `out`,
/// and creates the log folder Slurm writes into.
pub fn emit_slurm(plan: &Plan, plan_path: &Path, out: &Path, nvcim: &Path, n: usize) -> Result<()> {
    let logs = out.join(LOG_DIR);
    fs::create_dir_all(&logs)
        .with_context(|| format!("cannot create the sweep directory --out {}", logs.display()))?;
    // Array tasks may start in another directory: absolute paths.
    let abs = |p: &Path| -> Result<PathBuf> {
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    let (plan_abs, out_abs, nvcim_abs) = (abs(plan_path)?, abs(out)?, abs(nvcim)?);
    let workdir = std::env::current_dir().context("reading the current directory")?;
    let nv = nvcim_abs.display().to_string();
    let files = [
        (
            "sweep.sbatch",
            slurm_script(plan, &plan_abs, &out_abs, &workdir, &nv, n)?,
        ),
        (
            "merge.sbatch",
            merge_script(plan, &plan_abs, &out_abs, &workdir, &nv)?,
        ),
        ("submit.sh", submit_script(&out_abs, n)?),
    ];
    for (name, text) in &files {
        let p = out.join(name);
        fsx::write_atomic(&p, text.as_bytes())?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", p.display()))?;
    }
    println!(
        "{n} cells: wrote sweep.sbatch, merge.sbatch and submit.sh in {}",
        out_abs.display()
    );
    println!("submit: bash {}", out_abs.join("submit.sh").display());
    Ok(())
}

/// `nvcim sweep PLAN --merge`: the report of every finished cell into `OUT/report`, then an
/// error naming each cell that is missing (with its array index and where its log is), so a
/// merge job after a partly failed array shows the tables it could make and fails visibly.
pub fn merge(plan: &Plan, out: &Path) -> Result<()> {
    let cells = plan.cells();
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let dir = c.dir(out);
        match cell_state(&dir) {
            CellState::Finished => present.push(dir.join("eval")),
            st => missing.push(format!(
                "[{i}] {} ({}; logs: {}/{LOG_DIR}/*_{i}.out, {})",
                c.name(),
                state_name(st),
                out.display(),
                dir.join("train.log").display()
            )),
        }
    }
    if present.is_empty() {
        bail!(
            "no cell of plan {} is finished in {}; nothing to merge. Missing:\n{}",
            plan.name,
            out.display(),
            missing.join("\n")
        );
    }
    crate::report::write(&crate::report::ReportArgs {
        runs: present.clone(),
        out: out.join("report"),
        matching: crate::report::Match::Train,
        allow_missing: false,
        threshold: 5.0,
        convergence_ref: crate::report::Reference::Max,
    })?;
    if !missing.is_empty() {
        bail!(
            "the report in {} covers {} of {} cells; missing:\n{}",
            out.join("report").display(),
            present.len(),
            cells.len(),
            missing.join("\n")
        );
    }
    eprintln!(
        "merged all {} cells of plan {} into {}",
        cells.len(),
        plan.name,
        out.join("report").display()
    );
    Ok(())
}
