//! Training noise: `shared`'s device-variation model sampled with tensor ops on the training
//! device, and the module mapper that perturbs every conv/linear weight of a model.
//!
//! The distribution is exactly `VariationConfig::sample` + `Readout::delta_weight` for a weight
//! quantized against its tensor's `max|W|` (per-layer scale):
//! - no faults: the error is `N(0, weight_std(q) * max|W|)`, one fused normal sample per tensor;
//!   with a state-dependent profile the std is chosen per weight from its quantized magnitude's
//!   band (a mask, no extra samples);
//! - with stuck-at faults: per device `j`, a uniform draw decides stuck-low / stuck-high /
//!   programmed, the device levels `g_j` come from the quantized magnitude, and the weight error is
//!   `±max|W|/(2^M-1) * sum_j 2^(jN) dg_j` (M/N extra tensors of draws).
//!
//! The numbers differ from `shared`'s PRNG streams (training does not need to replay them);
//! evaluation uses `shared` number for number.

use std::cell::RefCell;
use std::sync::mpsc;
use std::thread::JoinHandle;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Distribution, Shape, Tensor};
use nvcim_shared::variation::VariationConfig;

use crate::kernels::backend::on_flex;

/// Samples weight perturbations on the device of the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingNoise {
    cfg: VariationConfig,
}

impl TrainingNoise {
    /// Noise following `cfg`.
    pub fn new(cfg: VariationConfig) -> Self {
        TrainingNoise { cfg }
    }

    /// The variation model.
    pub fn config(&self) -> &VariationConfig {
        &self.cfg
    }

    /// Whether the noise is identically zero (sigma 0 and no faults).
    pub fn is_zero(&self) -> bool {
        self.cfg.sigma() == 0.0 && !self.cfg.faults().any()
    }

    /// One perturbation `dw` of the weight tensor `w` (no gradient flows through it).
    pub fn sample<const D: usize>(&self, w: Tensor<D>) -> Tensor<D> {
        // Sampled on the inner backend: `detach` alone left the scale's `abs` and `max` in the
        // autodiff graph, and every backward pass computed their (unused) gradients over every
        // weight. The draws come from the same generator either way.
        if w.is_autodiff() {
            return self.sample(w.inner()).autodiff();
        }
        let quant = self.cfg.quant();
        let max_mag = f32::from(quant.max_magnitude());
        let device = w.device();
        let shape = w.shape();
        // [1, ..., 1]: broadcasts against w.
        let scale: Tensor<D> = w.clone().abs().max().clamp_min(1e-30).unsqueeze::<D>();
        let profiled = self.cfg.profile().multiplier().is_some();
        // The quantized magnitude, only when something depends on it.
        let magnitude = (profiled || self.cfg.faults().any()).then(|| {
            (w.clone().abs() / scale.clone())
                .mul_scalar(max_mag)
                .round()
        });
        // A magnitude inside the profile band, and one outside, for the two closed-form stds.
        let (in_band, out_band) = (quant.max_magnitude() / 2, 0u16);
        let band = |m: &Tensor<D>| {
            let m4 = m.clone().mul_scalar(4.0);
            m4.clone()
                .greater_elem(max_mag)
                .bool_and(m4.lower_elem(3.0 * max_mag))
        };
        // Per-weight value of `f(magnitude)` for a function constant on each band.
        let per_weight = |f: &dyn Fn(u16) -> f64| -> Option<Tensor<D>> {
            let (fi, fo) = (f(in_band) as f32, f(out_band) as f32);
            match (&magnitude, profiled && fi != fo) {
                (Some(m), true) => Some(band(m).float().mul_scalar(fi - fo).add_scalar(fo)),
                _ => None,
            }
        };
        if !self.cfg.faults().any() {
            let z = draw::<D>(shape, Distribution::Normal(0.0, 1.0), &device);
            let std = self.cfg.weight_std(out_band) as f32;
            return match per_weight(&|q| self.cfg.weight_std(q)) {
                Some(stds) => z * stds * scale,
                None => z.mul_scalar(std) * scale,
            };
        }
        let device_sd = per_weight(&|q| f64::from(self.cfg.device_sigma(q)));
        let magnitude = magnitude.expect("computed when faults are enabled");
        let n = u32::from(quant.n_bits());
        let levels = f32::from(quant.max_level()) + 1.0;
        let top = f32::from(quant.max_level());
        let (p_low, p_high) = (
            self.cfg.faults().stuck_low(),
            self.cfg.faults().stuck_high(),
        );
        let sd0 = self.cfg.device_sigma(out_band);
        let mut dmag = Tensor::<D>::zeros(shape.clone(), &device);
        for j in 0..quant.slices() as u32 {
            let unit = (1u32 << (j * n)) as f32;
            let shifted = magnitude.clone().div_scalar(unit).floor();
            let g = shifted.clone() - shifted.div_scalar(levels).floor().mul_scalar(levels);
            let z = draw::<D>(shape.clone(), Distribution::Normal(0.0, 1.0), &device);
            let programmed = match &device_sd {
                Some(sd) => z * sd.clone(),
                None => z.mul_scalar(sd0),
            };
            // One uniform per device: u < p_low stuck low, else u < p_low + p_high stuck high.
            let u = draw::<D>(shape.clone(), Distribution::Uniform(0.0, 1.0), &device);
            let low = u.clone().lower_elem(p_low);
            let high = u.lower_elem(p_low + p_high);
            let d = programmed
                .mask_where(high, g.clone().neg().add_scalar(top))
                .mask_where(low, g.neg());
            dmag = dmag + d.mul_scalar(unit);
        }
        let sign = w.lower_elem(0.0).float().mul_scalar(-2.0).add_scalar(1.0);
        dmag * sign * scale.div_scalar(max_mag)
    }
}

/// What a [`WeightMapper`] does to each conv and linear weight.
pub trait WeightFn {
    /// The new value of weight tensor `w`.
    fn apply<const D: usize>(&mut self, w: Tensor<D>) -> Tensor<D>;
}

/// Maps every conv and linear weight (backbone and exits) through `F`, keeping each parameter's
/// id; every other parameter is left as it is.
pub struct WeightMapper<F> {
    f: F,
    path: ModulePath,
    /// How many tensors were mapped.
    pub mapped: usize,
}

impl<F> WeightMapper<F> {
    fn with(f: F) -> Self {
        WeightMapper {
            f,
            path: ModulePath::default(),
            mapped: 0,
        }
    }
}

impl<F: WeightFn> ModuleMapper for WeightMapper<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.path.at_weight() {
            return param;
        }
        self.mapped += 1;
        let f = &mut self.f;
        param.map(|w| f.apply(w))
    }
}

/// The modules a mapper or visitor is inside, innermost last (name, container type).
#[derive(Default)]
struct ModulePath(Vec<(String, String)>);

impl ModulePath {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.0.push((name.to_string(), container_type.to_string()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    /// Whether the innermost entered module is the `weight` field of a conv or linear layer.
    fn at_weight(&self) -> bool {
        matches!(self.0.last(), Some((name, ty)) if name == "weight"
            && (ty == "Struct:Conv2d" || ty == "Struct:Linear"))
    }
}

/// `w + dw` with a fresh `dw` drawn from the noise.
pub struct AddNoise<'a>(&'a TrainingNoise);

impl WeightFn for AddNoise<'_> {
    fn apply<const D: usize>(&mut self, w: Tensor<D>) -> Tensor<D> {
        let dw = self.0.sample(w.clone());
        w + dw
    }
}

/// Replaces every conv and linear weight `w` (backbone and exits) by `w + dw` with a fresh `dw`,
/// keeping `w`'s parameter id, so that gradients computed through the perturbed module land on
/// the clean parameters (`GradientsParams::from_grads(loss.backward(), &clean)`).
pub type NoiseMapper<'a> = WeightMapper<AddNoise<'a>>;

impl<'a> NoiseMapper<'a> {
    /// A mapper drawing from `noise`.
    pub fn new(noise: &'a TrainingNoise) -> Self {
        WeightMapper::with(AddNoise(noise))
    }
}

/// Clamps to `±k` times the tensor's population standard deviation.
struct Clip(f32);

impl WeightFn for Clip {
    fn apply<const D: usize>(&mut self, w: Tensor<D>) -> Tensor<D> {
        let flat: Tensor<1> = w.clone().detach().flatten(0, D - 1);
        let std = flat.var_bias(0).sqrt().into_scalar::<f32>();
        let c = self.0 * std;
        if !(c.is_finite() && c > 0.0) {
            return w;
        }
        let grad = w.is_require_grad();
        // Clamped on the inner backend: a fresh leaf, as the optimizer leaves its params.
        let out = if w.is_autodiff() {
            w.inner().clamp(-c, c).autodiff()
        } else {
            w.clamp(-c, c)
        };
        if grad { out.require_grad() } else { out }
    }
}

/// `module` with every conv and linear weight clamped to `±k` times its tensor's standard
/// deviation (population, over all of the tensor's elements): per-layer Gaussian clipping
/// (`--clip-weights`). Parameter ids are kept, so the optimizer's state follows them.
pub fn clip_weights<M: Module>(module: M, k: f32) -> M {
    module.map(&mut WeightMapper::with(Clip(k)))
}

/// The training noise's random tensors of the next training step, drawn on a helper thread
/// while this step runs (on Flex, the CPU backend).
///
/// Burn's CPU backend draws every value of `Tensor::random` one at a time from one generator
/// under a lock: about 23 ns a value, 300 ms of VGG-8 w1.0's step, with both rayon workers idle.
/// Its generator is Burn's, so the draws cannot be split or sped up without changing every
/// seed's numbers; but they do not depend on the weights, only on their shapes. So the first
/// step of a scope records the sequence of draws (elements and distribution), and from then on,
/// as soon as a step has taken its last draw and another step follows, a helper thread draws
/// the same sequence for the next step from the same generator, in the same order, while this
/// step's backward pass and update run. The numbers are those of drawing in place: nothing else
/// draws from the generator inside a scope (training draws only the noise), and the scope ends
/// with no draw pending (the last step of an epoch says that no step follows).
///
/// Outside a scope, and on other backends, the noise is drawn by `Tensor::random` in place.
pub struct DrawAhead(());

thread_local! {
    /// [`DrawAhead`]'s state on the thread that runs the training steps: `Some` inside a scope.
    static AHEAD: RefCell<Option<Ahead>> = const { RefCell::new(None) };
}

struct Ahead {
    /// One step's draws in order: elements and distribution.
    seq: Vec<(usize, Distribution)>,
    /// Whether `seq` holds a whole step (the first step has ended).
    known: bool,
    /// Draws this step has taken.
    pos: usize,
    /// Whether another step follows this one (draw its noise ahead).
    more: bool,
    /// The device the noise is drawn on (Flex's).
    device: Option<Device>,
    /// This step's draws, taken ahead by `helper`.
    ready: Option<mpsc::Receiver<Tensor<1>>>,
    helper: Option<JoinHandle<()>>,
}

impl DrawAhead {
    /// Starts a scope on this thread: until it is dropped, the noise this thread draws is drawn
    /// one step ahead.
    ///
    /// # Panics
    /// When this thread has a scope open already.
    pub fn scope() -> Self {
        AHEAD.with_borrow_mut(|g| {
            assert!(g.is_none(), "one DrawAhead scope at a time");
            *g = Some(Ahead {
                seq: Vec::new(),
                known: false,
                pos: 0,
                more: false,
                device: None,
                ready: None,
                helper: None,
            });
        });
        DrawAhead(())
    }

    /// Marks the start of a training step: `more` says whether another step follows it in this
    /// scope with the same draws (the same model, method and noise).
    pub fn begin_step(&self, more: bool) {
        AHEAD.with_borrow_mut(|g| {
            let a = g.as_mut().expect("inside the scope");
            if a.pos > 0 && !a.known {
                a.known = true;
            }
            assert!(
                !a.known || a.pos == a.seq.len(),
                "a training step took {} of its {} noise draws",
                a.pos,
                a.seq.len()
            );
            a.pos = 0;
            a.more = more;
            // The first step's draws are recorded, not known, until the second step begins.
            if a.known && a.ready.is_none() {
                a.launch();
            }
        });
    }
}

impl Drop for DrawAhead {
    fn drop(&mut self) {
        // `try_with`: nothing to end when the thread's storage is gone already.
        let a = AHEAD.try_with(|g| g.borrow_mut().take()).ok().flatten();
        if let Some(mut a) = a {
            // Whatever was drawn ahead is dropped; the helper ends before the generator is used
            // again.
            a.ready = None;
            if let Some(h) = a.helper.take() {
                let _ = h.join();
            }
        }
    }
}

impl Ahead {
    /// Starts drawing `seq` on a helper thread.
    fn launch(&mut self) {
        let Some(device) = self.device.clone() else {
            return;
        };
        if let Some(h) = self.helper.take() {
            let _ = h.join();
        }
        let (tx, rx) = mpsc::channel();
        let seq = self.seq.clone();
        self.helper = Some(std::thread::spawn(move || {
            for (n, dist) in seq {
                if tx.send(Tensor::<1>::random([n], dist, &device)).is_err() {
                    break;
                }
            }
        }));
        self.ready = Some(rx);
    }
}

/// `Tensor::random(shape, dist, device)`, taken from [`DrawAhead`]'s draws inside a scope.
/// `Tensor::random` fills a tensor in row-major order whatever its shape, so the same number
/// of elements drawn as one row are the same values.
fn draw<const D: usize>(shape: Shape, dist: Distribution, device: &Device) -> Tensor<D> {
    let n = shape.num_elements();
    let taken = AHEAD.with_borrow_mut(|g| {
        let a = g.as_mut().filter(|_| on_flex(device))?;
        if !a.known {
            a.seq.push((n, dist));
            a.pos += 1;
            a.device.get_or_insert_with(|| device.clone());
            return Some(Tensor::<1>::random([n], dist, device));
        }
        assert!(
            a.seq.get(a.pos) == Some(&(n, dist)),
            "noise draw {} of a training step is not the one the step before took there",
            a.pos
        );
        let t = a
            .ready
            .as_ref()
            .and_then(|rx| rx.recv().ok())
            .expect("the noise helper thread draws every value of the step");
        a.pos += 1;
        if a.pos == a.seq.len() {
            a.ready = None;
            if a.more {
                a.launch();
            }
        }
        Some(t)
    });
    match taken {
        Some(t) => t.reshape(shape),
        None => Tensor::<D>::random(shape, dist, device),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};
    use nvcim_shared::quant::QuantConfig;
    use nvcim_shared::variation::{Faults, Profile, SigmaUnit};

    /// Every float parameter of `module` that is not a conv/linear weight (biases, BatchNorm's
    /// gamma, beta and running statistics), in visiting order.
    pub(crate) fn non_weight_params<M: Module>(module: &M) -> Vec<Vec<f32>> {
        struct V(ModulePath, Vec<Vec<f32>>);
        impl burn::module::ModuleVisitor for V {
            fn enter_module(&mut self, name: &str, container_type: &str) {
                self.0.enter(name, container_type);
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.0.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if !self.0.at_weight() {
                    let v = param.val().into_data().try_to_vec::<f32>().unwrap();
                    self.1.push(v);
                }
            }
        }
        let mut v = V(ModulePath::default(), Vec::new());
        module.visit(&mut v);
        v.1
    }

    /// Every float parameter of `module`, in visiting order.
    pub(crate) fn all_params<M: Module>(module: &M) -> Vec<Vec<f32>> {
        struct V(Vec<Vec<f32>>);
        impl burn::module::ModuleVisitor for V {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0
                    .push(param.val().into_data().try_to_vec::<f32>().unwrap());
            }
        }
        let mut v = V(Vec::new());
        module.visit(&mut v);
        v.0
    }

    /// Sample mean and the standard error of the mean of `xs`.
    fn mean_se(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
        (m, (v / n).sqrt())
    }

    fn noise_of(cfg: VariationConfig, w: Vec<f32>, seed: u64) -> Vec<f64> {
        let device = Device::flex();
        device.seed(seed);
        let n = w.len();
        let t = Tensor::<1>::from_data(TensorData::new(w, [n]), &device);
        let d = TrainingNoise::new(cfg).sample(t);
        d.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn cfg(sigma: f32, unit: SigmaUnit, profile: Profile, faults: Faults) -> VariationConfig {
        VariationConfig::new(QuantConfig::DEFAULT, sigma, unit, profile, faults).unwrap()
    }

    /// Weights of scale 2.0 (one weight pins max|W|), the rest at `|w| = frac * 2` with random signs.
    fn weights(n: usize, frac: f32) -> Vec<f32> {
        let mut w: Vec<f32> = (0..n)
            .map(|i| if i % 3 == 0 { -2.0 * frac } else { 2.0 * frac })
            .collect();
        w[0] = 2.0;
        w
    }

    #[test]
    fn uniform_std_matches_closed_form_in_both_units() {
        let _rng = crate::burn_rng_guard();
        let n = 200_000;
        for unit in [SigmaUnit::Range, SigmaUnit::Level] {
            let c = cfg(0.4, unit, Profile::Uniform, Faults::NONE);
            let d = noise_of(c, weights(n, 0.3), 1);
            // Mean square / scale^2 estimates weight_std^2; tolerance 5 standard errors.
            let sq: Vec<f64> = d.iter().map(|x| (x / 2.0) * (x / 2.0)).collect();
            let (ms, se) = mean_se(&sq);
            let expect = c.weight_std(0).powi(2);
            assert!(
                (ms - expect).abs() < 5.0 * se,
                "{unit:?}: {ms} vs {expect} (se {se})"
            );
        }
    }

    #[test]
    fn profile_bands_get_their_own_std() {
        let _rng = crate::burn_rng_guard();
        let n = 100_000;
        let c = cfg(0.3, SigmaUnit::Range, Profile::Fefet6, Faults::NONE);
        for frac in [0.5f32, 0.1, 0.9] {
            let d = noise_of(c, weights(n, frac), 2);
            let q = (frac * 255.0).round() as u16;
            let sq: Vec<f64> = d[1..].iter().map(|x| (x / 2.0) * (x / 2.0)).collect();
            let (ms, se) = mean_se(&sq);
            let expect = c.weight_std(q).powi(2);
            assert!(
                (ms - expect).abs() < 5.0 * se,
                "frac {frac}: {ms} vs {expect} (se {se})"
            );
        }
        assert!(
            c.weight_std(128) > 3.0 * c.weight_std(10),
            "the band must matter in this test"
        );
    }

    #[test]
    fn stuck_at_faults_match_the_closed_form_rms_and_mean() {
        let _rng = crate::burn_rng_guard();
        let n = 200_000;
        let faults = Faults::new(0.1, 0.05).unwrap();
        let c = cfg(0.2, SigmaUnit::Range, Profile::Uniform, faults);
        for frac in [0.6f32, -0.6] {
            let mut w = weights(n, frac.abs());
            w.iter_mut().skip(1).for_each(|x| *x = 2.0 * frac);
            let d = noise_of(c, w, 3);
            let q = (frac.abs() * 255.0).round() as u16;
            let e: Vec<f64> = d[1..].iter().map(|x| x / 2.0).collect();
            let sq: Vec<f64> = e.iter().map(|x| x * x).collect();
            let (ms, se) = mean_se(&sq);
            let expect = c.weight_rms(q).powi(2);
            assert!(
                (ms - expect).abs() < 5.0 * se,
                "{frac}: {ms} vs {expect} (se {se})"
            );
            // The mean error: sum_j 4^j mu_j / 255 with mu = -p_low g + p_high (3 - g), signed.
            let levels = [q & 3, (q >> 2) & 3, (q >> 4) & 3, (q >> 6) & 3];
            let mu: f64 = levels
                .iter()
                .enumerate()
                .map(|(j, &g)| {
                    4f64.powi(j as i32) * (-0.1 * f64::from(g) + 0.05 * (3.0 - f64::from(g)))
                })
                .sum::<f64>()
                / 255.0
                * f64::from(frac.signum());
            let (m, se) = mean_se(&e);
            assert!(
                (m - mu).abs() < 5.0 * se,
                "{frac}: mean {m} vs {mu} (se {se})"
            );
        }
    }

    #[test]
    fn zero_sigma_is_zero() {
        let _rng = crate::burn_rng_guard();
        let c = cfg(0.0, SigmaUnit::Range, Profile::Uniform, Faults::NONE);
        assert!(TrainingNoise::new(c).is_zero());
        assert!(noise_of(c, weights(100, 0.5), 4).iter().all(|&x| x == 0.0));
    }
}
