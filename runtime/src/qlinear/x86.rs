//! The vector tiles of [`super`]: 16 rows' sums at once, lanes being rows
//! (module docs of `ouroc_kernels::quant` for the layout). Macros, not
//! closures, in the target-feature functions: a closure does not get the
//! function's target features, so its intrinsics would not inline.

use ouroc_kernels::quant::{BLOCK, QuantFormat, TILE, block_bytes};
use std::arch::x86_64::*;

/// # Safety
/// AVX-512 F/BW/VL, VNNI and F16C; `w` holds `nb` blocks of a tile, the
/// activation slices `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
pub(super) unsafe fn tile_vnni(
    format: QuantFormat,
    w: &[u8],
    xq: &[i8],
    xd: &[f32],
    xs: &[i32],
    nb: usize,
    acc: &mut [f32; TILE],
) {
    let (bb, qb) = (block_bytes(format), TILE * format.quant_bytes());
    let (wp, xp) = (w.as_ptr(), xq.as_ptr());
    let shift = if format == QuantFormat::Q8_0 { 7 } else { 3 };
    let nib = _mm512_set1_epi8(15);
    // SAFETY: block b reads bytes b * bb .. (b + 1) * bb of w and the
    // activation block b (32 quants, one scale and one sum).
    unsafe {
        macro_rules! load {
            ($p:expr) => {
                _mm512_loadu_si512($p as *const _)
            };
        }
        // Activation quants 4g..4g+3 of block b, in every lane.
        macro_rules! xg {
            ($b:expr, $g:expr) => {
                _mm512_set1_epi32((xp.add($b * BLOCK + 4 * $g) as *const i32).read_unaligned())
            };
        }
        let mut a = _mm512_loadu_ps(acc.as_ptr());
        for b in 0..nb {
            let base = wp.add(b * bb);
            let mut s = _mm512_setzero_si512();
            match format {
                QuantFormat::Q8_0 => {
                    s = _mm512_dpbusd_epi32(s, load!(base), xg!(b, 0));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(64)), xg!(b, 1));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(128)), xg!(b, 2));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(192)), xg!(b, 3));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(256)), xg!(b, 4));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(320)), xg!(b, 5));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(384)), xg!(b, 6));
                    s = _mm512_dpbusd_epi32(s, load!(base.add(448)), xg!(b, 7));
                }
                QuantFormat::Q4_0 => {
                    // Run p: low nibbles weights 4p.., high nibbles 16 + 4p..
                    macro_rules! run {
                        ($p:expr) => {{
                            let c = load!(base.add(64 * $p));
                            s = _mm512_dpbusd_epi32(s, _mm512_and_si512(c, nib), xg!(b, $p));
                            s = _mm512_dpbusd_epi32(
                                s,
                                _mm512_and_si512(_mm512_srli_epi16::<4>(c), nib),
                                xg!(b, $p + 4),
                            );
                        }};
                    }
                    run!(0);
                    run!(1);
                    run!(2);
                    run!(3);
                }
            }
            // The stored quants are q + offset: subtract offset * sum(x).
            let isum = _mm512_sub_epi32(s, _mm512_set1_epi32(*xs.get_unchecked(b) << shift));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(base.add(qb) as *const __m256i));
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.get_unchecked(b)));
            a = _mm512_add_ps(a, _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum)));
        }
        _mm512_storeu_ps(acc.as_mut_ptr(), a);
    }
}

/// # Safety
/// AVX2 and F16C; the slices as for [`tile_vnni`].
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn tile_avx2(
    format: QuantFormat,
    w: &[u8],
    xq: &[i8],
    xd: &[f32],
    xs: &[i32],
    nb: usize,
    acc: &mut [f32; TILE],
) {
    let (bb, qb) = (block_bytes(format), TILE * format.quant_bytes());
    let (wp, xp) = (w.as_ptr(), xq.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let nib = _mm256_set1_epi8(15);
    // SAFETY: as in `tile_vnni`; half h of a 64-byte run is rows 8h..8h+8.
    unsafe {
        macro_rules! load {
            ($p:expr) => {
                _mm256_loadu_si256($p as *const __m256i)
            };
        }
        macro_rules! xg {
            ($b:expr, $g:expr) => {
                _mm256_set1_epi32((xp.add($b * BLOCK + 4 * $g) as *const i32).read_unaligned())
            };
        }
        for h in 0..2 {
            let mut a = _mm256_loadu_ps(acc.as_ptr().add(8 * h));
            for b in 0..nb {
                let base = wp.add(b * bb + 32 * h);
                let mut s = _mm256_setzero_si256();
                let isum = match format {
                    QuantFormat::Q8_0 => {
                        // Signed weights (q + 128 with its top bit flipped); the
                        // product of |w| and x with w's sign fits maddubs.
                        macro_rules! group {
                            ($g:expr) => {{
                                let ws = _mm256_xor_si256(load!(base.add(64 * $g)), flip);
                                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xg!(b, $g), ws));
                                s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                            }};
                        }
                        group!(0);
                        group!(1);
                        group!(2);
                        group!(3);
                        group!(4);
                        group!(5);
                        group!(6);
                        group!(7);
                        s
                    }
                    QuantFormat::Q4_0 => {
                        macro_rules! run {
                            ($p:expr) => {{
                                let c = load!(base.add(64 * $p));
                                let lo = _mm256_maddubs_epi16(_mm256_and_si256(c, nib), xg!(b, $p));
                                let hi = _mm256_maddubs_epi16(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib),
                                    xg!(b, $p + 4),
                                );
                                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));
                            }};
                        }
                        run!(0);
                        run!(1);
                        run!(2);
                        run!(3);
                        _mm256_sub_epi32(s, _mm256_set1_epi32(*xs.get_unchecked(b) << 3))
                    }
                };
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(b * bb + qb + 16 * h) as *const __m128i));
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.get_unchecked(b)));
                a = _mm256_add_ps(a, _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum)));
            }
            _mm256_storeu_ps(acc.as_mut_ptr().add(8 * h), a);
        }
    }
}
