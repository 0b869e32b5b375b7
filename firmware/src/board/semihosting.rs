//! Arm semihosting as QEMU 7.2 implements it for 32-bit Arm (`BKPT 0xAB`, operation in r0,
//! parameter or parameter block address in r1, result in r0).

use core::{arch::asm, fmt};

use nvcim_firmware::exit::ExitCode;

const SYS_OPEN: u32 = 0x01;
const SYS_WRITE: u32 = 0x05;
const SYS_GET_CMDLINE: u32 = 0x15;
const SYS_EXIT: u32 = 0x18;
const SYS_EXIT_EXTENDED: u32 = 0x20;
const ADP_STOPPED_APPLICATION_EXIT: u32 = 0x2_0026;
const ADP_STOPPED_RUN_TIME_ERROR_UNKNOWN: u32 = 0x2_0024;

/// One semihosting call.
///
/// # Safety
/// `arg` must be what operation `op` expects: for the block-taking calls, the address of a
/// live parameter block whose pointers are valid for the access the call makes.
unsafe fn call(op: u32, arg: usize) -> i32 {
    let r: i32;
    // SAFETY: BKPT 0xAB traps to QEMU's semihosting, which reads r0/r1 and the block the caller
    // vouched for, and writes only r0 (and the buffers named in the block).
    unsafe { asm!("bkpt #0xab", inout("r0") op as i32 => r, in("r1") arg, options(nostack)) };
    r
}

/// Exits QEMU with `code` as its process exit status.
///
/// On 32-bit Arm, plain `SYS_EXIT` takes only a reason (QEMU maps application exit to 0 and
/// anything else to 1); `SYS_EXIT_EXTENDED` takes the block `{reason, subcode}` and QEMU exits
/// with the subcode, so every code of [`ExitCode`] reaches the shell.
pub fn exit(code: ExitCode) -> ! {
    let block = [ADP_STOPPED_APPLICATION_EXIT, u32::from(code.code())];
    // SAFETY: `block` is a live two-word parameter block, as SYS_EXIT_EXTENDED requires.
    unsafe { call(SYS_EXIT_EXTENDED, block.as_ptr() as usize) };
    // Only reached if the host lacks the extension: keep at least ok / not ok.
    let reason = if code == ExitCode::Ok {
        ADP_STOPPED_APPLICATION_EXIT
    } else {
        ADP_STOPPED_RUN_TIME_ERROR_UNKNOWN
    };
    // SAFETY: SYS_EXIT on 32-bit Arm takes the reason itself in r1, no memory.
    unsafe { call(SYS_EXIT, reason as usize) };
    loop {
        core::hint::spin_loop();
    }
}

/// The command line (`SYS_GET_CMDLINE`) in `buf`, or `None` if it does not fit or is not
/// UTF-8.
pub fn command_line(buf: &mut [u8]) -> Option<&str> {
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: the block names `buf` with its true length; QEMU writes at most that many bytes
    // (including the terminating NUL) and the length it wrote into block[1].
    let r = unsafe { call(SYS_GET_CMDLINE, block.as_mut_ptr() as usize) };
    if r != 0 {
        return None;
    }
    let len = block[1].min(buf.len());
    core::str::from_utf8(&buf[..len]).ok()
}

/// The host's stdout (`:tt` opened for writing), as a `fmt::Write` that sends whole lines.
pub struct Console {
    handle: i32,
    line: [u8; 256],
    len: usize,
}

impl Console {
    /// Opens `:tt` for writing (mode 4, "w").
    pub fn open() -> Console {
        const TT: &[u8] = b":tt\0";
        let block = [TT.as_ptr() as usize, 4, TT.len() - 1];
        // SAFETY: the block holds a NUL-terminated name, the mode, and the name's length.
        let handle = unsafe { call(SYS_OPEN, block.as_ptr() as usize) };
        Console {
            handle,
            line: [0; 256],
            len: 0,
        }
    }

    fn flush(&mut self) {
        if self.len > 0 && self.handle >= 0 {
            let block = [self.handle as usize, self.line.as_ptr() as usize, self.len];
            // SAFETY: the block names an open handle and `len` initialised bytes of `line`.
            unsafe { call(SYS_WRITE, block.as_ptr() as usize) };
        }
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.line.len() {
                self.flush();
            }
            self.line[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}
