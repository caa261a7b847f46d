//! The vector block sums of [`super`]: whole groups of eight blocks, each
//! group's eight integer sums in natural block order in one `__m256i`,
//! then the shared f32 step (module docs of [`super`]).

use ouroc_kernels::quant::{BLOCK, QuantFormat};
use std::arch::x86_64::*;

/// The f32 step of one group: `acc += (dw * dx) * isum`, lane j = block 8g + j.
#[inline(always)]
unsafe fn accumulate(acc: __m256, isum: __m256i, scales: *const u8, xd: *const f32) -> __m256 {
    // SAFETY: the callers pass eight f16 scales and eight f32 activation scales.
    unsafe {
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(scales as *const __m128i));
        let dx = _mm256_loadu_ps(xd);
        _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum)))
    }
}

/// The groups of eight blocks the vector loops take: q8_0 every whole
/// group; q4_0 the whole groups of its four-block chunks.
fn groups(format: QuantFormat, nb: usize) -> usize {
    match format {
        QuantFormat::Q8_0 => nb / 8,
        QuantFormat::Q4_0 => nb / 4 * 4 / 8,
    }
}

/// Eight block sums from four `vpdpbusd` results, each covering two blocks
/// (lanes 0-7 block 2r, 8-15 block 2r + 1), in natural order.
#[inline(always)]
unsafe fn reduce4(a0: __m512i, a1: __m512i, a2: __m512i, a3: __m512i) -> __m256i {
    // SAFETY: register operations only (the caller has the features).
    unsafe {
        let t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
        let t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
        // Per 128-bit lane q: the partial sums of a0..a3 over lanes 4q..4q+3.
        let u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
        // Lanes q0, q2 | q1, q3; the halves added: [blocks 0,2,4,6 | 1,3,5,7].
        let p = _mm512_shuffle_i32x4::<0b11_01_10_00>(u, u);
        let s = _mm256_add_epi32(_mm512_castsi512_si256(p), _mm512_extracti64x4_epi64::<1>(p));
        _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }
}

/// # Safety
/// AVX-512 F/BW/VL, VNNI, AVX2 and F16C; the slices hold a row of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
pub(super) unsafe fn groups_vnni(
    format: QuantFormat,
    w: &[u8],
    xq: &[i8],
    xd: &[f32],
    xs: &[i32],
    nb: usize,
    acc: &mut [f32; 8],
) -> usize {
    let g = groups(format, nb);
    let scales = w[nb * format.quant_bytes()..].as_ptr();
    let (wp, xp) = (w.as_ptr(), xq.as_ptr() as *const u8);
    let shift = _mm_cvtsi32_si128(if format == QuantFormat::Q8_0 { 7 } else { 3 });
    let zero = _mm512_setzero_si512();
    let nib = _mm512_set1_epi8(15);
    // SAFETY: every load is inside the row's quants (group i reads bytes up
    // to the end of block 8i + 7) or its activation blocks.
    unsafe {
        let mut a = _mm256_loadu_ps(acc.as_ptr());
        // Macros, not closures: a closure does not get this function's
        // target features, so its intrinsics would not inline.
        macro_rules! load {
            ($p:expr) => {
                _mm512_loadu_si512($p as *const _)
            };
        }
        macro_rules! lo {
            ($c:expr) => {
                _mm512_and_si512($c, nib)
            };
        }
        macro_rules! hi {
            ($c:expr) => {
                _mm512_and_si512(_mm512_srli_epi16::<4>($c), nib)
            };
        }
        for i in 0..g {
            let xg = xp.add(i * 8 * BLOCK);
            let (x0, x1, x2, x3) = (load!(xg), load!(xg.add(64)), load!(xg.add(128)), load!(xg.add(192)));
            let (a0, a1, a2, a3) = match format {
                QuantFormat::Q8_0 => {
                    let wg = wp.add(i * 8 * BLOCK);
                    (
                        _mm512_dpbusd_epi32(zero, load!(wg), x0),
                        _mm512_dpbusd_epi32(zero, load!(wg.add(64)), x1),
                        _mm512_dpbusd_epi32(zero, load!(wg.add(128)), x2),
                        _mm512_dpbusd_epi32(zero, load!(wg.add(192)), x3),
                    )
                }
                QuantFormat::Q4_0 => {
                    // Two chunks of four blocks: low nibbles are its first
                    // 64 weights, high nibbles the next 64.
                    let (c0, c1) = (load!(wp.add(i * 128)), load!(wp.add(i * 128 + 64)));
                    (
                        _mm512_dpbusd_epi32(zero, lo!(c0), x0),
                        _mm512_dpbusd_epi32(zero, hi!(c0), x1),
                        _mm512_dpbusd_epi32(zero, lo!(c1), x2),
                        _mm512_dpbusd_epi32(zero, hi!(c1), x3),
                    )
                }
            };
            // The stored quants are q + offset: subtract offset * sum(x).
            let sums = _mm256_loadu_si256(xs.as_ptr().add(i * 8) as *const __m256i);
            let isum = _mm256_sub_epi32(reduce4(a0, a1, a2, a3), _mm256_sll_epi32(sums, shift));
            a = accumulate(a, isum, scales.add(i * 16), xd.as_ptr().add(i * 8));
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), a);
    }
    g * 8
}

/// Eight block sums (each a vector of eight partial sums) in natural order.
#[inline(always)]
unsafe fn reduce8(v: [__m256i; 8]) -> __m256i {
    // SAFETY: register operations only.
    unsafe {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        let h0123 = _mm256_hadd_epi32(h01, h23);
        let h4567 = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h0123, h4567),
            _mm256_permute2x128_si256::<0x31>(h0123, h4567),
        )
    }
}

/// # Safety
/// AVX2 and F16C; the slices hold a row of `nb` blocks.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn groups_avx2(
    format: QuantFormat,
    w: &[u8],
    xq: &[i8],
    xd: &[f32],
    xs: &[i32],
    nb: usize,
    acc: &mut [f32; 8],
) -> usize {
    let g = groups(format, nb);
    let scales = w[nb * format.quant_bytes()..].as_ptr();
    let (wp, xp) = (w.as_ptr(), xq.as_ptr() as *const u8);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let nib = _mm256_set1_epi8(15);
    // SAFETY: as in `groups_vnni`.
    unsafe {
        let mut a = _mm256_loadu_ps(acc.as_ptr());
        // Macros, not closures (see `groups_vnni`).
        macro_rules! load {
            ($p:expr) => {
                _mm256_loadu_si256($p as *const __m256i)
            };
        }
        for i in 0..g {
            let xg = xp.add(i * 8 * BLOCK);
            macro_rules! x {
                ($b:expr) => {
                    load!(xg.add($b * BLOCK))
                };
            }
            let isum = match format {
                QuantFormat::Q8_0 => {
                    // Signed weights (q + 128 with its top bit flipped); the
                    // product of |w| and x with w's sign fits maddubs.
                    let wg = wp.add(i * 8 * BLOCK);
                    macro_rules! block {
                        ($b:expr) => {{
                            let ws = _mm256_xor_si256(load!(wg.add($b * BLOCK)), flip);
                            let p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x!($b), ws));
                            _mm256_madd_epi16(p, ones)
                        }};
                    }
                    reduce8([
                        block!(0),
                        block!(1),
                        block!(2),
                        block!(3),
                        block!(4),
                        block!(5),
                        block!(6),
                        block!(7),
                    ])
                }
                QuantFormat::Q4_0 => {
                    // A 32-byte half h of chunk c: low nibbles block 4c + h,
                    // high nibbles block 4c + 2 + h.
                    let wg = wp.add(i * 128);
                    let (c00, c01, c10, c11) = (load!(wg), load!(wg.add(32)), load!(wg.add(64)), load!(wg.add(96)));
                    macro_rules! dot {
                        ($q:expr, $b:expr) => {
                            _mm256_madd_epi16(_mm256_maddubs_epi16($q, x!($b)), ones)
                        };
                    }
                    macro_rules! hi {
                        ($v:expr) => {
                            _mm256_and_si256(_mm256_srli_epi16::<4>($v), nib)
                        };
                    }
                    let raw = reduce8([
                        dot!(_mm256_and_si256(c00, nib), 0),
                        dot!(_mm256_and_si256(c01, nib), 1),
                        dot!(hi!(c00), 2),
                        dot!(hi!(c01), 3),
                        dot!(_mm256_and_si256(c10, nib), 4),
                        dot!(_mm256_and_si256(c11, nib), 5),
                        dot!(hi!(c10), 6),
                        dot!(hi!(c11), 7),
                    ]);
                    let sums = _mm256_loadu_si256(xs.as_ptr().add(i * 8) as *const __m256i);
                    _mm256_sub_epi32(raw, _mm256_slli_epi32::<3>(sums))
                }
            };
            a = accumulate(a, isum, scales.add(i * 16), xd.as_ptr().add(i * 8));
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), a);
    }
    g * 8
}
