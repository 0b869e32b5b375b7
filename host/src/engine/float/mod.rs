//! The float engine: the checkpoint's network ([`crate::ir`]) with each run's perturbed
//! weights, classified by [`layers`] (an `f32` layer-at-a-time engine that matches Burn's
//! forward pass to `1e-4` of the logits' scale; see the test below).

use anyhow::{Result, ensure};
use nvcim_shared::{quant::ScaleMode, variation::VariationConfig};

use super::{BnRecalibration, NoisyClassifier, has_batchnorm, noisy_weights, weight_scales};
use crate::{
    data::{Batch, Dataset, batches},
    ir::{Network, convert::Loaded},
};

pub mod layers;

/// Images per batch of the float engine in `nvcim eval` ([`layers::BATCH`]).
pub const FLOAT_BATCH: usize = layers::BATCH;

/// The float engine of `nvcim eval` over the checkpoint's backbone, and its test data in
/// batches of `batch` images.
pub fn float_engine(
    loaded: &Loaded,
    test: &Dataset,
    mode: ScaleMode,
    batch: usize,
) -> Result<(FloatEngine, FloatData)> {
    let engine = FloatEngine::new(loaded.network()?, mode)?;
    let data = FloatData::new(&batches(test, batch));
    Ok((engine, data))
}

/// The float engine: the checkpoint's network ([`crate::ir`]) with each run's perturbed
/// weights, classified by [`layers`] (an `f32` engine that matches Burn's forward pass
/// to `1e-4` of the logits' scale; see the test below).
pub struct FloatEngine {
    net: Network,
    clean: Vec<Vec<f32>>,
    scales: Vec<f32>,
    recal: Option<BnRecalibration>,
}

impl FloatEngine {
    /// An engine over `net`, its weights quantized against per-layer or per-model `max|W|`.
    pub fn new(net: Network, mode: ScaleMode) -> Result<Self> {
        let clean: Vec<Vec<f32>> = net.weights().into_iter().map(<[f32]>::to_vec).collect();
        let scales = weight_scales(&clean, mode)?;
        Ok(FloatEngine {
            net,
            clean,
            scales,
            recal: None,
        })
    }

    /// The engine with every Monte Carlo run's BatchNorm statistics re-estimated by `recal`
    /// after its weights are programmed (the clean accuracy keeps the checkpoint's statistics).
    pub fn with_recalibration(mut self, recal: BnRecalibration) -> Result<Self> {
        ensure!(
            has_batchnorm(&self.net),
            "--bn-recalibrate: the network has no BatchNorm to recalibrate"
        );
        self.recal = Some(recal);
        Ok(self)
    }

    /// The network of run `run` under `seed` as it classifies: its perturbed weights, and its
    /// BatchNorm statistics recalibrated through them when the engine recalibrates.
    pub fn run_network(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<Network> {
        let mut net = self.noisy_network(var, seed, run)?;
        if let Some(r) = &self.recal {
            r.apply(&mut net)?;
        }
        Ok(net)
    }

    /// [`FloatEngine::run_network`] of an engine that recalibrates, with the largest `|value|`
    /// of each node's output over the recalibration images (see
    /// [`layers::recalibrate_batchnorm`]).
    pub fn recalibrated_network(
        &self,
        var: &VariationConfig,
        seed: u64,
        run: u32,
    ) -> Result<(Network, Vec<f32>)> {
        let mut net = self.noisy_network(var, seed, run)?;
        let r = self
            .recal
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the engine does not recalibrate BatchNorm"))?;
        let max = r.apply(&mut net)?;
        Ok((net, max))
    }

    /// The network with the weights of run `run` under `seed`.
    pub fn noisy_network(&self, var: &VariationConfig, seed: u64, run: u32) -> Result<Network> {
        let noisy = noisy_weights(&self.clean, &self.scales, var, seed, run)?;
        let mut net = self.net.clone();
        net.set_weights(noisy)?;
        Ok(net)
    }

    fn count(&self, net: &Network, data: &FloatData) -> Result<usize> {
        layers::Prepared::new(net, layers::Isa::detect())?.count_correct(&data.batches)
    }
}

/// The float engine's test set: normalized `[n][c][h][w]` batches and their labels, converted
/// once for every run.
pub struct FloatData {
    batches: Vec<(Vec<f32>, Vec<i64>)>,
}

impl FloatData {
    /// The batches' images and labels.
    pub fn new(batches: &[Batch]) -> Self {
        FloatData {
            batches: batches
                .iter()
                .map(|b| (b.images.clone(), b.labels.clone()))
                .collect(),
        }
    }
}

impl NoisyClassifier for FloatEngine {
    type Data = FloatData;

    fn num_layers(&self) -> usize {
        self.clean.len()
    }

    fn num_examples(&self, data: &FloatData) -> usize {
        data.batches.iter().map(|(_, l)| l.len()).sum()
    }

    fn clean(&self, data: &FloatData) -> Result<usize> {
        self.count(&self.net, data)
    }

    fn run(&self, var: &VariationConfig, seed: u64, run: u32, data: &FloatData) -> Result<usize> {
        let net = self.run_network(var, seed, run)?;
        self.count(&net, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::convert::to_network;
    use crate::ir::{Normalization, Provenance};
    use crate::model::{Arch, ModelSpec};
    use burn::tensor::Device;
    use burn::tensor::{Distribution, Tensor};
    use nvcim_shared::quant::QuantConfig;
    use nvcim_shared::variation::{Faults, Profile, SigmaUnit};

    #[test]
    fn float_engine_run_equals_burn_with_the_perturbed_weights() {
        let _rng = crate::burn_rng_guard();
        for arch in [Arch::Vgg8, Arch::Resnet18] {
            let spec = ModelSpec {
                arch,
                width: 0.0625,
                in_channels: 1,
                image_size: 16,
                num_classes: 10,
                graph: None,
            };
            let dev = Device::flex();
            dev.seed(4);
            let b = spec.init_backbone(&dev);
            let net =
                to_network(&b, &spec, Normalization::identity(1), Provenance::default()).unwrap();
            let engine = FloatEngine::new(net.clone(), ScaleMode::PerLayer).unwrap();
            let var = VariationConfig::new(
                QuantConfig::new(8, 2).unwrap(),
                0.5,
                SigmaUnit::Range,
                Profile::Uniform,
                Faults::NONE,
            )
            .unwrap();
            // Burn's backbone with the run's weights: the float engine's definition.
            let clean = b.weights();
            let scales = weight_scales(&clean, ScaleMode::PerLayer).unwrap();
            let mut noisy = b.clone();
            noisy
                .set_weights(&noisy_weights(&clean, &scales, &var, 7, 3).unwrap())
                .unwrap();
            let x = Tensor::<4>::random([3, 1, 16, 16], Distribution::Default, &dev);
            let input: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap();
            let want: Vec<f32> = noisy.forward(x).into_data().try_to_vec::<f32>().unwrap();
            let run = engine.noisy_network(&var, 7, 3).unwrap();
            for isa in layers::Isa::available() {
                let got = layers::Prepared::new(&run, isa)
                    .unwrap()
                    .logits(&input, 3)
                    .unwrap();
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Random init: BatchNorm is the identity, so logits grow with depth; compare
                // relatively.
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                assert!(
                    diff < 1e-4 * scale,
                    "{arch:?} {isa:?}: max diff {diff} at logit scale {scale}"
                );
            }
            // And the run's weights differ from the clean ones (the test can fail).
            assert_ne!(noisy.weights(), clean);
        }
    }
}
