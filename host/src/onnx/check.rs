//! Cross-checking an ONNX file: tract and ONNX Runtime on the same images, the largest logit
//! difference between them, and each one's accuracy when labels exist.
//!
//! [`CheckReport::compare_reference`] is the hook for a third implementation's logits (Burn's,
//! wired by the checkpoint side): it records the largest difference of the reference against
//! each runtime and the reference's accuracy.

use std::path::Path;

use anyhow::{Result, ensure};
use serde::Serialize;

use super::run::{OrtRunner, TractRunner};
use crate::engine::argmax;

/// Fraction of rows of `logits` (`[n][classes]`) whose arg-max is the label.
pub fn accuracy(logits: &[f32], labels: &[u32]) -> f32 {
    if labels.is_empty() {
        return 0.0;
    }
    let classes = logits.len() / labels.len();
    let correct = logits
        .chunks(classes)
        .zip(labels)
        .filter(|&(row, &y)| argmax(row) == y as usize)
        .count();
    correct as f32 / labels.len() as f32
}

/// Logits of one implementation.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeResult {
    /// `tract`, `onnxruntime`, `burn`, ...
    pub name: String,
    /// Accuracy on the labels, when there are labels.
    pub accuracy: Option<f32>,
    /// Flat `[images][classes]` logits.
    #[serde(skip)]
    pub logits: Vec<f32>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The checked file.
    pub model: String,
    /// Images run.
    pub images: usize,
    /// Images per runtime call.
    pub batch: usize,
    /// The ONNX Runtime library used.
    pub onnxruntime: String,
    /// tract, ONNX Runtime, then any references.
    pub runtimes: Vec<RuntimeResult>,
    /// `(a, b, max |logit_a - logit_b|)` for every compared pair.
    pub max_abs_diff: Vec<(String, String, f32)>,
}

/// The largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

impl CheckReport {
    /// The hook for reference logits (e.g. Burn's on the same images): adds `name`'s accuracy
    /// and its largest difference against every runtime checked so far.
    pub fn compare_reference(
        &mut self,
        name: &str,
        logits: Vec<f32>,
        labels: Option<&[u32]>,
    ) -> Result<()> {
        let expected = self.runtimes.first().map_or(0, |r| r.logits.len());
        ensure!(
            logits.len() == expected,
            "reference `{name}` has {} logits, the runtimes {expected}",
            logits.len()
        );
        for r in &self.runtimes {
            self.max_abs_diff.push((
                r.name.clone(),
                name.to_string(),
                max_abs_diff(&r.logits, &logits),
            ));
        }
        self.runtimes.push(RuntimeResult {
            name: name.to_string(),
            accuracy: labels.map(|l| accuracy(&logits, l)),
            logits,
        });
        Ok(())
    }

    /// The largest difference recorded between any two implementations.
    pub fn worst_diff(&self) -> f32 {
        self.max_abs_diff.iter().map(|d| d.2).fold(0.0, f32::max)
    }
}

/// Runs `path` in tract and ONNX Runtime on `n` images (flat NCHW, normalized as the model
/// expects) in batches of `batch`, and compares them.
pub fn check_onnx(
    path: &Path,
    images: &[f32],
    n: usize,
    labels: Option<&[u32]>,
    batch: usize,
) -> Result<CheckReport> {
    ensure!(n > 0 && batch > 0, "need at least one image and batch >= 1");
    if let Some(l) = labels {
        ensure!(l.len() == n, "{} labels for {n} images", l.len());
    }
    let mut tract = TractRunner::load(path)?;
    let mut ort = OrtRunner::load(path, 0)?;
    let per: usize = tract.info().image.iter().product();
    ensure!(
        images.len() == n * per,
        "{}: {} input values for {n} images of {:?}",
        path.display(),
        images.len(),
        tract.info().image
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(batch) {
        let m = batch.min(n - start);
        let x = &images[start * per..(start + m) * per];
        a.extend(tract.run(x, m)?);
        b.extend(ort.run(x, m)?);
    }
    ensure!(
        a.len() == b.len(),
        "tract gave {} logits, ONNX Runtime {}",
        a.len(),
        b.len()
    );
    let diff = max_abs_diff(&a, &b);
    Ok(CheckReport {
        model: path.display().to_string(),
        images: n,
        batch,
        onnxruntime: super::run::init_ort()?.display().to_string(),
        runtimes: vec![
            RuntimeResult {
                name: "tract".into(),
                accuracy: labels.map(|l| accuracy(&a, l)),
                logits: a,
            },
            RuntimeResult {
                name: "onnxruntime".into(),
                accuracy: labels.map(|l| accuracy(&b, l)),
                logits: b,
            },
        ],
        max_abs_diff: vec![("tract".into(), "onnxruntime".into(), diff)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_argmax() {
        let logits = [0.1, 0.9, 0.8, 0.2, 0.5, 0.5];
        assert_eq!(accuracy(&logits, &[1, 0, 1]), 2.0 / 3.0);
    }
}
