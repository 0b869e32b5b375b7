//! Checkpoints: written every epoch into a temporary directory and swapped in by rename, so a
//! crash never leaves a half-written checkpoint.
//!
//! Layout under `--out DIR`:
//! - `config.json` (the resolved run configuration), `model.json` (the backbone's
//!   [`ModelSpec`](crate::model::ModelSpec)), `metrics.jsonl` (one
//!   [`EpochMetrics`] per line);
//! - `checkpoint/`: `model.bpk` (backbone + exits, BN statistics, parameter ids), `optimizer.bpk`
//!   (Adam moments), `state.json` (epochs done = the scheduler's position, best so far, history,
//!   the RNG derivation);
//! - `best/`: `backbone.bpk` (the backbone alone, best validation accuracy under the run's
//!   `--select` rule, named in its `state.json`), `model.json`, `state.json`.
//!
//! Both directories hold `checksums.json` (the CRC-32 and length of each file, written with
//! them): `--resume` and every reader of `best/backbone.bpk` refuse a file that changed since
//! (saves from before checksums load as they are).
//!
//! Every file is `fsync`ed before the directory holding it is swapped in, and the swap itself
//! is two renames (`checkpoint/` -> `checkpoint.old/`, `checkpoint.tmp/` -> `checkpoint/`):
//! a process killed at any point leaves a complete `checkpoint/` or `checkpoint.old/`, which
//! `--resume` picks up ([`Checkpoint::latest`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{EpochMetrics, TrainConfig};
use crate::fsx::{self, read_json};
use crate::model::{Backbone, TrainModel};

/// Progress and selection state saved with each checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Epochs completed (the cosine scheduler's position).
    pub epochs_done: usize,
    /// The best epoch so far (1-based; 0 = none).
    pub best_epoch: usize,
    /// Its selection score (noisy validation accuracy, or clean when `--mc-val 0`).
    pub best_score: f64,
    /// Its clean validation accuracy.
    pub best_val_clean: f64,
    /// Its noisy validation accuracy.
    pub best_val_noisy: f64,
    /// Metrics of every epoch so far.
    pub history: Vec<EpochMetrics>,
    /// How the random state of the next epoch is derived (it is a function of seed and epoch).
    #[serde(default)]
    pub rng: String,
}

/// The checkpoint directories of one output directory.
pub struct Checkpoint {
    out: PathBuf,
}

pub use crate::fsx::{write_atomic, write_json_atomic};
pub use crate::model::load_backbone;

/// Fails, naming the differing keys, when a resumed run's configuration differs from the saved one.
pub fn ensure_same_config(saved: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        bail!("config.json is not a JSON object");
    };
    let differ: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        // Runs saved before recipes existed used nvcim's.
        .filter(|k| !(*k == "recipe" && a.get(*k).is_none() && b[*k] == "nvcim"))
        .map(|k| {
            format!(
                "{k}: saved {} now {}",
                a.get(k).unwrap_or(&serde_json::Value::Null),
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect();
    if !differ.is_empty() {
        bail!(
            "--resume with a different configuration ({}); pass the original flags or a new --out",
            differ.join("; ")
        );
    }
    Ok(())
}

/// On a failed write (a full disk, say), removes the partial `tmp` directory so it holds no
/// space, and says that `dir` is as it was.
fn abandon_on_error(written: Result<()>, tmp: &Path, dir: &Path) -> Result<()> {
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(tmp);
        let h = fsx::hint(&format!("{e:#}"));
        return Err(e.context(format!(
            "{} was not replaced and still holds the previous complete save{h}",
            dir.display()
        )));
    }
    Ok(())
}

/// Swaps `tmp` in as `dir`; `crash` names the crash point between the two renames.
fn swap_in(tmp: &Path, dir: &Path, crash: &str) -> Result<()> {
    let old = dir.with_extension("old");
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    // Everything in `tmp` is on disk before it replaces the previous directory.
    for entry in std::fs::read_dir(tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let entry = entry.with_context(|| format!("listing {}", tmp.display()))?;
        fsx::sync_file(&entry.path())?;
    }
    fsx::sync_dir(tmp)?;
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    fsx::crash_point(crash);
    std::fs::rename(tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    fsx::sync_dir(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn fresh_tmp(dir: &Path) -> Result<PathBuf> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

fn rec_err(e: burn::store::RecordError) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

impl Checkpoint {
    /// The checkpoints of `out`.
    pub fn new(out: &Path) -> Self {
        Checkpoint {
            out: out.to_path_buf(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    fn best_dir(&self) -> PathBuf {
        self.out.join("best")
    }

    /// The best backbone's file.
    pub fn best_backbone_path(&self) -> PathBuf {
        self.best_dir().join("backbone.bpk")
    }

    /// The newest complete checkpoint directory (`checkpoint/`, or `checkpoint.old/` when a
    /// crash hit between the two renames of a swap).
    pub fn latest(&self) -> Option<PathBuf> {
        let d = self.dir();
        [d.clone(), d.with_extension("old")]
            .into_iter()
            .find(|p| p.join("state.json").is_file())
    }

    /// Saves model, optimizer and state, and rewrites `metrics.jsonl`.
    pub fn save(
        &self,
        model: &TrainModel,
        optim: &ModuleOptimizer,
        cfg: &TrainConfig,
        state: &State,
    ) -> Result<()> {
        let dir = self.dir();
        let tmp = fresh_tmp(&dir)?;
        let written = (|| -> Result<()> {
            model
                .clone()
                .save_file(tmp.join("model.bpk"))
                .map_err(rec_err)
                .with_context(|| {
                    format!("saving the model to {}", tmp.join("model.bpk").display())
                })?;
            fsx::crash_point("checkpoint-files");
            optim
                .save(tmp.join("optimizer.bpk"))
                .map_err(rec_err)
                .with_context(|| {
                    format!(
                        "saving the optimizer to {}",
                        tmp.join("optimizer.bpk").display()
                    )
                })?;
            let mut st = state.clone();
            st.rng = format!(
                "derived: epoch e reseeds the device with epoch_seed({}, e) and draws shuffles/augmentation from stream_for(Host, {}, e, tag)",
                cfg.seed, cfg.seed
            );
            write_json_atomic(&tmp.join("state.json"), &serde_json::to_value(&st)?)?;
            fsx::write_checksums(&tmp)
        })();
        abandon_on_error(written, &tmp, &dir)?;
        swap_in(&tmp, &dir, "checkpoint-swap")?;
        fsx::crash_point("before-metrics");
        self.write_metrics(state)
    }

    /// Rewrites `metrics.jsonl` from the state's history (also on resume: a run killed after a
    /// checkpoint's swap and before this file was written gets it back).
    pub fn write_metrics(&self, state: &State) -> Result<()> {
        let mut lines = String::new();
        for m in &state.history {
            lines += &serde_json::to_string(m)?;
            lines.push('\n');
        }
        write_atomic(&self.out.join("metrics.jsonl"), lines.as_bytes())
    }

    /// Saves the backbone alone as the best so far.
    pub fn save_best(&self, backbone: &Backbone, cfg: &TrainConfig, state: &State) -> Result<()> {
        let dir = self.best_dir();
        let tmp = fresh_tmp(&dir)?;
        let written = (|| -> Result<()> {
            backbone
                .clone()
                .save_file(tmp.join("backbone.bpk"))
                .map_err(rec_err)
                .with_context(|| {
                    format!(
                        "saving the backbone to {}",
                        tmp.join("backbone.bpk").display()
                    )
                })?;
            write_json_atomic(&tmp.join("model.json"), &serde_json::to_value(&cfg.model)?)?;
            let info = serde_json::json!({
                "epoch": state.best_epoch,
                "val_clean_acc": state.best_val_clean,
                "val_noisy_acc": state.best_val_noisy,
                "selected_by": format!("{} validation accuracy", cfg.selection().name()),
            });
            write_json_atomic(&tmp.join("state.json"), &info)?;
            fsx::write_checksums(&tmp)
        })();
        abandon_on_error(written, &tmp, &dir)?;
        swap_in(&tmp, &dir, "best-swap")
    }

    /// Loads a checkpoint directory into a fresh model and the given optimizer.
    pub fn load(
        &self,
        dir: &Path,
        cfg: &TrainConfig,
        device: &Device,
        optim: ModuleOptimizer,
    ) -> Result<(TrainModel, State, ModuleOptimizer)> {
        fsx::verify_dir(dir).context("resuming")?;
        let state: State = serde_json::from_value(read_json(&dir.join("state.json"))?)
            .with_context(|| {
                format!(
                    "{} is not an nvcim checkpoint state",
                    dir.join("state.json").display()
                )
            })?;
        let backbone = cfg.model.init_backbone(device);
        let exits = if cfg.method.uses_exits() {
            cfg.model.init_exits(device)
        } else {
            Vec::new()
        };
        let p = dir.join("model.bpk");
        let record = ModuleRecord::load(&p)
            .map_err(rec_err)
            .with_context(|| format!("reading {}", p.display()))?;
        let model = TrainModel { backbone, exits };
        let model = if crate::model::legacy::is_legacy(&p) {
            // Written before VGG-8 and ResNet-18 became graphs: the names are mapped.
            crate::model::legacy::load_train_model(&p, &cfg.model, model)?
        } else {
            model
                .try_load_record(record)
                .map_err(rec_err)
                .with_context(|| format!("{} does not fit this model", p.display()))?
        };
        let p = dir.join("optimizer.bpk");
        let optim = optim
            .load(&p)
            .map_err(rec_err)
            .with_context(|| format!("reading {}", p.display()))?;
        Ok((model, state, optim))
    }
}
