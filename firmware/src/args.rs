//! The semihosting command line, parsed into a typed [`Command`].
//!
//! QEMU builds the command line from the kernel's file name followed by the `-append` words,
//! separated by single spaces, so the first word is the program name and is skipped.
//! Grammar (flags mirror the host CLI's names):
//!
//! ```text
//! PROGRAM [selftest [--seed N] [--cases N]]
//! PROGRAM check
//! PROGRAM crash panic|hardfault|hang   (tests the fault paths, exit codes and timeouts)
//! PROGRAM run [--mc N] [--sigma S] [--sigma-unit range|level] [--profile NAME] [--seed N]
//!             [--m-bits M] [--n-bits N] [--tile-rows R] [--tile-cols C] [--adc-bits B]
//! ```
//!
//! With no verb the firmware runs `check`.
//!
//! ```
//! use nvcim_firmware::args::{parse, Command};
//! let cmd = parse("fw.elf run --mc 5 --sigma 0.4 --seed 7").unwrap();
//! let Command::Run(run) = cmd else { panic!() };
//! assert_eq!((run.mc, run.seed), (5, 7));
//! assert_eq!(run.sigma, Some(0.4));
//! ```

use core::{fmt, ops::RangeInclusive, str::FromStr};

use nvcim_shared::{
    quant::QuantConfig,
    variation::{Profile, SigmaUnit},
};

/// What the firmware was asked to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// Compare the DSP kernels with the plain ones and measure instruction counts.
    SelfTest(SelfTestArgs),
    /// Validate the blob in PSRAM and print the memory report.
    Check,
    /// Monte Carlo inference on the model in PSRAM.
    Run(RunArgs),
    /// Fail on purpose, to test the fault handlers' exit codes.
    Crash(Crash),
}

/// Which fault `crash` provokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// A Rust panic.
    Panic,
    /// A bus fault escalated to HardFault (a read from unmapped memory).
    HardFault,
    /// Spin forever, for the host runner's timeout.
    Hang,
}

/// Options of `selftest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfTestArgs {
    /// Seed of the random test vectors.
    pub seed: u64,
    /// Random vectors per tested length.
    pub cases: u32,
}

impl Default for SelfTestArgs {
    fn default() -> Self {
        SelfTestArgs { seed: 1, cases: 16 }
    }
}

/// Options of `run`. Every `None` is the packed model's own setting.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunArgs {
    /// Monte Carlo runs (at least 1).
    pub mc: u32,
    /// Seed of the variation streams `rng::stream(seed, run, layer)`.
    pub seed: u64,
    /// Device sigma, in the convention of `unit`.
    pub sigma: Option<f32>,
    /// The sigma convention.
    pub unit: Option<SigmaUnit>,
    /// State-dependent variation profile.
    pub profile: Option<Profile>,
    /// Magnitude bits M (must be the model's: its weights are quantized with it).
    pub m_bits: Option<u8>,
    /// Device bits N (must be the model's).
    pub n_bits: Option<u8>,
    /// Crossbar tile rows (inputs per tile, 1..=256).
    pub tile_rows: Option<u32>,
    /// Crossbar tile columns (outputs per tile, at least 1).
    pub tile_cols: Option<u32>,
    /// ADC resolution in bits; `None` (or `--adc-bits 0`) is an ideal ADC (the fast path).
    pub adc_bits: Option<u8>,
}

/// What was wrong with the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum ArgError<'a> {
    /// The first word after the program name is not a verb.
    UnknownVerb(&'a str),
    /// A flag that this verb does not take.
    UnknownFlag {
        /// The verb.
        verb: &'static str,
        /// The flag.
        flag: &'a str,
    },
    /// A flag at the end of the line without its value.
    MissingValue(&'a str),
    /// A value that does not parse or is out of range for its flag.
    BadValue {
        /// The flag.
        flag: &'a str,
        /// The value given.
        value: &'a str,
        /// What the flag accepts.
        expected: &'static str,
    },
    /// The values are individually fine but do not form a valid configuration.
    Invalid(nvcim_shared::Error),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnknownVerb(v) => {
                write!(f, "unknown verb `{v}` (expected selftest, check or run)")
            }
            ArgError::UnknownFlag { verb, flag } => write!(f, "`{verb}` does not take `{flag}`"),
            ArgError::MissingValue(flag) => write!(f, "`{flag}` needs a value"),
            ArgError::BadValue {
                flag,
                value,
                expected,
            } => {
                write!(f, "bad value `{value}` for `{flag}`: expected {expected}")
            }
            ArgError::Invalid(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl core::error::Error for ArgError<'_> {}

/// Parses a whole semihosting command line (program name first).
pub fn parse(cmdline: &str) -> Result<Command, ArgError<'_>> {
    let mut words = cmdline.split_ascii_whitespace();
    let _program = words.next();
    match words.next() {
        None | Some("check") => {
            if let Some(flag) = words.next() {
                return Err(ArgError::UnknownFlag {
                    verb: "check",
                    flag,
                });
            }
            Ok(Command::Check)
        }
        Some("selftest") => parse_selftest(words).map(Command::SelfTest),
        Some("run") => parse_run(words).map(Command::Run),
        Some("crash") => {
            let kind = match words.next() {
                Some("panic") => Crash::Panic,
                Some("hardfault") => Crash::HardFault,
                Some("hang") => Crash::Hang,
                Some(v) => {
                    return Err(ArgError::BadValue {
                        flag: "crash",
                        value: v,
                        expected: "panic, hardfault or hang",
                    });
                }
                None => return Err(ArgError::MissingValue("crash")),
            };
            match words.next() {
                Some(flag) => Err(ArgError::UnknownFlag {
                    verb: "crash",
                    flag,
                }),
                None => Ok(Command::Crash(kind)),
            }
        }
        Some(other) => Err(ArgError::UnknownVerb(other)),
    }
}

fn value<'a>(
    flag: &'a str,
    words: &mut impl Iterator<Item = &'a str>,
) -> Result<&'a str, ArgError<'a>> {
    words.next().ok_or(ArgError::MissingValue(flag))
}

fn number<'a, T: FromStr + PartialOrd>(
    flag: &'a str,
    words: &mut impl Iterator<Item = &'a str>,
    range: RangeInclusive<T>,
    expected: &'static str,
) -> Result<T, ArgError<'a>> {
    let v = value(flag, words)?;
    match v.parse::<T>() {
        Ok(x) if range.contains(&x) => Ok(x),
        _ => Err(ArgError::BadValue {
            flag,
            value: v,
            expected,
        }),
    }
}

fn parse_selftest<'a>(
    mut words: impl Iterator<Item = &'a str>,
) -> Result<SelfTestArgs, ArgError<'a>> {
    let mut args = SelfTestArgs::default();
    while let Some(flag) = words.next() {
        match flag {
            "--seed" => {
                args.seed = number(flag, &mut words, 0..=u64::MAX, "an unsigned 64-bit integer")?
            }
            "--cases" => args.cases = number(flag, &mut words, 1..=u32::MAX, "an integer >= 1")?,
            _ => {
                return Err(ArgError::UnknownFlag {
                    verb: "selftest",
                    flag,
                });
            }
        }
    }
    Ok(args)
}

fn parse_run<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<RunArgs, ArgError<'a>> {
    let mut args = RunArgs {
        mc: 1,
        ..RunArgs::default()
    };
    while let Some(flag) = words.next() {
        match flag {
            "--mc" => args.mc = number(flag, &mut words, 1..=u32::MAX, "an integer >= 1")?,
            "--seed" => {
                args.seed = number(flag, &mut words, 0..=u64::MAX, "an unsigned 64-bit integer")?
            }
            "--sigma" => {
                let v = value(flag, &mut words)?;
                args.sigma = Some(match v.parse::<f32>() {
                    Ok(s) if s.is_finite() && s >= 0.0 => s,
                    _ => {
                        return Err(ArgError::BadValue {
                            flag,
                            value: v,
                            expected: "a finite number >= 0",
                        });
                    }
                });
            }
            "--sigma-unit" => {
                let v = value(flag, &mut words)?;
                args.unit = Some(SigmaUnit::from_name(v).ok_or(ArgError::BadValue {
                    flag,
                    value: v,
                    expected: "range or level",
                })?);
            }
            "--profile" => {
                let v = value(flag, &mut words)?;
                args.profile = Some(Profile::from_name(v).ok_or(ArgError::BadValue {
                    flag,
                    value: v,
                    expected: "uniform, rram1, fefet2, rram4 or fefet6",
                })?);
            }
            "--m-bits" => {
                args.m_bits = Some(number(flag, &mut words, 1..=u8::MAX, "2, 4, 6 or 8")?)
            }
            "--n-bits" => args.n_bits = Some(number(flag, &mut words, 1..=u8::MAX, "1, 2 or 4")?),
            "--tile-rows" => {
                args.tile_rows = Some(number(flag, &mut words, 1..=256, "an integer in 1..=256")?)
            }
            "--tile-cols" => {
                args.tile_cols = Some(number(flag, &mut words, 1..=u32::MAX, "an integer >= 1")?)
            }
            "--adc-bits" => {
                let bits: u8 = number(flag, &mut words, 0..=16, "0 (ideal) or 2 to 16")?;
                if bits == 1 {
                    return Err(ArgError::BadValue {
                        flag,
                        value: "1",
                        expected: "0 (ideal) or 2 to 16",
                    });
                }
                args.adc_bits = (bits > 0).then_some(bits);
            }
            _ => return Err(ArgError::UnknownFlag { verb: "run", flag }),
        }
    }
    // M and N are checked against each other here (defaults 8 and 2), against the model later.
    QuantConfig::new(
        args.m_bits.unwrap_or(QuantConfig::DEFAULT.m_bits()),
        args.n_bits.unwrap_or(QuantConfig::DEFAULT.n_bits()),
    )
    .map_err(ArgError::Invalid)?;
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_check() {
        assert_eq!(parse(""), Ok(Command::Check));
        assert_eq!(parse("fw.elf"), Ok(Command::Check));
        assert_eq!(parse("fw.elf check"), Ok(Command::Check));
        assert_eq!(parse("fw crash panic"), Ok(Command::Crash(Crash::Panic)));
        assert_eq!(
            parse("fw crash hardfault"),
            Ok(Command::Crash(Crash::HardFault))
        );
        assert!(parse("fw crash").is_err() && parse("fw crash boom").is_err());
        assert!(matches!(
            parse("fw.elf check --mc 3"),
            Err(ArgError::UnknownFlag { .. })
        ));
    }

    #[test]
    fn selftest_flags() {
        assert_eq!(
            parse("fw selftest"),
            Ok(Command::SelfTest(SelfTestArgs::default()))
        );
        assert_eq!(
            parse("fw   selftest --seed 9 --cases 3 "),
            Ok(Command::SelfTest(SelfTestArgs { seed: 9, cases: 3 }))
        );
        assert!(matches!(
            parse("fw selftest --cases 0"),
            Err(ArgError::BadValue { .. })
        ));
        assert_eq!(
            parse("fw selftest --seed"),
            Err(ArgError::MissingValue("--seed"))
        );
    }

    #[test]
    fn run_flags() {
        let Ok(Command::Run(r)) = parse(
            "fw run --mc 5 --sigma 0.25 --sigma-unit level --profile FeFET6 --seed 18446744073709551615 \
             --tile-rows 64 --tile-cols 32 --adc-bits 6 --m-bits 6 --n-bits 2",
        ) else {
            panic!("run should parse")
        };
        assert_eq!(
            (r.mc, r.seed, r.tile_rows, r.tile_cols, r.adc_bits),
            (5, u64::MAX, Some(64), Some(32), Some(6))
        );
        assert_eq!(r.sigma, Some(0.25));
        assert_eq!(r.unit, Some(SigmaUnit::Level));
        assert_eq!(r.profile, Some(Profile::Fefet6));
        assert_eq!(r.m_bits, Some(6));
        let Ok(Command::Run(r)) = parse("fw run --adc-bits 0") else {
            panic!()
        };
        assert_eq!((r.mc, r.adc_bits, r.unit, r.sigma), (1, None, None, None));
    }

    #[test]
    fn run_errors() {
        assert_eq!(parse("fw fly"), Err(ArgError::UnknownVerb("fly")));
        assert!(matches!(
            parse("fw run --mc 0"),
            Err(ArgError::BadValue { flag: "--mc", .. })
        ));
        assert!(matches!(
            parse("fw run --mc -1"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            parse("fw run --sigma nan"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            parse("fw run --sigma -0.1"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            parse("fw run --sigma-unit volts"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            parse("fw run --adc-bits 17"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            parse("fw run --m-bits 8 --n-bits 3"),
            Err(ArgError::Invalid(_))
        ));
        assert!(matches!(
            parse("fw run --bogus 1"),
            Err(ArgError::UnknownFlag { verb: "run", .. })
        ));
        assert_eq!(parse("fw run --mc"), Err(ArgError::MissingValue("--mc")));
    }
}
