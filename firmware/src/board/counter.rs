//! Instruction counting with the MPS2 FPGAIO free-running counter.
//!
//! Under `qemu-system-arm -icount shift=0` one guest instruction takes one nanosecond of
//! virtual time, and the FPGAIO `COUNTER` register (0x40028018) ticks at 25 MHz, so one tick
//! is 40 instructions, deterministically. Measurements subtract the cost of an empty one and
//! have a resolution of 40 instructions, so callers measure many operations at once.

const FPGAIO_COUNTER: *const u32 = 0x4002_8018 as *const u32;
/// Instructions per counter tick under `-icount shift=0`.
pub const INSNS_PER_TICK: u64 = 40;

fn ticks() -> u32 {
    // SAFETY: 0x40028018 is the FPGAIO COUNTER register of the MPS2 board, always mapped and
    // readable; a volatile 32-bit read has no side effect.
    unsafe { core::ptr::read_volatile(FPGAIO_COUNTER) }
}

fn raw(f: impl FnOnce()) -> u64 {
    let t0 = ticks();
    f();
    u64::from(ticks().wrapping_sub(t0)) * INSNS_PER_TICK
}

/// Instructions `f` executes, less the cost of measuring nothing.
pub fn measure(f: impl FnOnce()) -> u64 {
    let empty = raw(|| {});
    raw(f).saturating_sub(empty)
}

/// A 64-bit instruction count extended from the 32-bit tick counter: exact as long as it is
/// read at least once per `2^32` ticks (172 s of virtual time, 1.7e11 instructions).
#[derive(Debug)]
pub struct Instructions {
    last: u32,
    total: u64,
}

impl Instructions {
    /// Starts counting from zero now.
    pub fn start() -> Self {
        Instructions {
            last: ticks(),
            total: 0,
        }
    }

    /// Instructions since [`Self::start`].
    pub fn now(&mut self) -> u64 {
        let t = ticks();
        self.total += u64::from(t.wrapping_sub(self.last)) * INSNS_PER_TICK;
        self.last = t;
        self.total
    }
}
