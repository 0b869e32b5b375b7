//! The integer engine: the packed CiM model the firmware runs ([`nvcim_shared::format`]), its
//! tiles programmed per run, classified on the collapsed path by the layer-at-a-time
//! [`layers`] engine and with a non-ideal ADC image by image through `shared`'s `exec` on the
//! host's [`crate::engine::simd`] kernel — bit-exact with the firmware either way.

use anyhow::{Context, Result, ensure};
use nvcim_shared::{
    exec::{Scratch, count_correct_with, program},
    format::{Model, build::PackConfig},
    tile::{Adc, Path as TilePath},
    variation::VariationConfig,
};

use super::{NoisyClassifier, simd::HostKernel};
use crate::{data::Dataset, ir::convert::Loaded, pack::pack_checkpoint};

pub mod layers;

/// The integer engine of `nvcim eval`: the checkpoint packed with `test` and activation scales
/// calibrated on `calibration` training images (see [`pack_checkpoint`]), with an ideal ADC or
/// one of `adc_bits`.
pub fn int_engine(
    loaded: &Loaded,
    train: &Dataset,
    test: &Dataset,
    calibration: usize,
    cfg: &PackConfig,
    adc_bits: Option<u8>,
    noisy_sigma: f32,
) -> Result<IntEngine> {
    let blob = pack_checkpoint(loaded, train, test, calibration, cfg, noisy_sigma)?;
    IntEngine::new(blob, adc_bits)
}

/// The integer engine over a packed model and its packed test images.
pub struct IntEngine {
    blob: Vec<u8>,
    path: TilePath,
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
        Ok(IntEngine { blob, path })
    }

    fn model(&self) -> Result<Model<'_>> {
        Model::parse(&self.blob).map_err(|e| anyhow::anyhow!("packed model: {e}"))
    }

    fn count(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<usize> {
        int_run(&self.model()?, self.path, var, seed, run)
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
        return layers::count_correct(m, &state, layers::BATCH, layers::Isa::detect())
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
        let var = self.model()?.variation().with_sigma(0.0)?;
        self.count(&var, 0, 0)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, _: &()) -> Result<usize> {
        self.count(var, seed, run)
    }
}
