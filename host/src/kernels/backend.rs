//! The project's convolution kernels inside Burn: a backend extension ([`NvKernels`]) whose Flex
//! implementation runs [`super::conv`] (forward, input gradient, weight gradient), and whose
//! `Autodiff` implementation registers a backward step calling the Flex gradients — Burn's
//! autodiff does the rest, so models, methods, optimizers and checkpoints are unchanged.
//!
//! Why an extension and not a decorator backend: with Burn 0.22's `Dispatch` tensors a model's
//! tensors carry one of Burn's own backends, so a backend of ours cannot be slotted in; Burn's
//! `#[backend_extension]` is its route for custom operations on a dispatched backend. The one
//! call site is [`conv2d`], used by every convolution of the graph network ([`crate::model::graph`]); a
//! convolution it does not cover (bias, groups, dilation, asymmetric padding, a dtype other
//! than `f32`, or another device such as wgpu/cuda) goes to Burn's `conv2d` unchanged.
//!
//! Training-mode batch normalization goes the same way ([`batch_norm`]), and so does VGG-8's
//! 2x2 stride-2 max pooling ([`max_pool2d`], bit-identical with Flex's, gradient included).
//!
//! `NVCIM_CONV=burn` in the environment routes every convolution, batch norm and max pool to
//! Burn's own kernels (for comparisons; read once per process).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, DType, Dispatch, Flex, TensorMetadata, backend_extension,
};
use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::{Tensor, TensorData};

use super::Isa;
use super::conv::{self, Geom};
use super::{act, bn, pool, profile};

fn options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride; 2], [padding; 2], [1; 2], 1)
}

/// The operations the project computes itself on Flex: a bias-free, ungrouped, undilated 2-D
/// convolution with one stride and one symmetric padding for both axes and its two gradients,
/// and training-mode batch normalization and its gradients. The default bodies are Burn's own
/// operations.
#[backend_extension(Flex, Autodiff)]
pub trait NvKernels: Backend {
    /// `conv2d(x, weight)`.
    fn nv_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options(stride, padding))
    }

    /// The gradient of [`NvKernels::nv_conv2d`] with respect to `x`.
    fn nv_conv2d_x_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, output_grad, options(stride, padding))
    }

    /// The gradient of [`NvKernels::nv_conv2d`] with respect to `weight`.
    fn nv_conv2d_weight_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, output_grad, options(stride, padding))
    }

    /// Training-mode batch normalization: `(output, batch mean, batch biased variance)`.
    fn nv_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let r = Self::batch_norm_train(x, gamma, beta, epsilon);
        (r.output, r.mean, r.variance)
    }

    /// The gradients of [`NvKernels::nv_batch_norm_train`]: `(x, gamma, beta)`.
    fn nv_batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let r = Self::batch_norm_train_backward(x, gamma, mean, variance, epsilon, output_grad);
        (r.x_grad, r.gamma_grad, r.beta_grad)
    }

    /// `relu(x)`.
    fn nv_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::relu(x)
    }

    /// The gradient of [`NvKernels::nv_relu`]: `grad` where its `output` is positive or NaN,
    /// zero elsewhere.
    fn nv_relu_backward(output: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::relu_backward(output, grad)
    }

    /// 2x2 max pooling with stride 2, no padding, floor mode (VGG-8's pool).
    fn nv_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// The gradient of [`NvKernels::nv_max_pool2x2`] with respect to `x`.
    fn nv_max_pool2x2_backward(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        burn_max_pool2x2_backward::<Self>(x, output_grad)
    }
}

/// The sizes of a Flex convolution, `None` when it is not `f32` NCHW.
fn geom(x: &FlexTensor, w: &FlexTensor, stride: usize, padding: usize) -> Option<Geom> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    let (xs, ws) = (x.shape(), w.shape());
    if xs.num_dims() != 4 || ws.num_dims() != 4 {
        return None;
    }
    let ([n, c, h, wd], [o, ci, kh, kw]) = (xs.dims::<4>(), ws.dims::<4>());
    let g = Geom {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        stride,
        pad: padding,
    };
    (ci == c && g.out().is_some()).then_some(g)
}

/// A convolution's row in [`profile`]'s table: `n x c x h x w -> o, kh x kw / stride`.
fn conv_key(g: &Geom) -> String {
    format!(
        "{}x{}x{}x{} -> {}, {}x{}/{}",
        g.n, g.c, g.h, g.w, g.o, g.kh, g.kw, g.stride
    )
}

/// A batch norm's or pool's row in [`profile`]'s table: `n x c x plane`.
fn bn_key(n: usize, c: usize, plane: usize) -> String {
    format!("{n}x{c}x{plane}")
}

fn flex_out(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

impl NvKernels for Flex {
    fn nv_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        let Some(g) = geom(&x, &weight, stride, padding) else {
            return Self::conv2d(x, weight, None, options(stride, padding));
        };
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let (oh, ow) = g.out().expect("checked by geom");
        // SAFETY: `forward_uninit` writes every value of `y`.
        let y = unsafe {
            super::written(g.n * g.o * oh * ow, |y| {
                profile::time(
                    "conv forward",
                    || conv_key(&g),
                    || conv::forward_uninit(Isa::detect(), &g, x.storage(), weight.storage(), y),
                )
            })
        };
        flex_out(y, [g.n, g.o, oh, ow])
    }

    fn nv_conv2d_x_backward(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let Some(g) =
            geom(&x, &weight, stride, padding).filter(|_| output_grad.dtype() == DType::F32)
        else {
            return Self::conv2d_x_backward(x, weight, output_grad, options(stride, padding));
        };
        let (weight, dy) = (weight.to_contiguous(), output_grad.to_contiguous());
        // SAFETY: `backward_input_uninit` writes every value of `dx`.
        let dx = unsafe {
            super::written(g.n * g.c * g.h * g.w, |dx| {
                profile::time(
                    "conv input grad",
                    || conv_key(&g),
                    || {
                        conv::backward_input_uninit(
                            Isa::detect(),
                            &g,
                            weight.storage(),
                            dy.storage(),
                            dx,
                        )
                    },
                )
            })
        };
        flex_out(dx, [g.n, g.c, g.h, g.w])
    }

    fn nv_conv2d_weight_backward(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let Some(g) =
            geom(&x, &weight, stride, padding).filter(|_| output_grad.dtype() == DType::F32)
        else {
            return Self::conv2d_weight_backward(x, weight, output_grad, options(stride, padding));
        };
        let (x, dy) = (x.to_contiguous(), output_grad.to_contiguous());
        let mut dw = vec![0f32; g.o * g.c * g.kh * g.kw];
        profile::time(
            "conv weight grad",
            || conv_key(&g),
            || conv::backward_weight(Isa::detect(), &g, x.storage(), dy.storage(), &mut dw),
        );
        flex_out(dw, [g.o, g.c, g.kh, g.kw])
    }

    fn nv_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some((n, c, plane)) = bn_geom(&x, &[&gamma, &beta]) else {
            let r = Self::batch_norm_train(x, gamma, beta, epsilon);
            return (r.output, r.mean, r.variance);
        };
        let shape = x.shape();
        let (x, gamma, beta) = (
            x.to_contiguous(),
            gamma.to_contiguous(),
            beta.to_contiguous(),
        );
        let (y, mean, var) = profile::time(
            "bn forward",
            || bn_key(n, c, plane),
            || {
                bn::forward(
                    x.storage(),
                    gamma.storage(),
                    beta.storage(),
                    epsilon,
                    n,
                    plane,
                )
            },
        );
        (flex_out(y, shape), flex_out(mean, [c]), flex_out(var, [c]))
    }

    fn nv_batch_norm_train_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some((n, c, plane)) = bn_geom(&x, &[&gamma, &mean, &variance, &output_grad]) else {
            let r = Self::batch_norm_train_backward(x, gamma, mean, variance, epsilon, output_grad);
            return (r.x_grad, r.gamma_grad, r.beta_grad);
        };
        let shape = x.shape();
        let [x, gamma, mean, variance, dy] =
            [x, gamma, mean, variance, output_grad].map(|t| t.to_contiguous());
        let (dx, dgamma, dbeta) = profile::time(
            "bn backward",
            || bn_key(n, c, plane),
            || {
                bn::backward(
                    x.storage(),
                    gamma.storage(),
                    mean.storage(),
                    variance.storage(),
                    epsilon,
                    dy.storage(),
                    n,
                    plane,
                )
            },
        );
        (
            flex_out(dx, shape),
            flex_out(dgamma, [c]),
            flex_out(dbeta, [c]),
        )
    }

    fn nv_relu(mut x: FlexTensor) -> FlexTensor {
        if x.dtype() != DType::F32 {
            return Self::relu(x);
        }
        // Unique storage: in place over all of it (values outside the view belong to no one
        // else), the layout kept.
        if let Some(v) = x.try_storage_mut::<f32>() {
            let n = v.len();
            profile::time("relu forward", || n.to_string(), || act::relu(v));
            return x;
        }
        let x = x.to_contiguous();
        let mut y = x.storage::<f32>().to_vec();
        let n = y.len();
        profile::time("relu forward", || n.to_string(), || act::relu(&mut y));
        flex_out(y, x.shape())
    }

    fn nv_relu_backward(output: FlexTensor, mut grad: FlexTensor) -> FlexTensor {
        let same = output.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && output.shape() == grad.shape()
            && output.as_slice::<f32>().is_some()
            && grad.as_slice::<f32>().is_some();
        if !same {
            return Self::relu_backward(output, grad);
        }
        let out = output.as_slice::<f32>().expect("checked above");
        let n = out.len();
        let key = || n.to_string();
        // Contiguous at offset 0 and unique: in place.
        if grad.layout().start_offset() == 0
            && let Some(g) = grad.try_storage_mut::<f32>()
            && g.len() == n
        {
            profile::time("relu backward", key, || act::relu_grad(g, out));
            return grad;
        }
        let mut g = grad.as_slice::<f32>().expect("checked above").to_vec();
        profile::time("relu backward", key, || act::relu_grad(&mut g, out));
        flex_out(g, grad.shape())
    }

    fn nv_max_pool2x2(x: FlexTensor) -> FlexTensor {
        let Some([n, c, h, w]) = pool_geom(&x) else {
            return Self::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        };
        let x = x.to_contiguous();
        let mut y = super::zeros(n * c * (h / 2) * (w / 2));
        profile::time(
            "pool forward",
            || bn_key(n, c, h * w),
            || pool::forward(x.storage(), n * c, h, w, &mut y),
        );
        flex_out(y, [n, c, h / 2, w / 2])
    }

    fn nv_max_pool2x2_backward(x: FlexTensor, output_grad: FlexTensor) -> FlexTensor {
        let Some([n, c, h, w]) = pool_geom(&x).filter(|_| output_grad.dtype() == DType::F32) else {
            return burn_max_pool2x2_backward::<Self>(x, output_grad);
        };
        let (x, dy) = (x.to_contiguous(), output_grad.to_contiguous());
        let mut dx = super::zeros(n * c * h * w);
        profile::time(
            "pool backward",
            || bn_key(n, c, h * w),
            || pool::backward(x.storage(), dy.storage(), n * c, h, w, &mut dx),
        );
        flex_out(dx, [n, c, h, w])
    }
}

/// Burn's own gradient of the 2x2 stride-2 max pool (the maxima's indices found again from
/// `x`): the trait's default body and Flex's fallback for what it does not cover.
fn burn_max_pool2x2_backward<B: Backend>(
    x: FloatTensor<B>,
    output_grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let (k, s, p, d) = ([2, 2], [2, 2], [0, 0], [1, 1]);
    let indices =
        B::max_pool2d_with_indices(x.clone(), k, s, p, d, false, burn::backend::IntDType::I64)
            .indices;
    B::max_pool2d_with_indices_backward(x, k, s, p, d, false, output_grad, indices).x_grad
}

/// The shape of an `f32` NCHW max-pool input, `None` otherwise.
fn pool_geom(x: &FlexTensor) -> Option<[usize; 4]> {
    (x.dtype() == DType::F32 && x.shape().num_dims() == 4).then(|| x.shape().dims::<4>())
}

/// `(images, channels, values per plane)` of an `f32` batch-norm input whose other tensors are
/// `f32` too; `None` otherwise.
fn bn_geom(x: &FlexTensor, others: &[&FlexTensor]) -> Option<(usize, usize, usize)> {
    let shape = x.shape();
    let ok = x.dtype() == DType::F32
        && others.iter().all(|t| t.dtype() == DType::F32)
        && shape.num_dims() >= 2
        && shape[0] > 0
        && shape[1] > 0;
    ok.then(|| {
        (
            shape[0],
            shape[1],
            shape.num_elements() / (shape[0] * shape[1]),
        )
    })
}

/// The backward step of [`NvKernels::nv_conv2d`] under autodiff.
#[derive(Debug)]
struct ConvBackward;

impl<B: NvKernels> Backward<B, 2> for ConvBackward {
    type State = (NodeId, NodeId, usize, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, w_state, stride, padding) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let w = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(w_state);
        if let Some(node) = node_x {
            let g = B::nv_conv2d_x_backward(x.clone(), w.clone(), grad.clone(), stride, padding);
            grads.register::<B>(node.id, g);
        }
        if let Some(node) = node_w {
            let g = B::nv_conv2d_weight_backward(x, w, grad, stride, padding);
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: NvKernels, C: CheckpointStrategy> NvKernels for Autodiff<B, C> {
    fn nv_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        match ConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let xs = prep.checkpoint(&x);
                let ws = prep.checkpoint(&weight);
                prep.finish(
                    (xs, ws, stride, padding),
                    B::nv_conv2d(x.into_primitive(), weight.into_primitive(), stride, padding),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nv_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
            )),
        }
    }

    fn nv_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        match BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let xs = prep.checkpoint(&x);
                let gs = prep.checkpoint(&gamma);
                let (y, mean, var) = B::nv_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let y = prep.finish((xs, gs, mean.clone(), var.clone(), epsilon), y);
                (y, Self::from_inner(mean), Self::from_inner(var))
            }
            OpsKind::UnTracked(prep) => {
                let (y, mean, var) = B::nv_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (
                    prep.finish(y),
                    Self::from_inner(mean),
                    Self::from_inner(var),
                )
            }
        }
    }

    fn nv_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match ReluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::nv_relu(x.into_primitive());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nv_relu(x.into_primitive())),
        }
    }

    fn nv_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match MaxPoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let xs = prep.checkpoint(&x);
                prep.finish(xs, B::nv_max_pool2x2(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nv_max_pool2x2(x.into_primitive())),
        }
    }
}

/// The backward step of [`NvKernels::nv_relu`] under autodiff (the output kept as its state).
#[derive(Debug)]
struct ReluBackward;

impl<B: NvKernels> Backward<B, 1> for ReluBackward {
    type State = B::FloatTensorPrimitive;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::nv_relu_backward(ops.state, grad));
        }
    }
}

/// The backward step of [`NvKernels::nv_max_pool2x2`] under autodiff (the maxima are found
/// again from the input).
#[derive(Debug)]
struct MaxPoolBackward;

impl<B: NvKernels> Backward<B, 1> for MaxPoolBackward {
    type State = NodeId;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(ops.state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::nv_max_pool2x2_backward(x, grad));
        }
    }
}

/// The backward step of [`NvKernels::nv_batch_norm_train`] under autodiff (the batch statistics
/// come along as the forward pass computed them).
#[derive(Debug)]
struct BatchNormBackward;

impl<B: NvKernels> Backward<B, 3> for BatchNormBackward {
    type State = (
        NodeId,
        NodeId,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma_state, mean, variance, epsilon) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
        let (dx, dgamma, dbeta) =
            B::nv_batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, dbeta);
        }
    }
}

/// Whether `NVCIM_CONV=burn` routes every convolution to Burn's kernels.
pub(crate) fn burn_kernels_only() -> bool {
    static ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONLY.get_or_init(|| std::env::var("NVCIM_CONV").is_ok_and(|v| v == "burn"))
}

/// Whether `device` is Flex, with or without autodiff (what [`NvKernels`] is implemented for).
pub(crate) fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// `conv.forward(x)`, through [`NvKernels`] when the convolution and device are ones it covers
/// (module docs).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let pad = match conv.padding {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && t == b && t == r => Some(t),
        _ => None,
    };
    let covered = conv.bias.is_none()
        && conv.groups == 1
        && conv.dilation == [1, 1]
        && conv.stride[0] == conv.stride[1]
        && pad.is_some()
        && !burn_kernels_only()
        && on_flex(&x.device());
    if !covered {
        return conv.forward(x);
    }
    let y = <Dispatch as NvKernels>::nv_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        conv.stride[0],
        pad.unwrap_or(0),
    );
    Tensor::from_dispatch(y)
}

thread_local! {
    static BATCH_STATS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every [`batch_norm`] on this thread in training mode — normalizing by the
/// batch's statistics and moving the running statistics — even on a module without autodiff
/// or with training off (a `valid()` copy): the clean pass of `--bn-stats clean` uses it to
/// measure the clean network's statistics without building an autodiff graph. Flex only (the
/// extension's kernels); elsewhere `batch_norm` is Burn's.
pub fn with_batch_stats<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BATCH_STATS.set(self.0);
        }
    }
    let _reset = Reset(BATCH_STATS.replace(true));
    f()
}

/// `bn.forward(x)`, through [`NvKernels`] in training mode on Flex (module docs): the same
/// output and the same running-statistics update (momentum) as Burn's `BatchNorm`.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let training = device.is_autodiff() && bn.training.is_enabled();
    if !(training || BATCH_STATS.get()) || burn_kernels_only() || !on_flex(&device) {
        return bn.forward(x);
    }
    let (y, mean, var) = <Dispatch as NvKernels>::nv_batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    let (y, mean, var) = (
        Tensor::<4>::from_dispatch(y),
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(var),
    );
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    bn.running_mean.update(
        running_mean
            .mul_scalar(1.0 - bn.momentum)
            .add(mean.detach().mul_scalar(bn.momentum))
            .detach(),
    );
    bn.running_var.update(
        running_var
            .mul_scalar(1.0 - bn.momentum)
            .add(var.detach().mul_scalar(bn.momentum))
            .detach(),
    );
    y
}

/// `relu(x)`, through [`NvKernels`] on Flex (in parallel; the same bits as Burn's), Burn's
/// elsewhere or under `NVCIM_CONV=burn`.
pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if burn_kernels_only() || !on_flex(&x.device()) {
        return burn::tensor::activation::relu(x);
    }
    Tensor::from_dispatch(<Dispatch as NvKernels>::nv_relu(x.into_dispatch()))
}

/// `pool.forward(x)` for VGG-8's 2x2 stride-2 pool, through [`NvKernels`] on Flex (any other
/// pool or device, or `NVCIM_CONV=burn`, goes to Burn's).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let covered = pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && !pool.ceil_mode
        && matches!(pool.padding, PaddingConfig2d::Valid)
        && !burn_kernels_only()
        && on_flex(&x.device());
    if !covered {
        return pool.forward(x);
    }
    Tensor::from_dispatch(<Dispatch as NvKernels>::nv_max_pool2x2(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    use super::*;

    fn layer(c: usize, o: usize, k: usize, stride: usize, pad: usize, d: &Device) -> Conv2d {
        Conv2dConfig::new([c, o], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            .init(d)
    }

    fn assert_close(what: &str, got: Tensor<4>, want: Tensor<4>) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let (g, w) = (
            got.into_data().try_to_vec::<f32>().unwrap(),
            want.into_data().try_to_vec::<f32>().unwrap(),
        );
        let scale = w.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let worst = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-4 * scale,
            "{what}: max |difference| {worst} at scale {scale}"
        );
    }

    /// The extension's forward pass and both gradients (through Burn's autodiff) equal Burn's
    /// own `conv2d` within `1e-4` of the values' scale, on shapes covering stride 1 and 2,
    /// padding 0 and 1, 1x1 and 3x3 kernels, 1 to 512 channels, batches 1 to 128, odd sizes.
    #[test]
    fn forward_and_both_gradients_match_burns_conv2d() {
        let _rng = crate::burn_rng_guard();
        let d = Device::flex().autodiff();
        d.seed(7);
        // (n, c, o, h, w, k, stride, pad)
        let cases = [
            (128, 1, 16, 12, 12, 3, 1, 1),
            (4, 512, 8, 5, 5, 3, 1, 1),
            (2, 24, 512, 6, 6, 1, 1, 0),
            (3, 17, 33, 9, 7, 3, 2, 1),
            (1, 1, 1, 1, 1, 1, 1, 0),
            (5, 64, 128, 8, 8, 1, 2, 0),
            (7, 3, 5, 11, 13, 3, 1, 0),
            (2, 9, 6, 4, 4, 3, 2, 0),
        ];
        for (n, c, o, h, w, k, s, p) in cases {
            let what = format!("n{n} c{c} o{o} {h}x{w} k{k} s{s} p{p}");
            let conv = layer(c, o, k, s, p, &d);
            let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d)
                .require_grad();
            let ours = conv2d(&conv, x.clone());
            let burns = conv.forward(x.clone());
            let gy = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &d);
            let g1 = (ours.clone() * gy.clone()).sum().backward();
            let g2 = (burns.clone() * gy).sum().backward();
            assert_close(&format!("{what} y"), ours, burns);
            assert_close(
                &format!("{what} dx"),
                x.grad(&g1).unwrap(),
                x.grad(&g2).unwrap(),
            );
            let (w1, w2) = (conv.weight.val().grad(&g1), conv.weight.val().grad(&g2));
            assert_close(&format!("{what} dw"), w1.unwrap(), w2.unwrap());
        }
    }

    /// Central differences of `L = sum(conv(x, w)^2) / 2` (exact for a quadratic, up to `f32`
    /// rounding) against the extension's gradients, at random coordinates of `x` and `w`.
    #[test]
    fn gradients_match_finite_differences() {
        let _rng = crate::burn_rng_guard();
        let d = Device::flex().autodiff();
        d.seed(11);
        let conv = layer(3, 4, 3, 2, 1, &d);
        let x =
            Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let loss = |conv: &Conv2d, x: Tensor<4>| {
            let y = conv2d(conv, x);
            (y.clone() * y).sum().div_scalar(2.0)
        };
        let grads = loss(&conv, x.clone()).backward();
        let gx = x
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let gw = conv
            .weight
            .val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let xv = x.clone().inner().into_data().try_to_vec::<f32>().unwrap();
        let wv = conv
            .weight
            .val()
            .inner()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let plain = Device::flex();
        let eval = |xv: &[f32], wv: &[f32]| -> f64 {
            let mut c = conv.clone();
            c.weight = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(wv.to_vec(), [4, 3, 3, 3]),
                &plain,
            ));
            let x = Tensor::<4>::from_data(TensorData::new(xv.to_vec(), [2, 3, 7, 6]), &plain);
            f64::from(loss(&c, x).into_scalar::<f32>())
        };
        let eps = 0.25f32;
        for j in [0, 5, 40, 77, 130, 251] {
            let (mut a, mut b) = (xv.clone(), xv.clone());
            a[j] += eps;
            b[j] -= eps;
            let fd = (eval(&a, &wv) - eval(&b, &wv)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(gx[j])).abs() <= 1e-3 * fd.abs().max(1.0),
                "dx[{j}]: {} vs {fd}",
                gx[j]
            );
        }
        for j in [0, 13, 50, 107] {
            let (mut a, mut b) = (wv.clone(), wv.clone());
            a[j] += eps;
            b[j] -= eps;
            let fd = (eval(&xv, &a) - eval(&xv, &b)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(gw[j])).abs() <= 1e-3 * fd.abs().max(1.0),
                "dw[{j}]: {} vs {fd}",
                gw[j]
            );
        }
    }

    /// Training-mode batch norm through the extension equals Burn's `BatchNorm`: output,
    /// running statistics after the update, and the gradients of x, gamma and beta.
    #[test]
    fn batch_norm_matches_burns_in_training_mode() {
        let _rng = crate::burn_rng_guard();
        use burn::nn::BatchNormConfig;
        let d = Device::flex().autodiff();
        d.seed(5);
        for (n, c, h, w) in [(8, 3, 5, 7), (1, 16, 2, 2), (32, 64, 4, 4)] {
            let what = format!("n{n} c{c} {h}x{w}");
            let ours_bn = BatchNormConfig::new(c).init(&d);
            let burns_bn = ours_bn.clone();
            let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(1.0, 2.0), &d)
                .require_grad();
            let gy = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d);
            let y1 = batch_norm(&ours_bn, x.clone());
            let y2 = burns_bn.forward(x.clone());
            let g1 = (y1.clone() * gy.clone()).sum().backward();
            let g2 = (y2.clone() * gy).sum().backward();
            assert_close(&format!("{what} y"), y1, y2);
            assert_close(
                &format!("{what} dx"),
                x.grad(&g1).unwrap(),
                x.grad(&g2).unwrap(),
            );
            let as4 = |t: Tensor<1>| t.reshape([1, 1, 1, c]);
            let (a, b) = (&ours_bn, &burns_bn);
            for (name, p, q) in [
                ("dgamma", a.gamma.val().grad(&g1), b.gamma.val().grad(&g2)),
                ("dbeta", a.beta.val().grad(&g1), b.beta.val().grad(&g2)),
            ] {
                assert_close(&format!("{what} {name}"), as4(p.unwrap()), as4(q.unwrap()));
            }
            for (name, p, q) in [
                (
                    "running mean",
                    a.running_mean.value_sync(),
                    b.running_mean.value_sync(),
                ),
                (
                    "running var",
                    a.running_var.value_sync(),
                    b.running_var.value_sync(),
                ),
            ] {
                assert_close(&format!("{what} {name}"), as4(p), as4(q));
            }
        }
    }

    /// Max pooling through the extension equals Burn's `MaxPool2d` exactly: output and input
    /// gradient, on odd sizes and on ReLU outputs (many tied zeros), with and without autodiff.
    #[test]
    fn max_pool_matches_burns_exactly() {
        use burn::nn::pool::MaxPool2dConfig;
        let _rng = crate::burn_rng_guard();
        let pool = MaxPool2dConfig::new([2, 2]).init();
        let d = Device::flex().autodiff();
        d.seed(9);
        for (n, c, h, w) in [(2, 3, 5, 7), (1, 1, 2, 2), (16, 32, 8, 8), (3, 5, 1, 6)] {
            let what = format!("n{n} c{c} {h}x{w}");
            let raw = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d);
            let x = burn::tensor::activation::relu(raw).detach().require_grad();
            let gy = Tensor::<4>::random([n, c, h / 2, w / 2], Distribution::Normal(0.0, 1.0), &d);
            let y1 = max_pool2d(&pool, x.clone());
            let y2 = pool.forward(x.clone());
            let g1 = (y1.clone() * gy.clone()).sum().backward();
            let g2 = (y2.clone() * gy).sum().backward();
            let bits = |t: Tensor<4>| -> Vec<u32> {
                let v = t.into_data().try_to_vec::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(y1.dims(), y2.dims(), "{what}: shape");
            assert_eq!(bits(y1), bits(y2), "{what}: output");
            assert_eq!(
                bits(x.grad(&g1).unwrap()),
                bits(x.grad(&g2).unwrap()),
                "{what}: input gradient"
            );
            let plain = x.clone().detach().inner();
            assert_eq!(
                bits(max_pool2d(&pool, plain.clone())),
                bits(pool.forward(plain)),
                "{what}: without autodiff"
            );
        }
    }

    /// ReLU through the extension: Burn's output and gradient to the bit, with zeros, `-0.0`
    /// and NaN in the input, in place (a unique input) and copied (a shared one), with and
    /// without autodiff, on tensors larger than one parallel chunk.
    #[test]
    fn relu_matches_burns_exactly() {
        let _rng = crate::burn_rng_guard();
        let d = Device::flex().autodiff();
        d.seed(11);
        let bits = |t: Tensor<4>| -> Vec<u32> {
            let v = t.into_data().try_to_vec::<f32>().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for shape in [[2, 3, 5, 7], [4, 64, 32, 33]] {
            let raw = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &d);
            // Exact zeros, negative zeros and NaNs among the values.
            let raw = raw
                .clone()
                .mask_fill(raw.clone().abs().lower_elem(0.05), -0.0);
            let raw = raw.clone().mask_fill(raw.clone().greater_elem(2.5), 0.0);
            let raw = raw
                .clone()
                .mask_fill(raw.clone().lower_elem(-2.5), f32::NAN);
            let x = raw.detach().require_grad();
            let gy = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &d);
            let y1 = relu(x.clone() * 1.0);
            let y2 = burn::tensor::activation::relu(x.clone() * 1.0);
            let g1 = (y1.clone() * gy.clone()).sum().backward();
            let g2 = (y2.clone() * gy).sum().backward();
            assert_eq!(bits(y1), bits(y2), "{shape:?}: output");
            assert_eq!(
                bits(x.grad(&g1).unwrap()),
                bits(x.grad(&g2).unwrap()),
                "{shape:?}: input gradient"
            );
            let plain = x.clone().detach().inner();
            let kept = plain.clone();
            assert_eq!(
                bits(relu(plain.clone())),
                bits(burn::tensor::activation::relu(plain)),
                "{shape:?}: without autodiff, shared input"
            );
            assert!(
                kept.into_data()
                    .try_to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .any(|v| *v < 0.0)
            );
        }
    }

    /// A convolution the extension does not cover (a bias) takes Burn's path: same values.
    #[test]
    fn uncovered_convolutions_fall_back_to_burn() {
        let _rng = crate::burn_rng_guard();
        let d = Device::flex();
        let conv = Conv2dConfig::new([2, 3], [3, 3]).init(&d);
        let x = Tensor::<4>::random([2, 2, 5, 5], Distribution::Normal(0.0, 1.0), &d);
        assert_close("bias", conv2d(&conv, x.clone()), conv.forward(x));
    }
}
