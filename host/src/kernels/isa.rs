//! [`Isa`]: the instruction sets the host's kernels are compiled for, detected once per process.

/// Which inner loops this CPU runs: one tier, detected once ([`Isa::detect`]). Each kernel asks
/// the tier what it needs ([`Isa::has_vnni`], [`Isa::has_avx512`], [`Isa::has_avx2`]) and
/// takes the best path it has at or below it.
///
/// | tier | features | `f32` kernels ([`super::gemm`], `per_isa!`) | `i16` dot products ([`super::dot`]) | integer engine layers |
/// |---|---|---|---|---|
/// | `Avx512Vnni` | AVX-512 F, BW, DQ, VL, VNNI; FMA | AVX-512 | AVX-512 VNNI | AVX-512 VNNI |
/// | `Avx512` | AVX-512 F, BW, DQ, VL; FMA | AVX-512 | AVX2 | portable |
/// | `Avx2` | AVX2, FMA | AVX2 | AVX2 | portable |
/// | `Portable` | — | portable | `shared`'s `Plain` | portable |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F, BW, DQ, VL and VNNI, and FMA.
    Avx512Vnni,
    /// AVX-512 F, BW, DQ and VL, and FMA (what the engine's AVX-512 functions are compiled for).
    Avx512,
    /// AVX2 and FMA.
    Avx2,
    /// Portable Rust.
    Portable,
}

impl Isa {
    /// The best this CPU has (the detection runs once per process).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if has_avx512_core() && has_fma() && has_avx512_vnni() {
                Isa::Avx512Vnni
            } else if has_avx512_core() && has_fma() {
                Isa::Avx512
            } else if has_avx2() && has_fma() {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }

    /// The tier's name, as [`Isa::log_choice`] prints it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "AVX-512 with VNNI",
            Isa::Avx512 => "AVX-512",
            Isa::Avx2 => "AVX2",
            Isa::Portable => "portable",
        }
    }

    /// Prints on stderr, once per process, the kernels this CPU gets: the tier comes from the
    /// CPU's feature flags alone (never from a timing, so a result does not depend on the load),
    /// and a log shows which paths a run took.
    pub fn log_choice() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "kernels: {} (from this CPU's features; f32 micro-kernel {} rows x {} lanes)",
                Isa::detect().name(),
                super::gemm::MR,
                super::gemm::NR * super::gemm::LANES
            )
        });
    }

    /// The tiers a test should run on this CPU: [`Isa::Portable`], [`Isa::Avx2`], and the
    /// detected AVX-512 tier — every path of every kernel that this CPU has. (A kernel without
    /// a path of its own for a tier runs a lower one, so a test may run one path twice.)
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        let mut v = vec![Isa::Portable];
        if best.has_avx2() {
            v.push(Isa::Avx2);
        }
        if best.has_avx512() {
            v.push(best);
        }
        v
    }

    /// AVX-512 VNNI: the integer kernels' `vpdpwssd` paths.
    pub fn has_vnni(self) -> bool {
        self == Isa::Avx512Vnni
    }

    /// AVX-512 F, BW, DQ and VL, and FMA: the `f32` kernels' AVX-512 paths.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::Avx512)
    }

    /// AVX2 and FMA (implied by every tier above it): the AVX2 paths.
    pub fn has_avx2(self) -> bool {
        self != Isa::Portable
    }
}

/// Whether this CPU has AVX2 (cached by std).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512 F, BW, DQ and VL, the subset the AVX-512 functions are
/// compiled for (cached by std).
fn has_avx512_core() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has FMA (cached by std).
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512 VNNI, with AVX-512 F and BW (cached by std).
fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_nest() {
        let best = Isa::detect();
        assert!(!best.has_vnni() || best.has_avx512());
        assert!(!best.has_avx512() || best.has_avx2());
        let all = Isa::available();
        assert_eq!(all[0], Isa::Portable);
        assert_eq!(*all.last().expect("portable at least"), best);
    }
}
