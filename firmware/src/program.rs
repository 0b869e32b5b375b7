//! Tile programming on the Cortex-M4: the Monte Carlo run's other hot loop.
//!
//! Every run draws one Gaussian deviation per device (four per weight at M = 8, N = 2) and
//! writes the collapsed `i16` weight. [`Smlad`]'s [`Programmer`] runs that loop in assembly for
//! the usual case (the collapsed path, no stuck-at faults, M = 8 sliced into four 2-bit
//! devices) and hands everything else to [`program_layer`], the reference. The assembly is
//! `shared`'s fast path instruction for instruction, so it writes the same bits:
//!
//! - xoshiro128++ `next` (9 instructions, the four state words stay in registers);
//! - the ziggurat's fast path from [`ziggurat_strips`] (`r & 0x7f` picks the strip, `(r >> 9)
//!   < k` accepts, `|z| = ((r >> 8) | 1) as f32 * w`, the sign is bit 7 of `r`);
//! - `r = trunc(|z| * sd + 0.5)` (VMUL then VMLA, each rounded as Rust's two operations are;
//!   VCVT truncates and saturates as `as i32` does), the unclamped test `r <= safe`, the sign;
//! - the weight: its levels' sum `(magnitude & 0xff) << 4` (the devices are the magnitude's bit
//!   pairs, so `sum_j (g_j << 4) << 2j` is that), plus `±r_j << 2j` per device, the weight's
//!   sign, one STRH.
//!
//! By count of the listing, 30 instructions per device and 16 per weight on the fast path; 38.5
//! per device measured on VGG-8 w0.25 at sigma 0.4 with the slow draws (`cargo xtask bench
//! firmware`; the Rust loop took 50.4, most of the difference being register spills and moves
//! the compiler could not avoid with 14 live values).
//!
//! The draws the fast path does not cover, a wedge or the tail of the ziggurat (about 2.8% of
//! draws), call [`Xoshiro128PlusPlus::normal_after_fast_miss`] from the assembly and continue.
//! A deviation that may need the clamp (above 337/16 levels: about 17 standard deviations at
//! sigma 0.4) ends the assembly loop *before* the weight it belongs to: the loop saves the
//! generator at the start of every weight (one STM), so Rust re-runs that one weight through
//! [`program_layer`] from that state and resumes the assembly after it. The self-test ([`crate::selftest::check_programming`]) compares the two on
//! the target, including sigmas where the clamp fires.

use nvcim_shared::Result;
use nvcim_shared::rng::Xoshiro128PlusPlus;
use nvcim_shared::tile::{Path, Plain, Programmer, decode_records, program_layer};
use nvcim_shared::variation::VariationConfig;

use crate::kernel::Smlad;

impl Programmer for Smlad {
    #[inline]
    fn program_records(
        var: &VariationConfig,
        records: &[u8],
        fan_in: usize,
        path: Path,
        rng: &mut Xoshiro128PlusPlus,
        state: &mut [i16],
    ) -> Result<()> {
        #[cfg(all(target_arch = "arm", target_os = "none"))]
        {
            let q = var.quant();
            if path == Path::Collapsed
                && !var.faults().any()
                && (q.m_bits(), q.n_bits()) == (8, 2)
                && records.len() == 2 * state.len()
            {
                return arm::program_8x2(var, records, rng, state);
            }
        }
        <Plain as Programmer>::program_records(var, records, fan_in, path, rng, state)
    }
}

/// One weight through the reference: `records` holds exactly one record, `slot` its state.
#[cfg_attr(not(all(target_arch = "arm", target_os = "none")), allow(dead_code))]
fn program_one(
    var: &VariationConfig,
    record: &[u8],
    rng: &mut Xoshiro128PlusPlus,
    slot: &mut i16,
) -> Result<()> {
    program_layer(
        var,
        decode_records(record),
        1,
        Path::Collapsed,
        rng,
        core::slice::from_mut(slot),
    )
}

#[cfg(all(target_arch = "arm", target_os = "none"))]
mod arm {
    use nvcim_shared::Result;
    use nvcim_shared::rng::{Strip, Xoshiro128PlusPlus, ziggurat_strips};
    use nvcim_shared::tile::{FRAC_BITS, unclamped_deviation};
    use nvcim_shared::variation::VariationConfig;

    /// What the assembly reads and writes back; the offsets are in its text.
    #[repr(C)]
    struct Job {
        /// 0: generator state; on return, after the last finished weight.
        s: [u32; 4],
        /// 16: the next weight record; on return, the first weight not written.
        src: *const u8,
        /// 20: its state slot; on return, the first slot not written.
        dst: *mut i16,
        /// 24: one past the last slot.
        end: *mut i16,
        /// 28: the ziggurat's fast-path strips.
        tab: *const Strip,
        /// 32, 36: the device std in `2^-FRAC_BITS` levels, outside and inside the band.
        sd: [f32; 2],
        /// 40: `unclamped_deviation`.
        safe: u32,
    }

    /// `program_layer` for M = 8, N = 2, collapsed, no faults; `records.len() == 2 *
    /// state.len()` (the caller checked).
    pub(super) fn program_8x2(
        var: &VariationConfig,
        records: &[u8],
        rng: &mut Xoshiro128PlusPlus,
        state: &mut [i16],
    ) -> Result<()> {
        let range = state.as_mut_ptr_range();
        let mut job = Job {
            s: rng.state(),
            src: records.as_ptr(),
            dst: range.start,
            end: range.end,
            tab: ziggurat_strips().as_ptr(),
            sd: var.device_sigma_fixed(FRAC_BITS),
            safe: unclamped_deviation(var.quant()),
        };
        loop {
            // SAFETY: `src` has two bytes for every slot of `dst..end` (the caller checked
            // `records.len() == 2 * state.len()`), `dst..end` lies in `state`, which nothing
            // else touches while the assembly runs, and `tab` points at the 128 strips. The
            // function follows the AAPCS (it saves r4-r11, lr and s16-s19, keeps sp 8-aligned
            // at its call of `finish_normal`, and otherwise uses the caller-saved s4-s6) and
            // writes only `job`, the slots and its own stack frame.
            unsafe { program_8x2_asm(&mut job) };
            if job.dst == job.end {
                break;
            }
            // A device of the weight at `dst` may need the clamp: the reference, from the
            // generator's state at the start of that weight.
            // (`from_state` refuses only the all-zero state, which xoshiro never reaches from
            // a seeded one: its step is a bijection on the non-zero states.)
            let mut g = Xoshiro128PlusPlus::from_state(job.s).unwrap_or_else(|| rng.clone());
            // SAFETY: `dst < end` is a slot of `state` and `src` its two-byte record (see
            // above); both stay in bounds after the step by one weight.
            let (record, slot) =
                unsafe { (core::slice::from_raw_parts(job.src, 2), &mut *job.dst) };
            super::program_one(var, record, &mut g, slot)?;
            job.s = g.state();
            // SAFETY: as above, at most one past the end.
            unsafe {
                job.src = job.src.add(2);
                job.dst = job.dst.add(1);
            }
        }
        if let Some(g) = Xoshiro128PlusPlus::from_state(job.s) {
            *rng = g;
        }
        Ok(())
    }

    /// The ziggurat's wedge or tail for the assembly: `s` is the generator just after the
    /// rejected draw `r`; returns `z`'s bits and leaves `s` after the last draw.
    unsafe extern "C" fn finish_normal(s: *mut [u32; 4], r: u32) -> u32 {
        // SAFETY: the assembly passes a slot of its own stack frame, aligned and unaliased.
        let s = unsafe { &mut *s };
        // (Never all-zero: see `program_8x2`.)
        let Some(mut g) = Xoshiro128PlusPlus::from_state(*s) else {
            return 0;
        };
        let z = g.normal_after_fast_miss(r);
        *s = g.state();
        z.to_bits()
    }

    /// One device: its deviation `±r` added into the weight in r9 at bit `$sh` (`$first`:
    /// r9 holds the weight's level sum `(magnitude & 0xff)`, which this device shifts by 4;
    /// the level sum is `sum_j g_j << 2j` since the devices are the magnitude's bit pairs).
    /// Registers: r0-r3 the generator, r7 the strips, r8 the record, lr `safe`, s16 the
    /// weight's std, s17 = 0.5; r10-r12, s4-s6 scratch. A wedge or tail draw calls
    /// `finish_normal` (r0-r3 go through the frame at sp + 20); a deviation above `safe`
    /// branches to `4:`, which restarts the weight in Rust.
    macro_rules! device {
        (@acc "first", $sh:tt) => {
            "rsbne r9, r12, r9, lsl #4\naddeq r9, r12, r9, lsl #4\n"
        };
        (@acc "next", $sh:tt) => {
            concat!(
                "subne r9, r9, r12, lsl #", $sh, "\n",
                "addeq r9, r9, r12, lsl #", $sh, "\n",
            )
        };
        ($first:tt, $sh:tt) => {
            concat!(
                // xoshiro128++: result = rotl(s0 + s3, 7) + s0, then the state update.
                "add r11, r0, r3\n",
                "add r10, r0, r11, ror #25\n",
                "lsl r12, r1, #9\n",
                "eor r2, r2, r0\n",
                "eor r3, r3, r1\n",
                "eor r1, r1, r2\n",
                "eor r0, r0, r3\n",
                "eor r2, r2, r12\n",
                "ror r3, r3, #21\n",
                // The ziggurat: strip r & 0x7f, the fast path when (r >> 9) < k.
                "and r11, r10, #127\n",
                "add r11, r7, r11, lsl #3\n",
                "ldr r12, [r11]\n",
                "cmp r12, r10, lsr #9\n",
                "bhi 5f\n",
                // The wedge or tail: z's bits in r0; its sign to bit 7 of r10 as the fast
                // path has it.
                "add r12, sp, #20\n",
                "stm r12, {{r0-r3}}\n",
                "mov r0, r12\n",
                "mov r1, r10\n",
                "bl {finish}\n",
                "lsr r10, r0, #24\n",
                "bic r12, r0, #0x80000000\n",
                "vmov s5, r12\n",
                "add r12, sp, #20\n",
                "ldm r12, {{r0-r3}}\n",
                "ldr r12, [sp, #16]\n",
                "ldr lr, [r12, #40]\n",
                "b 6f\n",
                // |z| = ((r >> 8) | 1) as f32 * w
                "5:\n",
                "vldr s4, [r11, #4]\n",
                "lsr r12, r10, #8\n",
                "orr r12, r12, #1\n",
                "vmov s5, r12\n",
                "vcvt.f32.u32 s5, s5\n",
                "vmul.f32 s5, s5, s4\n",
                // r = trunc(|z| * sd + 0.5); above `safe` the clamp may apply.
                "6:\n",
                "vmov.f32 s6, s17\n",
                "vmla.f32 s6, s5, s16\n",
                "vcvt.s32.f32 s6, s6\n",
                "vmov r12, s6\n",
                "cmp r12, lr\n",
                "bhi 4f\n",
                // w += ±r << 2j, the sign bit 7 of the draw.
                "tst r10, #128\n",
                "ite ne\n",
                device!(@acc $first, $sh),
            )
        };
    }

    /// The weight loop; see the module docs and `device!`.
    #[unsafe(naked)]
    unsafe extern "C" fn program_8x2_asm(job: *mut Job) {
        core::arch::naked_asm!(
            // The module-level assembler does not inherit the target's FPU.
            ".fpu fpv4-sp-d16",
            // Frame (96 bytes with the saves, 8-aligned for the call): sp + 0 the generator
            // at the weight's start, sp + 16 `job`, sp + 20 the generator for `finish_normal`.
            "push {{r4-r11, lr}}",
            "vpush {{s16-s19}}",
            "sub sp, #44",
            "str r0, [sp, #16]",
            "mov r12, r0",
            "ldm r12, {{r0-r3}}",
            "ldr r4, [r12, #16]",
            "ldr r5, [r12, #20]",
            "ldr r6, [r12, #24]",
            "ldr r7, [r12, #28]",
            "vldr s18, [r12, #32]",
            "vldr s19, [r12, #36]",
            "ldr lr, [r12, #40]",
            "vmov.f32 s17, #0.5",
            "cmp r5, r6",
            "bhs 3f",
            "2:",
            // The generator at the weight's start, for a restart in Rust.
            "stm sp, {{r0-r3}}",
            "ldrh r8, [r4], #2",
            // The band: magnitude (bits 0-14) in 64..=191 takes sd[1].
            "ubfx r11, r8, #0, #15",
            "sub r11, r11, #64",
            "cmp r11, #128",
            "ite lo",
            "vmovlo.f32 s16, s19",
            "vmovhs.f32 s16, s18",
            "ubfx r9, r8, #0, #8",
            device!("first", "0"),
            device!("next", "2"),
            device!("next", "4"),
            device!("next", "6"),
            // The weight's sign (bit 15), the slot.
            "tst r8, #32768",
            "it ne",
            "rsbne r9, r9, #0",
            "strh r9, [r5], #2",
            "cmp r5, r6",
            "blo 2b",
            "3:",
            "ldr r12, [sp, #16]",
            "stm r12, {{r0-r3}}",
            "str r4, [r12, #16]",
            "str r5, [r12, #20]",
            "add sp, #44",
            "vpop {{s16-s19}}",
            "pop {{r4-r11, pc}}",
            // A deviation that may need the clamp: back to the weight's start.
            "4:",
            "ldm sp, {{r0-r3}}",
            "sub r4, r4, #2",
            "b 3b",
            finish = sym finish_normal,
        )
    }
}
