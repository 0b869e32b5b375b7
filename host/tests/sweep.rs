//! `nvcim sweep` on the real binary: checked-in plans, dry runs, resumability with fake
//! finished cells (real eval.json files from the result writer), a run through a stand-in
//! nvcim, Slurm scripts and bad plans.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use nvcim::{
    eval::{
        mc::SigmaRuns,
        results::{EvalConfig, EvalReport, write_eval_outputs},
    },
    sweep::{Plan, TRAIN_DONE},
};

const PLAN: &str = r#"
name = "tiny"
datasets = ["fashion-mnist"]
models = ["vgg8"]
methods = ["vanilla", "nft"]
train_sigmas = [0.4]
alphas = [0.01]
seeds = [0, 1]
epochs = 1
[eval]
sigmas = [0.2, 0.4, 0.6]
mc = 5
"#;

fn nvcim(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvcim"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running nvcim")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A real eval.json (and its companions) for a finished cell.
fn finish(eval_dir: &Path) {
    let config = EvalConfig {
        checkpoint: "train/best/backbone.bpk".into(),
        model: "vgg8".into(),
        dataset: "fashion-mnist".into(),
        method: "vanilla".into(),
        alpha: None,
        train_sigma: None,
        train_seed: Some(0),
        drop_exit: None,
        noise_injection: None,
        clip_weights: None,
        preprocess: None,
        sigma_unit: "range".into(),
        profile: "uniform".into(),
        m_bits: 8,
        n_bits: 2,
        stuck_low: 0.0,
        stuck_high: 0.0,
        scale_mode: "layer".into(),
        engine: "float".into(),
        tile: None,
        sigmas: vec![0.2, 0.4, 0.6],
        mc: 5,
        seed: 0,
        test_subset: None,
        bn_recalibrate: None,
    };
    let runs: Vec<SigmaRuns> = [0.2f32, 0.4, 0.6]
        .iter()
        .enumerate()
        .map(|(i, &s)| SigmaRuns {
            sigma: s,
            correct: (0..5).map(|r| 90 - 10 * i + r).collect(),
            examples: 100,
        })
        .collect();
    let report = EvalReport::new(config, 95, &runs, 0.1).unwrap();
    write_eval_outputs(eval_dir, &report).unwrap();
}

/// A stand-in for nvcim: `train` makes a checkpoint (and fails when FAKE_FAIL exists);
/// `eval` copies FAKE_EVAL to `--out/eval.json`. Every call is logged to FAKE_LOG.
fn fake_nvcim(dir: &Path) -> PathBuf {
    let p = dir.join("fake-nvcim.sh");
    fs::write(
        &p,
        r#"#!/bin/sh
verb=$1; shift
out=""; prev=""
for a in "$@"; do
  if [ "$prev" = "--out" ]; then out=$a; fi
  prev=$a
done
echo "$verb $*" >> "$FAKE_LOG"
case $verb in
  train)
    mkdir -p "$out/checkpoint" "$out/best" && touch "$out/best/backbone.bpk"
    if [ -n "$FAKE_SLEEP" ]; then sleep "$FAKE_SLEEP"; fi
    if [ -e "$FAKE_FAIL" ]; then echo "fake training failure" >&2; exit 3; fi ;;
  eval)
    mkdir -p "$out" && cp "$FAKE_EVAL" "$out/eval.json" ;;
esac
"#,
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn checked_in_plans_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
    let mut n = 0;
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let plan = Plan::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(!plan.cells().is_empty());
            n += 1;
        }
    }
    assert!(n >= 4);
    // Table II on MNIST: 2 models x (vanilla 1 + noise 4 + nft 4) cells x 5 seeds (the
    // `<= x*` cells are maxima over independent trainings).
    let t2 = Plan::load(&dir.join("mnist-table2.toml")).unwrap();
    assert_eq!(t2.cells().len(), 18 * 5);
    assert_eq!((t2.epochs, t2.eval.mc), (200, 200));
    let t3 = Plan::load(&dir.join("mnist-table3.toml")).unwrap();
    assert_eq!(t3.cells().len(), 2 * 2 * 10);
}

#[test]
fn resumable_sweep_through_a_stand_in_nvcim() {
    let tmp = tempfile::tempdir().unwrap();
    let plan_path = tmp.path().join("tiny.toml");
    fs::write(&plan_path, PLAN).unwrap();
    let out = tmp.path().join("out");
    let plan = Plan::parse(PLAN).unwrap();
    let cells = plan.cells();
    assert_eq!(cells.len(), 4);
    let plan_s = plan_path.to_str().unwrap();
    let out_s = out.to_str().unwrap();

    // Cell 0 finished, cell 1 trained, cell 2 partially trained, cell 3 new.
    finish(&cells[0].dir(&out).join("eval"));
    fs::create_dir_all(cells[1].dir(&out)).unwrap();
    fs::write(cells[1].dir(&out).join(TRAIN_DONE), "").unwrap();
    fs::create_dir_all(cells[2].dir(&out).join("train/checkpoint")).unwrap();

    let o = nvcim(&["sweep", plan_s, "--out", out_s, "--dry-run"], &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("4 cells"), "{stdout}");
    assert!(stdout.contains(&format!("[0] {} (finished, skipped)", cells[0].name())));
    assert!(stdout.contains(&format!("[1] {} (trained, not evaluated)", cells[1].name())));
    assert!(stdout.contains(&format!("[2] {} (training incomplete)", cells[2].name())));
    assert!(stdout.contains(&format!("[3] {} (new)", cells[3].name())));
    assert_eq!(stdout.matches(" train --dataset").count(), 2, "{stdout}");
    assert_eq!(stdout.matches(" eval ").count(), 3, "{stdout}");
    assert!(
        !out.join(cells[3].name()).exists(),
        "a dry run creates nothing"
    );

    let fake = fake_nvcim(tmp.path());
    let log = tmp.path().join("calls.log");
    let eval_json = cells[0].dir(&out).join("eval/eval.json");
    let fail = tmp.path().join("no-failure");
    let env = [
        ("FAKE_LOG", log.as_path()),
        ("FAKE_EVAL", eval_json.as_path()),
        ("FAKE_FAIL", fail.as_path()),
    ];
    let run = |extra: &[&str]| {
        let mut a = vec![
            "sweep",
            plan_s,
            "--out",
            out_s,
            "--nvcim",
            fake.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        nvcim(&a, &env)
    };

    // Without --resume the partial cell is refused; the others run (two at a time).
    let o = run(&["--jobs", "2"]);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--resume") && stderr.contains(&cells[2].name()),
        "{stderr}"
    );
    assert!(
        stdout.contains("2 cells run, 1 already finished, 0 left to another process, 1 failed"),
        "{stdout}"
    );
    let calls = fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().filter(|l| l.starts_with("train")).count(),
        1,
        "{calls}"
    );
    assert_eq!(
        calls.lines().filter(|l| l.starts_with("eval")).count(),
        2,
        "{calls}"
    );
    assert!(
        !calls.contains(&cells[0].name()),
        "finished cell rerun: {calls}"
    );
    assert!(cells[3].dir(&out).join(TRAIN_DONE).is_file());
    assert!(cells[3].dir(&out).join("train.log").is_file());

    // --resume continues the partial training.
    fs::remove_file(&log).unwrap();
    let o = run(&["--resume"]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("1 cells run, 3 already finished, 0 left to another process, 0 failed"),
        "{stdout}"
    );
    let calls = fs::read_to_string(&log).unwrap();
    let train = calls.lines().find(|l| l.starts_with("train")).unwrap();
    assert!(
        train.ends_with("--resume") && train.contains(&cells[2].name()),
        "{train}"
    );

    // Everything finished: nothing runs.
    fs::remove_file(&log).unwrap();
    let o = run(&[]);
    assert!(o.status.success());
    assert!(!log.exists());

    // A failing training fails its cell, names the log, and leaves no done marker.
    let fresh = tmp.path().join("fresh");
    fs::write(&fail, "").unwrap();
    let o = nvcim(
        &[
            "sweep",
            plan_s,
            "--out",
            fresh.to_str().unwrap(),
            "--nvcim",
            fake.to_str().unwrap(),
            "--cell",
            "3",
        ],
        &env,
    );
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("train.log"), "{stderr}");
    assert!(!cells[3].dir(&fresh).join(TRAIN_DONE).exists());

    let o = nvcim(
        &["sweep", plan_s, "--out", out_s, "--cell", "4", "--dry-run"],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--cell 4"));
}

#[test]
fn slurm_array_and_merge_scripts() {
    let tmp = tempfile::tempdir().unwrap();
    let plan_path = tmp.path().join("tiny.toml");
    fs::write(&plan_path, PLAN).unwrap();
    let out = tmp.path().join("cluster");
    let o = nvcim(
        &[
            "sweep",
            plan_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--emit",
            "slurm",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let s = fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(s.contains("#SBATCH --array=0-3\n"), "{s}");
    assert!(
        s.contains(&format!(
            "sweep {} --out {} --cell \"$SLURM_ARRAY_TASK_ID\" --resume",
            plan_path.display(),
            out.display()
        )),
        "{s}"
    );
    let m = fs::read_to_string(out.join("merge.sbatch")).unwrap();
    assert!(
        m.contains(&format!(
            "sweep {} --out {} --merge",
            plan_path.display(),
            out.display()
        )),
        "{m}"
    );
    // Slurm does not create the folder of --output: the sweep does.
    assert!(out.join("logs").is_dir());
    let sub = fs::read_to_string(out.join("submit.sh")).unwrap();
    assert!(sub.contains("sbatch --parsable"), "{sub}");
    // A merge of a sweep with no finished cell names the missing ones and fails.
    let o = nvcim(
        &[
            "sweep",
            plan_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--merge",
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(
        err.contains("nothing to merge") && err.contains("[3] "),
        "{err}"
    );
}

#[test]
fn bad_plans_fail_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    fs::write(&p, PLAN.replace("mc = 5", "mc = 0")).unwrap();
    let o = nvcim(&["sweep", p.to_str().unwrap(), "--dry-run"], &[]);
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(err.contains("bad.toml") && err.contains("eval.mc"), "{err}");
    let o = nvcim(&["sweep", "/nonexistent/plan.toml"], &[]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("/nonexistent/plan.toml"));
}

/// Two sweeps on one plan and output directory at the same time: every cell is trained and
/// evaluated exactly once (a lock per cell), and both sweeps succeed.
#[test]
fn two_sweeps_on_one_directory_never_run_a_cell_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let plan_path = tmp.path().join("tiny.toml");
    fs::write(&plan_path, PLAN).unwrap();
    let out = tmp.path().join("out");
    let cells = Plan::parse(PLAN).unwrap().cells();
    // The eval.json the stand-in copies: a real one is not needed for the sweep's bookkeeping.
    let eval_json = tmp.path().join("eval.json");
    fs::write(&eval_json, "{}").unwrap();
    let fake = fake_nvcim(tmp.path());
    let log = tmp.path().join("calls.log");
    let fail = tmp.path().join("no-failure");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nvcim"))
            .args([
                "sweep",
                plan_path.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--nvcim",
                fake.to_str().unwrap(),
                "--jobs",
                "2",
            ])
            .env("FAKE_LOG", &log)
            .env("FAKE_EVAL", &eval_json)
            .env("FAKE_FAIL", &fail)
            .env("FAKE_SLEEP", "0.4")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let calls = fs::read_to_string(&log).unwrap();
    for c in &cells {
        let n = |verb: &str| {
            calls
                .lines()
                .filter(|l| l.starts_with(verb) && l.contains(&format!("/{}/", c.name())))
                .count()
        };
        assert_eq!((n("train"), n("eval")), (1, 1), "{}: {calls}", c.name());
    }
    // Between them, the two sweeps saw every cell as run, finished or busy elsewhere.
    let both = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    let ran: usize = both
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(ran, cells.len(), "{both}");
    // No lock is left held: a third sweep finds every cell finished.
    let o = nvcim(
        &[
            "sweep",
            plan_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--nvcim",
            fake.to_str().unwrap(),
        ],
        &[
            ("FAKE_LOG", log.as_path()),
            ("FAKE_EVAL", eval_json.as_path()),
            ("FAKE_FAIL", fail.as_path()),
        ],
    );
    assert!(
        text(&o).0.contains("0 cells run, 4 already finished"),
        "{}",
        text(&o).0
    );
}
