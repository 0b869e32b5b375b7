//! Packed models for tests and benchmarks (feature `testmodel`, host only: it allocates).
//!
//! - [`small`]: a small CNN on 1x12x12 images (conv 4, pool, conv 8, pool, linear 16, linear
//!   4), deterministic weights, `n` test images labelled so that the clean integer engine gets
//!   three in four right;
//! - [`squeeze`]: a SqueezeNet-style head on 1x12x12 images (conv 8 + ReLU, pool, squeeze
//!   conv 1x1 4 + ReLU, expand conv 1x1 8 + ReLU, classifier conv 1x1 4 + ReLU, global pool as
//!   the logits: the last op has no weights), `n` test images labelled with the clean
//!   prediction;
//! - [`vgg8_w025`]: VGG-8 at width 0.25 on 1x32x32 (conv 16, 32, pool, 64, 64, pool, 128, 128,
//!   pool, FC 2048 -> 256 -> 10), random weights, for instruction counts.

use alloc::vec::Vec;

use nvcim_shared::{
    Result,
    exec::{Scratch, infer, program},
    format::{
        Model,
        build::{InputSpec, Layer, ModelDesc, Node, PackConfig, TestBatch, calibrate, pack},
    },
    rng::Xoshiro128PlusPlus,
    tile::Path,
    variation::VariationConfig,
};

fn weights(rng: &mut Xoshiro128PlusPlus, n: usize, fan_in: usize) -> Vec<f32> {
    // Uniform in +-sqrt(3 / fan_in): unit-variance outputs for unit-variance inputs.
    let a = libm_sqrt(3.0 / fan_in as f32);
    (0..n)
        .map(|_| ((rng.next() >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * a)
        .collect()
}

fn libm_sqrt(x: f32) -> f32 {
    libm::sqrtf(x)
}

fn conv(w: &[f32], out: usize) -> Layer<'_> {
    Layer::Conv2d {
        weight: w,
        bias: None,
        out_channels: out,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1; 4],
        groups: 1,
    }
}

fn linear(w: &[f32], out: usize) -> Layer<'_> {
    Layer::Linear {
        weight: w,
        bias: None,
        out_features: out,
    }
}

const POOL: Layer<'static> = Layer::MaxPool {
    kernel: [2, 2],
    stride: [2, 2],
    padding: [0; 4],
};

/// Packs `layers` (calibrated on the images) with the images and labels from `label`, which
/// sees each image's clean integer prediction.
fn pack_with(
    input: InputSpec<'_>,
    classes: usize,
    layers: &[Layer<'_>],
    images: &[u8],
    var: VariationConfig,
    label: impl Fn(usize, usize) -> u16,
) -> Result<Vec<u8>> {
    let mut nodes: Vec<Node<'_>> = layers.iter().map(|&l| Node::new(l)).collect();
    let desc = ModelDesc {
        input,
        classes,
        nodes: &nodes,
    };
    let act = calibrate(&desc, images)?;
    for (n, a) in nodes.iter_mut().zip(act) {
        n.act_max = a.max(1e-3);
    }
    let desc = ModelDesc {
        input,
        classes,
        nodes: &nodes,
    };
    let cfg = PackConfig::new(var);
    let n = images.len() / (input.channels * input.height * input.width);
    let zeros = alloc::vec![0u16; n];
    let blob = pack(
        &desc,
        &cfg,
        Some(TestBatch {
            images,
            labels: &zeros,
        }),
    )?;
    // The clean integer predictions, then the labels derived from them.
    let model = Model::parse(&blob)?;
    let clean = var.with_sigma(0.0)?;
    let mut state = alloc::vec![0i16; model.state_len(Path::Collapsed)];
    program(&model, &clean, 0, 0, Path::Collapsed, &mut state)?;
    let s = model.scratch();
    let (mut act, mut patch, mut logits) = (
        alloc::vec![0u8; s.act_bytes],
        alloc::vec![0i16; s.patch],
        alloc::vec![0i32; s.logits],
    );
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let (image, _) = model.test_image(i).expect("i < test_len");
        let mut scratch = Scratch {
            act: &mut act,
            patch: &mut patch,
        };
        let class = infer(
            &model,
            Path::Collapsed,
            &state,
            image,
            &mut scratch,
            &mut logits,
        )?;
        labels.push(label(i, class));
    }
    pack(
        &desc,
        &cfg,
        Some(TestBatch {
            images,
            labels: &labels,
        }),
    )
}

/// The small test CNN with `n` test images, packed for `sigma` (range convention).
pub fn small_with(n: usize, sigma: f32) -> Result<Vec<u8>> {
    let mut rng = Xoshiro128PlusPlus::from_u64(0x5e_a11);
    let (c1, c2, c3) = (
        weights(&mut rng, 4 * 9, 9),
        weights(&mut rng, 8 * 4 * 9, 36),
        weights(&mut rng, 16 * 72, 72),
    );
    let c4 = weights(&mut rng, 4 * 16, 16);
    let layers = [
        conv(&c1, 4),
        Layer::Relu,
        POOL,
        conv(&c2, 8),
        Layer::Relu,
        POOL,
        Layer::Flatten,
        linear(&c3, 16),
        Layer::Relu,
        linear(&c4, 4),
    ];
    let images: Vec<u8> = (0..n * 144).map(|_| (rng.next() >> 24) as u8).collect();
    let input = InputSpec {
        channels: 1,
        height: 12,
        width: 12,
        mean: &[0.5],
        std: &[0.25],
    };
    pack_with(
        input,
        4,
        &layers,
        &images,
        VariationConfig::paper(sigma)?,
        |i, class| {
            if i % 4 == 3 {
                ((class + 1) % 4) as u16
            } else {
                class as u16
            }
        },
    )
}

/// [`small_with`] at sigma 0.3; panics only if packing a fixed valid model fails (a bug).
pub fn small(n: usize) -> Vec<u8> {
    small_with(n, 0.3).expect("the small test model packs")
}

/// The SqueezeNet-style test model (see the module docs) with `n` test images, packed for sigma
/// 0.3; panics only if packing a fixed valid model fails (a bug).
pub fn squeeze(n: usize) -> Vec<u8> {
    squeeze_with(n).expect("the squeeze test model packs")
}

fn squeeze_with(n: usize) -> Result<Vec<u8>> {
    let mut rng = Xoshiro128PlusPlus::from_u64(0x5_9ee2e);
    let c1 = weights(&mut rng, 8 * 9, 9);
    let (sq, ex, cls) = (
        weights(&mut rng, 4 * 8, 8),
        weights(&mut rng, 8 * 4, 4),
        weights(&mut rng, 4 * 8, 8),
    );
    // Positive biases keep every class channel alive after the ReLU.
    let bias = [0.3f32, 0.2, 0.25, 0.35];
    let pointwise = |weight, bias, out_channels| Layer::Conv2d {
        weight,
        bias,
        out_channels,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0; 4],
        groups: 1,
    };
    let head = pointwise(&cls, Some(&bias[..]), 4);
    let layers = [
        conv(&c1, 8),
        Layer::Relu,
        POOL,
        pointwise(&sq, None, 4),
        Layer::Relu,
        pointwise(&ex, None, 8),
        Layer::Relu,
        head,
        Layer::Relu,
        Layer::GlobalAvgPool,
        Layer::Flatten,
    ];
    let images: Vec<u8> = (0..n * 144).map(|_| (rng.next() >> 24) as u8).collect();
    let input = InputSpec {
        channels: 1,
        height: 12,
        width: 12,
        mean: &[0.5],
        std: &[0.25],
    };
    pack_with(
        input,
        4,
        &layers,
        &images,
        VariationConfig::paper(0.3)?,
        |_, class| class as u16,
    )
}

/// VGG-8 at width 0.25 with `n` random test images, packed for `sigma` (range convention).
pub fn vgg8_w025(n: usize, sigma: f32) -> Result<Vec<u8>> {
    let mut rng = Xoshiro128PlusPlus::from_u64(0x0766_8025);
    let chans = [
        (1usize, 16usize),
        (16, 32),
        (32, 64),
        (64, 64),
        (64, 128),
        (128, 128),
    ];
    let convs: Vec<Vec<f32>> = chans
        .iter()
        .map(|&(i, o)| weights(&mut rng, o * i * 9, i * 9))
        .collect();
    let fc1 = weights(&mut rng, 256 * 2048, 2048);
    let fc2 = weights(&mut rng, 10 * 256, 256);
    let mut layers = Vec::new();
    for (k, (w, &(_, o))) in convs.iter().zip(&chans).enumerate() {
        layers.push(conv(w, o));
        layers.push(Layer::Relu);
        if k % 2 == 1 {
            layers.push(POOL);
        }
    }
    layers.extend([
        Layer::Flatten,
        linear(&fc1, 256),
        Layer::Relu,
        linear(&fc2, 10),
    ]);
    let images: Vec<u8> = (0..n * 1024).map(|_| (rng.next() >> 24) as u8).collect();
    let input = InputSpec {
        channels: 1,
        height: 32,
        width: 32,
        mean: &[0.5],
        std: &[0.25],
    };
    pack_with(
        input,
        10,
        &layers,
        &images,
        VariationConfig::paper(sigma)?,
        |_, class| class as u16,
    )
}
