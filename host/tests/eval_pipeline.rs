//! End to end: the Monte Carlo driver and the result writer on a tiny dense network (three sigma
//! values, mc 5), every file present and consistent with the others, then `nvcim report` on it.

use std::{fs, path::Path, process::Command};

use clap::Parser;
use nvcim::{
    engine::dense::fixture,
    eval::{
        EvalOptions, ModelInfo, evaluate_quiet,
        results::{EvalReport, histogram_name, read_eval_report},
    },
};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    opts: EvalOptions,
}

/// The flags parsed once into a plan (as `nvcim eval` does), then the evaluation.
fn run_eval(
    opts: &EvalOptions,
    net: &nvcim::engine::dense::DenseNetwork,
    data: &nvcim::engine::dense::DenseData,
) -> anyhow::Result<EvalReport> {
    let plan = opts.plan()?;
    evaluate_quiet(&plan, &opts.out, &info(), net, data)
}

fn options(out: &Path, extra: &[&str]) -> EvalOptions {
    let mut args = vec!["eval"];
    let defaults = [("--sigma", "0.2,0.4,0.6"), ("--mc", "5"), ("--seed", "7")];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    args.extend(["--quiet", "--out", out.to_str().unwrap()]);
    Flags::try_parse_from(args).unwrap().opts
}

fn info() -> ModelInfo {
    ModelInfo {
        checkpoint: "tiny-dense".into(),
        model: "dense".into(),
        dataset: "synthetic".into(),
        method: "vanilla".into(),
        ..ModelInfo::default()
    }
}

/// Splits a CSV without quoted fields.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn num(s: &str) -> f64 {
    s.parse()
        .unwrap_or_else(|_| panic!("`{s}` is not a number"))
}

#[test]
fn every_file_is_present_and_consistent() {
    let (net, data) = fixture::separable(5, 16, 12, 4, 300);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval");
    let report = run_eval(&options(&out, &[]), &net, &data).unwrap();

    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![
        "accuracy_vs_sigma.png".to_string(),
        "eval.csv".into(),
        "eval.json".into(),
        "runs.csv".into(),
    ];
    expected.extend([0.2f32, 0.4, 0.6].map(histogram_name));
    expected.sort();
    assert_eq!(names, expected);
    for n in names.iter().filter(|n| n.ends_with(".png")) {
        let b = fs::read(out.join(n)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{n}");
    }

    // eval.json is the report, and self-consistent.
    let json = read_eval_report(&out.join("eval.json")).unwrap();
    assert_eq!(json, report);
    assert_eq!(json.config.sigmas, vec![0.2, 0.4, 0.6]);
    assert_eq!((json.config.mc, json.config.seed), (5, 7));
    assert_eq!(json.config.sigma_unit, "range");
    assert_eq!(json.config.engine, "float");
    assert_eq!(json.test_examples, 300);
    assert!(json.clean_accuracy > 80.0, "{}", json.clean_accuracy);

    // runs.csv: 15 rows, equal to eval.json's runs.
    let runs = rows(&fs::read_to_string(out.join("runs.csv")).unwrap());
    assert_eq!(runs.len(), 15);
    for r in &runs {
        let res = json.at(num(&r[0]) as f32).unwrap();
        let i: usize = r[1].parse().unwrap();
        let correct: usize = r[2].parse().unwrap();
        assert_eq!(correct, res.correct[i]);
        assert_eq!(r[3], "300");
        assert_eq!(num(&r[4]), res.accuracies[i]);
        assert!((num(&r[4]) - 100.0 * correct as f64 / 300.0).abs() < 1e-9);
    }

    // eval.csv: one row per sigma whose mean is the mean of runs.csv's rows.
    let summary = rows(&fs::read_to_string(out.join("eval.csv")).unwrap());
    assert_eq!(summary.len(), 3);
    for row in &summary {
        let sigma = num(&row[0]);
        let accs: Vec<f64> = runs
            .iter()
            .filter(|r| num(&r[0]) == sigma)
            .map(|r| num(&r[4]))
            .collect();
        assert_eq!(accs.len(), 5);
        let mean = accs.iter().sum::<f64>() / 5.0;
        assert!((num(&row[6]) - mean).abs() < 1e-9);
        let s = json.at(sigma as f32).unwrap().summary;
        assert_eq!(num(&row[6]), s.mean);
        assert_eq!(num(&row[7]), s.std);
        assert_eq!((num(&row[11]), num(&row[12])), (s.min, s.max));
        assert!(s.ci95_low <= s.mean && s.mean <= s.ci95_high);
    }
    // Noise hurts more as sigma grows (monotone on this network at these sigmas).
    let means: Vec<f64> = json.results.iter().map(|r| r.summary.mean).collect();
    assert!(means[0] > means[2], "{means:?}");

    // Two worker threads draw exactly the same runs.
    let out2 = dir.path().join("eval2");
    let two = run_eval(&options(&out2, &["--jobs", "2"]), &net, &data).unwrap();
    assert_eq!(two.results, report.results);

    // nvcim report reads the directory.
    let rep = dir.path().join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args([
            "report",
            out.to_str().unwrap(),
            "--out",
            rep.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = String::from_utf8_lossy(&o.stdout);
    let mean02 = format!("{:.2}", json.results[0].summary.mean);
    assert!(
        md.contains("| synthetic dense vanilla |") && md.contains(&mean02),
        "{md}"
    );
    for f in ["report.md", "table2.csv", "table2.png"] {
        assert!(rep.join(f).is_file(), "{f}");
    }
    // One evaluation: no setting has independent trainings to count, so no Table III.
    assert!(!rep.join("table3.csv").exists());
    assert!(
        md.contains("table3: skipped, no setting has two or more independent trainings"),
        "{md}"
    );
}

#[test]
fn bad_input_is_refused() {
    let (net, data) = fixture::separable(6, 4, 4, 2, 20);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e");
    let err = |extra: &[&str], out: &Path| {
        format!(
            "{:#}",
            run_eval(&options(out, extra), &net, &data).unwrap_err()
        )
    };
    assert!(err(&["--mc", "0"], &out).contains("--mc"));
    assert!(err(&["--sigma", ""], &out).contains("--sigma"));
    assert!(err(&["--sigma", "0.1,-2"], &out).contains("--sigma"));
    assert!(err(&["--jobs", "0"], &out).contains("--jobs"));
    let file = dir.path().join("file");
    fs::write(&file, "").unwrap();
    let msg = err(&[], &file.join("sub"));
    assert!(msg.contains("--out") && msg.contains("file"), "{msg}");
    assert!(!out.join("eval.json").exists());
}

#[test]
fn report_names_the_file_with_missing_fields() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    fs::create_dir_all(&run).unwrap();
    let (net, data) = fixture::separable(7, 4, 4, 2, 20);
    let out = dir.path().join("ok");
    let report: EvalReport = run_eval(&options(&out, &[]), &net, &data).unwrap();
    let mut v = serde_json::to_value(&report).unwrap();
    v["config"].as_object_mut().unwrap().remove("model");
    fs::write(run.join("eval.json"), v.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(["report", run.to_str().unwrap(), "--out"])
        .arg(dir.path().join("rep"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("eval.json") && err.contains("model"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(["report"])
        .arg(dir.path().join("nothing-here"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing-here"));
    // With --allow-missing the unfinished run is skipped and the good one reported.
    let o = Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(["report", "--allow-missing"])
        .arg(dir.path().join("nothing-here"))
        .arg(&out)
        .arg("--out")
        .arg(dir.path().join("rep2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing-here"));
    assert!(dir.path().join("rep2/report.md").is_file());
}
