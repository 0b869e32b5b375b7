//! The Monte Carlo loop of `run`, portable: the board runs it with its SMLAD kernel on the
//! emulated Cortex-M4F, `nvcim firmware run --simulated` runs it in process with the plain
//! kernel, and both print the same lines:
//!
//! ```text
//! config mc 5 seed 7 sigma 0.3 range profile uniform m 8 n 2 tiles 128x128 adc ideal
//! run 0 correct 27 of 32
//! ...
//! summary runs 5 total 32 mean 26.8000 std 0.8366 min 26 max 28 acc 83.7500%
//! ```
//!
//! For run `r`: [`nvcim_shared::exec::program_with`] from the streams `(seed, r, layer)`, then
//! [`nvcim_shared::exec::count_correct_with`] over the packed test batch.
//!
//! ```
//! use nvcim_firmware::{args::RunArgs, mc};
//! use nvcim_shared::{format::Model, tile::Plain};
//! let blob = nvcim_firmware::testmodel::small(8);
//! let model = Model::parse(&blob)?;
//! let plan = mc::plan(&model, &RunArgs { mc: 2, sigma: Some(0.2), ..RunArgs::default() })?;
//! let need = mc::needs(&plan);
//! let mut bufs = mc::OwnedBuffers::new(&need);
//! let mut out = String::new();
//! let (summary, _) = mc::run::<Plain>(&plan, &mut bufs.borrow(), &mut out, &mut mc::NoClock)?;
//! assert_eq!(summary.runs, 2);
//! assert!(out.lines().nth(1).unwrap().starts_with("run 0 correct "));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt::{self, Write};

use nvcim_shared::{
    exec::{Scratch, count_correct_with, program_with},
    format::{Model, OpKind, ScratchSizes},
    quant::QuantConfig,
    tile::{Adc, DotKernel, FRAC_BITS, MAX_TILE_ROWS, Path, Programmer},
    variation::VariationConfig,
};

use crate::{
    args::RunArgs,
    stats::{Accumulator, RunLine, Summary},
};

/// A resolved `run`: the model (with the tiles asked for) and everything the loop needs.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'m> {
    /// The model, on the run's tiles.
    pub model: Model<'m>,
    /// Monte Carlo runs.
    pub mc: u32,
    /// Seed of the streams.
    pub seed: u64,
    /// The variation model of every run.
    pub variation: VariationConfig,
    /// Collapsed (ideal ADC) or sliced through a quantizing ADC.
    pub path: Path,
}

/// Why the arguments do not fit the model (exit 2).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum PlanError {
    /// M or N differs from the packed model's (its weights are quantized with them).
    QuantMismatch {
        /// The model's (M, N).
        model: (u8, u8),
        /// The (M, N) asked for.
        asked: (u8, u8),
    },
    /// The resulting configuration is invalid.
    Invalid(nvcim_shared::Error),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::QuantMismatch { model, asked } => write!(
                f,
                "the model is packed for M = {}, N = {}; --m-bits/--n-bits asked for {}, {} (repack it)",
                model.0, model.1, asked.0, asked.1
            ),
            PlanError::Invalid(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl core::error::Error for PlanError {}

impl From<nvcim_shared::Error> for PlanError {
    fn from(e: nvcim_shared::Error) -> Self {
        PlanError::Invalid(e)
    }
}

/// The full scale of a `bits`-bit ADC on `rows`-row tiles: the largest noiseless column sum of
/// one slice, `rows * 255 * (max_level << FRAC_BITS)` (all inputs and devices at their top).
pub fn adc_full_scale(quant: QuantConfig, rows: usize) -> u32 {
    let top = u32::from(quant.max_level()) << FRAC_BITS;
    rows.min(MAX_TILE_ROWS) as u32 * 255 * top
}

/// Resolves the arguments against the model's packed configuration (every `None` is the
/// model's own setting).
pub fn plan<'m>(model: &Model<'m>, a: &RunArgs) -> Result<Plan<'m>, PlanError> {
    let packed = model.variation();
    let q = packed.quant();
    let asked = (
        a.m_bits.unwrap_or(q.m_bits()),
        a.n_bits.unwrap_or(q.n_bits()),
    );
    if asked != (q.m_bits(), q.n_bits()) {
        return Err(PlanError::QuantMismatch {
            model: (q.m_bits(), q.n_bits()),
            asked,
        });
    }
    let variation = VariationConfig::new(
        q,
        a.sigma.unwrap_or(packed.sigma()),
        a.unit.unwrap_or(packed.unit()),
        a.profile.unwrap_or(packed.profile()),
        packed.faults(),
    )?;
    let rows = a.tile_rows.map_or(model.tile_rows(), |r| r as usize);
    let cols = a.tile_cols.map_or(model.tile_cols(), |c| c as usize);
    let model = model.with_tiles(rows, cols)?;
    let path = match a.adc_bits {
        None => Path::Collapsed,
        Some(bits) => Path::Sliced(Adc::with_full_scale(bits, adc_full_scale(q, rows))?),
    };
    Ok(Plan {
        model,
        mc: a.mc.max(1),
        seed: a.seed,
        variation,
        path,
    })
}

/// Buffer sizes a plan needs, from the model's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// `i16` elements of programmed state.
    pub state: usize,
    /// Activation arena, patch and logits.
    pub scratch: ScratchSizes,
}

/// What [`run`] needs for this plan.
pub fn needs(plan: &Plan<'_>) -> Needs {
    Needs {
        state: plan.model.state_len(plan.path),
        scratch: plan.model.scratch(),
    }
}

/// The caller's buffers, each at least the size [`needs`] gives (the state exactly).
#[derive(Debug)]
pub struct Buffers<'b> {
    /// Programmed tile state.
    pub state: &'b mut [i16],
    /// Activation arena.
    pub act: &'b mut [u8],
    /// Patch (im2col row).
    pub patch: &'b mut [i16],
    /// Logits.
    pub logits: &'b mut [i32],
}

/// Heap-allocated buffers for the host (feature `testmodel` or tests).
#[cfg(any(test, feature = "testmodel"))]
#[derive(Debug)]
pub struct OwnedBuffers {
    state: alloc::vec::Vec<i16>,
    act: alloc::vec::Vec<u8>,
    patch: alloc::vec::Vec<i16>,
    logits: alloc::vec::Vec<i32>,
}

#[cfg(any(test, feature = "testmodel"))]
impl OwnedBuffers {
    /// Buffers of exactly the needed sizes.
    pub fn new(n: &Needs) -> Self {
        OwnedBuffers {
            state: alloc::vec![0; n.state],
            act: alloc::vec![0; n.scratch.act_bytes],
            patch: alloc::vec![0; n.scratch.patch],
            logits: alloc::vec![0; n.scratch.logits],
        }
    }

    /// Borrowed views for [`run`].
    pub fn borrow(&mut self) -> Buffers<'_> {
        Buffers {
            state: &mut self.state,
            act: &mut self.act,
            patch: &mut self.patch,
            logits: &mut self.logits,
        }
    }
}

/// A monotonic counter the loop reads around programming and inference (the board's FPGAIO
/// instruction counter); [`NoClock`] on the host.
pub trait Clock {
    /// The count now.
    fn now(&mut self) -> u64;
}

/// A clock that never moves.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClock;

impl Clock for NoClock {
    fn now(&mut self) -> u64 {
        0
    }
}

/// Clock counts spent programming and classifying, over all runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Counts in [`program_with`].
    pub program: u64,
    /// Counts in the classification of the test batch.
    pub infer: u64,
}

/// Multiply-accumulates of one image over the conv and linear layers.
pub fn macs_per_image(model: &Model<'_>) -> u64 {
    (0..model.op_count())
        .filter_map(|i| model.op(i).ok())
        .filter(|op| matches!(op.kind, OpKind::Conv | OpKind::Linear))
        .map(|op| op.out.len() as u64 * model.fan_in(&op) as u64)
        .sum()
}

/// Device deviations sampled to program one run: one per device of every weight.
pub fn devices_per_run(model: &Model<'_>) -> u64 {
    model.weight_count() as u64 * model.quant().slices() as u64
}

/// The `config` line: everything that determines the run lines.
pub fn config_line<'a>(plan: &'a Plan<'_>) -> impl fmt::Display + 'a {
    struct Line<'a, 'm>(&'a Plan<'m>);
    impl fmt::Display for Line<'_, '_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let p = self.0;
            let (v, q) = (p.variation, p.variation.quant());
            write!(
                f,
                "config mc {} seed {} sigma {} {} profile {} m {} n {} tiles {}x{} adc ",
                p.mc,
                p.seed,
                v.sigma(),
                v.unit().name(),
                v.profile().name(),
                q.m_bits(),
                q.n_bits(),
                p.model.tile_rows(),
                p.model.tile_cols()
            )?;
            match p.path {
                Path::Sliced(Adc::Quantized { bits, step }) => write!(f, "{bits} step {step}"),
                _ => write!(f, "ideal"),
            }
        }
    }
    Line(plan)
}

/// Runs the Monte Carlo loop with the tile-column kernel and tile programmer `K`, printing the
/// `config` line, one `run` line per run and the `summary` line to `out`.
pub fn run<K: DotKernel + Programmer>(
    plan: &Plan<'_>,
    bufs: &mut Buffers<'_>,
    out: &mut impl Write,
    clock: &mut impl Clock,
) -> Result<(Summary, Cost), nvcim_shared::Error> {
    let model = &plan.model;
    let total = model.test_len() as u32;
    let _ = writeln!(out, "{}", config_line(plan));
    let mut acc = Accumulator::new(total);
    let mut cost = Cost::default();
    for r in 0..plan.mc {
        let t0 = clock.now();
        program_with::<K>(model, &plan.variation, plan.seed, r, plan.path, bufs.state)?;
        let t1 = clock.now();
        let mut scratch = Scratch {
            act: bufs.act,
            patch: bufs.patch,
        };
        let correct =
            count_correct_with::<K>(model, plan.path, bufs.state, &mut scratch, bufs.logits)?;
        let t2 = clock.now();
        cost.program += t1.wrapping_sub(t0);
        cost.infer += t2.wrapping_sub(t1);
        let correct = correct as u32;
        acc.push(correct);
        let _ = writeln!(
            out,
            "{}",
            RunLine {
                run: r,
                correct,
                total
            }
        );
    }
    let summary = acc.summary().expect("mc >= 1 runs were pushed");
    let _ = writeln!(out, "{summary}");
    Ok((summary, cost))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodel;
    use alloc::string::String;
    use nvcim_shared::{
        exec::{count_correct, program},
        tile::Plain,
    };

    fn args(mc: u32, sigma: f32, seed: u64) -> RunArgs {
        RunArgs {
            mc,
            seed,
            sigma: Some(sigma),
            ..RunArgs::default()
        }
    }

    /// An independent kernel with the same bits, to check the hook is used and exact.
    struct Reversed;
    impl DotKernel for Reversed {
        fn dot_i16(w: &[i16], x: &[i16]) -> i32 {
            w.iter().zip(x).rev().fold(0i32, |s, (&a, &b)| {
                s.wrapping_add(i32::from(a) * i32::from(b))
            })
        }
    }
    impl Programmer for Reversed {}

    #[test]
    fn lines_match_the_engine_run_by_run() {
        let blob = testmodel::small(32);
        let model = Model::parse(&blob).unwrap();
        for (sigma, seed) in [(0.0, 1), (0.3, 7), (0.8, 11)] {
            let plan = plan(&model, &args(4, sigma, seed)).unwrap();
            let mut b = OwnedBuffers::new(&needs(&plan));
            let mut out = String::new();
            let (summary, _) =
                run::<Plain>(&plan, &mut b.borrow(), &mut out, &mut NoClock).unwrap();
            let mut other = String::new();
            run::<Reversed>(&plan, &mut b.borrow(), &mut other, &mut NoClock).unwrap();
            assert_eq!(out, other);
            let lines: alloc::vec::Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 6, "{out}");
            let mut acc = Accumulator::new(32);
            for r in 0..4u32 {
                let var = model.variation().with_sigma(sigma).unwrap();
                let mut state = alloc::vec![0i16; model.state_len(Path::Collapsed)];
                program(&model, &var, seed, r, Path::Collapsed, &mut state).unwrap();
                let o = b.borrow();
                let mut s = Scratch {
                    act: o.act,
                    patch: o.patch,
                };
                let c = count_correct(&model, Path::Collapsed, &state, &mut s, o.logits).unwrap()
                    as u32;
                acc.push(c);
                assert_eq!(
                    lines[1 + r as usize],
                    alloc::format!("run {r} correct {c} of 32")
                );
            }
            assert_eq!(acc.summary(), Some(summary));
            if sigma == 0.0 {
                assert_eq!((summary.min, summary.max), (24, 24), "{out}");
            }
        }
    }

    /// A model whose last op is a global pool writing the logits (no weights, no layer).
    #[test]
    fn global_pool_logits_model_runs() {
        let blob = testmodel::squeeze(8);
        let model = Model::parse(&blob).unwrap();
        let last = model.op(model.op_count() - 1).unwrap();
        assert_eq!((last.kind, last.layer), (OpKind::GlobalAvgPool, None));
        assert_eq!(model.layer_count(), 4);
        // conv 3x3 8 on 12x12, pool to 6x6, 1x1 convs 8 -> 4 -> 8 -> 4.
        assert_eq!(
            macs_per_image(&model),
            144 * 9 * 8 + 36 * 8 * 4 + 36 * 4 * 8 + 36 * 8 * 4
        );
        // Labelled with the clean predictions: all right at sigma 0, and both kernels agree.
        let clean = plan(&model, &args(2, 0.0, 3)).unwrap();
        let mut b = OwnedBuffers::new(&needs(&clean));
        let mut out = String::new();
        let (summary, _) = run::<Plain>(&clean, &mut b.borrow(), &mut out, &mut NoClock).unwrap();
        assert_eq!((summary.min, summary.max), (8, 8), "{out}");
        let noisy = plan(&model, &args(3, 0.5, 3)).unwrap();
        let (mut a, mut c) = (String::new(), String::new());
        run::<Plain>(&noisy, &mut b.borrow(), &mut a, &mut NoClock).unwrap();
        run::<Reversed>(&noisy, &mut b.borrow(), &mut c, &mut NoClock).unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn overrides_and_their_errors() {
        let blob = testmodel::small(4);
        let model = Model::parse(&blob).unwrap();
        let p = plan(
            &model,
            &RunArgs {
                mc: 1,
                ..RunArgs::default()
            },
        )
        .unwrap();
        assert_eq!(p.variation, model.variation());
        assert_eq!(p.path, Path::Collapsed);
        let a = RunArgs {
            mc: 2,
            tile_rows: Some(16),
            adc_bits: Some(6),
            ..RunArgs::default()
        };
        let p = plan(&model, &a).unwrap();
        assert_eq!(p.model.tile_rows(), 16);
        assert!(matches!(
            p.path,
            Path::Sliced(Adc::Quantized { bits: 6, .. })
        ));
        assert!(
            config_line(&p)
                .to_string()
                .ends_with("tiles 16x128 adc 6 step 6318")
        );
        let mut b = OwnedBuffers::new(&needs(&p));
        assert_eq!(b.state.len(), 4 * model.weight_count());
        run::<Plain>(&p, &mut b.borrow(), &mut String::new(), &mut NoClock).unwrap();
        let bad = RunArgs {
            n_bits: Some(4),
            ..RunArgs::default()
        };
        assert!(matches!(
            plan(&model, &bad),
            Err(PlanError::QuantMismatch { .. })
        ));
        assert_eq!(
            macs_per_image(&model),
            144 * 9 * 4 + 36 * 36 * 8 + 72 * 16 + 16 * 4
        );
    }
}
