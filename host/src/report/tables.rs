//! The tables themselves: each one a grid of cells over the loaded evaluations, rendered as
//! Markdown, long-format CSV and a plot.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Result, ensure};

use super::{Entry, Match};
use crate::{
    eval::stats::summarize,
    plot::{self, Point, Series},
};

/// A cell of a table: the aggregate of the runs that fill it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellValue {
    /// Mean accuracy (percent).
    pub mean: f64,
    /// Half width of the 95% interval, if defined.
    pub ci: Option<f64>,
    /// Runs aggregated.
    pub runs: usize,
}

impl CellValue {
    fn text(&self) -> String {
        let mut s = format!("{:.2}", self.mean);
        if let Some(h) = self.ci {
            write!(s, " ± {h:.2}").expect("writing to a String");
        }
        if self.runs > 1 {
            write!(s, " (n={})", self.runs).expect("writing to a String");
        }
        s
    }
}

/// Aggregates runs at one sigma (see the module docs).
fn aggregate(entries: &[&Entry], sigma: f32) -> Result<Option<CellValue>> {
    let results: Vec<_> = entries.iter().filter_map(|e| e.report.at(sigma)).collect();
    Ok(match results.len() {
        0 => None,
        1 => Some(CellValue {
            mean: results[0].summary.mean,
            ci: results[0].summary.ci95_half_width,
            runs: 1,
        }),
        n => {
            let means: Vec<f64> = results.iter().map(|r| r.summary.mean).collect();
            let s = summarize(&means)?;
            Some(CellValue {
                mean: s.mean,
                ci: s.ci95_half_width,
                runs: n,
            })
        }
    })
}

/// A table: row labels x sigma columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Title (Markdown heading).
    pub title: String,
    /// What a cell holds.
    pub note: String,
    /// Column sigma values.
    pub sigmas: Vec<f32>,
    /// Rows: label and one text per column.
    pub rows: Vec<(String, Vec<Option<String>>)>,
    /// Numeric series for the CSV and the plot: label, sigma, value, interval half width, runs.
    pub values: Vec<(String, f32, f64, Option<f64>, usize)>,
    /// The y axis of the plot.
    pub y_label: String,
}

impl Table {
    /// Markdown text.
    pub fn markdown(&self) -> String {
        let mut s = format!("## {}\n\n{}\n\n| setting |", self.title, self.note);
        for sg in &self.sigmas {
            write!(s, " σ = {sg} |").expect("writing to a String");
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(self.sigmas.len()));
        s.push('\n');
        for (label, cells) in &self.rows {
            write!(s, "| {label} |").expect("writing to a String");
            for c in cells {
                write!(s, " {} |", c.as_deref().unwrap_or("–")).expect("writing to a String");
            }
            s.push('\n');
        }
        s
    }

    /// Long-format CSV: setting, sigma, value, ci95_half_width, runs.
    pub fn csv(&self) -> String {
        let mut s = String::from("setting,sigma,value,ci95_half_width,runs\n");
        for (label, sigma, v, ci, n) in &self.values {
            let ci = ci.map(|c| c.to_string()).unwrap_or_default();
            writeln!(s, "\"{}\",{sigma},{v},{ci},{n}", label.replace('"', "\"\""))
                .expect("writing to a String");
        }
        s
    }

    pub(super) fn plot(&self, path: &Path, unit: &str) -> Result<()> {
        let mut series: BTreeMap<&str, Vec<Point>> = BTreeMap::new();
        for (label, sigma, v, ci, _) in &self.values {
            series.entry(label).or_default().push(Point {
                x: f64::from(*sigma),
                y: *v,
                band: ci.map(|h| (v - h, v + h)),
            });
        }
        let order: Vec<&str> = self.rows.iter().map(|r| r.0.as_str()).collect();
        let series: Vec<Series> = order
            .iter()
            .filter_map(|l| {
                series.get(l).map(|p| Series {
                    name: (*l).to_string(),
                    points: p.clone(),
                })
            })
            .collect();
        plot::lines(
            path,
            &self.title,
            &format!("sigma ({unit})"),
            &self.y_label,
            &series,
        )
    }
}

fn sigma_columns(entries: &[&Entry]) -> Vec<f32> {
    let mut s: Vec<f32> = entries
        .iter()
        .flat_map(|e| e.report.config.sigmas.iter().copied())
        .collect();
    s.sort_by(f32::total_cmp);
    s.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
    s
}

/// Rows of mean accuracy per group, one column per sigma.
fn accuracy_table(
    title: &str,
    note: &str,
    groups: &[(String, Vec<&Entry>)],
    m: Match,
) -> Result<Table> {
    let all: Vec<&Entry> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let sigmas = sigma_columns(&all);
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for (label, entries) in groups {
        let mut cells = Vec::new();
        for &sg in &sigmas {
            let fill: Vec<&Entry> = entries
                .iter()
                .copied()
                .filter(|e| e.uses_sigma(sg, m))
                .collect();
            let v = aggregate(&fill, sg)?;
            if let Some(v) = v {
                values.push((label.clone(), sg, v.mean, v.ci, v.runs));
            }
            cells.push(v.map(|v| v.text()));
        }
        rows.push((label.clone(), cells));
    }
    Ok(Table {
        title: title.into(),
        note: note.into(),
        sigmas,
        rows,
        values,
        y_label: "mean noisy accuracy (%)".into(),
    })
}

fn method_label(e: &Entry) -> String {
    let c = &e.report.config;
    let mut s = format!("{} {} {}", c.dataset, c.model, c.method);
    // Alpha only means something for negative feedback (nft, nft-ovf).
    if let Some(a) = c.alpha.filter(|_| c.method.starts_with("nft")) {
        write!(s, " α={a}").expect("writing to a String");
    }
    if c.method != "vanilla" && !e.noise_injection() {
        s.push_str(" w/o noise injection");
    }
    s
}

/// Groups entries by a label, keeping first-seen order.
fn group_by<'a>(
    entries: impl Iterator<Item = &'a Entry>,
    key: impl Fn(&Entry) -> String,
) -> Vec<(String, Vec<&'a Entry>)> {
    let mut out: Vec<(String, Vec<&Entry>)> = Vec::new();
    for e in entries {
        let k = key(e);
        match out.iter_mut().find(|g| g.0 == k) {
            Some(g) => g.1.push(e),
            None => out.push((k, vec![e])),
        }
    }
    out
}

/// Table II.
pub fn table2(entries: &[Entry], m: Match) -> Result<Table> {
    // With `--match any`, runs trained at different sigmas are different rows.
    let groups = group_by(
        entries
            .iter()
            .filter(|e| e.report.config.drop_exit.is_none()),
        |e| {
            let mut s = method_label(e);
            if m == Match::Any && e.noise_injection() {
                write!(s, " trained σ={}", e.train_sigma()).expect("writing to a String");
            }
            s
        },
    );
    ensure!(!groups.is_empty(), "no runs for Table II");
    accuracy_table(
        "Table II: mean noisy accuracy (%) by method and sigma",
        &format!(
            "Mean ± 95% CI of the Monte Carlo runs; with n runs, the mean of their means ± the 95% CI over runs. Columns: {}.",
            match m {
                Match::Train => "runs trained at that sigma, and runs trained without noise",
                Match::Any => "every run",
            }
        ),
        &groups,
        m,
    )
}

/// Table III: non-converging runs out of N per setting, at each sigma.
pub fn table3(entries: &[Entry], m: Match, threshold: f64) -> Result<Table> {
    let groups = group_by(
        entries
            .iter()
            .filter(|e| e.report.config.drop_exit.is_none()),
        |e| {
            let mut s = method_label(e);
            if e.noise_injection() {
                write!(s, " trained σ={}", e.train_sigma()).expect("writing to a String");
            }
            s
        },
    );
    ensure!(!groups.is_empty(), "no runs for Table III");
    let all: Vec<&Entry> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let sigmas = sigma_columns(&all);
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for (label, group) in &groups {
        let mut cells = Vec::new();
        for &sg in &sigmas {
            let means: Vec<f64> = group
                .iter()
                .filter(|e| e.uses_sigma(sg, m))
                .filter_map(|e| e.mean_at(sg))
                .collect();
            if means.is_empty() {
                cells.push(None);
                continue;
            }
            let (bad, n) = non_converged(&means, threshold);
            values.push((label.clone(), sg, bad as f64, None, n));
            cells.push(Some(format!("{bad}/{n}")));
        }
        rows.push((label.clone(), cells));
    }
    Ok(Table {
        title: "Table III: non-converging trainings".into(),
        note: format!(
            "Runs whose mean noisy accuracy is more than {threshold} points from the mean over the setting's independent runs, out of the number of runs."
        ),
        sigmas,
        rows,
        values,
        y_label: "non-converging runs".into(),
    })
}

/// `(runs more than threshold points from the mean, runs)`.
pub fn non_converged(means: &[f64], threshold: f64) -> (usize, usize) {
    let mean = means.iter().sum::<f64>() / means.len() as f64;
    (
        means
            .iter()
            .filter(|&&x| (x - mean).abs() > threshold)
            .count(),
        means.len(),
    )
}

/// Table IV: nft with and without noise injection; `None` without runs of both kinds.
pub fn table4(entries: &[Entry], m: Match) -> Result<Option<Table>> {
    let nft: Vec<&Entry> = entries
        .iter()
        .filter(|e| {
            e.report.config.method.starts_with("nft") && e.report.config.drop_exit.is_none()
        })
        .collect();
    if !(nft.iter().any(|e| e.noise_injection()) && nft.iter().any(|e| !e.noise_injection())) {
        return Ok(None);
    }
    let groups = group_by(nft.into_iter(), |e| {
        let c = &e.report.config;
        format!(
            "{} {} {} {}",
            c.dataset,
            c.model,
            c.method,
            if e.noise_injection() {
                "with noise injection"
            } else {
                "without noise injection"
            }
        )
    });
    accuracy_table(
        "Table IV: nft with and without noise injection",
        "Mean noisy accuracy (%) ± 95% CI.",
        &groups,
        m,
    )
    .map(Some)
}

/// Table V: nft with all exits and with one exit dropped; `None` without ablation runs.
pub fn table5(entries: &[Entry], m: Match) -> Result<Option<Table>> {
    let nft: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.report.config.method == "nft")
        .collect();
    if !nft.iter().any(|e| e.report.config.drop_exit.is_some()) {
        return Ok(None);
    }
    let groups = group_by(nft.into_iter(), |e| {
        let c = &e.report.config;
        let exits = match c.drop_exit {
            Some(d) => format!("without exit {d}"),
            None => "all exits".into(),
        };
        let ni = if e.noise_injection() {
            ""
        } else {
            " w/o noise injection"
        };
        format!("{} {} nft{ni} {exits}", c.dataset, c.model)
    });
    accuracy_table(
        "Table V: dropping one exit (ablation)",
        "Mean noisy accuracy (%) ± 95% CI.",
        &groups,
        m,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::{super::load_runs, *};
    use crate::eval::{mc::SigmaRuns, results::EvalReport, results::tests::config};

    fn entry(
        method: &str,
        train_sigma: Option<f32>,
        seed: u64,
        drop: Option<usize>,
        means: &[(f32, usize)],
    ) -> Entry {
        let sigmas: Vec<f32> = means.iter().map(|m| m.0).collect();
        let mut c = config(&sigmas, 2);
        c.method = method.into();
        c.train_sigma = train_sigma;
        c.train_seed = Some(seed);
        c.drop_exit = drop;
        c.alpha = method.starts_with("nft").then_some(0.01);
        let runs: Vec<SigmaRuns> = means
            .iter()
            .map(|&(s, k)| SigmaRuns {
                sigma: s,
                correct: vec![k - 1, k + 1],
                examples: 100,
            })
            .collect();
        Entry {
            path: PathBuf::from(format!("{method}{seed}")),
            report: EvalReport::new(c, 100, &runs, 0.0).unwrap(),
        }
    }

    #[test]
    fn table2_matches_training_sigma() {
        let e = vec![
            entry("vanilla", None, 0, None, &[(0.2, 80), (0.4, 40)]),
            entry("nft", Some(0.2), 0, None, &[(0.2, 95), (0.4, 90)]),
            entry("nft", Some(0.4), 0, None, &[(0.2, 97), (0.4, 93)]),
        ];
        let t = table2(&e, Match::Train).unwrap();
        assert_eq!(t.sigmas, vec![0.2, 0.4]);
        assert_eq!(t.rows.len(), 2);
        let nft = &t.rows[1].1;
        // sigma 0.2 from the run trained at 0.2; 0.4 from the one trained at 0.4.
        // Runs 94 and 96 -> mean 95, std sqrt(2), CI 12.7062.
        assert_eq!(nft[0].as_deref(), Some("95.00 ± 12.71"));
        assert_eq!(nft[1].as_deref(), Some("93.00 ± 12.71"));
        // `--match any`: every sigma of every run, one row per training sigma.
        let any = table2(&e, Match::Any).unwrap();
        assert_eq!(any.rows.len(), 3);
        assert!(
            any.rows[1].0.ends_with("trained σ=0.2"),
            "{}",
            any.rows[1].0
        );
        assert_eq!(any.rows[1].1[0].as_deref(), Some("95.00 ± 12.71"));
        assert_eq!(any.rows[1].1[1].as_deref(), Some("90.00 ± 12.71"));
        assert_eq!(any.rows[2].1[0].as_deref(), Some("97.00 ± 12.71"));
        assert!(
            t.markdown()
                .contains("| synthetic dense vanilla | 80.00 ± 12.71 | 40.00 ± 12.71 |"),
            "{}",
            t.markdown()
        );
        assert_eq!(t.csv().lines().count(), 5);
    }

    #[test]
    fn table3_counts_runs_far_from_the_mean() {
        // Mean 86.25: only 60 is more than 5 points away.
        assert_eq!(
            non_converged(&[90.0, 91.0, 89.0, 90.0, 91.0, 89.0, 90.0, 60.0], 5.0),
            (1, 8)
        );
        // One outlier in four drags the mean (82.5) more than 5 points from every run.
        assert_eq!(non_converged(&[90.0, 91.0, 89.0, 60.0], 5.0), (4, 4));
        assert_eq!(non_converged(&[90.0, 91.0], 5.0), (0, 2));
        let mut e: Vec<Entry> = (0..4)
            .map(|s| entry("noise", Some(0.6), s, None, &[(0.6, 90)]))
            .collect();
        e.push(entry("noise", Some(0.6), 9, None, &[(0.6, 30)]));
        let t = table3(&e, Match::Train, 5.0).unwrap();
        assert_eq!(t.rows[0].1[0].as_deref(), Some("5/5"));
        // mean 78: the four at 90 are 12 points off too; with a tighter group only the outlier.
        e.extend((10..20).map(|s| entry("noise", Some(0.6), s, None, &[(0.6, 90)])));
        let t = table3(&e, Match::Train, 5.0).unwrap();
        assert_eq!(t.rows[0].1[0].as_deref(), Some("1/15"));
    }

    #[test]
    fn training_config_fills_missing_fields() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("cell/train");
        fs::create_dir_all(train.join("best")).unwrap();
        fs::write(
            train.join("config.json"),
            r#"{"method": "nft", "alpha": 0.1, "seed": 3, "variation": {"sigma": 0.6}, "drop_exit": 2}"#,
        )
        .unwrap();
        let mut e = entry("nft", None, 0, None, &[(0.6, 90)]);
        let c = &mut e.report.config;
        (c.alpha, c.train_seed) = (None, None);
        c.checkpoint = train.join("best/backbone.bpk").display().to_string();
        let eval = dir.path().join("cell/eval");
        fs::create_dir_all(&eval).unwrap();
        crate::eval::results::write_eval_outputs(&eval, &e.report).unwrap();
        let got = load_runs(std::slice::from_ref(&eval))
            .unwrap()
            .remove(0)
            .report
            .config;
        assert_eq!(got.alpha, Some(0.1));
        assert_eq!(got.train_sigma, Some(0.6));
        assert_eq!(got.train_seed, Some(3));
        assert_eq!(got.drop_exit, Some(2));
        // A config.json that is not JSON is an error naming it.
        fs::write(train.join("config.json"), "{").unwrap();
        let err = format!("{:#}", load_runs(&[eval]).unwrap_err());
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn tables_4_and_5_need_their_runs() {
        let base = vec![entry("nft", Some(0.4), 0, None, &[(0.4, 90)])];
        assert!(table4(&base, Match::Train).unwrap().is_none());
        assert!(table5(&base, Match::Train).unwrap().is_none());
        let mut more = base.clone();
        more.push(entry("nft", Some(0.0), 0, None, &[(0.4, 70)]));
        more.push(entry("nft", Some(0.4), 0, Some(1), &[(0.4, 85)]));
        let t4 = table4(&more, Match::Train).unwrap().unwrap();
        assert_eq!(t4.rows.len(), 2);
        assert!(t4.rows[1].0.contains("without noise injection"));
        assert_eq!(t4.rows[1].1[0].as_deref(), Some("70.00 ± 12.71"));
        let t5 = table5(&more, Match::Train).unwrap().unwrap();
        assert_eq!(t5.rows.len(), 3);
        assert!(t5.rows.iter().any(|r| r.0.ends_with("without exit 1")));
    }
}
