//! Everything that needs the board: entry point, verbs, fault handlers.

mod counter;
mod memory;
mod semihosting;

use core::{fmt::Write, hint::black_box, panic::PanicInfo, sync::atomic::AtomicBool};

use cortex_m_rt::{ExceptionFrame, entry, exception};
use nvcim_firmware::{
    args::{self, Command, Crash, RunArgs, SelfTestArgs},
    blob,
    exit::ExitCode,
    kernel, mc, selftest,
    stats::Fixed2,
};
use nvcim_shared::{
    format::Model,
    quant::Quantized,
    rng::{self, Xoshiro128PlusPlus},
    variation::VariationConfig,
};

use semihosting::{Console, exit};

/// Command line buffer; QEMU rejects a longer command line.
const CMDLINE_LEN: usize = 1024;

#[entry]
fn main() -> ! {
    let mut out = Console::open();
    let mut buf = [0u8; CMDLINE_LEN];
    let Some(cmdline) = semihosting::command_line(&mut buf) else {
        let _ = writeln!(
            out,
            "error: the semihosting command line is longer than {CMDLINE_LEN} bytes"
        );
        exit(ExitCode::CommandLineTooLong);
    };
    let _ = writeln!(
        out,
        "nvcim-firmware {} on mps2-an386",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "{}", memory::report());
    let code = match args::parse(cmdline) {
        Err(e) => {
            let _ = writeln!(out, "error: {e}");
            ExitCode::BadArguments
        }
        Ok(Command::SelfTest(a)) => self_test(&mut out, a),
        Ok(Command::Check) => check(&mut out),
        Ok(Command::Run(a)) => run(&mut out, &a).err().unwrap_or(ExitCode::Ok),
        Ok(Command::Crash(Crash::Panic)) => panic!("crash requested on the command line"),
        Ok(Command::Crash(Crash::Hang)) => loop {
            core::hint::spin_loop();
        },
        Ok(Command::Crash(Crash::HardFault)) => {
            // SAFETY: not safe and not meant to be: a read from unmapped memory, to test the
            // HardFault handler. 0xF000_0000 is outside every region of the mps2-an386 map.
            let v = unsafe { core::ptr::read_volatile(0xF000_0000 as *const u32) };
            let _ = writeln!(out, "error: read of unmapped memory returned {v:#x}");
            ExitCode::Ok
        }
    };
    let _ = writeln!(out, "{}", memory::report());
    let _ = writeln!(out, "exit {} ({})", code.code(), code.describe());
    exit(code)
}

/// Prints a blob error and maps it to its exit code.
fn blob_error(out: &mut Console, e: blob::BlobError) -> ExitCode {
    let _ = writeln!(out, "error: blob: {e}");
    if e.is_too_large() {
        ExitCode::DoesNotFit
    } else {
        ExitCode::BlobInvalid
    }
}

fn describe(out: &mut Console, m: &Model<'_>) {
    let _ = writeln!(
        out,
        "blob ok model {} B ops {} layers {} weights {} test images {} classes {}",
        m.bytes().len(),
        m.op_count(),
        m.layer_count(),
        m.weight_count(),
        m.test_len(),
        m.classes()
    );
}

/// `check`: validate the packed model in PSRAM and report its size.
#[inline(never)]
fn check(out: &mut Console) -> ExitCode {
    let psram = memory::take_psram().expect("PSRAM is taken once, by the verb");
    match blob::validate(psram) {
        Ok(m) => {
            describe(out, &m);
            memory::set_psram_used(m.bytes().len());
            ExitCode::Ok
        }
        Err(e) => blob_error(out, e),
    }
}

impl mc::Clock for counter::Instructions {
    fn now(&mut self) -> u64 {
        counter::Instructions::now(self)
    }
}

fn too_big(out: &mut Console, what: &str, needed: usize, available: usize) -> ExitCode {
    let _ = writeln!(
        out,
        "error: does not fit: {what} needs {needed} B, {available} B available"
    );
    ExitCode::DoesNotFit
}

/// `run`: Monte Carlo inference on the packed model in PSRAM. The model stays where QEMU put
/// it; the programmed state goes in PSRAM after it, the scratch in the static RAM pools.
#[inline(never)]
fn run(out: &mut Console, a: &RunArgs) -> Result<(), ExitCode> {
    let psram = memory::take_psram().expect("PSRAM is taken once, by the verb");
    let psram_len = psram.len();
    let Some(len) = blob::declared_len(psram) else {
        let e = blob::validate(psram).expect_err("no magic: the parser rejects it");
        return Err(blob_error(out, e));
    };
    let (head, tail) = psram.split_at_mut(nvcim_firmware::fit::state_offset(len).min(psram_len));
    let model = blob::validate(head).map_err(|e| blob_error(out, e))?;
    describe(out, &model);
    let plan = mc::plan(&model, a).map_err(|e| {
        let _ = writeln!(out, "error: {e}");
        ExitCode::BadArguments
    })?;
    let need = mc::needs(&plan);
    // SAFETY: any bit pattern is a valid i16, and `align_to_mut` only hands out aligned,
    // in-bounds elements of the exclusively borrowed tail.
    let (_, state, _) = unsafe { tail.align_to_mut::<i16>() };
    let state_bytes = 2 * need.state;
    let Some(state) = state.get_mut(..need.state) else {
        return Err(too_big(
            out,
            "programmed state (PSRAM after the model)",
            state_bytes,
            2 * state.len(),
        ));
    };
    memory::set_psram_used(head.len() + state_bytes);
    let pools = memory::take_pools().expect("the pools are taken once, by `run`");
    let s = need.scratch;
    let act = pools
        .act
        .get_mut(..s.act_bytes)
        .ok_or_else(|| too_big(out, "activation arena (RAM)", s.act_bytes, memory::ACT_CAP))?;
    let patch = pools
        .patch
        .get_mut(..s.patch)
        .ok_or_else(|| too_big(out, "patch (RAM)", 2 * s.patch, 2 * memory::PATCH_CAP))?;
    let logits = pools
        .logits
        .get_mut(..s.logits)
        .ok_or_else(|| too_big(out, "logits (RAM)", 4 * s.logits, 4 * memory::LOGITS_CAP))?;
    let _ = writeln!(
        out,
        "memory model {} B state {} B act {} B patch {} B logits {} B",
        model.bytes().len(),
        state_bytes,
        s.act_bytes,
        2 * s.patch,
        4 * s.logits
    );
    let mut bufs = mc::Buffers {
        state,
        act,
        patch,
        logits,
    };
    let (_, cost) =
        mc::run::<kernel::Smlad>(&plan, &mut bufs, out, &mut counter::Instructions::start())
            .map_err(|e| {
                let _ = writeln!(out, "error: engine: {e}");
                ExitCode::BlobInvalid
            })?;
    let runs = u64::from(plan.mc);
    let devices = mc::devices_per_run(&plan.model) * runs;
    let images = plan.model.test_len() as u64 * runs;
    let macs = mc::macs_per_image(&plan.model) * images;
    let _ = writeln!(
        out,
        "insn program {} devices {} insn/device {}",
        cost.program,
        devices,
        per(cost.program, devices)
    );
    let _ = writeln!(
        out,
        "insn infer {} images {} insn/image {} macs {} insn/mac {}",
        cost.infer,
        images,
        per(cost.infer, images),
        macs,
        per(cost.infer, macs)
    );
    Ok(())
}

/// Instructions per operation over `ops` operations, as `insn/op X.XX`.
fn per(insns: u64, ops: u64) -> Fixed2 {
    Fixed2::ratio(insns, ops).unwrap_or(Fixed2(0))
}

#[inline(never)]
fn self_test(out: &mut Console, a: SelfTestArgs) -> ExitCode {
    let _ = writeln!(
        out,
        "selftest seed {} cases {} lengths {:?}",
        a.seed,
        a.cases,
        selftest::LENGTHS
    );
    match selftest::check_kernels(a.seed, a.cases) {
        Ok(c) => {
            let _ = writeln!(out, "selftest dot_i8 {} comparisons bit-exact", c.dot_i8);
            let _ = writeln!(out, "selftest dot_i16 {} comparisons bit-exact", c.dot_i16);
            let _ = writeln!(out, "selftest dot_row {} comparisons bit-exact", c.dot_row);
            let _ = writeln!(
                out,
                "selftest dot_rows2 {} comparisons bit-exact",
                c.dot_rows2
            );
        }
        Err(m) => {
            let _ = writeln!(out, "selftest FAILED: {m}");
            return ExitCode::SelfTestFailed;
        }
    }
    match selftest::check_programming(a.seed, a.cases.min(4)) {
        Ok(n) => {
            let _ = writeln!(out, "selftest program {n} comparisons bit-exact");
        }
        Err(m) => {
            let _ = writeln!(out, "selftest FAILED: {m}");
            return ExitCode::SelfTestFailed;
        }
    }
    bench_kernels(out, a.seed);
    bench_sampling(out, a.seed);
    let _ = writeln!(out, "selftest ok");
    ExitCode::Ok
}

/// Instructions per MAC of each kernel at a few lengths, `reps` calls each.
fn bench_kernels(out: &mut Console, seed: u64) {
    const LEN: usize = 4096;
    // Word alignment so that the i16 kernel takes its LDM path, as the engine's buffers will.
    #[repr(C, align(4))]
    struct Buffers {
        a8: [i8; LEN],
        b8: [i8; LEN],
        a16: [i16; LEN],
        b16: [i16; LEN],
    }
    let mut rng = Xoshiro128PlusPlus::from_u64(seed);
    let mut buf = Buffers {
        a8: [0; LEN],
        b8: [0; LEN],
        a16: [0; LEN],
        b16: [0; LEN],
    };
    for i in 0..LEN {
        buf.a8[i] = rng.next() as i8;
        buf.b8[i] = rng.next() as i8;
        buf.a16[i] = (rng.next() as i16) >> 4;
        buf.b16[i] = (rng.next() & 0xff) as i16;
    }
    for &(len, reps) in &[
        (4096usize, 16u64),
        (256, 256),
        (128, 512),
        (64, 1024),
        (27, 1024),
    ] {
        let macs = len as u64 * reps;
        let (a8, b8) = (&buf.a8[..len], &buf.b8[..len]);
        let (a16, b16) = (&buf.a16[..len], &buf.b16[..len]);
        let runs: [(&str, &str, u64); 4] = [
            (
                "dot_i8",
                "plain",
                counter::measure(|| {
                    (0..reps).for_each(|_| {
                        black_box(kernel::dot_i8_plain(black_box(a8), black_box(b8)));
                    })
                }),
            ),
            (
                "dot_i8",
                "smlad",
                counter::measure(|| {
                    (0..reps).for_each(|_| {
                        black_box(kernel::dot_i8(black_box(a8), black_box(b8)));
                    })
                }),
            ),
            (
                "dot_i16",
                "plain",
                counter::measure(|| {
                    (0..reps).for_each(|_| {
                        black_box(kernel::dot_i16_plain(black_box(a16), black_box(b16)));
                    })
                }),
            ),
            (
                "dot_i16",
                "smlad",
                counter::measure(|| {
                    (0..reps).for_each(|_| {
                        black_box(kernel::dot_i16(black_box(a16), black_box(b16)));
                    })
                }),
            ),
        ];
        for (name, kind, insns) in runs {
            let _ = writeln!(
                out,
                "bench {name} {kind} len {len} calls {reps} insn/mac {}",
                per(insns, macs)
            );
        }
    }
}

/// Instructions per Gaussian sample and per device deviation of `VariationConfig::sample`.
fn bench_sampling(out: &mut Console, seed: u64) {
    const SAMPLES: u64 = 8192;
    let mut s = rng::stream(seed, 0, 0);
    let insns = counter::measure(|| {
        let mut acc = 0u32;
        for _ in 0..SAMPLES as u32 {
            acc ^= s.next();
        }
        black_box(acc);
    });
    let _ = writeln!(
        out,
        "bench xoshiro128++ draws {SAMPLES} insn/draw {}",
        per(insns, SAMPLES)
    );
    let insns = counter::measure(|| {
        let mut acc = 0.0f32;
        for _ in 0..SAMPLES as u32 {
            acc += rng::standard_normal(&mut s);
        }
        black_box(acc);
    });
    let _ = writeln!(
        out,
        "bench standard_normal samples {SAMPLES} insn/sample {}",
        per(insns, SAMPLES)
    );

    const CALLS: u64 = 4096;
    let cfg = VariationConfig::paper(0.4).expect("sigma 0.4 is valid");
    let devices = CALLS * cfg.quant().slices() as u64;
    let mut codes = Xoshiro128PlusPlus::from_u64(seed ^ 0x5eed);
    let mut s = rng::stream(seed, 0, 1);
    let insns = counter::measure(|| {
        let mut acc = 0.0f32;
        for _ in 0..CALLS as u32 {
            let r = codes.next();
            let q = Quantized {
                negative: r & 0x100 != 0,
                magnitude: (r & 0xff) as u16,
            };
            acc += black_box(cfg).sample(q, &mut s).deltas()[0];
        }
        black_box(acc);
    });
    let _ = writeln!(
        out,
        "bench variation.sample m 8 n 2 sigma 0.4 range config runtime calls {CALLS} insn/call {} insn/device {}",
        per(insns, CALLS),
        per(insns, devices)
    );
    // The floor: the same number of Gaussian draws, scaled, without slicing or the readout.
    let sd = cfg.device_sigma(0);
    let insns = counter::measure(|| {
        let mut acc = 0.0f32;
        for _ in 0..devices as u32 {
            acc += sd * rng::standard_normal(&mut s);
        }
        black_box(acc);
    });
    let _ = writeln!(
        out,
        "bench sd*standard_normal draws {devices} insn/device {} (floor of sample)",
        per(insns, devices)
    );
    // The same with the configuration a compile-time constant, as a specialised engine sees it.
    let insns = counter::measure(|| {
        let mut acc = 0.0f32;
        for _ in 0..CALLS as u32 {
            let r = codes.next();
            let q = Quantized {
                negative: r & 0x100 != 0,
                magnitude: (r & 0xff) as u16,
            };
            acc += cfg.sample(q, &mut s).deltas()[0];
        }
        black_box(acc);
    });
    let _ = writeln!(
        out,
        "bench variation.sample m 8 n 2 sigma 0.4 range config constant calls {CALLS} insn/call {} insn/device {}",
        per(insns, CALLS),
        per(insns, devices)
    );
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    // A panic while printing the panic exits without printing again.
    if !PANICKING.swap(true, core::sync::atomic::Ordering::Relaxed) {
        let _ = writeln!(Console::open(), "panic: {info}");
    }
    exit(ExitCode::Panic)
}

#[exception]
unsafe fn HardFault(ef: &ExceptionFrame) -> ! {
    let _ = writeln!(
        Console::open(),
        "HardFault at pc {:#010x} lr {:#010x}",
        ef.pc(),
        ef.lr()
    );
    exit(ExitCode::HardFault)
}

#[exception]
unsafe fn DefaultHandler(irqn: i16) {
    let _ = writeln!(Console::open(), "unexpected exception or interrupt {irqn}");
    exit(ExitCode::UnexpectedException)
}
