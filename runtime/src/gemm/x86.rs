//! x86-64 micro-kernels: AVX-512 BF16 (`vdpbf16ps`), AVX-512F and AVX2 f32
//! FMA. Each computes a register tile of R output rows x T tokens over a
//! block of k, one vector accumulator per (row, token), and sums each
//! accumulator horizontally at the end. The AVX-512 kernels first take a
//! masked `head` so that W row 0 is then read at 64-byte aligned addresses
//! (a load that splits a cache line costs twice), and end with a masked
//! tail; the AVX2 kernels end with a scalar tail.
//!
//! bf16 widening: a bf16 value is the high half of an f32, so a bf16 lane
//! widens exactly by a 16-bit shift. When both operands are bf16 the
//! f32-FMA kernels load 2 x 16 bf16 as one vector of 32-bit pairs and split
//! it into its high halves (`and 0xffff0000`: the odd k) and low halves
//! (`<< 16`: the even k) without any shuffle: x and W pair up lane by lane,
//! only the order of the sum changes.

// Register tiles are arrays indexed by (row, token) in fixed-trip loops that
// LLVM unrolls into registers; index loops say that most plainly.
#![allow(clippy::needless_range_loop)]

use super::{MAX_R, MAX_TILE, Micro, Tile, TileFn, Variant};
use std::arch::x86_64::*;

/// AVX-512 F, BW and VL: what the AVX-512 kernels need besides BF16.
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

/// Register tiles (rows, tokens), measured on Zen 4. AVX-512: 24
/// accumulators + 4 x + 1 W vectors of the 32 zmm; bf16 x bf16 on f32 FMA
/// (the split halves of x and W take twice the registers): 16 + 8 + 2.
/// AVX2: 12 + 3 + 1 of the 16 ymm; bf16 x bf16: 6 + 4 + 2.
const R512: usize = 6;
const T512: usize = 4;
const RPAIR: usize = 4;
const R256: usize = 4;
const T256: usize = 3;
const RP256: usize = 3;
const TP256: usize = 2;

pub(super) fn micro(v: Variant, xb: bool, wb: bool) -> Option<Micro> {
    let (rows, tokens, tile): (usize, usize, TileFn) = match (v, xb, wb) {
        (Variant::Avx512Bf16, true, true) => (R512, T512, dp_tile),
        (Variant::Avx512F, true, true) => (RPAIR, T512, pair512_tile),
        (Variant::Avx512Bf16 | Variant::Avx512F, false, false) => (R512, T512, fma512_tile::<false, false>),
        (Variant::Avx512Bf16 | Variant::Avx512F, false, true) => (R512, T512, fma512_tile::<false, true>),
        (Variant::Avx512Bf16 | Variant::Avx512F, true, false) => (R512, T512, fma512_tile::<true, false>),
        (Variant::Avx2Fma, true, true) => (RP256, TP256, pair256_tile),
        (Variant::Avx2Fma, false, false) => (R256, T256, fma256_tile::<false, false>),
        (Variant::Avx2Fma, false, true) => (R256, T256, fma256_tile::<false, true>),
        (Variant::Avx2Fma, true, false) => (R256, T256, fma256_tile::<true, false>),
        (Variant::Scalar, ..) => return None,
    };
    // The AVX-512 kernels take a head with masked loads to align W.
    let align = v != Variant::Avx2Fma;
    Some(Micro {
        rows,
        tokens,
        align,
        tile,
    })
}

/// Row pointers of a tile: rows past `nr` repeat the last row (computed
/// and discarded).
#[inline(always)]
fn row_ptrs<const N: usize>(p: *const u8, stride: usize, n: usize) -> [*const u8; N] {
    let mut out = [p; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = p.wrapping_add(i.min(n - 1) * stride);
    }
    out
}

/// A kernel's main loop, `$body` once per `$step` elements of k while a
/// whole step fits. With a later tile to hint ([`Tile::pf`]) each step also
/// hints the next `$bytes` of it: `$bytes` is the W bytes a step reads, so
/// that tile (its rows one after the other) is walked in address order in
/// as many steps as this one takes. Into L2 only: L1 holds this tile.
macro_rules! main_loop {
    ($tile:expr, $i:ident, $k:expr, $step:expr, $bytes:expr, $body:block) => {{
        if !$tile.pf.is_null() {
            let mut q = $tile.pf;
            while $i + $step <= $k {
                super::prefetch_row(q, $bytes, false);
                q = q.wrapping_add($bytes);
                $body
                $i += $step;
            }
        }
        while $i + $step <= $k {
            $body
            $i += $step;
        }
    }};
}

/// Dispatch on the token count of a tile (1..=T) to a kernel with that many
/// token accumulators.
macro_rules! by_tokens {
    ($name:ident, $inner:ident, $r:expr, [$($t:literal),*]) => {
        by_tokens!(@fn $name, [], [$($t => $inner::<$r, $t>),*]);
    };
    ($name:ident, $inner:ident, $r:expr, [$($t:literal),*], XB, WB) => {
        by_tokens!(@fn $name, [const XB: bool, const WB: bool], [$($t => $inner::<$r, $t, XB, WB>),*]);
    };
    (@fn $name:ident, [$($g:tt)*], [$($t:literal => $call:expr),*]) => {
        unsafe fn $name<$($g)*>(tile: &Tile, out: &mut [f32; MAX_TILE]) {
            // SAFETY: `micro` hands out this function only where its
            // features were detected; pointers as `Tile` documents.
            unsafe {
                match tile.nt {
                    $($t => $call(tile, out),)*
                    n => unreachable!("tile of {n} tokens"),
                }
            }
        }
    };
}

by_tokens!(dp_tile, dp512, R512, [1, 2, 3, 4]);
by_tokens!(pair512_tile, pair512, RPAIR, [1, 2, 3, 4]);
by_tokens!(fma512_tile, fma512, R512, [1, 2, 3, 4], XB, WB);
by_tokens!(pair256_tile, pair256, RP256, [1, 2]);
by_tokens!(fma256_tile, fma256, R256, [1, 2, 3], XB, WB);

// ---------------------------------------------------------------- AVX-512

/// 16 elements from `p + i` (f32, or bf16 widened), lanes past `m` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(crate) unsafe fn load16<const B: bool>(p: *const u8, i: usize, m: __mmask16) -> __m512 {
    unsafe {
        if B {
            let h = _mm256_maskz_loadu_epi16(m, p.add(2 * i) as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_maskz_loadu_ps(m, p.add(4 * i) as *const f32)
        }
    }
}

/// 32 bf16 from `p + i` as 16 pairs, elements past `m` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load32bf(p: *const u8, i: usize, m: __mmask32) -> __m512i {
    unsafe { _mm512_maskz_loadu_epi16(m, p.add(2 * i) as *const i16) }
}

/// The high (odd k) and low (even k) bf16 halves of 16 pairs, as f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn split512(v: __m512i) -> (__m512, __m512) {
    let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000u32 as i32));
    let lo = _mm512_slli_epi32::<16>(v);
    (_mm512_castsi512_ps(hi), _mm512_castsi512_ps(lo))
}

/// The lanes of the first `n` (1..=32) elements.
#[inline(always)]
fn mask32(n: usize) -> u32 {
    u32::MAX >> (32 - n)
}

/// The horizontal sums of four vectors, `[sum a, sum b, sum c, sum d]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(crate) fn hsum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // 128-bit lanes: ab = [a0+a2, a1+a3, b0+b2, b1+b3], cd likewise.
    let ab = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xee>(a, b));
    let cd = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(c, d), _mm512_shuffle_f32x4::<0xee>(c, d));
    // Lane j holds four partial sums of vector j.
    let v = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(ab, cd),
        _mm512_shuffle_f32x4::<0xdd>(ab, cd),
    );
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0xb1>(v));
    let v = _mm512_add_ps(v, _mm512_permute_ps::<0x4e>(v));
    let first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(first, v))
}

/// `out[t * MAX_R + r] = sum of acc[r][t]`: four rows of a token at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn reduce512<const R: usize, const T: usize>(acc: &[[__m512; T]; R], out: &mut [f32; MAX_TILE]) {
    const { assert!(R.next_multiple_of(4) <= MAX_R && T * MAX_R <= MAX_TILE) };
    let z = _mm512_setzero_ps();
    for t in 0..T {
        for g in (0..R).step_by(4) {
            let get = |r: usize| if r < R { acc[r][t] } else { z };
            let s = hsum4(get(g), get(g + 1), get(g + 2), get(g + 3));
            // SAFETY: 4 floats at t * MAX_R + g, g + 4 <= MAX_R.
            unsafe { _mm_storeu_ps(out.as_mut_ptr().add(t * MAX_R + g), s) };
        }
    }
}

/// One k step of `vdpbf16ps` over the tile: 32 k, elements past `m` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn dp_step<const R: usize, const T: usize>(
    wp: &[*const u8; R],
    xp: &[*const u8; T],
    i: usize,
    m: __mmask32,
    acc: &mut [[__m512; T]; R],
) {
    unsafe {
        let mut xv = [_mm512_setzero_si512(); T];
        for t in 0..T {
            xv[t] = load32bf(xp[t], i, m);
        }
        for r in 0..R {
            let wv: __m512bh = std::mem::transmute(load32bf(wp[r], i, m));
            for t in 0..T {
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, std::mem::transmute::<__m512i, __m512bh>(xv[t]));
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dp512<const R: usize, const T: usize>(tile: &Tile, out: &mut [f32; MAX_TILE]) {
    let (k, head) = (tile.k, tile.head);
    let wp = row_ptrs::<R>(tile.w, tile.ws, tile.nr);
    let xp = row_ptrs::<T>(tile.x, tile.xs, T);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    unsafe {
        // A head only when the driver aligns W (known when compiling: the
        // loop's masks otherwise cost registers the main loop needs).
        while super::ALIGN_W && i < head {
            let n = (head - i).min(32);
            dp_step(&wp, &xp, i, mask32(n), &mut acc);
            i += n;
        }
        main_loop!(tile, i, k, 32, R * 64, {
            dp_step(&wp, &xp, i, !0, &mut acc);
        });
        if i < k {
            dp_step(&wp, &xp, i, mask32(k - i), &mut acc);
        }
    }
    reduce512(&acc, out);
}

/// One step of f32 FMA over the tile for two bf16 operands: 32 k.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn pair512_step<const R: usize, const T: usize>(
    wp: &[*const u8; R],
    xp: &[*const u8; T],
    i: usize,
    m: __mmask32,
    acc: &mut [[__m512; T]; R],
) {
    unsafe {
        let mut xh = [_mm512_setzero_ps(); T];
        let mut xl = [_mm512_setzero_ps(); T];
        for t in 0..T {
            (xh[t], xl[t]) = split512(load32bf(xp[t], i, m));
        }
        for r in 0..R {
            let (wh, wl) = split512(load32bf(wp[r], i, m));
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wh, xh[t], acc[r][t]);
            }
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wl, xl[t], acc[r][t]);
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pair512<const R: usize, const T: usize>(tile: &Tile, out: &mut [f32; MAX_TILE]) {
    let (k, head) = (tile.k, tile.head);
    let wp = row_ptrs::<R>(tile.w, tile.ws, tile.nr);
    let xp = row_ptrs::<T>(tile.x, tile.xs, T);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    unsafe {
        while super::ALIGN_W && i < head {
            let n = (head - i).min(32);
            pair512_step(&wp, &xp, i, mask32(n), &mut acc);
            i += n;
        }
        main_loop!(tile, i, k, 32, R * 64, {
            pair512_step(&wp, &xp, i, !0, &mut acc);
        });
        if i < k {
            pair512_step(&wp, &xp, i, mask32(k - i), &mut acc);
        }
    }
    reduce512(&acc, out);
}

/// One step of f32 FMA over the tile: 16 k.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn fma512_step<const R: usize, const T: usize, const XB: bool, const WB: bool>(
    wp: &[*const u8; R],
    xp: &[*const u8; T],
    i: usize,
    m: __mmask16,
    acc: &mut [[__m512; T]; R],
) {
    unsafe {
        let mut xv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            xv[t] = load16::<XB>(xp[t], i, m);
        }
        for r in 0..R {
            let wv = load16::<WB>(wp[r], i, m);
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fma512<const R: usize, const T: usize, const XB: bool, const WB: bool>(
    tile: &Tile,
    out: &mut [f32; MAX_TILE],
) {
    let (k, head) = (tile.k, tile.head);
    let wp = row_ptrs::<R>(tile.w, tile.ws, tile.nr);
    let xp = row_ptrs::<T>(tile.x, tile.xs, T);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    unsafe {
        while super::ALIGN_W && i < head {
            let n = (head - i).min(16);
            fma512_step::<R, T, XB, WB>(&wp, &xp, i, mask32(n) as u16, &mut acc);
            i += n;
        }
        main_loop!(tile, i, k, 16, R * if WB { 32 } else { 64 }, {
            fma512_step::<R, T, XB, WB>(&wp, &xp, i, !0, &mut acc);
        });
        if i < k {
            fma512_step::<R, T, XB, WB>(&wp, &xp, i, mask32(k - i) as u16, &mut acc);
        }
    }
    reduce512(&acc, out);
}

// ---------------------------------------------------------------- AVX2

/// 8 elements from `p + i` (f32, or bf16 widened).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load8<const B: bool>(p: *const u8, i: usize) -> __m256 {
    unsafe {
        if B {
            let h = _mm_loadu_si128(p.add(2 * i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_loadu_ps(p.add(4 * i) as *const f32)
        }
    }
}

/// The high (odd k) and low (even k) halves of 8 bf16 pairs at `p + i`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn split256(p: *const u8, i: usize) -> (__m256, __m256) {
    unsafe {
        let v = _mm256_loadu_si256(p.add(2 * i) as *const __m256i);
        let hi = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000u32 as i32));
        let lo = _mm256_slli_epi32::<16>(v);
        (_mm256_castsi256_ps(hi), _mm256_castsi256_ps(lo))
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Horizontal sums plus the scalar tail `k0..k` of each (row, token).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn finish256<const R: usize, const T: usize, const XB: bool, const WB: bool>(
    acc: &[[__m256; T]; R],
    wp: &[*const u8; R],
    xp: &[*const u8; T],
    k0: usize,
    k: usize,
    out: &mut [f32; MAX_TILE],
) {
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum256(acc[r][t]);
            for i in k0..k {
                // SAFETY: i < k inside rows of k elements.
                s += unsafe { super::load_elem(xp[t], i, XB) * super::load_elem(wp[r], i, WB) };
            }
            out[t * MAX_R + r] = s;
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn pair256<const R: usize, const T: usize>(tile: &Tile, out: &mut [f32; MAX_TILE]) {
    let (k, head) = (tile.k, tile.head);
    let wp = row_ptrs::<R>(tile.w, tile.ws, tile.nr);
    let xp = row_ptrs::<T>(tile.x, tile.xs, T);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let _ = head; // AVX2 reads W where it lies: no masked 16-bit loads
    let mut i = 0;
    unsafe {
        main_loop!(tile, i, k, 16, R * 32, {
            let mut xh = [_mm256_setzero_ps(); T];
            let mut xl = [_mm256_setzero_ps(); T];
            for t in 0..T {
                (xh[t], xl[t]) = split256(xp[t], i);
            }
            for r in 0..R {
                let (wh, wl) = split256(wp[r], i);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wh, xh[t], acc[r][t]);
                }
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wl, xl[t], acc[r][t]);
                }
            }
        });
        finish256::<R, T, true, true>(&acc, &wp, &xp, i, k, out);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn fma256<const R: usize, const T: usize, const XB: bool, const WB: bool>(
    tile: &Tile,
    out: &mut [f32; MAX_TILE],
) {
    let (k, head) = (tile.k, tile.head);
    let wp = row_ptrs::<R>(tile.w, tile.ws, tile.nr);
    let xp = row_ptrs::<T>(tile.x, tile.xs, T);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let _ = head; // AVX2 reads W where it lies: no masked 16-bit loads
    let mut i = 0;
    unsafe {
        main_loop!(tile, i, k, 8, R * if WB { 16 } else { 32 }, {
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xv[t] = load8::<XB>(xp[t], i);
            }
            for r in 0..R {
                let wv = load8::<WB>(wp[r], i);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
        });
        finish256::<R, T, XB, WB>(&acc, &wp, &xp, i, k, out);
    }
}

// ---------------------------------------------------------------- outer product

/// Rows of W per outer-product tile (two 16-lane vectors).
pub(crate) const PANEL_R: usize = 32;
/// Tokens per outer-product tile.
pub(crate) const PANEL_T: usize = 12;

/// Widen 16 rows of bf16 W (row r at `w + r * ws` bytes, elements `i0 ..
/// i0 + 16` of each, rows past `nr` and elements past `kl` read as zero)
/// into the k-major panel: element (r, i) at `panel[(i - i0) * PANEL_R + c
/// + r]`, for the half `c` (0 or 16) of the panel's rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn panel_block(w: *const u8, ws: usize, nr: usize, i0: usize, kl: usize, panel: *mut f32, c: usize) {
    let m = if kl - i0 >= 16 { !0u16 } else { (1u16 << (kl - i0)) - 1 };
    let mut v = [_mm512_setzero_ps(); 16];
    for (r, x) in v.iter_mut().enumerate().take(nr) {
        // SAFETY: row r of W, elements i0 .. min(i0 + 16, kl), masked.
        let h = unsafe { _mm256_maskz_loadu_epi16(m, w.add(r * ws + 2 * i0) as *const i16) };
        *x = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
    }
    // 16 x 16 transpose: pairs, quads, then 128-bit lanes twice.
    let mut t = [_mm512_setzero_ps(); 16];
    for j in 0..8 {
        t[2 * j] = _mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        for h in 0..2 {
            let (a, b) = (t[4 * j + h], t[4 * j + 2 + h]);
            u[4 * j + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
            u[4 * j + 2 + h] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        }
    }
    // u[4j + q] holds, in 128-bit lane l, rows 4j .. 4j + 4 of column
    // 4l + [0, 2, 1, 3][q]: gather lane l of the four row groups.
    let mut s = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let cq = [0, 2, 1, 3][q];
        let (a, b, c2, d) = (u[q], u[4 + q], u[8 + q], u[12 + q]);
        let ab_lo = _mm512_shuffle_f32x4::<0x44>(a, b);
        let ab_hi = _mm512_shuffle_f32x4::<0xee>(a, b);
        let cd_lo = _mm512_shuffle_f32x4::<0x44>(c2, d);
        let cd_hi = _mm512_shuffle_f32x4::<0xee>(c2, d);
        s[cq] = _mm512_shuffle_f32x4::<0x88>(ab_lo, cd_lo);
        s[4 + cq] = _mm512_shuffle_f32x4::<0xdd>(ab_lo, cd_lo);
        s[8 + cq] = _mm512_shuffle_f32x4::<0x88>(ab_hi, cd_hi);
        s[12 + cq] = _mm512_shuffle_f32x4::<0xdd>(ab_hi, cd_hi);
    }
    for (i, x) in s.iter().enumerate().take(kl - i0) {
        // SAFETY: panel row i (PANEL_R floats), half c.
        unsafe { _mm512_storeu_ps(panel.add(i * PANEL_R + c), *x) };
    }
}

/// The k-major f32 panel of W rows `o .. o + nr` (nr <= PANEL_R; missing
/// rows zero), elements `k0 .. k0 + kl`: `panel[i * PANEL_R + r]`.
///
/// # Safety
/// AVX-512 F/BW/VL present; W rows of `ws` bytes; `panel` holds `kl *
/// PANEL_R` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn panel(w: *const u8, ws: usize, nr: usize, kl: usize, panel: *mut f32) {
    for c in [0, 16] {
        let n = nr.saturating_sub(c).min(16);
        let mut i0 = 0;
        while i0 < kl {
            // SAFETY: rows c .. c + n of the tile.
            unsafe { panel_block(w.wrapping_add(c * ws), ws, n, i0, kl, panel.add(i0 * PANEL_R), c) };
            i0 += 16;
        }
    }
}

/// `out[t] = sum_i x_t[i] * panel[i]` (PANEL_R rows per element, two
/// vectors) for tokens `t < nt` (x row t at `x + t * xs` f32), over `kl`
/// elements in order, one fused multiply-add per element: lane r of
/// `out[t]` is output row r of token t. Accumulates into `out` (callers
/// zero it or pass partial sums).
///
/// # Safety
/// AVX-512 F present; `kl` panel rows; `nt <= PANEL_T` x rows of `kl` f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn outer(
    panel: *const f32,
    x: *const f32,
    xs: usize,
    nt: usize,
    kl: usize,
    out: &mut [[__m512; 2]; PANEL_T],
) {
    let xr: [*const f32; PANEL_T] = std::array::from_fn(|t| x.wrapping_add(t.min(nt - 1) * xs));
    let mut acc = *out;
    for i in 0..kl {
        // SAFETY: panel row i; element i of each x row.
        unsafe {
            let w0 = _mm512_loadu_ps(panel.add(i * PANEL_R));
            let w1 = _mm512_loadu_ps(panel.add(i * PANEL_R + 16));
            for t in 0..PANEL_T {
                let xv = _mm512_set1_ps(*xr[t].add(i));
                acc[t][0] = _mm512_fmadd_ps(xv, w0, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(xv, w1, acc[t][1]);
            }
        }
    }
    *out = acc;
}

/// Add `bias` (PANEL_R floats), round to bf16 and store the first `nr`
/// outputs of `acc` at `y` (u16).
///
/// # Safety
/// AVX-512 F/BW/VL present; `nr` u16 writable at `y`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn store_bf16(acc: &[__m512; 2], bias: &[f32; PANEL_R], nr: usize, y: *mut u16) {
    for (h, a) in acc.iter().enumerate() {
        let n = nr.saturating_sub(16 * h).min(16);
        if n == 0 {
            break;
        }
        // SAFETY: 16 floats of the bias.
        let v = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(bias.as_ptr().add(16 * h)) });
        let b = _mm512_castps_si512(v);
        // Round to nearest even, NaN made quiet (as `bf16_bits`).
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)));
        let q = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let r = _mm512_mask_mov_epi32(r, nan, q);
        let m = if n == 16 { !0u16 } else { (1u16 << n) - 1 };
        // SAFETY: n u16 at y + 16h.
        unsafe { _mm512_mask_cvtepi32_storeu_epi16(y.add(16 * h) as *mut i16, m, r) };
    }
}
