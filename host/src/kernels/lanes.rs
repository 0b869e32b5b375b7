//! `f32` vectors for the training kernels' plain loops: [`Lanes`] (an AVX-512 or AVX2 register,
//! or one scalar) and [`per_isa!`], which compiles a kernel once per instruction set and calls
//! the copy for the CPU's [`crate::kernels::Isa`].

/// A vector of `f32` lanes: one AVX-512 or AVX2 register, or one scalar (the portable path and
/// the tails).
///
/// The register types' methods call their ISA's intrinsics: they are only instantiated by
/// [`per_isa!`]'s copies for that ISA, which run once [`crate::kernels::Isa::detect`] found it.
pub(crate) trait Lanes: Copy {
    /// Lanes per vector.
    const N: usize;
    /// Zero in every lane.
    const ZERO: Self;
    /// `s[at..at + N]` (panics past the end).
    fn load(s: &[f32], at: usize) -> Self;
    /// Into `s[at..at + N]` (panics past the end).
    fn store(self, s: &mut [f32], at: usize);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    /// `s[at..at + 2N]` split into its even and its odd values.
    fn load_pairs(s: &[f32], at: usize) -> (Self, Self);
    /// `even` and `odd` interleaved into `s[at..at + 2N]`.
    fn store_pairs(even: Self, odd: Self, s: &mut [f32], at: usize);
    /// Per lane, max pooling's step (Flex's rule): where `x` is greater than `m` or NaN,
    /// `(x, k)`, else `(m, at)`.
    fn later_max(m: Self, at: Self, x: Self, k: f32) -> (Self, Self);
    /// Per lane, `g` where `at == k`, else 0.
    fn where_eq(at: Self, k: f32, g: Self) -> Self;
}

impl Lanes for f32 {
    const N: usize = 1;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn load(s: &[f32], at: usize) -> Self {
        s[at]
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], at: usize) {
        s[at] = self;
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn load_pairs(s: &[f32], at: usize) -> (Self, Self) {
        (s[at], s[at + 1])
    }
    #[inline(always)]
    fn store_pairs(even: Self, odd: Self, s: &mut [f32], at: usize) {
        s[at] = even;
        s[at + 1] = odd;
    }
    #[inline(always)]
    fn later_max(m: Self, at: Self, x: Self, k: f32) -> (Self, Self) {
        if x > m || x.is_nan() { (x, k) } else { (m, at) }
    }
    #[inline(always)]
    fn where_eq(at: Self, k: f32, g: Self) -> Self {
        if at == k { g } else { 0.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod regs {
    use std::arch::x86_64::{
        __m256, __m512, _CMP_EQ_OQ, _CMP_GT_OQ, _CMP_UNORD_Q, _mm256_add_ps, _mm256_and_ps,
        _mm256_blendv_ps, _mm256_castpd_ps, _mm256_castps_pd, _mm256_cmp_ps, _mm256_loadu_ps,
        _mm256_or_ps, _mm256_permute2f128_ps, _mm256_permute4x64_pd, _mm256_set1_ps,
        _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_sub_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
        _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_loadu_ps, _mm512_mask_blend_ps,
        _mm512_maskz_mov_ps, _mm512_permutex2var_ps, _mm512_set1_ps, _mm512_setr_epi32,
        _mm512_storeu_ps, _mm512_sub_ps,
    };

    use super::Lanes;

    /// 16 lanes (AVX-512 F).
    #[derive(Clone, Copy)]
    pub(crate) struct F512(__m512);
    /// 8 lanes (AVX).
    #[derive(Clone, Copy)]
    pub(crate) struct F256(__m256);

    // SAFETY (every `unsafe` below): these types are only used by the AVX-512 (`F512`) and AVX2
    // (`F256`) copies of `per_isa!`, called once the CPU was detected to have those features;
    // loads and stores are bounds-checked first.
    impl Lanes for F512 {
        const N: usize = 16;
        // SAFETY: all-zero bits are 16 zeros.
        const ZERO: Self = F512(unsafe { std::mem::transmute::<[f32; 16], __m512>([0.0; 16]) });
        #[inline(always)]
        fn load(s: &[f32], at: usize) -> Self {
            let s = &s[at..at + 16];
            F512(unsafe { _mm512_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, s: &mut [f32], at: usize) {
            let s = &mut s[at..at + 16];
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            F512(unsafe { _mm512_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            F512(unsafe { _mm512_sub_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn load_pairs(s: &[f32], at: usize) -> (Self, Self) {
            let (lo, hi) = (Self::load(s, at).0, Self::load(s, at + 16).0);
            unsafe {
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (
                    F512(_mm512_permutex2var_ps(lo, even, hi)),
                    F512(_mm512_permutex2var_ps(lo, odd, hi)),
                )
            }
        }
        #[inline(always)]
        fn store_pairs(even: Self, odd: Self, s: &mut [f32], at: usize) {
            unsafe {
                let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                let hi =
                    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                F512(_mm512_permutex2var_ps(even.0, lo, odd.0)).store(s, at);
                F512(_mm512_permutex2var_ps(even.0, hi, odd.0)).store(s, at + 16);
            }
        }
        #[inline(always)]
        fn later_max(m: Self, at: Self, x: Self, k: f32) -> (Self, Self) {
            unsafe {
                let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x.0, m.0)
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x.0, x.0);
                (
                    F512(_mm512_mask_blend_ps(take, m.0, x.0)),
                    F512(_mm512_mask_blend_ps(take, at.0, _mm512_set1_ps(k))),
                )
            }
        }
        #[inline(always)]
        fn where_eq(at: Self, k: f32, g: Self) -> Self {
            unsafe {
                let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(at.0, _mm512_set1_ps(k));
                F512(_mm512_maskz_mov_ps(hit, g.0))
            }
        }
    }

    impl Lanes for F256 {
        const N: usize = 8;
        // SAFETY: all-zero bits are 8 zeros.
        const ZERO: Self = F256(unsafe { std::mem::transmute::<[f32; 8], __m256>([0.0; 8]) });
        #[inline(always)]
        fn load(s: &[f32], at: usize) -> Self {
            let s = &s[at..at + 8];
            F256(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, s: &mut [f32], at: usize) {
            let s = &mut s[at..at + 8];
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            F256(unsafe { _mm256_add_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            F256(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn load_pairs(s: &[f32], at: usize) -> (Self, Self) {
            let (lo, hi) = (Self::load(s, at).0, Self::load(s, at + 8).0);
            // `shuffle` takes pairs within 128-bit halves: [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6];
            // the 64-bit chunks then go in order 0, 2, 1, 3.
            unsafe {
                let order = |v: __m256| {
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)))
                };
                (
                    F256(order(_mm256_shuffle_ps::<0x88>(lo, hi))),
                    F256(order(_mm256_shuffle_ps::<0xDD>(lo, hi))),
                )
            }
        }
        #[inline(always)]
        fn store_pairs(even: Self, odd: Self, s: &mut [f32], at: usize) {
            unsafe {
                let (l, h) = (
                    _mm256_unpacklo_ps(even.0, odd.0),
                    _mm256_unpackhi_ps(even.0, odd.0),
                );
                F256(_mm256_permute2f128_ps::<0x20>(l, h)).store(s, at);
                F256(_mm256_permute2f128_ps::<0x31>(l, h)).store(s, at + 8);
            }
        }
        #[inline(always)]
        fn later_max(m: Self, at: Self, x: Self, k: f32) -> (Self, Self) {
            unsafe {
                let take = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(x.0, m.0),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(x.0, x.0),
                );
                (
                    F256(_mm256_blendv_ps(m.0, x.0, take)),
                    F256(_mm256_blendv_ps(at.0, _mm256_set1_ps(k), take)),
                )
            }
        }
        #[inline(always)]
        fn where_eq(at: Self, k: f32, g: Self) -> Self {
            unsafe {
                F256(_mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_EQ_OQ>(at.0, _mm256_set1_ps(k)),
                    g.0,
                ))
            }
        }
    }
}

/// Defines `fn $name(isa: Isa, args..)` that runs `$body` (generic over its [`Lanes`] type `$v`)
/// with the vectors of `isa`: an AVX-512 copy on [`regs::F512`], an AVX2 copy on
/// [`regs::F256`], a portable one on `f32`. The copies compute the same bits: the bodies are
/// plain arithmetic in a fixed order (Rust contracts no multiply-add and reassociates nothing),
/// so only the vector width differs; the tests of each kernel run every path the CPU has.
macro_rules! per_isa {
    ($(#[$m:meta])* fn $name:ident<$v:ident>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name(isa: $crate::kernels::Isa, $($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$v: $crate::kernels::lanes::Lanes>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($a: $t),*) $(-> $r)? { body::<$crate::kernels::lanes::regs::F512>($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($a: $t),*) $(-> $r)? { body::<$crate::kernels::lanes::regs::F256>($($a),*) }
            match isa {
                // SAFETY: `Isa::Avx512Vnni`, `Isa::Avx512` and `Isa::Avx2` are only detected on
                // CPUs with these features.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx512Vnni | $crate::kernels::Isa::Avx512 => unsafe { avx512($($a),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx2 => unsafe { avx2($($a),*) },
                _ => body::<f32>($($a),*),
            }
        }
    };
}

pub(crate) use per_isa;
