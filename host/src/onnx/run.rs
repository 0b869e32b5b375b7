//! Running an ONNX file: [`TractRunner`] (tract-onnx, pure Rust) and [`OrtRunner`] (ONNX Runtime
//! through `ort`, the shared library loaded at run time, see [`super::locate_ort`]).
//!
//! Both take a flat NCHW `f32` batch and return the flat `[batch][classes]` logits.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use anyhow::{Context, Result, anyhow, ensure};
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoTValue, Tensor, TypedRunnableModel,
    tvec,
};

use super::ModelInfo;

/// A model in tract, optimized once per batch size it is run at.
pub struct TractRunner {
    model: tract_onnx::prelude::InferenceModel,
    info: ModelInfo,
    what: String,
    plans: HashMap<usize, Arc<TypedRunnableModel>>,
}

impl TractRunner {
    /// Loads an ONNX file.
    pub fn load(path: &Path) -> Result<Self> {
        let proto = super::read_model(path)?;
        Self::from_proto(&proto, &path.display().to_string())
    }

    /// Loads a decoded model; `what` names it in errors.
    pub fn from_proto(proto: &ModelProto, what: &str) -> Result<Self> {
        let info = ModelInfo::of(proto, what)?;
        let model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("tract cannot load {what}"))?;
        Ok(TractRunner {
            model,
            info,
            what: what.to_string(),
            plans: HashMap::new(),
        })
    }

    /// Names and input shape.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Prepares (optimizes) the plan for `batch` images; [`Self::run`] does this on first use.
    pub fn prepare(&mut self, batch: usize) -> Result<Arc<TypedRunnableModel>> {
        if let Some(p) = self.plans.get(&batch) {
            return Ok(p.clone());
        }
        let [c, h, w] = self.info.image;
        let fact = InferenceFact::dt_shape(DatumType::F32, tvec![batch, c, h, w]);
        let plan = self
            .model
            .clone()
            .with_input_fact(0, fact)
            .and_then(|m| m.into_optimized())
            .and_then(tract_onnx::prelude::IntoRunnable::into_runnable)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("tract cannot optimize {} at batch {batch}", self.what))?;
        self.plans.insert(batch, plan.clone());
        Ok(plan)
    }

    /// Runs `batch` images (flat NCHW); returns the flat logits.
    pub fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        let [c, h, w] = self.info.image;
        ensure!(
            batch > 0 && input.len() == batch * c * h * w,
            "{}: input has {} values, expected {batch} x {c} x {h} x {w}",
            self.what,
            input.len()
        );
        let plan = self.prepare(batch)?;
        let x = Tensor::from_shape(&[batch, c, h, w], input).map_err(|e| anyhow!("{e:?}"))?;
        let out = plan
            .run(tvec![x.into_tvalue()])
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("tract failed running {}", self.what))?;
        let y = out
            .first()
            .with_context(|| format!("{}: no output", self.what))?;
        let logits = y
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>().map(<[f32]>::to_vec))
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("{}: output is not f32", self.what))?;
        ensure!(
            y.shape().first() == Some(&batch),
            "{}: output shape {:?} is not [batch, classes]",
            self.what,
            y.shape()
        );
        Ok(logits)
    }
}

/// The ONNX Runtime library, loaded once per process.
static ORT: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> =
    OnceLock::new();

/// Loads ONNX Runtime (once) and returns the library's path.
pub fn init_ort() -> Result<PathBuf> {
    Ok(ort_environment()?.0.clone())
}

/// The loaded library and its environment (loaded on first use).
fn ort_environment() -> Result<&'static (PathBuf, ort::environment::Environment)> {
    let loaded = ORT.get_or_init(|| {
        let lib = super::locate_ort().map_err(|e| format!("{e:#}"))?;
        let env = ort::init_from(&lib)
            .map_err(|e| format!("loading ONNX Runtime from {}: {e}", lib.display()))?
            .with_name("nvcim")
            .build()
            .map_err(|e| format!("starting ONNX Runtime from {}: {e}", lib.display()))?;
        Ok((lib, env))
    });
    loaded.as_ref().map_err(|e| anyhow!("{e}"))
}

/// A model in ONNX Runtime (CPU execution provider).
pub struct OrtRunner {
    session: ort::session::Session,
    info: ModelInfo,
    what: String,
}

impl OrtRunner {
    /// Loads an ONNX file; `threads` intra-op threads (0: ONNX Runtime's default).
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        let what = path.display().to_string();
        let proto = super::read_model(path)?;
        let info = ModelInfo::of(&proto, &what)?;
        let (_, env) = ort_environment()?;
        let mut builder = ort::session::Session::builder(env)
            .map_err(|e| anyhow!("{e}"))
            .context("creating an ONNX Runtime session")?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| anyhow!("{e}"))?;
        }
        let session = builder
            .commit_from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("ONNX Runtime cannot load {what}"))?;
        Ok(OrtRunner {
            session,
            info,
            what,
        })
    }

    /// Names and input shape.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs `batch` images (flat NCHW); returns the flat logits.
    pub fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        let [c, h, w] = self.info.image;
        ensure!(
            batch > 0 && input.len() == batch * c * h * w,
            "{}: input has {} values, expected {batch} x {c} x {h} x {w}",
            self.what,
            input.len()
        );
        let x = ort::value::Tensor::from_array(([batch, c, h, w], input.to_vec()))
            .map_err(|e| anyhow!("{e}"))?;
        let what = &self.what;
        let outputs = self
            .session
            .run(ort::inputs![self.info.input.as_str() => x])
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("ONNX Runtime failed running {what}"))?;
        let y = outputs
            .get(self.info.output.as_str())
            .with_context(|| format!("{what}: no output `{}`", self.info.output))?;
        let (shape, data) = y
            .try_extract_tensor::<f32>()
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{what}: output is not an f32 tensor"))?;
        ensure!(
            shape.first() == Some(&(batch as i64)),
            "{what}: output shape {shape:?} is not [batch, classes]"
        );
        Ok(data.to_vec())
    }
}
