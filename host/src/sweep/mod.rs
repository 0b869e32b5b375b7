//! Experiment plans: a grid of training + evaluation cells read from a TOML file; [`run`] runs
//! them on this machine and [`slurm`] writes the scripts that run them on a Slurm cluster.
//!
//! ```toml
//! name = "fmnist-table2-cpu"
//! datasets = ["fashion-mnist"]
//! models = ["vgg8"]
//! methods = ["vanilla", "noise", "nft"]
//! train_sigmas = [0.2, 0.4, 0.6]   # noise / nft only; vanilla trains without noise
//! alphas = [0.01]                  # nft / nft-ovf only
//! seeds = [0]
//! epochs = 10
//! # optional: out, data_dir, width, sigma_unit, alpha_by_model, drop_exits, train_args,
//! #           train_args_by_model = { resnet18 = ["--lr", "0.01"] },
//! #           onnx_models = { mycnn = "models/mycnn.onnx" }   # then models = ["mycnn"]
//!
//! [eval]
//! sigmas = [0.2, 0.4, 0.6]
//! mc = 50
//! # optional: seed (0), engine ("float"), test_subset, args
//!
//! [slurm]                          # optional, for --emit slurm
//! partition = "gpu"                # optional: partition, account, time, gres, cpus_per_task,
//! time = "48:00:00"                #   mem, and free `directives = ["--qos=long"]`
//! gres = "gpu:1"
//! ```
//!
//! **Cells.** The grid is datasets x models x methods x training sigma x alpha x drop-exit x
//! seeds, with the axes a method does not use collapsed: `vanilla` has no training sigma and no
//! alpha, `noise` no alpha, and only `nft` has exits to drop (`drop_exits = [i, ...]` adds one
//! ablation cell per listed exit next to the full model). `alpha_by_model` overrides `alphas`
//! for the models it names (the paper's best alpha differs per model). A training sigma of 0
//! trains without noise injection (Table IV's "without" row). `train_args_by_model` adds
//! flags to the trainings of the models it names, after `train_args` (the authors train
//! ResNet-18 at `--lr 0.01`, VGG-8 at the default 1e-3).
//!
//! **Your own CNN.** `onnx_models` names ONNX files; a name listed there may stand in `models`,
//! and its cells train `nvcim train --onnx FILE` (the file's weights as the starting point, exits
//! by `--exits auto`) instead of `--model NAME`. The plan's `width` applies to the built-in
//! models only. Input flags the file needs (`--mean`, `--std`, `--fit`, `--gray-to-rgb`,
//! `--init random`, `--exits`) go in `train_args_by_model.NAME`. A relative path is taken from
//! the directory `nvcim sweep` runs in, as `data_dir` is.
//!
//! **Settings both verbs take flow through.** The device model a cell is trained under
//! (`--m`, `--n`, `--device-profile`, `--stuck-low`, `--stuck-high` in `train_args`, and
//! `sigma_unit`) is passed on to its `nvcim eval`, unless `[eval] args` sets that flag itself
//! (evaluating under another device model is then a visible choice of the plan).
//!
//! **Layout.** Cell `c` lives in `OUT/<c.name>/`: `train/` (the `nvcim train --out`),
//! `train.done` (written by the sweep when training exited successfully) and `eval/` (the
//! `nvcim eval --out`; its `eval.json` marks the cell finished). The commands are built by
//! [`train_command`] and [`eval_command`], the one place to adapt to the verbs' flags.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;

use crate::eval::results::EVAL_JSON;

pub mod run;
pub mod slurm;

pub use slurm::{merge_script, shell_line, shell_quote, slurm_script, submit_script};

/// Dataset names `nvcim train --dataset` accepts.
pub const DATASETS: [&str; 4] = ["mnist", "fashion-mnist", "cifar10", "cifar100"];
/// Model names `nvcim train --model` accepts.
pub const MODELS: [&str; 2] = ["vgg8", "resnet18"];
/// Training methods `nvcim train --method` accepts.
pub const METHODS: [&str; 4] = ["vanilla", "noise", "nft", "nft-ovf"];
/// Where `nvcim train --out DIR` leaves the checkpoint `nvcim eval` reads, relative to DIR.
pub const CHECKPOINT_IN_TRAIN_DIR: &str = "best/backbone.bpk";
/// Where `nvcim train` keeps the state it resumes from, relative to its `--out`.
pub const RESUME_STATE_IN_TRAIN_DIR: &str = "checkpoint";
/// The marker the sweep writes in a cell once training succeeded.
pub const TRAIN_DONE: &str = "train.done";

/// A sweep plan, as written in TOML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Name of the plan; the default output directory is `runs/<name>`.
    pub name: String,
    /// Output directory (overridden by `nvcim sweep --out`).
    pub out: Option<PathBuf>,
    /// Datasets.
    pub datasets: Vec<String>,
    /// Directory of the dataset files (`--data-dir`), if not the default.
    pub data_dir: Option<String>,
    /// Models.
    pub models: Vec<String>,
    /// Model width multiplier (`--width`), if not the default.
    pub width: Option<f64>,
    /// Training methods.
    pub methods: Vec<String>,
    /// Training sigma values (noise-injecting methods).
    #[serde(default)]
    pub train_sigmas: Vec<f32>,
    /// Alpha values (negative-feedback methods).
    #[serde(default)]
    pub alphas: Vec<f64>,
    /// Alpha values for particular models, replacing `alphas` for them.
    #[serde(default)]
    pub alpha_by_model: BTreeMap<String, Vec<f64>>,
    /// Exits to drop, one ablation cell each (nft only), next to the full model.
    #[serde(default)]
    pub drop_exits: Vec<usize>,
    /// Training seeds (independent runs).
    pub seeds: Vec<u64>,
    /// Training epochs.
    pub epochs: usize,
    /// The sigma convention of every sigma in the plan.
    #[serde(default = "default_unit")]
    pub sigma_unit: String,
    /// Extra flags for every `nvcim train`.
    #[serde(default)]
    pub train_args: Vec<String>,
    /// Extra flags for the trainings of particular models (after `train_args`).
    #[serde(default)]
    pub train_args_by_model: BTreeMap<String, Vec<String>>,
    /// Models given as ONNX files (`nvcim train --onnx FILE`), by the name `models` uses.
    #[serde(default)]
    pub onnx_models: BTreeMap<String, String>,
    /// The evaluation of every cell.
    pub eval: EvalPlan,
    /// Cluster options for `--emit slurm`.
    #[serde(default)]
    pub slurm: SlurmPlan,
}

/// The `[slurm]` table of a plan.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SlurmPlan {
    /// `--partition` of both jobs.
    pub partition: Option<String>,
    /// `--account` of both jobs.
    pub account: Option<String>,
    /// `--time` of each array task, e.g. `"48:00:00"`.
    pub time: Option<String>,
    /// `--gres` of each array task, e.g. `"gpu:1"`.
    pub gres: Option<String>,
    /// `--cpus-per-task` of each array task (default 8, unless a GPU or the directives set it).
    pub cpus_per_task: Option<u32>,
    /// `--mem` of each array task, e.g. `"16G"`.
    pub mem: Option<String>,
    /// Further `#SBATCH` options of each array task, e.g. `["--qos=long"]`.
    #[serde(default)]
    pub directives: Vec<String>,
}

fn default_unit() -> String {
    "range".into()
}

fn default_engine() -> String {
    "float".into()
}

/// The `[eval]` table of a plan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalPlan {
    /// Evaluation sigma values.
    pub sigmas: Vec<f32>,
    /// Monte Carlo runs per sigma.
    pub mc: u32,
    /// Seed of the variation streams.
    #[serde(default)]
    pub seed: u64,
    /// `float` or `int`.
    #[serde(default = "default_engine")]
    pub engine: String,
    /// Evaluate on the first this many test examples only.
    pub test_subset: Option<usize>,
    /// Extra flags for every `nvcim eval`.
    #[serde(default)]
    pub args: Vec<String>,
}

fn check_names(what: &str, given: &[String], known: &[&str]) -> Result<()> {
    ensure!(!given.is_empty(), "`{what}` is empty");
    for g in given {
        ensure!(
            known.contains(&g.as_str()),
            "unknown {what} entry `{g}` (known: {})",
            known.join(", ")
        );
    }
    Ok(())
}

fn check_sigmas(what: &str, s: &[f32]) -> Result<()> {
    for &v in s {
        ensure!(
            v.is_finite() && v >= 0.0,
            "`{what}` has {v}; sigma must be finite and >= 0"
        );
    }
    Ok(())
}

fn check_alphas(what: &str, a: &[f64]) -> Result<()> {
    for &v in a {
        ensure!(
            v.is_finite() && v > 0.0,
            "`{what}` has {v}; alpha must be > 0"
        );
    }
    Ok(())
}

impl Plan {
    /// Parses and checks a plan.
    pub fn parse(text: &str) -> Result<Plan> {
        let plan: Plan = toml::from_str(text).context("not a valid sweep plan")?;
        plan.check()?;
        Ok(plan)
    }

    /// Reads, parses and checks a plan file.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading plan {}", path.display()))?;
        Plan::parse(&text).with_context(|| format!("in plan {}", path.display()))
    }

    /// Checks names, ranges and that every method has the axes it needs.
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "`name` must be non-empty letters, digits, `-`, `_` or `.`"
        );
        check_names("datasets", &self.datasets, &DATASETS)?;
        for (name, file) in &self.onnx_models {
            ensure!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)),
                "`onnx_models` name `{name}` must be non-empty letters, digits, `-` or `.` (it \
                 becomes part of the cell directories' names)"
            );
            ensure!(
                !MODELS.contains(&name.as_str()),
                "`onnx_models` name `{name}` is a built-in model's; choose another"
            );
            ensure!(
                !file.is_empty(),
                "`onnx_models.{name}` is empty: give the ONNX file's path"
            );
        }
        let known: Vec<&str> = MODELS
            .iter()
            .copied()
            .chain(self.onnx_models.keys().map(String::as_str))
            .collect();
        check_names("models", &self.models, &known)?;
        for m in self.onnx_models.keys() {
            ensure!(
                self.models.contains(m),
                "`onnx_models` names `{m}`, which is not in `models`"
            );
        }
        for m in self.train_args_by_model.keys() {
            ensure!(
                self.models.contains(m),
                "`train_args_by_model` names `{m}`, which is not in `models`"
            );
        }
        check_names("methods", &self.methods, &METHODS)?;
        ensure!(!self.seeds.is_empty(), "`seeds` is empty");
        ensure!(self.epochs > 0, "`epochs` must be at least 1");
        if let Some(w) = self.width {
            ensure!(w.is_finite() && w > 0.0, "`width` must be > 0");
        }
        ensure!(
            self.sigma_unit == "range" || self.sigma_unit == "level",
            "`sigma_unit` must be `range` or `level`, not `{}`",
            self.sigma_unit
        );
        check_sigmas("train_sigmas", &self.train_sigmas)?;
        check_alphas("alphas", &self.alphas)?;
        for (m, a) in &self.alpha_by_model {
            ensure!(
                self.models.contains(m),
                "`alpha_by_model` names `{m}`, which is not in `models`"
            );
            ensure!(!a.is_empty(), "`alpha_by_model.{m}` is empty");
            check_alphas(&format!("alpha_by_model.{m}"), a)?;
        }
        let injects = self.methods.iter().any(|m| m != "vanilla");
        ensure!(
            !injects || !self.train_sigmas.is_empty(),
            "`train_sigmas` is empty but methods {:?} train with noise",
            self.methods
        );
        if self.methods.iter().any(|m| m.starts_with("nft")) {
            for m in &self.models {
                ensure!(
                    !self.alphas_for(m).is_empty(),
                    "no alpha for model `{m}`: set `alphas` or `alpha_by_model.{m}`"
                );
            }
        }
        ensure!(
            self.drop_exits.is_empty() || self.methods.iter().any(|m| m == "nft"),
            "`drop_exits` needs method `nft` (the only one with exits)"
        );
        let e = &self.eval;
        ensure!(!e.sigmas.is_empty(), "`eval.sigmas` is empty");
        check_sigmas("eval.sigmas", &e.sigmas)?;
        ensure!(e.mc > 0, "`eval.mc` must be at least 1");
        ensure!(
            e.engine == "float" || e.engine == "int",
            "`eval.engine` must be `float` or `int`, not `{}`",
            e.engine
        );
        ensure!(
            e.test_subset != Some(0),
            "`eval.test_subset` must be at least 1"
        );
        for d in &self.slurm.directives {
            ensure!(
                d.starts_with("--") && !d.chars().any(char::is_whitespace),
                "`slurm.directives` entry `{d}` must be one `--option[=value]`"
            );
        }
        let sl = &self.slurm;
        for (k, v) in [
            ("partition", &sl.partition),
            ("account", &sl.account),
            ("time", &sl.time),
            ("gres", &sl.gres),
            ("mem", &sl.mem),
        ] {
            if let Some(v) = v {
                ensure!(
                    !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '#'),
                    "`slurm.{k}` = `{v}` must be one word (Slurm's own syntax, e.g. time = \"48:00:00\")"
                );
            }
        }
        ensure!(
            sl.cpus_per_task != Some(0),
            "`slurm.cpus_per_task` must be at least 1"
        );
        Ok(())
    }

    fn alphas_for(&self, model: &str) -> &[f64] {
        self.alpha_by_model
            .get(model)
            .map_or(&self.alphas[..], Vec::as_slice)
    }

    /// Every cell of the grid, in a fixed order (datasets, models, methods, sigma, alpha,
    /// drop-exit, seed); names are unique.
    pub fn cells(&self) -> Vec<Cell> {
        let mut out = Vec::new();
        for dataset in &self.datasets {
            for model in &self.models {
                for method in &self.methods {
                    let sigmas: Vec<Option<f32>> = if method == "vanilla" {
                        vec![None]
                    } else {
                        self.train_sigmas.iter().copied().map(Some).collect()
                    };
                    let alphas: Vec<Option<f64>> = if method.starts_with("nft") {
                        self.alphas_for(model).iter().copied().map(Some).collect()
                    } else {
                        vec![None]
                    };
                    let mut drops = vec![None];
                    if method == "nft" {
                        drops.extend(self.drop_exits.iter().copied().map(Some));
                    }
                    for &sigma in &sigmas {
                        for &alpha in &alphas {
                            for &drop_exit in &drops {
                                for &seed in &self.seeds {
                                    out.push(Cell {
                                        dataset: dataset.clone(),
                                        model: model.clone(),
                                        method: method.clone(),
                                        sigma,
                                        alpha,
                                        drop_exit,
                                        seed,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The output directory: `--out` if given, else the plan's `out`, else `runs/<name>`.
    pub fn out_dir(&self, flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf)
            .or_else(|| self.out.clone())
            .unwrap_or_else(|| Path::new("runs").join(&self.name))
    }
}

/// One grid cell: one training run and its evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Dataset.
    pub dataset: String,
    /// Model.
    pub model: String,
    /// Training method.
    pub method: String,
    /// Training sigma (`None` for vanilla).
    pub sigma: Option<f32>,
    /// Alpha (`None` unless negative feedback).
    pub alpha: Option<f64>,
    /// Dropped exit (`None`: all exits).
    pub drop_exit: Option<usize>,
    /// Training seed.
    pub seed: u64,
}

impl Cell {
    /// The directory name: the parameters that are set, e.g.
    /// `fashion-mnist_vgg8_nft_s0.4_a0.01_seed0`, or `..._drop1_seed0` for an ablation.
    pub fn name(&self) -> String {
        let mut s = format!("{}_{}_{}", self.dataset, self.model, self.method);
        if let Some(v) = self.sigma {
            write!(s, "_s{v}").expect("writing to a String");
        }
        if let Some(a) = self.alpha {
            write!(s, "_a{a}").expect("writing to a String");
        }
        if let Some(d) = self.drop_exit {
            write!(s, "_drop{d}").expect("writing to a String");
        }
        write!(s, "_seed{}", self.seed).expect("writing to a String");
        s
    }

    /// The cell's directory under `out`.
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join(self.name())
    }
}

/// The state of a cell on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellState {
    /// Nothing there yet.
    New,
    /// Training started but did not finish: rerun it with `--resume`.
    PartialTraining,
    /// Training finished; the evaluation did not.
    Trained,
    /// `eval/eval.json` exists: nothing to do.
    Finished,
}

/// Inspects a cell's directory.
pub fn cell_state(cell_dir: &Path) -> CellState {
    if cell_dir.join("eval").join(EVAL_JSON).is_file() {
        CellState::Finished
    } else if cell_dir.join(TRAIN_DONE).is_file() {
        CellState::Trained
    } else if [
        RESUME_STATE_IN_TRAIN_DIR,
        "checkpoint.old",
        "checkpoint.tmp",
    ]
    .iter()
    .any(|d| cell_dir.join("train").join(d).exists())
    {
        CellState::PartialTraining
    } else {
        CellState::New
    }
}

/// A command line: program arguments after the `nvcim` binary.
pub type Args = Vec<String>;

/// `nvcim train ...` for a cell (with `--resume` to continue a partial run).
pub fn train_command(plan: &Plan, cell: &Cell, cell_dir: &Path, resume: bool) -> Args {
    let mut a: Args = vec!["train".into()];
    let mut flag = |k: &str, v: String| {
        a.push(format!("--{k}"));
        a.push(v);
    };
    flag("dataset", cell.dataset.clone());
    if let Some(d) = &plan.data_dir {
        flag("data-dir", d.clone());
    }
    match plan.onnx_models.get(&cell.model) {
        Some(file) => flag("onnx", file.clone()),
        None => {
            flag("model", cell.model.clone());
            if let Some(w) = plan.width {
                flag("width", w.to_string());
            }
        }
    }
    flag("method", cell.method.clone());
    if let Some(al) = cell.alpha {
        flag("alpha", al.to_string());
    }
    // Vanilla trains without noise whatever its sigma; say so explicitly.
    flag("sigma", cell.sigma.unwrap_or(0.0).to_string());
    flag("sigma-unit", plan.sigma_unit.clone());
    if let Some(d) = cell.drop_exit {
        flag("drop-exit", d.to_string());
    }
    flag("epochs", plan.epochs.to_string());
    flag("seed", cell.seed.to_string());
    flag("out", cell_dir.join("train").display().to_string());
    if resume {
        a.push("--resume".into());
    }
    a.extend(plan.train_args.iter().cloned());
    if let Some(extra) = plan.train_args_by_model.get(&cell.model) {
        a.extend(extra.iter().cloned());
    }
    a
}

/// The device-model flags of `nvcim train` that `nvcim eval` takes too (`--sigma-unit` is
/// passed from the plan's `sigma_unit`). Aliases are listed with their flag.
const DEVICE_FLAGS: [&[&str]; 5] = [
    &["--m"],
    &["--n"],
    &["--device-profile", "--profile"],
    &["--stuck-low"],
    &["--stuck-high"],
];

/// The device-model flags (with their values) in `args`, as `[flag, value]` pairs, for the
/// flags `skip` does not set itself.
fn device_flags(args: &[String], skip: &[String]) -> Vec<String> {
    let sets = |names: &[&str], list: &[String]| {
        list.iter().any(|a| {
            names
                .iter()
                .any(|n| a == n || a.starts_with(&format!("{n}=")))
        })
    };
    let mut out = Vec::new();
    for names in DEVICE_FLAGS {
        if sets(names, skip) {
            continue;
        }
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if names.contains(&a.as_str()) {
                if let Some(v) = args.get(i + 1) {
                    out.extend([a.clone(), v.clone()]);
                }
                i += 2;
                continue;
            }
            if names.iter().any(|n| a.starts_with(&format!("{n}="))) {
                out.push(a.clone());
            }
            i += 1;
        }
    }
    out
}

/// `nvcim eval CKPT ...` for a cell (`cell` gives the model whose `train_args_by_model`
/// device flags also flow through).
pub fn eval_command(plan: &Plan, cell: &Cell, cell_dir: &Path) -> Args {
    let e = &plan.eval;
    let sigmas: Vec<String> = e.sigmas.iter().map(f32::to_string).collect();
    let mut a: Args = vec![
        "eval".into(),
        cell_dir
            .join("train")
            .join(CHECKPOINT_IN_TRAIN_DIR)
            .display()
            .to_string(),
        "--sigma".into(),
        sigmas.join(","),
        "--sigma-unit".into(),
        plan.sigma_unit.clone(),
        "--mc".into(),
        e.mc.to_string(),
        "--seed".into(),
        e.seed.to_string(),
        "--engine".into(),
        e.engine.clone(),
    ];
    if let Some(n) = e.test_subset {
        a.push("--test-subset".into());
        a.push(n.to_string());
    }
    a.push("--out".into());
    a.push(cell_dir.join("eval").display().to_string());
    let mut train_args = plan.train_args.clone();
    if let Some(extra) = plan.train_args_by_model.get(&cell.model) {
        train_args.extend(extra.iter().cloned());
    }
    a.extend(device_flags(&train_args, &e.args));
    a.extend(e.args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
name = "t"
datasets = ["fashion-mnist"]
models = ["vgg8", "resnet18"]
methods = ["vanilla", "noise", "nft"]
train_sigmas = [0.2, 0.4]
alphas = [0.01]
alpha_by_model = { resnet18 = [0.1, 0.001] }
drop_exits = [1]
seeds = [0, 1]
epochs = 3
data_dir = "/data/fm"
[eval]
sigmas = [0.2, 0.4, 0.6]
mc = 5
"#;

    #[test]
    fn cells_collapse_unused_axes() {
        let plan = Plan::parse(PLAN).unwrap();
        let cells = plan.cells();
        // Per seed: vgg8 vanilla 1 + noise 2 + nft 2 sigma x 1 alpha x 2 drop = 7;
        // resnet18 1 + 2 + 2 x 2 x 2 = 11. Times two seeds.
        assert_eq!(cells.len(), 2 * (7 + 11));
        let names: Vec<String> = cells.iter().map(Cell::name).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert_eq!(names[0], "fashion-mnist_vgg8_vanilla_seed0");
        assert!(names.contains(&"fashion-mnist_vgg8_noise_s0.4_seed1".to_string()));
        assert!(names.contains(&"fashion-mnist_resnet18_nft_s0.2_a0.001_drop1_seed0".to_string()));
        assert!(
            !names
                .iter()
                .any(|n| n.contains("vgg8_nft") && n.contains("_a0.1_"))
        );
        assert_eq!(plan.eval.engine, "float");
        assert_eq!(plan.out_dir(None), Path::new("runs/t"));
        assert_eq!(plan.out_dir(Some(Path::new("x"))), Path::new("x"));
    }

    #[test]
    fn bad_plans_are_clear_errors() {
        let cases: [(&str, &str, &str); 9] = [
            (
                "models = [\"vgg8\", \"resnet18\"]",
                "models = [\"vgg9\"]",
                "vgg9",
            ),
            (
                "methods = [\"vanilla\", \"noise\", \"nft\"]",
                "methods = [\"nfT\"]",
                "nfT",
            ),
            ("mc = 5", "mc = 0", "eval.mc"),
            ("sigmas = [0.2, 0.4, 0.6]", "sigmas = []", "eval.sigmas"),
            (
                "train_sigmas = [0.2, 0.4]",
                "train_sigmas = [-0.2]",
                "train_sigmas",
            ),
            ("epochs = 3", "epochs = 3\nepoch = 4", "epoch"),
            (
                "alphas = [0.01]\nalpha_by_model = { resnet18 = [0.1, 0.001] }",
                "",
                "alpha",
            ),
            ("seeds = [0, 1]", "seeds = \"0\"", "seeds"),
            ("mc = 5", "mc = 5\nengine = \"gpu\"", "gpu"),
        ];
        for (from, to, needle) in cases {
            assert!(PLAN.contains(from), "{from}");
            let err = Plan::parse(&PLAN.replace(from, to)).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "{from} -> {to}: {msg}");
        }
        assert!(Plan::parse("not toml [").is_err());
        let err = Plan::load(Path::new("/nonexistent/plan.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/plan.toml"));
    }

    /// A model given as an ONNX file trains with `--onnx FILE` (no `--model`, no `--width`) and
    /// takes its own flags; bad `onnx_models` entries are clear errors.
    #[test]
    fn onnx_models_train_from_their_file() {
        let plan = PLAN.replace(
            "models = [\"vgg8\", \"resnet18\"]",
            "models = [\"vgg8\", \"mycnn\"]\nwidth = 0.5\nonnx_models = { mycnn = \"m/my.onnx\" }\n\
             train_args_by_model = { mycnn = [\"--mean\", \"0.5\"] }",
        );
        let plan = plan.replace("alpha_by_model = { resnet18 = [0.1, 0.001] }", "");
        let p = Plan::parse(&plan).unwrap();
        let cells = p.cells();
        let mine = cells.iter().find(|c| c.model == "mycnn").unwrap();
        let t = train_command(&p, mine, Path::new("/o/c"), false).join(" ");
        assert!(
            t.starts_with(
                "train --dataset fashion-mnist --data-dir /data/fm --onnx m/my.onnx --method"
            ),
            "{t}"
        );
        assert!(!t.contains("--width") && !t.contains("--model"), "{t}");
        assert!(t.ends_with("--mean 0.5"), "{t}");
        let vgg = cells.iter().find(|c| c.model == "vgg8").unwrap();
        let t = train_command(&p, vgg, Path::new("/o/c"), false).join(" ");
        assert!(t.contains("--model vgg8 --width 0.5"), "{t}");
        assert!(!t.contains("--mean"), "{t}");
        for (from, to, needle) in [
            ("mycnn = \"m/my.onnx\"", "vgg8 = \"m/my.onnx\"", "built-in"),
            ("mycnn = \"m/my.onnx\"", "mycnn = \"\"", "path"),
            (
                "mycnn = \"m/my.onnx\" }",
                "mycnn = \"m/my.onnx\", other = \"o.onnx\" }",
                "`other`",
            ),
            (
                "mycnn = \"m/my.onnx\"",
                "\"my_cnn\" = \"m/my.onnx\"",
                "letters",
            ),
            (
                "onnx_models = { mycnn = \"m/my.onnx\" }",
                "",
                "unknown models entry `mycnn`",
            ),
            (
                "train_args_by_model = { mycnn",
                "train_args_by_model = { yourcnn",
                "`yourcnn`",
            ),
        ] {
            assert!(plan.contains(from), "{from}");
            let err = Plan::parse(&plan.replace(from, to)).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(needle), "{from} -> {to}: {msg}");
        }
    }

    #[test]
    fn commands_carry_the_cell() {
        let plan = Plan::parse(PLAN).unwrap();
        let cell = plan
            .cells()
            .into_iter()
            .find(|c| c.drop_exit.is_some())
            .unwrap();
        let dir = cell.dir(Path::new("/o"));
        let t = train_command(&plan, &cell, &dir, true).join(" ");
        assert!(t.starts_with("train --dataset fashion-mnist --data-dir /data/fm --model vgg8 --method nft --alpha 0.01 --sigma 0.2 --sigma-unit range --drop-exit 1 --epochs 3 --seed 0"), "{t}");
        assert!(
            t.ends_with(&format!("--out {}/train --resume", dir.display())),
            "{t}"
        );
        let e = eval_command(&plan, &cell, &dir).join(" ");
        assert_eq!(
            e,
            format!(
                "eval {0}/train/best/backbone.bpk --sigma 0.2,0.4,0.6 --sigma-unit range --mc 5 --seed 0 --engine float --out {0}/eval",
                dir.display()
            )
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("0.2,0.4"), "0.2,0.4");
    }

    /// Every command the sweep emits — train and eval, fresh and resumed, for every cell of
    /// the test plan and of every plan shipped in `plans/` — parses with `nvcim`'s own CLI.
    #[test]
    fn every_emitted_command_parses() {
        use crate::cli::{Cli, Command};
        use clap::Parser;
        let mut plans = vec![Plan::parse(PLAN).unwrap()];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            plans.push(Plan::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display())));
        }
        let mut parsed = 0;
        for plan in &plans {
            for cell in plan.cells() {
                let dir = cell.dir(Path::new("/o"));
                for resume in [false, true] {
                    let mut args = vec!["nvcim".to_string()];
                    args.extend(train_command(plan, &cell, &dir, resume));
                    let cli = Cli::try_parse_from(&args)
                        .unwrap_or_else(|e| panic!("{}: {}\n{e}", plan.name, args.join(" ")));
                    let Command::Train(t) = cli.command else {
                        panic!("not a train command")
                    };
                    let cfg = t
                        .flags
                        .config()
                        .unwrap_or_else(|e| panic!("{}: {}: {e:#}", plan.name, args.join(" ")));
                    assert_eq!(cfg.drop_exit, cell.drop_exit);
                    assert_eq!(cfg.seed, cell.seed);
                    parsed += 1;
                }
                let mut args = vec!["nvcim".to_string()];
                args.extend(eval_command(plan, &cell, &dir));
                let cli = Cli::try_parse_from(&args)
                    .unwrap_or_else(|e| panic!("{}: {}\n{e}", plan.name, args.join(" ")));
                let Command::Eval(e) = cli.command else {
                    panic!("not an eval command")
                };
                e.eval.plan().unwrap();
                assert_eq!(e.checkpoint.unwrap(), dir.join("train/best/backbone.bpk"));
                parsed += 1;
            }
        }
        assert!(parsed > 100, "{parsed} commands");
    }

    /// The device model of the training reaches the evaluation, unless `[eval] args` sets it.
    #[test]
    fn device_settings_flow_from_train_to_eval() {
        use crate::{
            cli::{Cli, Command},
            options::DeviceProfile,
        };
        use clap::Parser;
        let mut plan = Plan::parse(PLAN).unwrap();
        plan.train_args = vec![
            "--device-profile".into(),
            "rram1".into(),
            "--stuck-low=0.01".into(),
        ];
        plan.train_args_by_model =
            BTreeMap::from([("resnet18".to_string(), vec!["--lr".into(), "0.01".into()])]);
        let cells = plan.cells();
        let parse_eval = |plan: &Plan, cell: &Cell| {
            let mut args = vec!["nvcim".to_string()];
            args.extend(eval_command(plan, cell, Path::new("/o/c")));
            match Cli::try_parse_from(&args).unwrap().command {
                Command::Eval(e) => e,
                _ => unreachable!(),
            }
        };
        let e = parse_eval(&plan, &cells[0]);
        assert_eq!(e.eval.device.profile, DeviceProfile::Rram1);
        assert_eq!(e.eval.device.stuck_low, 0.01);
        let resnet = cells.iter().find(|c| c.model == "resnet18").unwrap();
        let vgg = cells.iter().find(|c| c.model == "vgg8").unwrap();
        let t = train_command(&plan, resnet, Path::new("/o/c"), false).join(" ");
        assert!(
            t.ends_with("--device-profile rram1 --stuck-low=0.01 --lr 0.01"),
            "{t}"
        );
        let t = train_command(&plan, vgg, Path::new("/o/c"), false).join(" ");
        assert!(!t.contains("--lr"), "{t}");
        // The plan's own eval flags win.
        plan.eval.args = vec!["--profile".into(), "fefet2".into()];
        let e = parse_eval(&plan, &cells[0]);
        assert_eq!(e.eval.device.profile, DeviceProfile::Fefet2);
        assert_eq!(e.eval.device.stuck_low, 0.01);
    }

    #[test]
    fn slurm_scripts() {
        let plan = Plan::parse(PLAN).unwrap();
        let n = plan.cells().len();
        let s = slurm_script(
            &plan,
            Path::new("/p/t.toml"),
            Path::new("/runs/t"),
            Path::new("/home/u/proj"),
            "/bin/nvcim",
            n,
        )
        .unwrap();
        assert!(s.contains("#SBATCH --chdir=/home/u/proj\n"), "{s}");
        assert!(s.starts_with("#!/bin/bash\n"));
        assert!(s.contains(&format!("#SBATCH --array=0-{}\n", n - 1)), "{s}");
        assert!(
            s.contains("#SBATCH --output=/runs/t/logs/%x-%A_%a.out\n"),
            "{s}"
        );
        assert!(s.contains("NVCIM=\"${NVCIM_BIN:-/bin/nvcim}\"\n"), "{s}");
        assert!(
            s.contains(
                "exec \"$NVCIM\" sweep /p/t.toml --out /runs/t --cell \"$SLURM_ARRAY_TASK_ID\" --resume"
            ),
            "{s}"
        );
        let m = merge_script(
            &plan,
            Path::new("/p/t.toml"),
            Path::new("/runs/t"),
            Path::new("/home/u/proj"),
            "/bin/nvcim",
        )
        .unwrap();
        assert!(m.contains("#SBATCH --chdir=/home/u/proj\n"), "{m}");
        assert!(
            slurm_script(
                &plan,
                Path::new("p"),
                Path::new("o"),
                Path::new("/a b"),
                "n",
                1
            )
            .unwrap_err()
            .to_string()
            .contains("/a b has a space")
        );
        assert!(
            m.contains("exec \"$NVCIM\" sweep /p/t.toml --out /runs/t --merge"),
            "{m}"
        );
        let sub = submit_script(Path::new("/runs/t"), n).unwrap();
        assert!(
            sub.contains("--dependency=afterany:\"$jid\" /runs/t/merge.sbatch"),
            "{sub}"
        );
        assert!(s.contains("#SBATCH --cpus-per-task=8\n"));
        assert!(
            slurm_script(
                &plan,
                Path::new("p"),
                Path::new("o"),
                Path::new("/w"),
                "n",
                0
            )
            .is_err()
        );
        let gpu = Plan::parse(&format!(
            "{PLAN}\n[slurm]\ndirectives = [\"--gres=gpu:1\"]\n"
        ))
        .unwrap();
        let s = slurm_script(
            &gpu,
            Path::new("p"),
            Path::new("o"),
            Path::new("/w"),
            "n",
            3,
        )
        .unwrap();
        assert!(
            s.contains("#SBATCH --gres=gpu:1\n") && !s.contains("cpus-per-task"),
            "{s}"
        );
        // The named options of [slurm] become directives of the array (partition and account
        // of the merge job too).
        let named = Plan::parse(&format!(
            "{PLAN}\n[slurm]\npartition = \"short\"\ntime = \"01:30:00\"\ngres = \"gpu:a100:1\"\ncpus_per_task = 4\nmem = \"8G\"\naccount = \"lab\"\n"
        ))
        .unwrap();
        let s = slurm_script(
            &named,
            Path::new("p"),
            Path::new("o"),
            Path::new("/w"),
            "n",
            3,
        )
        .unwrap();
        for d in [
            "--partition=short",
            "--account=lab",
            "--time=01:30:00",
            "--gres=gpu:a100:1",
            "--mem=8G",
            "--cpus-per-task=4",
        ] {
            assert!(s.contains(&format!("#SBATCH {d}\n")), "{d}: {s}");
        }
        let m = merge_script(&named, Path::new("p"), Path::new("o"), Path::new("/w"), "n").unwrap();
        assert!(
            m.contains("#SBATCH --partition=short\n") && !m.contains("gres"),
            "{m}"
        );
        assert!(Plan::parse(&format!("{PLAN}\n[slurm]\ndirectives = [\"gres\"]\n")).is_err());
        let e = Plan::parse(&format!("{PLAN}\n[slurm]\ntime = \"1 day\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("slurm.time"), "{e:#}");
        assert!(Plan::parse(&format!("{PLAN}\n[slurm]\ncpus_per_task = 0\n")).is_err());
    }
}
