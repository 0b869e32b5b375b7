//! The integer engine: the packed CiM model the firmware runs ([`nvcim_shared::format`]), its
//! tiles programmed per run, classified on the collapsed path by the layer-at-a-time
//! [`layers`] engine and with a non-ideal ADC image by image through `shared`'s `exec` on the
//! host's [`crate::kernels::dot`] kernel — bit-exact with the firmware either way.

use anyhow::{Context, Result, ensure};
use nvcim_shared::{
    exec::{Scratch, count_correct_with, program},
    format::{Model, build::PackConfig},
    tile::{Adc, Path as TilePath},
    variation::VariationConfig,
};

use super::{BnRecalibration, NoisyClassifier, float::FloatEngine};
use crate::{
    data::Dataset,
    ir::{Network, Op, convert::Loaded},
    kernels::{Isa, dot::HostKernel},
    pack::{calibrate_network, pack_network},
};

pub mod layers;

/// The integer engine of `nvcim eval`: the checkpoint packed with `test` and activation scales
/// calibrated on `calibration` training images (see [`crate::pack::pack_checkpoint`]), with an ideal ADC or
/// one of `adc_bits`; with `recal`, every run's BatchNorm statistics are re-estimated through
/// its perturbed weights and folded into its requantization records ([`IntEngine`]).
#[allow(clippy::too_many_arguments)]
pub fn int_engine(
    loaded: &Loaded,
    train: &Dataset,
    test: &Dataset,
    calibration: usize,
    cfg: &PackConfig,
    adc_bits: Option<u8>,
    noisy_sigma: f32,
    recal: Option<BnRecalibration>,
) -> Result<IntEngine> {
    int_engine_for(
        loaded.network()?,
        &loaded.path,
        train,
        test,
        calibration,
        cfg,
        adc_bits,
        noisy_sigma,
        recal,
    )
}

/// [`int_engine`] for any network (an imported ONNX model's too; `what` names it in errors):
/// `train` and `test` hold raw pixels in its input shape, normalized by `net.normalization`.
#[allow(clippy::too_many_arguments)]
pub fn int_engine_for(
    net: Network,
    what: &std::path::Path,
    train: &Dataset,
    test: &Dataset,
    calibration: usize,
    cfg: &PackConfig,
    adc_bits: Option<u8>,
    noisy_sigma: f32,
    recal: Option<BnRecalibration>,
) -> Result<IntEngine> {
    let c = calibrate_network(net, what, train, calibration, cfg, noisy_sigma)?;
    let blob = pack_network(&c.net, &c.act_max, test, cfg, what)?;
    let mut engine = IntEngine::new(blob, adc_bits)?;
    if let Some(r) = recal {
        engine.recal = Some(IntRecal {
            float: FloatEngine::new(c.net.clone(), cfg.scale_mode)?.with_recalibration(r)?,
            net: c.net,
            test: test.clone(),
            cfg: *cfg,
            what: what.to_path_buf(),
        });
    }
    Ok(engine)
}

/// The integer engine over a packed model and its packed test images.
///
/// With BatchNorm recalibration (`--bn-recalibrate`), run `r` first takes the float engine's
/// network of the same run (the same draws, [`FloatEngine::run_network`]) and its recalibrated
/// BatchNorm statistics, repacks the clean weights with those statistics — `pack` folds
/// BatchNorm into each channel's requantization multiplier and bias, not into the weights, so
/// the tiles programmed from `stream(seed, r, l)` are the same — and classifies with that
/// blob. The activation scales are re-derived the same way, from the largest `|value|` of each
/// node's output over the recalibration images through that run's recalibrated network: the
/// recalibrated BatchNorm changes the layers' output ranges (largest activation 4.6 -> 7.6 in a
/// layer of the test model), and
/// scales calibrated for the checkpoint's statistics would then clip them (the periphery
/// that recalibrates BatchNorm after programming sets its activation ranges with it).
pub struct IntEngine {
    blob: Vec<u8>,
    path: TilePath,
    recal: Option<IntRecal>,
}

/// What a recalibrating [`IntEngine`] repacks from.
struct IntRecal {
    float: FloatEngine,
    net: crate::ir::Network,
    test: Dataset,
    cfg: PackConfig,
    what: std::path::PathBuf,
}

impl IntEngine {
    /// An engine over `blob`, with an ideal ADC or one of `adc_bits`.
    pub fn new(blob: Vec<u8>, adc_bits: Option<u8>) -> Result<Self> {
        let model = Model::parse(&blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
        ensure!(
            model.test_len() > 0,
            "the packed model holds no test images"
        );
        let path = match adc_bits {
            None => TilePath::Collapsed,
            Some(bits) => TilePath::Sliced(
                Adc::with_full_scale(
                    bits,
                    nvcim_firmware::mc::adc_full_scale(model.quant(), model.tile_rows()),
                )
                .map_err(|e| anyhow::anyhow!("--adc-bits {bits}: {e}"))?,
            ),
        };
        Ok(IntEngine {
            blob,
            path,
            recal: None,
        })
    }

    fn model(&self) -> Result<Model<'_>> {
        Model::parse(&self.blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))
    }

    fn count(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<usize> {
        let Some(r) = &self.recal else {
            return int_run(&self.model()?, self.path, var, seed, run);
        };
        let (noisy, mut act_max) = r.float.recalibrated_network(var, seed, run)?;
        // As `act_scales`: a node that never fires (or is fused into the next) gets scale 1.
        act_max
            .iter_mut()
            .filter(|m| **m <= 0.0)
            .for_each(|m| *m = 1.0);
        let mut net = r.net.clone();
        for (node, from) in net.nodes.iter_mut().zip(&noisy.nodes) {
            if let (Op::BatchNorm(bn), Op::BatchNorm(re)) = (&mut node.op, &from.op) {
                bn.mean.clone_from(&re.mean);
                bn.var.clone_from(&re.var);
            }
        }
        let blob = pack_network(&net, &act_max, &r.test, &r.cfg, &r.what)
            .with_context(|| format!("repacking run {run} with its recalibrated BatchNorm"))?;
        let model = Model::parse(&blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))?;
        int_run(&model, self.path, var, seed, run)
    }
}

/// One Monte Carlo run of the integer engine: programs run `run`'s tiles under `seed` and
/// counts the packed test batch's correct classifications, the same bits as the firmware's: on
/// the collapsed path by the layer-at-a-time [`layers`] engine, with a non-ideal ADC image by
/// image through `exec` on the host's tile kernel. `nvcim eval --engine int` and `nvcim firmware run`'s comparison both
/// call it.
pub fn int_run(
    m: &Model<'_>,
    path: TilePath,
    var: &VariationConfig,
    seed: u64,
    run: u32,
) -> Result<usize> {
    let mut state = vec![0i16; m.state_len(path)];
    program(m, var, seed, run, path, &mut state)
        .map_err(|e| anyhow::anyhow!("programming run {run}: {e}"))?;
    if layers::unsupported(m, path).is_none() {
        return layers::count_correct(m, &state, layers::BATCH, Isa::detect())
            .with_context(|| format!("classifying run {run}"));
    }
    let s = m.scratch();
    let (mut act, mut patch, mut logits) = (
        vec![0u8; s.act_bytes],
        vec![0i16; s.patch],
        vec![0i32; s.logits],
    );
    let mut scratch = Scratch {
        act: &mut act,
        patch: &mut patch,
    };
    count_correct_with::<HostKernel>(m, path, &state, &mut scratch, &mut logits)
        .map_err(|e| anyhow::anyhow!("classifying run {run}: {e}"))
}

impl NoisyClassifier for IntEngine {
    type Data = ();

    fn num_layers(&self) -> usize {
        self.model().map_or(0, |m| m.layer_count())
    }

    fn num_examples(&self, _: &()) -> usize {
        self.model().map_or(0, |m| m.test_len())
    }

    fn clean(&self, _: &()) -> Result<usize> {
        // The checkpoint's own BatchNorm statistics (as the float engine's clean accuracy).
        let var = self.model()?.variation().with_sigma(0.0)?;
        int_run(&self.model()?, self.path, &var, 0, 0)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, _: &()) -> Result<usize> {
        self.count(var, seed, run)
    }
}
