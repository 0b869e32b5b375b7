//! The memory report: code, static RAM, stack high-water mark and PSRAM, from linker symbols.

use core::{
    fmt,
    ptr::addr_of,
    sync::atomic::{AtomicUsize, Ordering},
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

/// The whole PSRAM region (16 MiB at 0x21000000), where QEMU's loader puts the blob.
pub fn psram() -> &'static [u8] {
    let (start, len) = (addr(addr_of!(_psram_origin)), addr(addr_of!(_psram_length)));
    // SAFETY: memory.x defines PSRAM as this region of the board; nothing is linked there and
    // the firmware never writes it, so a shared 'static view of it is never aliased mutably.
    unsafe { core::slice::from_raw_parts(start as *const u8, len) }
}

static PSRAM_USED: AtomicUsize = AtomicUsize::new(0);

/// Records how many PSRAM bytes the loaded blob occupies.
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
