//! The packed model format: one self-describing, checksummed, little-endian blob that the host
//! writes (`nvcim pack`, `build::pack` behind the `alloc` feature) and the firmware reads in
//! place, without copying or allocating ([`Model::parse`]).
//!
//! # Layout (version 2)
//!
//! All integers are little-endian, floats are IEEE-754 `f32` bit patterns. Sections follow the
//! 80-byte header back to back, in this order, with no padding:
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | `[u8; 8]` | magic `b"NVCIMPK\0"` |
//! | 8 | `u16` | format version, 2 (1 is still read, see below) |
//! | 10 | `u8`, `u8` | M (magnitude bits), N (device bits) |
//! | 12 | `f32` | sigma the model was packed for |
//! | 16 | `u8` | sigma unit: 0 `range`, 1 `level` |
//! | 17 | `u8` | profile: 0 uniform, 1 rram1, 2 fefet2, 3 rram4, 4 fefet6 |
//! | 18 | `u8` | scale mode: 0 per layer, 1 per model |
//! | 19 | `u8` | reserved, 0 |
//! | 20 | `f32`, `f32` | stuck-at-low and stuck-at-high fault rates |
//! | 28 | `u16`, `u16` | tile rows (1..=256), tile columns (>= 1) |
//! | 32 | `u16` x 3 | input channels, height, width |
//! | 38 | `u16` | class count |
//! | 40 | `u16`, `u16` | op count (1..=256), weight-layer count |
//! | 44 | `u32` | activation arena bytes (scratch) |
//! | 48 | `u32` | patch length (`i16` elements of scratch, >= the largest fan-in) |
//! | 52 | `u32`, `u32` | weight count, requantization record count |
//! | 60 | `u32` | test images |
//! | 64 | `u32`, `f32` | input tensor's arena offset, input scale |
//! | 72 | `u32` | total length in bytes, CRC included |
//! | 76 | `u32` | reserved, 0 |
//! | 80 | `i8 [C][256]` | per-channel input lookup table: raw pixel -> normalized `i8` |
//! | | `[op; n]` | op table, 52 bytes per op (below; 40 in version 1) |
//! | | `[record; r]` | requantization records, 16 bytes: `m: i32`, `shift: u32`, `bias: i64` |
//! | | `u16 [w]` | quantized weights: bit 15 sign (negative array), bits 0..8 magnitude |
//! | | `u8 [t][C][H][W]` | test images (raw pixels) |
//! | | `u16 [t]` | test labels |
//! | | `u32` | CRC-32 (IEEE) of every preceding byte |
//!
//! **Op record, version 2 (52 bytes):**
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | `u8` | kind: 1 conv, 2 linear, 3 relu, 4 max-pool, 5 avg-pool, 6 global avg-pool, 7 add, 8 clip, 9 concat |
//! | 1 | `u8` | output type: 0 `u8`, 1 `i8`, 2 `i32` logits |
//! | 2 | `u8`, `u8` | kernel height `kh`, width `kw` (conv, pools; 1, 1 for linear; 0 otherwise) |
//! | 4 | `u8`, `u8` | stride `sh`, `sw` (conv, pools; 1, 1 for linear; 0 otherwise) |
//! | 6 | `u8` x 4 | zero padding top, left, bottom, right (conv, pools; each `<` its kernel side) |
//! | 10 | `u8` | flags: bit 0 `count_include_pad` (avg-pool only), other bits 0 |
//! | 11 | `u8` | reserved, 0 |
//! | 12 | `u16` | groups (conv: divides in and out channels; 1 for every other op) |
//! | 14 | `u16`, `u16` | `src`, `src2` (tensor ids; tensor 0 is the input, tensor `i + 1` the output of op `i`; `src2` read by add and concat) |
//! | 18 | `u16` x 3 | output channels, height, width |
//! | 24 | `u16` | weight-layer index, or `0xFFFF` |
//! | 26 | `i16`, `i16` | saturation bounds `lo <= hi` of the output in output units, inside the output type's range (`0..=255` for `u8`, `-127..=127` for `i8`; both 0 for `i32` logits, which saturate at `±(2^31 - 1)`) |
//! | 30 | `u16` | reserved, 0 |
//! | 32 | `u32` | `out_off`, the output's arena byte offset (0 for logits) |
//! | 36 | `u32`, `u32` | `weights_start`, `params_start` |
//! | 44 | `f32` | `out_scale`, the real value of one output unit |
//! | 48 | `f32` | `w_scale`, the layer's `max|W|` (weighted ops; 0 otherwise) |
//!
//! **Op record, version 1 (40 bytes):** `kind u8` (1..=7), `out_kind u8`, `kh u8`, `kw u8`,
//! `stride u8`, `pad u8`, reserved `u16` = 0, `src u16`, `src2 u16`, `out_c u16`, `out_h u16`,
//! `out_w u16`, `layer u16`, `out_off u32`, `weights_start u32`, `params_start u32`,
//! `out_scale f32`, `w_scale f32`. It reads as the version-2 op with `stride = [s, s]`,
//! `pad = [p; 4]` (pools: `p = 0`), `groups = 1`, `count_include_pad` set on avg-pools, and the
//! saturation bounds of its output type; a version-1 model therefore runs exactly as it did.
//!
//! # Semantics
//!
//! Weight layers appear in forward order with consecutive `layer` indices and consecutive weight
//! ranges, each in PyTorch's canonical order (conv `[out][in / groups][kh][kw]`, linear
//! `[out][in]`). Conv/linear ops take one record per output channel
//! (`y = (acc * m + bias + 2^(shift-1)) >> shift`, then saturated to `[lo, hi]`): a fused ReLU
//! is `[0, 255]`, a fused clip `[round(min / out_scale), round(max / out_scale)]` intersected
//! with the output type's range. The last op, and only it, writes `i32` logits, with
//! `out = (classes, 1, 1)`: a conv or linear, or (version 2 only) a global avg-pool.
//!
//! - *Conv* with `groups = g`: input channels `[k C/g, (k+1) C/g)` feed output channels
//!   `[k O/g, (k+1) O/g)`. The fan-in of an output channel is `C/g * kh * kw` ([`Model::fan_in`]),
//!   its im2col patch reads only its group's channels, and each group is an independent weight
//!   matrix of `fan_in` rows by `O/g` columns, cut into crossbar tiles exactly as an ungrouped
//!   layer ([`Model::tile_count`] = `g * ceil(fan_in / rows) * ceil(O/g / cols)`). A depthwise
//!   layer (`g = C = O`) maps each channel onto one tile column of `kh * kw` rows: one tile per
//!   channel (tile columns beyond the first stay unused). Programming visits the weights in
//!   canonical order, so an ungrouped layer's state is what it always was.
//! - *Pools* slide a `kh x kw` window with stride `[sh, sw]` over the input padded by
//!   `[top, left, bottom, right]` (floor mode: `out = (in + pads - k) / s + 1`). Max-pool ignores
//!   padded positions (PyTorch's `-inf` padding); its output has the input's type and scale.
//!   Avg-pool sums the in-bounds values; with `count_include_pad` it takes one record
//!   (`m, shift` of `1 / (kh kw)`, bias 0, as the global pool); without, it takes none and
//!   divides each window's sum `s` by its number `n` of in-bounds positions exactly, rounding
//!   half up: `y = floor((2 s + n) / (2 n))` (output in the input's scale).
//! - *Global avg-pool* sums each channel's `H x W` window (at most [`MAX_POOL_WINDOW`]
//!   values) and requantizes the sum `s` with its one record, `y = (s m + 2^(shift-1)) >>
//!   shift`. Writing a tensor, the record is `1 / (H W)` (output in the input's type and scale).
//!   As the last op it writes the `i32` logits (SqueezeNet's `conv 1x1 -> ReLU -> global pool`
//!   head): the record is `x.scale / (H W) / out_scale` (`out_scale` the logits' unit, as for a
//!   conv or linear), the result saturated to `±(2^31 - 1)`, and `out` must be
//!   `(classes, 1, 1)`. This combination is new in version 2 without a layout change (the
//!   version stays 2; a version-1 model may not use it): readers that predate it reject it as
//!   an invalid `op.out_kind`.
//! - *Add* takes two records: `(m_a, shift, bias)` and `(m_b, -, -)`,
//!   `y = (a m_a + b m_b + bias + 2^(shift-1)) >> shift`.
//! - *Concat* writes `src`'s channels, then `src2`'s (same height and width), each rescaled to
//!   the output scale by its own record: `y = (v m + bias + 2^(shift-1)) >> shift`.
//! - *Clip* (and *ReLU*) keep their input's scale and saturate to `[lo, hi]`.
//!
//! The activation arena holds every `u8`/`i8` tensor from its producer to its last reader.
//!
//! # Validation
//!
//! [`Model::parse`] checks the magic, version, length and CRC first, then every header field,
//! every op (kinds, tensor references, shape arithmetic, kernel, stride, padding `<` kernel,
//! groups dividing both channel counts, saturation bounds inside the output type, the last op
//! and only it writing `i32` logits of shape `(classes, 1, 1)` from a conv, linear or global
//! pool, fan-in `<= 65536`, pooling windows `<=` [`MAX_POOL_WINDOW`], weight and record
//! ranges, arena regions in bounds and never overwriting a tensor that is still to be read),
//! every record (`shift <= 62`, `|m| < 2^23`, `|bias| < 2^61`), every weight magnitude and every
//! label. Any violation is a typed [`Error`]; it never panics and never indexes out of bounds
//! (every read goes through a checked accessor).

#[cfg(any(feature = "alloc", test))]
pub mod build;

use crate::crc::crc32;
use crate::error::{Error, Result};
use crate::quant::{QuantConfig, Quantized, ScaleMode};
use crate::tile::{MAX_FAN_IN, MAX_TILE_ROWS, Path};
use crate::variation::{Faults, Profile, SigmaUnit, VariationConfig};
pub use crate::version::{VERSION, VERSION_1};

/// The magic bytes of a packed model.
pub const MAGIC: [u8; 8] = *b"NVCIMPK\0";
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 80;
/// Bytes of one op record (version 2).
pub const OP_LEN: usize = 52;
/// Bytes of one op record of a version-1 model.
pub const OP_LEN_V1: usize = 40;
/// Bytes of one requantization record.
pub const RECORD_LEN: usize = 16;
/// Largest op count.
pub const MAX_OPS: usize = 256;
/// Largest number of values one pooling window or global pool sums.
pub const MAX_POOL_WINDOW: usize = 65536;

/// What an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// 2-D convolution with zero padding, possibly grouped (weights `[out][in / groups][kh][kw]`).
    Conv,
    /// Fully connected layer over the flattened `C*H*W` input (weights `[out][in]`).
    Linear,
    /// `max(x, 0)`, `i8` or `u8` in, `u8` out, same scale.
    Relu,
    /// Max pooling (padding ignored); same type and scale as its input.
    MaxPool,
    /// Average pooling; one record with `count_include_pad`, an exact division without.
    AvgPool,
    /// Mean over `H x W` per channel; requantized by one record. May write the logits (last op).
    GlobalAvgPool,
    /// Residual add of two tensors of one shape, each rescaled to the output scale.
    Add,
    /// Saturation to `[lo, hi]` ([`Op::clip`]), same scale in and out.
    Clip,
    /// Channel concatenation of `src` then `src2`, each rescaled to the output scale.
    Concat,
}

impl OpKind {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => OpKind::Conv,
            2 => OpKind::Linear,
            3 => OpKind::Relu,
            4 => OpKind::MaxPool,
            5 => OpKind::AvgPool,
            6 => OpKind::GlobalAvgPool,
            7 => OpKind::Add,
            8 => OpKind::Clip,
            9 => OpKind::Concat,
            _ => return None,
        })
    }

    /// The code stored in the op table.
    pub const fn code(self) -> u8 {
        match self {
            OpKind::Conv => 1,
            OpKind::Linear => 2,
            OpKind::Relu => 3,
            OpKind::MaxPool => 4,
            OpKind::AvgPool => 5,
            OpKind::GlobalAvgPool => 6,
            OpKind::Add => 7,
            OpKind::Clip => 8,
            OpKind::Concat => 9,
        }
    }

    /// Whether the op reads a second tensor ([`Op::src2`]): add and concat.
    pub const fn is_binary(self) -> bool {
        matches!(self, OpKind::Add | OpKind::Concat)
    }

    /// Whether the op has weights on crossbar tiles.
    pub const fn is_weighted(self) -> bool {
        matches!(self, OpKind::Conv | OpKind::Linear)
    }
}

/// The element type of an activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    /// Unsigned 8-bit (after ReLU), `0..=255`.
    U8,
    /// Signed 8-bit, `-127..=127` (the first layer's input reaches -128 through its table).
    I8,
    /// Signed 32-bit logits, written to the caller's logits buffer.
    I32,
}

impl ActKind {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => ActKind::U8,
            1 => ActKind::I8,
            2 => ActKind::I32,
            _ => return None,
        })
    }

    /// The code stored in the op table.
    pub const fn code(self) -> u8 {
        match self {
            ActKind::U8 => 0,
            ActKind::I8 => 1,
            ActKind::I32 => 2,
        }
    }

    /// The values an output of this type saturates to: `[0, 255]`, `[-127, 127]`, or
    /// `[-(2^31 - 1), 2^31 - 1]`.
    pub const fn range(self) -> [i32; 2] {
        match self {
            ActKind::U8 => [0, 255],
            ActKind::I8 => [-127, 127],
            ActKind::I32 => [-i32::MAX, i32::MAX],
        }
    }
}

/// A tensor shape, channels x height x width (`CHW` layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Shape {
    /// Number of elements.
    pub const fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Number of elements in `u64` (no overflow on 32-bit targets for any `u16` dimensions).
    pub const fn len_u64(&self) -> u64 {
        self.c as u64 * self.h as u64 * self.w as u64
    }

    /// Whether the shape has no elements.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoded op record (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Op {
    /// What it computes.
    pub kind: OpKind,
    /// Its output's element type.
    pub out_kind: ActKind,
    /// Kernel height (conv, pools).
    pub kh: usize,
    /// Kernel width (conv, pools).
    pub kw: usize,
    /// Strides `[sh, sw]` (conv, pools).
    pub stride: [usize; 2],
    /// Zero padding `[top, left, bottom, right]` (conv, pools).
    pub pad: [usize; 4],
    /// Convolution groups (1 for every other op).
    pub groups: usize,
    /// Avg-pool: divide by `kh * kw` (`true`) or by the in-bounds positions of each window.
    pub count_include_pad: bool,
    /// Saturation bounds `[lo, hi]` of the output in output units (within
    /// [`ActKind::range`] of [`Self::out_kind`]).
    pub clip: [i32; 2],
    /// Input tensor id.
    pub src: usize,
    /// Second input tensor id (add, concat).
    pub src2: usize,
    /// Output shape.
    pub out: Shape,
    /// Weight-layer index (conv, linear).
    pub layer: Option<usize>,
    /// Byte offset of the output in the activation arena.
    pub out_off: usize,
    /// First weight of the layer in the weight section.
    pub weights_start: usize,
    /// First requantization record.
    pub params_start: usize,
    /// Real value of one output unit.
    pub out_scale: f32,
    /// The layer's quantization scale `max|W|` (weighted ops).
    pub w_scale: f32,
}

/// A requantization record: `y = (acc * m + bias + 2^(shift-1)) >> shift`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requant {
    /// Multiplier, `|m| < 2^23`.
    pub m: i32,
    /// Right shift, `0..=62`.
    pub shift: u32,
    /// Bias in units of `2^-shift` output units, `|bias| < 2^61`.
    pub bias: i64,
}

/// Consecutive requantization records of a model ([`Model::records`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Records<'a> {
    bytes: &'a [u8],
}

impl Records<'_> {
    /// Record `i` of the range (zeroes when out of range, as [`Model::record`]).
    #[inline]
    pub fn get(&self, i: usize) -> Requant {
        match self.bytes.get(i * RECORD_LEN..(i + 1) * RECORD_LEN) {
            Some(b) => Requant {
                m: i32_at(b, 0),
                shift: u32_at(b, 4),
                bias: i64_at(b, 8),
            },
            None => Requant::default(),
        }
    }
}

/// A tensor of the op graph: where it lives and what it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tensor {
    /// Shape.
    pub shape: Shape,
    /// Element type.
    pub kind: ActKind,
    /// Byte offset in the arena (`U8`/`I8`).
    pub off: usize,
    /// Real value of one unit.
    pub scale: f32,
}

impl Tensor {
    fn region(&self) -> Option<(usize, usize)> {
        (self.kind != ActKind::I32).then_some((self.off, self.off + self.shape.len()))
    }
}

/// Scratch requirements of a model, all in elements of the named type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchSizes {
    /// `u8` activation arena.
    pub act_bytes: usize,
    /// `i16` patch (im2col row) buffer.
    pub patch: usize,
    /// `i32` logits.
    pub logits: usize,
}

impl ScratchSizes {
    /// Total bytes of scratch (activations, patch and logits).
    pub const fn total_bytes(&self) -> usize {
        self.act_bytes + 2 * self.patch + 4 * self.logits
    }
}

/// A parsed, fully validated packed model borrowing its bytes.
#[derive(Clone, Copy)]
pub struct Model<'a> {
    bytes: &'a [u8],
    version: u16,
    var: VariationConfig,
    scale_mode: ScaleMode,
    tile_rows: usize,
    tile_cols: usize,
    input: Shape,
    classes: usize,
    n_ops: usize,
    n_layers: usize,
    act_bytes: usize,
    patch_len: usize,
    n_weights: usize,
    n_params: usize,
    n_test: usize,
    input_off: usize,
    input_scale: f32,
    lut_at: usize,
    ops_at: usize,
    params_at: usize,
    weights_at: usize,
    images_at: usize,
    labels_at: usize,
}

impl core::fmt::Debug for Model<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Model")
            .field("bytes", &self.bytes.len())
            .field("variation", &self.var)
            .field("tiles", &(self.tile_rows, self.tile_cols))
            .field("input", &self.input)
            .field("classes", &self.classes)
            .field("ops", &self.n_ops)
            .field("layers", &self.n_layers)
            .field("weights", &self.n_weights)
            .field("test_images", &self.n_test)
            .finish_non_exhaustive()
    }
}

fn rd<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at.saturating_add(N)) {
        out.copy_from_slice(s);
    }
    out
}
fn u8_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(rd(b, at))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(rd(b, at))
}
fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(rd(b, at))
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(rd(b, at))
}
fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_bits(u32_at(b, at))
}

fn bad(field: &'static str, value: impl TryInto<i64>) -> Error {
    Error::InvalidField {
        field,
        value: value.try_into().unwrap_or(i64::MAX),
    }
}

fn ensure(ok: bool, field: &'static str, value: impl TryInto<i64>) -> Result<()> {
    if ok { Ok(()) } else { Err(bad(field, value)) }
}

fn check_scale(field: &'static str, s: f32) -> Result<()> {
    ensure(s.is_finite() && s > 0.0, field, i64::from(s.to_bits()))
}

/// Output size of a window of `k` sliding with `stride` over `n` padded by `lo` before and `hi`
/// after (floor mode), or `None` when the window does not fit or a pad is not below `k`.
fn out_dim(n: usize, k: usize, stride: usize, lo: usize, hi: usize) -> Option<usize> {
    let padded = n + lo + hi;
    (k >= 1 && stride >= 1 && lo < k && hi < k && padded >= k).then(|| (padded - k) / stride + 1)
}

/// A version-1 op record as the version-2 op it means (see the module docs).
fn decode_v1(b: &[u8], at: usize, kind: OpKind, out_kind: ActKind) -> Result<Op> {
    ensure(kind.code() <= 7, "op.kind", kind.code())?;
    ensure(u16_at(b, at + 6) == 0, "op.reserved", u16_at(b, at + 6))?;
    let (stride, pad) = (usize::from(u8_at(b, at + 4)), usize::from(u8_at(b, at + 5)));
    let pool = matches!(kind, OpKind::MaxPool | OpKind::AvgPool);
    ensure(!pool || pad == 0, "op.pad", pad)?;
    let layer = u16_at(b, at + 18);
    Ok(Op {
        kind,
        out_kind,
        kh: usize::from(u8_at(b, at + 2)),
        kw: usize::from(u8_at(b, at + 3)),
        stride: [stride; 2],
        pad: [pad; 4],
        groups: 1,
        count_include_pad: kind == OpKind::AvgPool,
        clip: out_kind.range(),
        src: usize::from(u16_at(b, at + 8)),
        src2: usize::from(u16_at(b, at + 10)),
        out: Shape {
            c: usize::from(u16_at(b, at + 12)),
            h: usize::from(u16_at(b, at + 14)),
            w: usize::from(u16_at(b, at + 16)),
        },
        layer: (layer != 0xFFFF).then_some(usize::from(layer)),
        out_off: u32_at(b, at + 20) as usize,
        weights_start: u32_at(b, at + 24) as usize,
        params_start: u32_at(b, at + 28) as usize,
        out_scale: f32_at(b, at + 32),
        w_scale: f32_at(b, at + 36),
    })
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

impl<'a> Model<'a> {
    /// Parses and validates a packed model (see the module docs for what is checked).
    pub fn parse(bytes: &'a [u8]) -> Result<Model<'a>> {
        if bytes.len() < 8 {
            return Err(Error::Truncated {
                needed: HEADER_LEN + 4,
                found: bytes.len(),
            });
        }
        if rd::<8>(bytes, 0) != MAGIC {
            return Err(Error::BadMagic);
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(Error::Truncated {
                needed: HEADER_LEN + 4,
                found: bytes.len(),
            });
        }
        let b = bytes;
        let version = u16_at(b, 8);
        if version != VERSION && version != VERSION_1 {
            return Err(Error::UnsupportedVersion { version });
        }
        let op_len = if version == VERSION_1 {
            OP_LEN_V1
        } else {
            OP_LEN
        };
        let total = u32_at(b, 72) as usize;
        if b.len() < total {
            return Err(Error::Truncated {
                needed: total,
                found: b.len(),
            });
        }
        ensure(
            total == b.len() && total >= HEADER_LEN + 4,
            "header.total_len",
            total,
        )?;
        let stored = u32_at(b, total - 4);
        let computed = crc32(b.get(..total - 4).unwrap_or(&[]));
        if stored != computed {
            return Err(Error::ChecksumMismatch { stored, computed });
        }

        let quant = QuantConfig::new(u8_at(b, 10), u8_at(b, 11))?;
        let unit = match u8_at(b, 16) {
            0 => SigmaUnit::Range,
            1 => SigmaUnit::Level,
            v => return Err(bad("header.sigma_unit", v)),
        };
        let profile = match u8_at(b, 17) {
            0 => Profile::Uniform,
            1 => Profile::Rram1,
            2 => Profile::Fefet2,
            3 => Profile::Rram4,
            4 => Profile::Fefet6,
            v => return Err(bad("header.profile", v)),
        };
        let scale_mode = match u8_at(b, 18) {
            0 => ScaleMode::PerLayer,
            1 => ScaleMode::PerModel,
            v => return Err(bad("header.scale_mode", v)),
        };
        ensure(u8_at(b, 19) == 0, "header.reserved", u8_at(b, 19))?;
        ensure(u32_at(b, 76) == 0, "header.reserved", u32_at(b, 76))?;
        let faults = Faults::new(f32_at(b, 20), f32_at(b, 24))?;
        let var = VariationConfig::new(quant, f32_at(b, 12), unit, profile, faults)?;
        let tile_rows = usize::from(u16_at(b, 28));
        let tile_cols = usize::from(u16_at(b, 30));
        ensure(
            (1..=MAX_TILE_ROWS).contains(&tile_rows),
            "header.tile_rows",
            tile_rows,
        )?;
        ensure(tile_cols >= 1, "header.tile_cols", tile_cols)?;
        let input = Shape {
            c: usize::from(u16_at(b, 32)),
            h: usize::from(u16_at(b, 34)),
            w: usize::from(u16_at(b, 36)),
        };
        ensure(
            input.c >= 1 && input.h >= 1 && input.w >= 1,
            "header.input_shape",
            0,
        )?;
        let classes = usize::from(u16_at(b, 38));
        ensure(classes >= 1, "header.classes", classes)?;
        let n_ops = usize::from(u16_at(b, 40));
        ensure((1..=MAX_OPS).contains(&n_ops), "header.op_count", n_ops)?;
        let n_layers = usize::from(u16_at(b, 42));
        let act_bytes = u32_at(b, 44) as usize;
        let patch_len = u32_at(b, 48) as usize;
        ensure(patch_len <= MAX_FAN_IN, "header.patch_len", patch_len)?;
        let n_weights = u32_at(b, 52) as usize;
        let n_params = u32_at(b, 56) as usize;
        let n_test = u32_at(b, 60) as usize;
        let input_off = u32_at(b, 64) as usize;
        let input_scale = f32_at(b, 68);
        check_scale("header.input_scale", input_scale)?;

        // Section layout, in u64 so that no field can overflow the arithmetic on a 32-bit target.
        let image_len = input.len_u64();
        let sizes = [
            input.c as u64 * 256,
            n_ops as u64 * op_len as u64,
            n_params as u64 * RECORD_LEN as u64,
            n_weights as u64 * 2,
            n_test as u64 * image_len,
            n_test as u64 * 2,
        ];
        let mut at = [0usize; 6];
        let mut end = HEADER_LEN as u64;
        for (a, s) in at.iter_mut().zip(sizes) {
            *a = end as usize;
            end += s;
            if end + 4 > total as u64 {
                return Err(Error::Truncated {
                    needed: (end + 4).min(usize::MAX as u64) as usize,
                    found: total,
                });
            }
        }
        ensure(end + 4 == total as u64, "header.total_len", total)?;
        let m = Model {
            bytes,
            version,
            var,
            scale_mode,
            tile_rows,
            tile_cols,
            input,
            classes,
            n_ops,
            n_layers,
            act_bytes,
            patch_len,
            n_weights,
            n_params,
            n_test,
            input_off,
            input_scale,
            lut_at: at[0],
            ops_at: at[1],
            params_at: at[2],
            weights_at: at[3],
            images_at: at[4],
            labels_at: at[5],
        };
        m.validate_ops()?;
        m.validate_records()?;
        m.validate_weights()?;
        for i in 0..n_test {
            let label = u16_at(b, m.labels_at + 2 * i);
            ensure(usize::from(label) < classes, "test.label", label)?;
        }
        Ok(m)
    }

    fn op_len(&self) -> usize {
        if self.version == VERSION_1 {
            OP_LEN_V1
        } else {
            OP_LEN
        }
    }

    fn decode_op(&self, i: usize) -> Result<Op> {
        let b = self.bytes;
        let at = self.ops_at + i * self.op_len();
        let kind = OpKind::from_code(u8_at(b, at)).ok_or(bad("op.kind", u8_at(b, at)))?;
        let out_kind =
            ActKind::from_code(u8_at(b, at + 1)).ok_or(bad("op.out_kind", u8_at(b, at + 1)))?;
        if self.version == VERSION_1 {
            return decode_v1(b, at, kind, out_kind);
        }
        ensure(u8_at(b, at + 11) == 0, "op.reserved", u8_at(b, at + 11))?;
        ensure(u16_at(b, at + 30) == 0, "op.reserved", u16_at(b, at + 30))?;
        let flags = u8_at(b, at + 10);
        ensure(
            flags & !1 == 0 && (flags == 0 || kind == OpKind::AvgPool),
            "op.flags",
            flags,
        )?;
        let (lo, hi) = (
            i32::from(u16_at(b, at + 26) as i16),
            i32::from(u16_at(b, at + 28) as i16),
        );
        let clip = if out_kind == ActKind::I32 {
            ensure(lo == 0 && hi == 0, "op.clip", lo)?;
            out_kind.range()
        } else {
            let [tlo, thi] = out_kind.range();
            ensure(tlo <= lo && lo <= hi && hi <= thi, "op.clip", lo)?;
            [lo, hi]
        };
        let u = |k: usize| usize::from(u8_at(b, at + k));
        let layer = u16_at(b, at + 24);
        Ok(Op {
            kind,
            out_kind,
            kh: u(2),
            kw: u(3),
            stride: [u(4), u(5)],
            pad: [u(6), u(7), u(8), u(9)],
            groups: usize::from(u16_at(b, at + 12)),
            count_include_pad: flags & 1 != 0,
            clip,
            src: usize::from(u16_at(b, at + 14)),
            src2: usize::from(u16_at(b, at + 16)),
            out: Shape {
                c: usize::from(u16_at(b, at + 18)),
                h: usize::from(u16_at(b, at + 20)),
                w: usize::from(u16_at(b, at + 22)),
            },
            layer: (layer != 0xFFFF).then_some(usize::from(layer)),
            out_off: u32_at(b, at + 32) as usize,
            weights_start: u32_at(b, at + 36) as usize,
            params_start: u32_at(b, at + 40) as usize,
            out_scale: f32_at(b, at + 44),
            w_scale: f32_at(b, at + 48),
        })
    }

    fn validate_ops(&self) -> Result<()> {
        ensure(
            self.input_off as u64 + self.input.len_u64() <= self.act_bytes as u64,
            "header.input_off",
            self.input_off,
        )?;
        let (mut layers, mut weights, mut params, mut max_fan_in) =
            (0usize, 0usize, 0usize, 0usize);
        for i in 0..self.n_ops {
            let op = self.decode_op(i)?;
            ensure(op.src <= i, "op.src", op.src)?;
            let x = self.tensor_unchecked(op.src)?;
            ensure(x.kind != ActKind::I32, "op.src", op.src)?;
            let last = i + 1 == self.n_ops;
            ensure(
                (op.out_kind == ActKind::I32) == last,
                "op.out_kind",
                op.out_kind.code(),
            )?;
            check_scale("op.out_scale", op.out_scale)?;
            let o = op.out;
            ensure(o.c >= 1 && o.h >= 1 && o.w >= 1, "op.out_shape", 0)?;
            // The window arithmetic of conv and pools: pads below the kernel, the output size.
            let window_ok = out_dim(x.shape.h, op.kh, op.stride[0], op.pad[0], op.pad[2])
                == Some(o.h)
                && out_dim(x.shape.w, op.kw, op.stride[1], op.pad[1], op.pad[3]) == Some(o.w);
            let no_window = op.kh == 0
                && op.kw == 0
                && op.stride == [0, 0]
                && op.pad == [0; 4]
                && op.groups == 1;
            if op.kind != OpKind::Conv {
                ensure(op.groups == 1, "op.groups", op.groups)?;
            }
            let mut n_params = 0;
            match op.kind {
                OpKind::Conv | OpKind::Linear => {
                    let fan_in = if op.kind == OpKind::Conv {
                        let g = op.groups;
                        ensure(g >= 1 && x.shape.c % g == 0 && o.c % g == 0, "op.groups", g)?;
                        ensure(window_ok, "op.conv_shape", i)?;
                        (x.shape.c / g) as u64 * op.kh as u64 * op.kw as u64
                    } else {
                        ensure(o.h == 1 && o.w == 1, "op.linear_shape", i)?;
                        ensure(
                            op.kh == 1 && op.kw == 1 && op.stride == [1, 1] && op.pad == [0; 4],
                            "op.linear_kernel",
                            i,
                        )?;
                        x.shape.len_u64()
                    };
                    ensure(
                        (1..=MAX_FAN_IN as u64).contains(&fan_in),
                        "op.fan_in",
                        fan_in,
                    )?;
                    let fan_in = fan_in as usize;
                    max_fan_in = max_fan_in.max(fan_in);
                    ensure(
                        op.layer == Some(layers),
                        "op.layer",
                        op.layer.map_or(-1, |l| l as i64),
                    )?;
                    layers += 1;
                    ensure(
                        op.weights_start == weights,
                        "op.weights_start",
                        op.weights_start,
                    )?;
                    weights = weights.saturating_add(o.c.saturating_mul(fan_in));
                    check_scale("op.w_scale", op.w_scale)?;
                    if last {
                        ensure(
                            o.c == self.classes && o.h == 1 && o.w == 1,
                            "op.logits_shape",
                            o.c,
                        )?;
                    }
                    n_params = o.c;
                }
                _ => {
                    ensure(
                        op.layer.is_none(),
                        "op.layer",
                        op.layer.map_or(-1, |l| l as i64),
                    )?;
                    // Besides conv and linear, only a (version-2) global pool writes logits.
                    ensure(
                        op.out_kind != ActKind::I32
                            || (op.kind == OpKind::GlobalAvgPool && self.version != VERSION_1),
                        "op.out_kind",
                        op.out_kind.code(),
                    )?;
                    let pool = matches!(op.kind, OpKind::MaxPool | OpKind::AvgPool);
                    // Version 1 wrote arbitrary kernel fields for window-less ops.
                    ensure(
                        pool || no_window || self.version == VERSION_1,
                        "op.kernel",
                        op.kh,
                    )?;
                    match op.kind {
                        OpKind::Relu => {
                            ensure(o == x.shape && op.out_kind == ActKind::U8, "op.relu", i)?;
                        }
                        OpKind::Clip => {
                            ensure(o == x.shape, "op.clip_shape", i)?;
                        }
                        OpKind::MaxPool | OpKind::AvgPool => {
                            ensure(o.c == x.shape.c, "op.pool", i)?;
                            ensure(window_ok, "op.pool_shape", i)?;
                            ensure(op.kh * op.kw <= MAX_POOL_WINDOW, "op.pool_window", op.kh)?;
                            if op.kind == OpKind::MaxPool {
                                ensure(op.out_kind == x.kind, "op.out_kind", op.out_kind.code())?;
                            } else if op.count_include_pad {
                                n_params = 1;
                            }
                        }
                        OpKind::GlobalAvgPool => {
                            ensure(o.c == x.shape.c && o.h == 1 && o.w == 1, "op.gap_shape", i)?;
                            let window = x.shape.h as u64 * x.shape.w as u64;
                            ensure(window <= MAX_POOL_WINDOW as u64, "op.pool_window", window)?;
                            if op.out_kind == ActKind::I32 {
                                ensure(o.c == self.classes, "op.logits_shape", o.c)?;
                            }
                            n_params = 1;
                        }
                        OpKind::Add | OpKind::Concat => {
                            ensure(op.src2 <= i, "op.src2", op.src2)?;
                            let y = self.tensor_unchecked(op.src2)?;
                            ensure(y.kind != ActKind::I32, "op.src2", op.src2)?;
                            let ok = if op.kind == OpKind::Add {
                                y.shape == x.shape && o == x.shape
                            } else {
                                y.shape.h == x.shape.h
                                    && y.shape.w == x.shape.w
                                    && o.h == x.shape.h
                                    && o.w == x.shape.w
                                    && o.c == x.shape.c + y.shape.c
                            };
                            ensure(ok, "op.binary_shape", i)?;
                            n_params = 2;
                        }
                        _ => {}
                    }
                }
            }
            ensure(
                op.params_start == params,
                "op.params_start",
                op.params_start,
            )?;
            params += n_params;
            if op.out_kind != ActKind::I32 {
                let end = op.out_off as u64 + o.len_u64();
                ensure(end <= self.act_bytes as u64, "op.out_off", op.out_off)?;
                // The output must not overwrite any tensor that this op or a later one reads.
                let out = (op.out_off, op.out_off + o.len());
                for k in i..self.n_ops {
                    let later = self.decode_op(k)?;
                    let inputs = [
                        Some(later.src),
                        later.kind.is_binary().then_some(later.src2),
                    ];
                    for t in inputs.into_iter().flatten().filter(|&t| t <= i) {
                        if let Some(r) = self.tensor_unchecked(t)?.region() {
                            ensure(!overlaps(out, r), "op.out_off", op.out_off)?;
                        }
                    }
                }
            }
        }
        ensure(layers == self.n_layers, "header.layer_count", self.n_layers)?;
        ensure(
            weights == self.n_weights,
            "header.weight_count",
            self.n_weights,
        )?;
        ensure(
            params == self.n_params,
            "header.record_count",
            self.n_params,
        )?;
        ensure(
            self.patch_len >= max_fan_in,
            "header.patch_len",
            self.patch_len,
        )?;
        Ok(())
    }

    fn validate_records(&self) -> Result<()> {
        for i in 0..self.n_params {
            let r = self.record(i);
            ensure(r.shift <= 62, "record.shift", r.shift)?;
            ensure(r.m.unsigned_abs() < 1 << 23, "record.m", r.m)?;
            ensure(r.bias.unsigned_abs() < 1 << 61, "record.bias", r.bias)?;
        }
        Ok(())
    }

    fn validate_weights(&self) -> Result<()> {
        let max = self.var.quant().max_magnitude();
        for i in 0..self.n_weights {
            let v = u16_at(self.bytes, self.weights_at + 2 * i);
            ensure(v & 0x7FFF <= max, "weight.magnitude", v)?;
        }
        Ok(())
    }

    fn tensor_unchecked(&self, t: usize) -> Result<Tensor> {
        if t == 0 {
            return Ok(Tensor {
                shape: self.input,
                kind: ActKind::I8,
                off: self.input_off,
                scale: self.input_scale,
            });
        }
        let op = self.decode_op(t - 1)?;
        Ok(Tensor {
            shape: op.out,
            kind: op.out_kind,
            off: op.out_off,
            scale: op.out_scale,
        })
    }

    /// The variation configuration the model was packed for.
    pub fn variation(&self) -> VariationConfig {
        self.var
    }

    /// The quantization configuration (M, N) of the weights.
    pub fn quant(&self) -> QuantConfig {
        self.var.quant()
    }

    /// Whether `max|W|` was taken per layer or per model.
    pub fn scale_mode(&self) -> ScaleMode {
        self.scale_mode
    }

    /// Crossbar tile rows (inputs per tile column).
    pub fn tile_rows(&self) -> usize {
        self.tile_rows
    }

    /// Crossbar tile columns.
    pub fn tile_cols(&self) -> usize {
        self.tile_cols
    }

    /// The same model on other crossbar tiles (`1..=256` rows, at least one column), as a run
    /// that overrides the packed tile size sees it. Tiles only group the sums (and the ADC's
    /// reads), so every other field stays valid.
    pub fn with_tiles(mut self, rows: usize, cols: usize) -> Result<Self> {
        ensure((1..=MAX_TILE_ROWS).contains(&rows), "tile_rows", rows)?;
        ensure((1..=0xFFFF).contains(&cols), "tile_cols", cols)?;
        self.tile_rows = rows;
        self.tile_cols = cols;
        Ok(self)
    }

    /// Input shape (`C, H, W`); an image is `C*H*W` raw `u8` pixels in `CHW` order.
    pub fn input_shape(&self) -> Shape {
        self.input
    }

    /// Number of classes (logits).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of ops.
    pub fn op_count(&self) -> usize {
        self.n_ops
    }

    /// Number of weight layers (conv and linear).
    pub fn layer_count(&self) -> usize {
        self.n_layers
    }

    /// Number of weights over all layers.
    pub fn weight_count(&self) -> usize {
        self.n_weights
    }

    /// Op `i` (validated at parse time).
    pub fn op(&self, i: usize) -> Result<Op> {
        ensure(i < self.n_ops, "op.index", i)?;
        self.decode_op(i)
    }

    /// Tensor `t`: 0 is the input, `i + 1` the output of op `i`.
    pub fn tensor(&self, t: usize) -> Result<Tensor> {
        ensure(t <= self.n_ops, "tensor.index", t)?;
        self.tensor_unchecked(t)
    }

    /// Requantization record `i` (zeroes when out of range).
    pub fn record(&self, i: usize) -> Requant {
        let at = self.params_at + i * RECORD_LEN;
        if i >= self.n_params {
            return Requant::default();
        }
        Requant {
            m: i32_at(self.bytes, at),
            shift: u32_at(self.bytes, at + 4),
            bias: i64_at(self.bytes, at + 8),
        }
    }

    /// Records `start .. start + n`, resolved once: what [`Self::record`]`(start + i)` gives
    /// for `i < n`, read from a slice without re-checking the model (an executor's per-layer
    /// preload).
    pub fn records(&self, start: usize, n: usize) -> Records<'a> {
        let end = start.saturating_add(n).min(self.n_params);
        let at = self.params_at + start.min(end) * RECORD_LEN;
        Records {
            bytes: self
                .bytes
                .get(at..self.params_at + end * RECORD_LEN)
                .unwrap_or(&[]),
        }
    }

    /// Quantized weight `i` of the whole model (zero when out of range).
    pub fn weight(&self, i: usize) -> Quantized {
        if i >= self.n_weights {
            return Quantized::default();
        }
        let v = u16_at(self.bytes, self.weights_at + 2 * i);
        Quantized {
            negative: v & 0x8000 != 0,
            magnitude: v & 0x7FFF,
        }
    }

    /// The quantized weights of a weighted op, in canonical order.
    pub fn layer_weights(&self, op: &Op) -> impl Iterator<Item = Quantized> + '_ {
        crate::tile::decode_records(self.layer_weight_bytes(op))
    }

    /// The weight records of a weighted op as stored (two bytes per weight, little-endian,
    /// bit 15 the sign; see [`crate::tile::decode_records`]); empty for other ops.
    pub fn layer_weight_bytes(&self, op: &Op) -> &[u8] {
        let n = if op.kind.is_weighted() {
            op.out.c * self.fan_in(op)
        } else {
            0
        };
        // `parse` checked that every layer's range lies in the weight section; a range that
        // does not (an `Op` not from this model) yields no weights.
        let at = self.weights_at + 2 * op.weights_start;
        self.bytes.get(at..at + 2 * n).unwrap_or(&[])
    }

    /// Crossbar tiles a weighted op occupies: each of its `groups` weight matrices (`fan_in`
    /// rows by `outputs / groups` columns) on its own tiles,
    /// `groups * ceil(fan_in / rows) * ceil(outputs / groups / cols)` (0 for other ops).
    pub fn tile_count(&self, op: &Op) -> usize {
        let k = self.fan_in(op);
        if k == 0 {
            return 0;
        }
        let g = op.groups.max(1);
        g * k.div_ceil(self.tile_rows) * (op.out.c / g).div_ceil(self.tile_cols)
    }

    /// Fan-in of one output of a weighted op: `in / groups * kh * kw` for a conv (`in * kh *
    /// kw` when ungrouped), the flattened input for a linear; 0 for others. A layer holds
    /// `outputs * fan_in` weights.
    pub fn fan_in(&self, op: &Op) -> usize {
        let x = self
            .tensor_unchecked(op.src)
            .map(|t| t.shape)
            .unwrap_or_default();
        match op.kind {
            OpKind::Conv => x.c / op.groups.max(1) * op.kh * op.kw,
            OpKind::Linear => x.len(),
            _ => 0,
        }
    }

    /// The format version of the blob (1 or 2).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Channel `c`'s input table: raw pixel -> `i8` input code (scale [`Self::input_scale`]).
    pub fn input_table(&self, c: usize) -> &'a [u8] {
        let at = self.lut_at + 256 * c;
        if c >= self.input.c {
            return &[];
        }
        self.bytes.get(at..at + 256).unwrap_or(&[])
    }

    /// Real value of one unit of the input code.
    pub fn input_scale(&self) -> f32 {
        self.input_scale
    }

    /// Number of test images packed with the model.
    pub fn test_len(&self) -> usize {
        self.n_test
    }

    /// Test image `i` (raw pixels, `CHW`) and its label.
    pub fn test_image(&self, i: usize) -> Option<(&'a [u8], u16)> {
        if i >= self.n_test {
            return None;
        }
        let len = self.input.len();
        let img = self
            .bytes
            .get(self.images_at + i * len..self.images_at + (i + 1) * len)?;
        Some((img, u16_at(self.bytes, self.labels_at + 2 * i)))
    }

    /// `i16` elements of programmed state for `path`.
    pub fn state_len(&self, path: Path) -> usize {
        self.n_weights * path.state_per_weight(self.quant())
    }

    /// The scratch [`crate::exec::infer`] needs.
    pub fn scratch(&self) -> ScratchSizes {
        ScratchSizes {
            act_bytes: self.act_bytes,
            patch: self.patch_len,
            logits: self.classes,
        }
    }

    /// The model's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}
