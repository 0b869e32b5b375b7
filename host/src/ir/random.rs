//! Random-weight VGG-8 and ResNet-18 graphs (DESIGN §1) for tests and benches.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use nvcim_shared::rng::{Purpose, standard_normal, stream_for};

use super::{BatchNorm, Conv2d, Linear, Network, Node, Normalization, Op, Pool, Provenance, Value};

impl Network {
    /// Random-weight VGG-8 (DESIGN §1): conv 64, 128, pool, 256, 256, pool, 512, 512, pool (each
    /// conv 3x3 / pad 1 followed by BatchNorm and ReLU), flatten, FC -> 1024 -> ReLU -> K, every
    /// width scaled by `width`. The input must be 32x32 (or any multiple of 8).
    pub fn vgg8(arch: &RandomArch) -> Result<Network> {
        let mut b = Builder::new(arch);
        let ch = |c: usize| arch.scaled(c);
        let mut x = Value::INPUT;
        let mut c_in = arch.channels;
        let mut spatial = arch.size;
        let plan: [&[usize]; 3] = [&[64, 128], &[256, 256], &[512, 512]];
        let mut k = 0;
        for stage in plan {
            for &c in stage {
                x = b.conv_bn_relu(&format!("features.{k}"), x, c_in, ch(c), 1, true);
                c_in = ch(c);
                k += 1;
            }
            x = b.push(
                format!("features.pool{k}"),
                Op::MaxPool(Pool::square(2, 2)),
                vec![x],
            );
            spatial /= 2;
        }
        x = b.push("flatten".into(), Op::Flatten, vec![x]);
        let hidden = ch(1024);
        x = b.linear("classifier.0", x, c_in * spatial * spatial, hidden, true);
        x = b.push("classifier.1".into(), Op::Relu, vec![x]);
        b.linear("classifier.2", x, hidden, arch.classes, true);
        b.finish("vgg8")
    }

    /// Random-weight ResNet-18 for CIFAR (DESIGN §1): 3x3 stem (no max-pool), stages of two basic
    /// blocks at 64/128/256/512 channels (times `width`; stride 2 and a 1x1 conv + BN shortcut
    /// where the shape changes), global average pool, FC -> K.
    pub fn resnet18(arch: &RandomArch) -> Result<Network> {
        let mut b = Builder::new(arch);
        let mut x = b.conv_bn_relu(
            "stem",
            Value::INPUT,
            arch.channels,
            arch.scaled(64),
            1,
            true,
        );
        let mut c_in = arch.scaled(64);
        for (s, &c) in [64, 128, 256, 512].iter().enumerate() {
            let c = arch.scaled(c);
            for blk in 0..2 {
                let stride = if s > 0 && blk == 0 { 2 } else { 1 };
                let name = format!("layer{}.{blk}", s + 1);
                let y = b.conv_bn_relu(&format!("{name}.conv1"), x, c_in, c, stride, true);
                let y = b.conv_bn_relu(&format!("{name}.conv2"), y, c, c, 1, false);
                let short = if stride != 1 || c_in != c {
                    let sc = b.conv(&format!("{name}.shortcut.conv"), x, c_in, c, 1, stride, 0);
                    b.bn(&format!("{name}.shortcut.bn"), sc, c)
                } else {
                    x
                };
                let sum = b.push(format!("{name}.add"), Op::Add, vec![y, short]);
                x = b.push(format!("{name}.relu"), Op::Relu, vec![sum]);
                c_in = c;
            }
        }
        x = b.push("pool".into(), Op::GlobalAvgPool, vec![x]);
        x = b.push("flatten".into(), Op::Flatten, vec![x]);
        b.linear("fc", x, c_in, arch.classes, true);
        b.finish("resnet18")
    }
}

/// The shape and seed of a random-weight test network.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomArch {
    /// Input channels (1 for MNIST-like data, 3 for CIFAR).
    pub channels: usize,
    /// Input height and width.
    pub size: usize,
    /// Number of classes.
    pub classes: usize,
    /// Width multiplier of every layer (1.0 is the paper's network).
    pub width: f32,
    /// Seed of the weights (host stream, never the variation streams).
    pub seed: u64,
}

impl RandomArch {
    /// A 32x32 input with `channels` channels, 10 classes, the given width, seed 0.
    pub fn new(channels: usize, width: f32) -> Self {
        RandomArch {
            channels,
            size: 32,
            classes: 10,
            width,
            seed: 0,
        }
    }

    fn scaled(&self, c: usize) -> usize {
        ((c as f32 * self.width).round() as usize).max(1)
    }
}

/// Builds a random-weight graph: He-scaled normal weights, BatchNorm statistics away from the
/// identity (so folding is tested), small biases.
struct Builder<'a> {
    arch: &'a RandomArch,
    nodes: Vec<Node>,
    draws: u32,
}

impl<'a> Builder<'a> {
    fn new(arch: &'a RandomArch) -> Self {
        Builder {
            arch,
            nodes: Vec::new(),
            draws: 0,
        }
    }

    fn normals(&mut self, n: usize, std: f32, mean: f32) -> Vec<f32> {
        let mut rng = stream_for(Purpose::Host, self.arch.seed, 0x1e_0000, self.draws);
        self.draws += 1;
        (0..n)
            .map(|_| mean + std * standard_normal(&mut rng))
            .collect()
    }

    fn push(&mut self, name: String, op: Op, inputs: Vec<Value>) -> Value {
        self.nodes.push(Node { name, op, inputs });
        Value::node(self.nodes.len() - 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: Value,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Value {
        let fan_in = (c_in * k * k) as f32;
        let weight = self.normals(c_out * c_in * k * k, (2.0 / fan_in).sqrt(), 0.0);
        let op = Op::Conv2d(Conv2d::square(
            c_in, c_out, k, stride, padding, weight, None,
        ));
        self.push(name.to_string(), op, vec![x])
    }

    fn bn(&mut self, name: &str, x: Value, c: usize) -> Value {
        let var: Vec<f32> = self
            .normals(c, 0.2, 0.0)
            .into_iter()
            .map(|v| 0.5 + v.abs())
            .collect();
        let op = Op::BatchNorm(BatchNorm {
            gamma: self.normals(c, 0.1, 1.0),
            beta: self.normals(c, 0.1, 0.0),
            mean: self.normals(c, 0.1, 0.0),
            var,
            eps: 1e-5,
        });
        self.push(name.to_string(), op, vec![x])
    }

    fn conv_bn_relu(
        &mut self,
        name: &str,
        x: Value,
        c_in: usize,
        c_out: usize,
        stride: usize,
        relu: bool,
    ) -> Value {
        let y = self.conv(&format!("{name}.conv"), x, c_in, c_out, 3, stride, 1);
        let y = self.bn(&format!("{name}.bn"), y, c_out);
        if relu {
            self.push(format!("{name}.relu"), Op::Relu, vec![y])
        } else {
            y
        }
    }

    fn linear(&mut self, name: &str, x: Value, fi: usize, fo: usize, bias: bool) -> Value {
        let weight = self.normals(fo * fi, (2.0 / fi as f32).sqrt(), 0.0);
        let bias = bias.then(|| self.normals(fo, 0.05, 0.0));
        let op = Op::Linear(Linear {
            out_features: fo,
            in_features: fi,
            weight,
            bias,
        });
        self.push(name.to_string(), op, vec![x])
    }

    fn finish(self, architecture: &str) -> Result<Network> {
        let channels = self.arch.channels;
        let net = Network {
            input: [channels, self.arch.size, self.arch.size],
            num_classes: self.arch.classes,
            normalization: Normalization::identity(channels),
            provenance: Provenance {
                architecture: Some(architecture.to_string()),
                method: Some("random".to_string()),
                extra: BTreeMap::from([
                    ("width".to_string(), self.arch.width.to_string()),
                    ("init_seed".to_string(), self.arch.seed.to_string()),
                ]),
                ..Provenance::default()
            },
            nodes: self.nodes,
        };
        let mut net = net;
        net.shapes()
            .with_context(|| format!("building a random {architecture}"))?;
        // BatchNorm statistics of a few standard-normal images, then shifted a little so that
        // running statistics and batch statistics differ (as after training).
        let batch = 2;
        let mut rng = stream_for(Purpose::Host, self.arch.seed, 0x1e_0001, 0);
        let x: Vec<f32> = (0..batch * net.input.iter().product::<usize>())
            .map(|_| standard_normal(&mut rng))
            .collect();
        net.calibrate_batchnorm(&x, batch)?;
        for node in &mut net.nodes {
            if let Op::BatchNorm(bn) = &mut node.op {
                for (m, v) in bn.mean.iter_mut().zip(&mut bn.var) {
                    *m += 0.05 * standard_normal(&mut rng) * v.sqrt();
                    *v *= 1.0 + 0.1 * standard_normal(&mut rng).abs();
                }
            }
        }
        Ok(net)
    }
}
