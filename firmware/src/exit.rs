//! Every exit code of the firmware, in one place.
//!
//! QEMU passes the code to the shell through the semihosting extended exit
//! (`SYS_EXIT_EXTENDED` with `ADP_Stopped_ApplicationExit`), so `qemu-system-arm`'s own exit
//! status *is* the code below. QEMU itself exits with 1 when the guest uses the plain
//! `SYS_EXIT` with any reason other than application exit, so 1 is never used here.

/// Why the firmware stopped. The discriminant is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Everything ran and every check passed.
    Ok = 0,
    /// The semihosting command line could not be parsed (unknown verb or flag, bad value).
    BadArguments = 2,
    /// The packed model in PSRAM failed validation (`Model::parse`: magic, version, CRC, fields,
    /// shapes).
    BlobInvalid = 3,
    /// The model does not fit: its blob is larger than PSRAM, its programmed state than the PSRAM
    /// after it, or its scratch than the RAM pools.
    DoesNotFit = 4,
    /// `selftest`: a DSP kernel disagreed with the plain-Rust reference.
    SelfTestFailed = 5,
    /// The verb is recognised but not supported by this build (reserved; no verb uses it).
    Unsupported = 6,
    /// The semihosting command line was longer than the firmware's buffer.
    CommandLineTooLong = 7,
    /// A Rust panic (bug in the firmware); the message was printed first.
    Panic = 101,
    /// A HardFault (bad memory access, undefined instruction, ...); the frame was printed first.
    HardFault = 102,
    /// Any other unexpected exception or interrupt.
    UnexpectedException = 103,
}

impl ExitCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ExitCode; 10] = [
        ExitCode::Ok,
        ExitCode::BadArguments,
        ExitCode::BlobInvalid,
        ExitCode::DoesNotFit,
        ExitCode::SelfTestFailed,
        ExitCode::Unsupported,
        ExitCode::CommandLineTooLong,
        ExitCode::Panic,
        ExitCode::HardFault,
        ExitCode::UnexpectedException,
    ];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The code for an exit status, if it is one of ours.
    pub fn from_code(code: i32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| i32::from(c.code()) == code)
    }

    /// A short description, as the host runner prints it.
    pub const fn describe(self) -> &'static str {
        match self {
            ExitCode::Ok => "ok",
            ExitCode::BadArguments => "bad arguments on the semihosting command line",
            ExitCode::BlobInvalid => "the blob in PSRAM failed validation",
            ExitCode::DoesNotFit => "the model does not fit in memory",
            ExitCode::SelfTestFailed => "a DSP kernel disagreed with the reference",
            ExitCode::Unsupported => "not supported by this firmware build",
            ExitCode::CommandLineTooLong => "semihosting command line too long",
            ExitCode::Panic => "firmware panic",
            ExitCode::HardFault => "HardFault",
            ExitCode::UnexpectedException => "unexpected exception",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for (i, a) in ExitCode::ALL.iter().enumerate() {
            assert_ne!(a.code(), 1, "1 is QEMU's own failure code");
            assert_eq!(ExitCode::from_code(i32::from(a.code())), Some(*a));
            for b in &ExitCode::ALL[i + 1..] {
                assert_ne!(a.code(), b.code());
            }
        }
        assert_eq!(ExitCode::from_code(1), None);
    }
}
