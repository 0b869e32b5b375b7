//! Host-side runner of the Cortex-M4F firmware under QEMU, and ([`compare`]) the in-process
//! simulation and host comparison that `nvcim firmware run` checks it against.
//!
//! Builds (or finds) the firmware ELF, boots it on `qemu-system-arm -M mps2-an386` with
//! semihosting and `-icount shift=0`, optionally with a blob loaded into PSRAM, under a hard
//! timeout, and returns the exit code and the output lines.
//!
//! ```no_run
//! use std::time::Duration;
//! use nvcim::firmware::{Build, QemuRun, firmware_elf};
//! let elf = firmware_elf(Build::Always)?;
//! let run = QemuRun::new(&elf).args(["selftest"]).timeout(Duration::from_secs(60)).run()?;
//! assert_eq!(run.code, 0);
//! # anyhow::Ok(())
//! ```

use std::{
    env,
    ffi::OsString,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
pub use nvcim_firmware::exit::ExitCode;

pub mod compare;

/// The firmware's target triple.
pub const TARGET: &str = "thumbv7em-none-eabihf";
/// The cargo profile the firmware is built with.
pub const PROFILE: &str = "firmware";
/// The firmware package (and binary) name.
pub const PACKAGE: &str = "nvcim-firmware";
/// Where QEMU's loader puts the blob: the start of the board's PSRAM.
pub const PSRAM_ADDR: u32 = 0x2100_0000;
/// The QEMU program; `NVCIM_QEMU` overrides it.
pub const QEMU: &str = "qemu-system-arm";

/// Whether [`firmware_elf`] runs cargo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Always run `cargo build` (cheap when nothing changed).
    Always,
    /// Build only if the ELF does not exist yet.
    IfMissing,
    /// Never build; fail if the ELF is missing.
    Never,
}

/// The workspace root (the directory of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf()
}

/// The cargo target directory shared with the caller: `CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where cargo puts the firmware ELF.
pub fn elf_path() -> PathBuf {
    target_dir().join(TARGET).join(PROFILE).join(PACKAGE)
}

/// Builds (as asked) and returns the firmware ELF:
/// `cargo build -p nvcim-firmware --target thumbv7em-none-eabihf --profile firmware`.
pub fn firmware_elf(build: Build) -> Result<PathBuf> {
    let elf = elf_path();
    let needed = match build {
        Build::Always => true,
        Build::IfMissing => !elf.is_file(),
        Build::Never => false,
    };
    if needed {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let out = Command::new(&cargo)
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir())
            .args([
                "build",
                "-p",
                PACKAGE,
                "--target",
                TARGET,
                "--profile",
                PROFILE,
            ])
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!("running {} to build the firmware", cargo.to_string_lossy())
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "building the firmware failed ({}); is the target installed? run `cargo xtask setup`\n{}",
                out.status,
                tail.join("\n")
            );
        }
    }
    ensure!(
        elf.is_file(),
        "no firmware ELF at {}; build it with `cargo build -p {PACKAGE} --target {TARGET} --profile {PROFILE}`",
        elf.display()
    );
    Ok(elf)
}

/// Finds `qemu-system-arm` (or `$NVCIM_QEMU`) on `PATH`.
pub fn find_qemu() -> Result<PathBuf> {
    let name = env::var_os("NVCIM_QEMU")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| OsString::from(QEMU));
    let p = PathBuf::from(&name);
    if p.components().count() > 1 {
        ensure!(
            p.is_file(),
            "NVCIM_QEMU names {}, which does not exist",
            p.display()
        );
        return Ok(p);
    }
    env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join(&name))
        .find(|c| c.is_file())
        .with_context(|| {
            format!("{} not found on PATH; run `cargo xtask setup` (it installs Debian's qemu-system-arm)", name.to_string_lossy())
        })
}

/// One firmware boot: what to run and how long it may take.
#[derive(Debug, Clone)]
pub struct QemuRun {
    elf: PathBuf,
    blob: Option<PathBuf>,
    args: Vec<String>,
    timeout: Duration,
}

/// What a firmware boot printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOutput {
    /// QEMU's exit status: the firmware's exit code (see [`ExitCode`]).
    pub code: i32,
    /// The firmware's output (semihosting stdout), line by line.
    pub lines: Vec<String>,
    /// QEMU's own diagnostics.
    pub stderr: String,
}

impl QemuOutput {
    /// The documented exit code, if the status is one.
    pub fn exit_code(&self) -> Option<ExitCode> {
        ExitCode::from_code(self.code)
    }

    /// The first line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.starts_with(prefix))
    }
}

impl QemuRun {
    /// Boots `elf` with no arguments, no blob and a 60 s timeout.
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        QemuRun {
            elf: elf.into(),
            blob: None,
            args: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    /// The firmware's command-line words (after the program name).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// A file for QEMU's loader to place at PSRAM (0x21000000).
    pub fn blob(mut self, blob: impl Into<PathBuf>) -> Self {
        self.blob = Some(blob.into());
        self
    }

    /// The wall-clock limit; QEMU is killed when it expires.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The QEMU command line.
    pub fn command(&self, qemu: &Path) -> Result<Command> {
        // QEMU splits `-append` on spaces and puts the kernel's file name first.
        for a in &self.args {
            ensure!(
                !a.is_empty() && !a.contains(char::is_whitespace),
                "firmware argument {a:?} is empty or has whitespace"
            );
        }
        let elf = self
            .elf
            .to_str()
            .with_context(|| format!("firmware path {} is not UTF-8", self.elf.display()))?;
        ensure!(
            !elf.contains(char::is_whitespace),
            "firmware path {elf:?} has whitespace, which QEMU's semihosting command line cannot carry"
        );
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-M",
            "mps2-an386",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
        ])
        .args([
            "-semihosting-config",
            "enable=on,target=native",
            "-icount",
            "shift=0",
        ])
        .args(["-kernel", elf]);
        if let Some(blob) = &self.blob {
            ensure!(blob.is_file(), "blob {} does not exist", blob.display());
            let file = blob
                .to_str()
                .with_context(|| format!("blob path {} is not UTF-8", blob.display()))?;
            ensure!(
                !file.contains(','),
                "blob path {file:?} has a comma, which QEMU's -device option cannot carry"
            );
            cmd.args([
                "-device",
                &format!("loader,file={file},addr={PSRAM_ADDR:#x}"),
            ]);
        }
        if !self.args.is_empty() {
            cmd.args(["-append", &self.args.join(" ")]);
        }
        Ok(cmd)
    }

    /// Boots the firmware and waits for it, killing QEMU at the timeout.
    pub fn run(&self) -> Result<QemuOutput> {
        ensure!(
            self.elf.is_file(),
            "firmware ELF {} does not exist",
            self.elf.display()
        );
        let qemu = find_qemu()?;
        let mut child = self
            .command(&qemu)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let out_reader = thread::spawn(move || {
            let mut v = Vec::new();
            stdout.read_to_end(&mut v).map(|_| v)
        });
        let err_reader = thread::spawn(move || {
            let mut v = Vec::new();
            stderr.read_to_end(&mut v).map(|_| v)
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for QEMU")? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(5));
        };
        let out = out_reader
            .join()
            .expect("the stdout reader does not panic")
            .context("reading QEMU's stdout")?;
        let err = err_reader
            .join()
            .expect("the stderr reader does not panic")
            .context("reading QEMU's stderr")?;
        let lines: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        let stderr = String::from_utf8_lossy(&err).into_owned();
        let Some(status) = status else {
            let last: Vec<&str> = lines
                .iter()
                .rev()
                .take(5)
                .rev()
                .map(String::as_str)
                .collect();
            bail!(
                "the firmware did not finish within {:?} and QEMU was killed; last output:\n{}",
                self.timeout,
                last.join("\n")
            );
        };
        let code = status.code().with_context(|| {
            format!(
                "QEMU was ended by a signal ({status}); stderr: {}",
                stderr.trim()
            )
        })?;
        Ok(QemuOutput {
            code,
            lines,
            stderr,
        })
    }
}

/// The firmware's memory report: `memory code C B ram R B stack S B psram P B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Flash image bytes (vector table, code, read-only data, initialised data).
    pub code: u64,
    /// Static RAM bytes (data, bss).
    pub ram: u64,
    /// Deepest stack use so far, bytes (from the painted stack).
    pub stack: u64,
    /// PSRAM bytes occupied by the blob.
    pub psram: u64,
}

impl Memory {
    /// The last memory report in the output (the one printed just before exit).
    pub fn last(lines: &[String]) -> Option<Memory> {
        lines.iter().rev().find_map(|l| Memory::parse(l))
    }

    /// Parses one memory line.
    pub fn parse(line: &str) -> Option<Memory> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            [
                "memory",
                "code",
                c,
                "B",
                "ram",
                r,
                "B",
                "stack",
                s,
                "B",
                "psram",
                p,
                "B",
            ] => Some(Memory {
                code: c.parse().ok()?,
                ram: r.parse().ok()?,
                stack: s.parse().ok()?,
                psram: p.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// One `bench` line of the self-test: instructions per operation of a kernel or sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// `dot_i8`, `dot_i16`, ...
    pub name: String,
    /// `plain` or `smlad` for kernels; empty otherwise.
    pub variant: String,
    /// Vector length, for kernels.
    pub len: Option<usize>,
    /// Instructions per MAC (kernels) or per sample / call.
    pub per_op: f64,
}

/// Parses the self-test's `bench dot_* {plain|smlad} len N calls C insn/mac X` lines.
pub fn kernel_benches(lines: &[String]) -> Result<Vec<Bench>> {
    let mut v = Vec::new();
    for l in lines.iter().filter(|l| l.starts_with("bench dot_")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let field = |key: &str| {
            w.iter()
                .position(|x| *x == key)
                .and_then(|i| w.get(i + 1).copied())
        };
        let parsed = (|| {
            Some(Bench {
                name: w.get(1)?.to_string(),
                variant: w.get(2)?.to_string(),
                len: field("len")?.parse().ok(),
                per_op: field("insn/mac")?.parse().ok()?,
            })
        })();
        v.push(parsed.with_context(|| format!("malformed bench line {l:?}"))?);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_shape() {
        let run = QemuRun::new("/x/fw")
            .args(["run", "--mc", "5"])
            .blob("/dev/null");
        // /dev/null is not a regular file: the blob check must refuse it.
        assert!(run.command(Path::new("qemu")).is_err());
        let cmd = QemuRun::new("/x/fw")
            .args(["selftest"])
            .command(Path::new("qemu"))
            .unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-M mps2-an386"), "{joined}");
        assert!(joined.contains("-icount shift=0"), "{joined}");
        assert!(
            joined.contains("-semihosting-config enable=on,target=native"),
            "{joined}"
        );
        assert!(
            joined.ends_with("-kernel /x/fw -append selftest"),
            "{joined}"
        );
        assert!(
            QemuRun::new("/x/fw")
                .args(["a b"])
                .command(Path::new("qemu"))
                .is_err()
        );
        assert!(QemuRun::new("/x y/fw").command(Path::new("qemu")).is_err());
    }

    #[test]
    fn memory_lines_parse() {
        let lines = vec![
            "memory code 1 B ram 2 B stack 3 B psram 4 B".to_string(),
            "memory code 82412 B ram 8 B stack 43288 B psram 1116 B".to_string(),
            "exit 0 (ok)".to_string(),
        ];
        assert_eq!(
            Memory::last(&lines),
            Some(Memory {
                code: 82_412,
                ram: 8,
                stack: 43_288,
                psram: 1_116
            })
        );
        assert_eq!(
            Memory::parse("memory code x B ram 2 B stack 3 B psram 4 B"),
            None
        );
        assert_eq!(Memory::last(&lines[2..]), None);
    }

    #[test]
    fn bench_lines_parse() {
        let lines = vec![
            "bench dot_i8 plain len 4096 calls 16 insn/mac 4.76".to_string(),
            "bench standard_normal samples 8192 insn/sample 42.64".to_string(),
        ];
        let b = kernel_benches(&lines).unwrap();
        assert_eq!(
            b,
            vec![Bench {
                name: "dot_i8".into(),
                variant: "plain".into(),
                len: Some(4096),
                per_op: 4.76
            }]
        );
        assert!(kernel_benches(&["bench dot_i8 plain len x".to_string()]).is_err());
    }
}
