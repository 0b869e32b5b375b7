//! The memory report: code, static RAM, stack high-water mark and PSRAM, from linker symbols.

use core::{
    fmt,
    ptr::{addr_of, addr_of_mut},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

unsafe extern "C" {
    static _flash_origin: u8;
    static _ram_origin: u8;
    static _psram_origin: u8;
    static _psram_length: u8;
    static __sdata: u8;
    static __edata: u8;
    static __sidata: u8;
    static __sheap: u8;
    static _stack_start: u8;
    static _stack_end: u8;
}

/// The 32-bit value cortex-m-rt paints the stack with at reset (`paint-stack` feature).
const STACK_PAINT: u32 = 0xcccc_cccc;

fn addr(p: *const u8) -> usize {
    p as usize
}

static PSRAM_TAKEN: AtomicBool = AtomicBool::new(false);

/// The whole PSRAM region (16 MiB at 0x21000000), where QEMU's loader puts the blob; the rest
/// of it holds the programmed tile state. `None` after the first call.
pub fn take_psram() -> Option<&'static mut [u8]> {
    if PSRAM_TAKEN.swap(true, Ordering::Relaxed) {
        return None;
    }
    let (start, len) = (addr(addr_of!(_psram_origin)), addr(addr_of!(_psram_length)));
    // SAFETY: memory.x defines PSRAM as this region of the board and nothing is linked there;
    // the flag above hands out this one reference at most once, so it is never aliased.
    Some(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len) })
}

/// The pool capacities, defined once in the portable [`nvcim_firmware::fit`] (the host's
/// `nvcim pack` checks models against them).
pub use nvcim_firmware::fit::{ACT_CAP, LOGITS_CAP, PATCH_CAP};

/// The static scratch pools in RAM, sized for the largest model this board runs; a run uses
/// the prefix its model's header asks for.
pub struct Pools {
    /// Activation arena.
    pub act: &'static mut [u8; ACT_CAP],
    /// Patch.
    pub patch: &'static mut [i16; PATCH_CAP],
    /// Logits.
    pub logits: &'static mut [i32; LOGITS_CAP],
}

static POOLS_TAKEN: AtomicBool = AtomicBool::new(false);

/// The scratch pools; `None` after the first call.
pub fn take_pools() -> Option<Pools> {
    /// Word alignment, so that the patch and the state rows (4-aligned in PSRAM) take the
    /// SMLAD kernel's LDM path.
    #[repr(C, align(4))]
    struct Aligned<T>(T);
    static mut ACT: Aligned<[u8; ACT_CAP]> = Aligned([0; ACT_CAP]);
    static mut PATCH: Aligned<[i16; PATCH_CAP]> = Aligned([0; PATCH_CAP]);
    static mut LOGITS: Aligned<[i32; LOGITS_CAP]> = Aligned([0; LOGITS_CAP]);
    if POOLS_TAKEN.swap(true, Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the flag above hands out these references at most once, and nothing else names
    // the statics, so each is the only reference to its buffer.
    unsafe {
        Some(Pools {
            act: &mut (*addr_of_mut!(ACT)).0,
            patch: &mut (*addr_of_mut!(PATCH)).0,
            logits: &mut (*addr_of_mut!(LOGITS)).0,
        })
    }
}

static PSRAM_USED: AtomicUsize = AtomicUsize::new(0);

/// Records how many PSRAM bytes the loaded blob (and the tile state after it) occupy.
pub fn set_psram_used(bytes: usize) {
    PSRAM_USED.store(bytes, Ordering::Relaxed);
}

/// Bytes used now: code (flash image), static RAM, deepest stack so far, PSRAM.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    code: usize,
    ram: usize,
    stack: usize,
    psram: usize,
}

/// Measures the report now.
pub fn report() -> Report {
    let flash = addr(addr_of!(_flash_origin));
    let data = addr(addr_of!(__edata)) - addr(addr_of!(__sdata));
    let code = addr(addr_of!(__sidata)) + data - flash;
    let ram = addr(addr_of!(__sheap)) - addr(addr_of!(_ram_origin));
    let (bottom, top) = (addr(addr_of!(_stack_end)), addr(addr_of!(_stack_start)));
    let mut deepest = top;
    let mut p = bottom;
    while p < top {
        // SAFETY: [bottom, top) is the stack region, word-aligned (asserted by link.x), mapped
        // RAM; reading a word of it (live stack or paint) is harmless.
        if unsafe { core::ptr::read_volatile(p as *const u32) } != STACK_PAINT {
            deepest = p;
            break;
        }
        p += 4;
    }
    Report {
        code,
        ram,
        stack: top - deepest,
        psram: PSRAM_USED.load(Ordering::Relaxed),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory code {} B ram {} B stack {} B psram {} B",
            self.code, self.ram, self.stack, self.psram
        )
    }
}
