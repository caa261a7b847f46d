//! The AVX-512 variant of the attention microkernel (see the parent
//! module): scores four positions at a time (one 16-lane accumulator per
//! position over head_dim, then one horizontal sum of the four), and the
//! weighted sum of V rows with up to four 16-column accumulators in
//! registers per pass over the positions.

use crate::gemm::x86::{hsum4, load16};
use std::arch::x86_64::*;

/// The lanes of the first `n` (0..=16) elements.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 { !0 } else { (1u16 << n) - 1 }
}

/// `scores[j] = q . k_j` (K row j at `k + j * row` bytes).
///
/// # Safety
/// AVX-512 F/BW/VL present; `scores.len()` rows of at least `q.len()`
/// elements at `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn dots(q: &[f32], k: *const u8, row: usize, bf16: bool, scores: &mut [f32]) {
    unsafe {
        if bf16 {
            dots_t::<true>(q, k, row, scores)
        } else {
            dots_t::<false>(q, k, row, scores)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dots_t<const B: bool>(q: &[f32], k: *const u8, row: usize, scores: &mut [f32]) {
    let hd = q.len();
    let n = scores.len();
    let chunks = hd.div_ceil(16);
    let mut j = 0;
    while j < n {
        let live = (n - j).min(4);
        // Rows past the last live one repeat it (computed, not stored).
        let rows: [*const u8; 4] = std::array::from_fn(|r| k.wrapping_add((j + r.min(live - 1)) * row));
        let mut acc = [_mm512_setzero_ps(); 4];
        for c in 0..chunks {
            let m = mask16(hd - 16 * c);
            // SAFETY: elements 16c .. of q (masked to hd) and of each row.
            let qv = unsafe { _mm512_maskz_loadu_ps(m, q.as_ptr().add(16 * c)) };
            for r in 0..4 {
                let kv = unsafe { load16::<B>(rows[r], 16 * c, m) };
                acc[r] = _mm512_fmadd_ps(qv, kv, acc[r]);
            }
        }
        let s = hsum4(acc[0], acc[1], acc[2], acc[3]);
        let mut out = [0f32; 4];
        // SAFETY: four floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        scores[j..j + live].copy_from_slice(&out[..live]);
        j += live;
    }
}

/// `out[d] = round(sum_j p[j] * v_j[d])` for d < hd (V row j at `v + j *
/// row` bytes), in position order.
///
/// # Safety
/// AVX-512 F/BW/VL present; `p.len()` rows of at least `hd` elements at
/// `v`; `hd` writable elements at `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn weighted_sum(p: &[f32], v: *const u8, row: usize, hd: usize, bf16: bool, out: *mut u8) {
    unsafe {
        if bf16 {
            weighted_sum_t::<true>(p, v, row, hd, out)
        } else {
            weighted_sum_t::<false>(p, v, row, hd, out)
        }
    }
}

/// Column chunks of 16 kept in registers per pass over the positions.
const CHUNKS: usize = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn weighted_sum_t<const B: bool>(p: &[f32], v: *const u8, row: usize, hd: usize, out: *mut u8) {
    let chunks = hd.div_ceil(16);
    let mut c0 = 0;
    while c0 < chunks {
        let nc = (chunks - c0).min(CHUNKS);
        let masks: [__mmask16; CHUNKS] = std::array::from_fn(|c| {
            let start = 16 * (c0 + c);
            if c < nc { mask16(hd - start) } else { 0 }
        });
        let mut acc = [_mm512_setzero_ps(); CHUNKS];
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm512_set1_ps(pj);
            let vj = v.wrapping_add(j * row);
            for c in 0..nc {
                // SAFETY: columns 16(c0 + c) .. of row j, masked to hd.
                let x = unsafe { load16::<B>(vj, 16 * (c0 + c), masks[c]) };
                acc[c] = _mm512_fmadd_ps(pv, x, acc[c]);
            }
        }
        for (c, a) in acc.iter().enumerate().take(nc) {
            let start = 16 * (c0 + c);
            let mut lanes = [0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
            for (i, &x) in lanes.iter().enumerate().take(hd - start) {
                // SAFETY: column start + i < hd of the output head.
                unsafe { super::put(out, start + i, B, x) };
            }
        }
        c0 += nc;
    }
}
