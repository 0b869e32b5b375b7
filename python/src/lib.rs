//! `nvcim._nvcim`: the compiled half of the Python package `nvcim` (PyO3, abi3 for CPython >=
//! 3.9). The Python half (`pysrc/nvcim`) re-exports it with docstrings and adds `nvcim.torch`.
//!
//! - [`PyVariationConfig`] is the device model of the CLI's `--m/--n/--sigma-unit/
//!   --device-profile/--stuck-low/--stuck-high`, with the same checks;
//! - [`perturb`] is the float engine's perturbation of one weight layer: quantized against the
//!   layer's own `max|W|`, devices drawn from `rng::stream(seed, run, layer)` in the array's C
//!   order (nvcim's canonical `[out][in]...` order), bit-identical to `nvcim eval --engine
//!   float`'s weights for that run and layer;
//! - [`evaluate_onnx`] is `nvcim eval --onnx --engine tract` on images the caller holds (a typed
//!   [`nvcim::eval::EvalPlan`], no argv), returning `eval.json`'s fields as a `dict`; on nvcim's
//!   models its runs equal the CLI's default float engine's (the pytest suite checks it);
//! - [`onnx_dataset`] reads an IDX test (or training) split prepared as an ONNX model expects it,
//!   exactly as `nvcim eval --onnx --data-dir` does.
//!
//! Errors are Python exceptions: `ValueError` for a bad argument value, `TypeError` for a wrong
//! type or dtype, `FileNotFoundError` for a missing file, `RuntimeError` for a model or data file
//! that cannot be used (with nvcim's message naming the file). Long work releases the GIL, and a
//! panic in the Rust code (a bug) is caught and raised as `RuntimeError`, never an abort.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use clap::ValueEnum;
use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use nvcim::{
    commands::eval::onnx_model_info,
    engine::onnx::{OnnxData, OnnxEngine},
    eval::{EvalPlan, compute_report},
    onnx::{ModelInfo, idx_split_images},
    options::DeviceProfile,
};
use nvcim_shared::{
    quant::{QuantConfig, layer_scale},
    rng::stream,
    variation::{Faults, Profile, SigmaUnit, VariationConfig},
};
use pyo3::{
    exceptions::{PyFileNotFoundError, PyRuntimeError, PyTypeError, PyValueError},
    prelude::*,
    types::PyTuple,
};

/// `ValueError(msg)`.
fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// An nvcim error as `RuntimeError`, with its whole chain of context.
fn runtime_error(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// Runs `f` without the GIL, turning a panic into `RuntimeError`.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> anyhow::Result<T> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            PyRuntimeError::new_err(format!(
                "internal error in nvcim (please report it): {what}"
            ))
        })?
        .map_err(runtime_error)
}

/// The device model: `M`-bit weight magnitudes sliced into `M / N` devices of `N` bits, each
/// with Gaussian conductance variation of std `sigma` (in `unit`), an optional state-dependent
/// profile and stuck-at faults.
#[pyclass(name = "VariationConfig", module = "nvcim", frozen, eq)]
#[derive(Debug, Clone, PartialEq)]
pub struct PyVariationConfig {
    /// Weight magnitude bits M.
    #[pyo3(get)]
    m: u8,
    /// Bits per device N.
    #[pyo3(get)]
    n: u8,
    unit: SigmaUnit,
    profile: Profile,
    /// Fraction of devices stuck at level 0.
    #[pyo3(get)]
    stuck_low: f32,
    /// Fraction of devices stuck at the top level.
    #[pyo3(get)]
    stuck_high: f32,
    inner: VariationConfig,
}

fn bits(name: &str, v: i64) -> PyResult<u8> {
    u8::try_from(v).map_err(|_| value_error(format!("{name}={v}: not a supported bit width")))
}

impl PyVariationConfig {
    /// The shared crate's configuration.
    pub fn config(&self) -> &VariationConfig {
        &self.inner
    }

    fn build(
        m: i64,
        n: i64,
        sigma: f64,
        unit: &str,
        profile: &str,
        stuck_low: f64,
        stuck_high: f64,
    ) -> PyResult<Self> {
        let (m, n) = (bits("m", m)?, bits("n", n)?);
        let quant =
            QuantConfig::new(m, n).map_err(|e| value_error(format!("m={m}, n={n}: {e}")))?;
        let unit = match unit {
            "range" => SigmaUnit::Range,
            "level" => SigmaUnit::Level,
            other => {
                return Err(value_error(format!(
                    "unit must be 'range' (a fraction of one device's full range, the paper's \
                     tables) or 'level' (one conductance level); got '{other}'"
                )));
            }
        };
        let profile = DeviceProfile::from_str(profile, false)
            .map(Profile::from)
            .map_err(|_| {
                value_error(format!(
                    "profile must be one of {}; got '{profile}'",
                    Profile::ALL.map(|p| format!("'{}'", p.name())).join(", ")
                ))
            })?;
        let (sl, sh) = (stuck_low as f32, stuck_high as f32);
        let faults = Faults::new(sl, sh).map_err(|e| {
            value_error(format!(
                "stuck_low={stuck_low}, stuck_high={stuck_high}: {e}"
            ))
        })?;
        let s = sigma as f32;
        if !sigma.is_finite() || sigma < 0.0 || !s.is_finite() {
            return Err(value_error(format!(
                "sigma={sigma} is invalid: sigma must be finite and >= 0"
            )));
        }
        let inner = VariationConfig::new(quant, s, unit, profile, faults)
            .map_err(|e| value_error(format!("sigma={sigma}: {e}")))?;
        Ok(PyVariationConfig {
            m,
            n,
            unit,
            profile,
            stuck_low: sl,
            stuck_high: sh,
            inner,
        })
    }
}

#[pymethods]
impl PyVariationConfig {
    #[new]
    #[pyo3(signature = (m=8, n=2, sigma=0.4, unit="range", profile="uniform", stuck_low=0.0, stuck_high=0.0))]
    fn new(
        m: i64,
        n: i64,
        sigma: f64,
        unit: &str,
        profile: &str,
        stuck_low: f64,
        stuck_high: f64,
    ) -> PyResult<Self> {
        Self::build(m, n, sigma, unit, profile, stuck_low, stuck_high)
    }

    /// The device variation, in `unit`.
    #[getter]
    fn sigma(&self) -> f32 {
        self.inner.sigma()
    }

    /// `'range'` or `'level'`.
    #[getter]
    fn unit(&self) -> &'static str {
        self.unit.name()
    }

    /// The state-dependent profile's name.
    #[getter]
    fn profile(&self) -> &'static str {
        self.profile.name()
    }

    /// Devices per weight, M / N.
    #[getter]
    fn devices_per_weight(&self) -> usize {
        self.inner.quant().slices()
    }

    /// This device model at another sigma.
    fn with_sigma(&self, sigma: f64) -> PyResult<Self> {
        Self::build(
            i64::from(self.m),
            i64::from(self.n),
            sigma,
            self.unit.name(),
            self.profile.name(),
            f64::from(self.stuck_low),
            f64::from(self.stuck_high),
        )
    }

    /// Closed-form std of a read-back weight (no faults) for a layer whose largest |weight| is
    /// `max_abs`, in the weights' own units: `max_abs * device_sigma * sqrt(sum_j 4^(jN)) /
    /// (2^M - 1)`. `magnitude` (the weight's code, 0..2^M-1) matters only for a non-uniform
    /// profile.
    #[pyo3(signature = (max_abs, magnitude=0))]
    fn weight_std(&self, max_abs: f64, magnitude: i64) -> PyResult<f64> {
        if !max_abs.is_finite() || max_abs < 0.0 {
            return Err(value_error(format!(
                "max_abs={max_abs} is invalid: it must be finite and >= 0"
            )));
        }
        let top = i64::from(self.inner.quant().max_magnitude());
        let q = u16::try_from(magnitude)
            .ok()
            .filter(|&q| i64::from(q) <= top)
            .ok_or_else(|| value_error(format!("magnitude={magnitude} is outside 0..={top}")))?;
        Ok(max_abs * self.inner.weight_std(q))
    }

    fn __repr__(&self) -> String {
        format!(
            "VariationConfig(m={}, n={}, sigma={}, unit='{}', profile='{}', stuck_low={}, stuck_high={})",
            self.m,
            self.n,
            self.inner.sigma(),
            self.unit.name(),
            self.profile.name(),
            self.stuck_low,
            self.stuck_high
        )
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let me = slf.get();
        let args = PyTuple::new(
            slf.py(),
            [
                i64::from(me.m).into_pyobject(slf.py())?.into_any(),
                i64::from(me.n).into_pyobject(slf.py())?.into_any(),
                f64::from(me.inner.sigma())
                    .into_pyobject(slf.py())?
                    .into_any(),
                me.unit.name().into_pyobject(slf.py())?.into_any(),
                me.profile.name().into_pyobject(slf.py())?.into_any(),
                f64::from(me.stuck_low).into_pyobject(slf.py())?.into_any(),
                f64::from(me.stuck_high).into_pyobject(slf.py())?.into_any(),
            ],
        )?;
        Ok((slf.get_type().into_any(), args))
    }
}

/// The array `obj` as an `f32` ndarray, or `TypeError` naming `what` and what it is.
fn f32_array<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a numpy.ndarray of float32, not {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "this type".into(), |n| n.to_string())
        ))
    })?;
    let dtype = untyped.dtype();
    if !dtype.is_equiv_to(&numpy::dtype::<f32>(obj.py())) {
        return Err(PyTypeError::new_err(format!(
            "{what} must be float32, not {}; convert with {what}.astype(numpy.float32) (the \
             device model's draws are defined on float32 weights)",
            dtype
                .str()
                .map_or_else(|_| "this dtype".into(), |s| s.to_string())
        )));
    }
    Ok(obj.cast::<PyArrayDyn<f32>>()?.clone())
}

/// Perturbs one weight layer as the float engine does (see the module docs). A layer of
/// 131,072 weights or more is split over `threads` threads (default: the cores this process
/// may use), with the same result.
#[pyfunction]
#[pyo3(signature = (weights, config, seed, run, layer, threads=None))]
fn perturb<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
    config: &PyVariationConfig,
    seed: u64,
    run: u32,
    layer: u32,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if threads == Some(0) {
        return Err(value_error(
            "threads must be at least 1 (or None for every core)",
        ));
    }
    let w = f32_array(weights, "weights")?;
    let ro = w.readonly();
    if ro.len() == 0 {
        return Err(value_error(
            "weights is empty: there is no layer to perturb",
        ));
    }
    let out = PyArrayDyn::<f32>::zeros(py, ro.shape(), false);
    let owned: Vec<f32>;
    // C order is nvcim's canonical order; a C-contiguous array is read in place.
    let src: &[f32] = if w.is_c_contiguous() {
        ro.as_slice().map_err(|e| value_error(e.to_string()))?
    } else {
        owned = ro.as_array().iter().copied().collect();
        &owned
    };
    let mut rw = out.readwrite();
    let dst = rw.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    let cfg = *config.config();
    let r = py.detach(|| -> Result<(), String> {
        let scale = layer_scale(src).map_err(|e| format!("weights: {e}"))?;
        // One layer at a time from Python: its pieces on every core (the same bits).
        let threads =
            threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        nvcim::engine::perturb::perturb_f32(
            &cfg,
            src,
            scale,
            &mut stream(seed, run, layer),
            dst,
            threads,
        )
        .map_err(|e| format!("weights: {e}"))
    });
    r.map_err(value_error)?;
    drop(rw);
    Ok(out)
}

fn check_file(path: &Path, what: &str) -> PyResult<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(PyFileNotFoundError::new_err(format!(
            "{what} {} does not exist or is not a file",
            path.display()
        )))
    }
}

/// Monte Carlo evaluation of an ONNX CNN on `images` (N, C, H, W float32, normalized as the
/// model expects) against integer `labels`: `eval.json`'s fields as a JSON string.
#[pyfunction]
#[pyo3(signature = (path, images, labels, sigmas, mc, seed, jobs=None, config=None))]
#[allow(clippy::too_many_arguments)]
fn evaluate_onnx_json<'py>(
    py: Python<'py>,
    path: PathBuf,
    images: &Bound<'py, PyAny>,
    labels: &Bound<'py, PyAny>,
    sigmas: Vec<f64>,
    mc: i64,
    seed: u64,
    jobs: Option<i64>,
    config: Option<Bound<'py, PyVariationConfig>>,
) -> PyResult<String> {
    check_file(&path, "the ONNX model")?;
    let images = f32_array(images, "images")?;
    if images.ndim() != 4 {
        return Err(value_error(format!(
            "images must be 4-D (N, C, H, W); got a {}-D array of shape {:?}",
            images.ndim(),
            images.shape()
        )));
    }
    let labels = labels
        .cast::<PyArray1<i64>>()
        .map_err(|_| PyTypeError::new_err("labels must be a 1-D numpy.ndarray of int64"))?;
    let n = images.shape()[0];
    if labels.len() != n || n == 0 {
        return Err(value_error(format!(
            "{} images and {} labels: give one label per image, at least one",
            n,
            labels.len()
        )));
    }
    if sigmas.is_empty() {
        return Err(value_error(
            "sigmas is empty: give at least one, e.g. [0.2, 0.4]",
        ));
    }
    if let Some(s) = sigmas.iter().find(|s| !s.is_finite() || **s < 0.0) {
        return Err(value_error(format!(
            "sigmas: {s} is invalid; sigma must be finite and >= 0"
        )));
    }
    if mc < 1 || mc > i64::from(u32::MAX) {
        return Err(value_error(format!("mc={mc}: it must be at least 1")));
    }
    if let Some(j) = jobs.filter(|&j| j < 1) {
        return Err(value_error(format!("jobs={j}: it must be at least 1")));
    }
    let labels: Vec<u32> = labels
        .readonly()
        .as_array()
        .iter()
        .map(|&y| u32::try_from(y).map_err(|_| value_error(format!("labels: {y} is negative"))))
        .collect::<PyResult<_>>()?;
    let flat: Vec<f32> = images.readonly().as_array().iter().copied().collect();
    let shape = images.shape()[1..].to_vec();
    let config = match config {
        Some(c) => c.get().clone(),
        None => PyVariationConfig::build(8, 2, 0.0, "range", "uniform", 0.0, 0.0)?,
    };
    let variation = config
        .config()
        .with_sigma(0.0)
        .map_err(|e| value_error(e.to_string()))?;
    let mut plan = EvalPlan::new(
        sigmas.iter().map(|&s| s as f32).collect(),
        mc as u32,
        seed,
        variation,
    )
    .map_err(|e| value_error(format!("{e:#}")))?;
    if let Some(j) = jobs {
        plan.jobs = j as usize;
    }
    detached(py, move || {
        let engine = OnnxEngine::new(&path)?;
        let info = ModelInfo::of(engine.model(), engine.what())?;
        anyhow::ensure!(
            shape == info.image,
            "{}: images of shape (N, {}, {}, {}) given; the model takes (N, {}, {}, {})",
            engine.what(),
            shape[0],
            shape[1],
            shape[2],
            info.image[0],
            info.image[1],
            info.image[2]
        );
        let model_info = onnx_model_info(&engine, &path, "numpy arrays");
        let data = OnnxData {
            images: flat,
            labels,
        };
        let report = compute_report(&plan, &model_info, &engine, &data)?;
        Ok(serde_json::to_string(&report)?)
    })
}

/// `(images (N, C, H, W) float32, labels (N,) int64)`.
type ImagesLabels<'py> = (Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArray1<i64>>);

/// The IDX split `split` (`"test"` or `"train"`) in `data_dir`, prepared as the ONNX model at
/// `path` expects (size and normalization), as `nvcim eval --onnx --data-dir` reads it: the
/// first `limit` images (all by default) and their labels.
#[pyfunction]
#[pyo3(signature = (path, data_dir, split="test", limit=None))]
fn onnx_dataset<'py>(
    py: Python<'py>,
    path: PathBuf,
    data_dir: PathBuf,
    split: &str,
    limit: Option<i64>,
) -> PyResult<ImagesLabels<'py>> {
    check_file(&path, "the ONNX model")?;
    let stem = match split {
        "test" => "t10k",
        "train" => "train",
        other => {
            return Err(value_error(format!(
                "split must be 'test' or 'train'; got '{other}'"
            )));
        }
    };
    let limit = match limit {
        None => usize::MAX,
        Some(l) if l >= 1 => usize::try_from(l).unwrap_or(usize::MAX),
        Some(l) => return Err(value_error(format!("limit={l}: it must be at least 1"))),
    };
    let (images, labels, image) = detached(py, move || {
        let engine = OnnxEngine::new(&path)?;
        let info = ModelInfo::of(engine.model(), engine.what())?;
        let (images, labels) = idx_split_images(&data_dir, stem, engine.model(), &info, |n| {
            Ok((0..limit.min(n)).collect())
        })?;
        Ok((images, labels, info.image))
    })?;
    let n = labels.len();
    let images = PyArray1::from_vec(py, images)
        .reshape([n, image[0], image[1], image[2]])?
        .to_dyn()
        .clone();
    let labels = PyArray1::from_vec(py, labels.into_iter().map(i64::from).collect());
    Ok((images, labels))
}

/// The compiled module.
#[pymodule]
fn _nvcim(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVariationConfig>()?;
    m.add_function(wrap_pyfunction!(perturb, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_onnx_json, m)?)?;
    m.add_function(wrap_pyfunction!(onnx_dataset, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
