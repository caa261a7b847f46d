//! The quantised `Linear` (`q8_0`, `q4_0`) on the CPU: the arithmetic of
//! `ouroc_kernels::quant` (its module docs are the contract), bit for bit.
//!
//! A launch first quantises every token's activation row per block of 32
//! ([`QuantRows::fill`], once per launch, shared by the threads), then each
//! thread takes a range of tiles of 16 output rows: for each tile every
//! token's 16 dot products at once, lanes being rows, so W streams from
//! memory once per launch whatever the number of tokens.
//!
//! A block's integer sums come from one 64-byte run of the tile per four
//! weights (the same four weights of the 16 rows) against those four
//! activation quants broadcast to every lane: AVX-512 VNNI (`vpdpbusd`: the
//! stored unsigned quants times the signed activation quants, then minus
//! the format's offset times the block's activation sum), AVX2
//! (`vpmaddubsw` on magnitudes and moved signs for q8_0, on the unsigned
//! nibbles for q4_0, eight rows per vector), or portable Rust. Each lane
//! then adds `(d_w * d_x) * isum` block after block, the reference's order,
//! so every variant returns the reference's bits.

use ouroc_ir::DType;
use ouroc_kernels::quant::{self, BLOCK, QuantFormat, TILE};
use std::ops::Range;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod x86;

/// One implementation, chosen by CPU features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QVariant {
    /// AVX-512 F/BW/VL with VNNI.
    Avx512Vnni,
    /// AVX2 with F16C.
    Avx2,
    Scalar,
}

impl QVariant {
    pub const ALL: [QVariant; 3] = [QVariant::Avx512Vnni, QVariant::Avx2, QVariant::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            QVariant::Avx512Vnni => "avx512vnni",
            QVariant::Avx2 => "avx2",
            QVariant::Scalar => "scalar",
        }
    }

    pub fn supported(self) -> bool {
        match self {
            QVariant::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            QVariant::Avx512Vnni => {
                crate::gemm::has_avx512()
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            QVariant::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest supported variant (detected once).
    pub fn best() -> QVariant {
        static BEST: OnceLock<QVariant> = OnceLock::new();
        *BEST.get_or_init(|| {
            QVariant::ALL
                .into_iter()
                .find(|v| v.supported())
                .unwrap_or(QVariant::Scalar)
        })
    }
}

/// Every token's activation row quantised per block: `nb * 32` quants,
/// `nb` scales and `nb` quant sums per token, tokens one after another.
#[derive(Default)]
pub struct QuantRows {
    pub acts: quant::QuantActs,
    pub nb: usize,
    row: Vec<f32>,
}

impl QuantRows {
    /// Quantise `tokens` rows of `k` activations of dtype `act` (f32, or
    /// bf16 as u16 bits), row t at `x + t * stride` elements.
    ///
    /// # Safety
    /// `x` addresses `tokens` such rows.
    pub unsafe fn fill(&mut self, x: *const u8, act: DType, stride: usize, tokens: usize, k: usize) {
        let nb = quant::blocks(k);
        self.nb = nb;
        let a = &mut self.acts;
        a.q.clear();
        a.d.clear();
        a.sum.clear();
        a.q.reserve(tokens * nb * BLOCK);
        self.row.resize(k, 0.0);
        for t in 0..tokens {
            // SAFETY: row t lies in the caller's buffer.
            unsafe {
                match act {
                    DType::BF16 => {
                        let r = (x as *const u16).add(t * stride);
                        for (i, v) in self.row.iter_mut().enumerate() {
                            *v = f32::from_bits((r.add(i).read_unaligned() as u32) << 16);
                        }
                    }
                    _ => {
                        let r = (x as *const f32).add(t * stride);
                        for (i, v) in self.row.iter_mut().enumerate() {
                            *v = r.add(i).read_unaligned();
                        }
                    }
                }
            }
            quant::quantise_acts(&self.row, a);
        }
    }
}

/// One quantised Linear launch. `y` row t (n elements of `act`) starts at
/// `y + t * y_stride` elements; `bias` is `[n]` of `bias_dtype` or null.
#[derive(Clone, Copy)]
pub struct QLinearArgs<'a> {
    pub tokens: usize,
    pub n: usize,
    pub k: usize,
    pub format: QuantFormat,
    pub x: &'a QuantRows,
    /// `[n, k]` in `format`'s tiled layout ([`quant::matrix_bytes`]).
    pub w: *const u8,
    pub bias: *const u8,
    pub bias_dtype: DType,
    pub act: DType,
    pub y: *mut u8,
    pub y_stride: usize,
}

// SAFETY: plain pointers to buffers the caller owns; concurrent calls write
// disjoint `rows` of y.
unsafe impl Send for QLinearArgs<'_> {}
unsafe impl Sync for QLinearArgs<'_> {}

/// Outputs of the tiles `tiles` (16 rows each; the last one's rows past
/// `n` are padding, not written) of every token, with the fastest variant.
///
/// # Safety
/// The pointers address buffers of the documented shapes for `p.tokens`
/// tokens, `p.x` was filled for them with this `k`; concurrent calls use
/// disjoint `tiles`.
pub unsafe fn qlinear(p: &QLinearArgs, tiles: Range<usize>) {
    unsafe { qlinear_with(QVariant::best(), p, tiles) }
}

/// [`qlinear`] with a given variant (panics if this CPU lacks it).
///
/// # Safety
/// As [`qlinear`].
pub unsafe fn qlinear_with(v: QVariant, p: &QLinearArgs, tiles: Range<usize>) {
    assert!(v.supported(), "variant {} is not supported by this CPU", v.name());
    assert!(
        tiles.end <= quant::tiles(p.n) && p.x.nb == quant::blocks(p.k),
        "qlinear: tiles or activations do not fit"
    );
    let (nb, tb) = (p.x.nb, quant::tile_bytes(p.format, p.k));
    let a = &p.x.acts;
    for t in tiles {
        // SAFETY: tile t lies in the weight buffer (tiles(n) tiles of tb bytes).
        let w = unsafe { std::slice::from_raw_parts(p.w.add(t * tb), tb) };
        // The tile's output rows r0 .. r0 + nr (no allocation: a decode
        // token runs about 10^5 tiles).
        let (r0, nr) = (t * TILE, TILE.min(p.n - t * TILE));
        let mut bias = [0f32; TILE];
        if !p.bias.is_null() {
            for (i, b) in bias[..nr].iter_mut().enumerate() {
                // SAFETY: `[n]` bias elements, r0 + i < n.
                *b = unsafe { read(p.bias, p.bias_dtype, r0 + i) };
            }
        }
        for tok in 0..p.tokens {
            let (xq, xd, xs) = (
                &a.q[tok * nb * BLOCK..(tok + 1) * nb * BLOCK],
                &a.d[tok * nb..(tok + 1) * nb],
                &a.sum[tok * nb..(tok + 1) * nb],
            );
            let sums = tile_sums(v, p.format, w, xq, xd, xs, nb);
            for i in 0..nr {
                // SAFETY: element r0 + i < n of y row tok.
                unsafe { write(p.y, p.act, tok * p.y_stride + r0 + i, sums[i] + bias[i]) };
            }
        }
    }
}

/// One tile's 16 row sums (before the bias) with variant `v`. Panics when
/// this CPU lacks the variant or a slice is shorter than `nb` blocks need.
pub fn tile_sums(
    v: QVariant,
    format: QuantFormat,
    w: &[u8],
    xq: &[i8],
    xd: &[f32],
    xs: &[i32],
    nb: usize,
) -> [f32; TILE] {
    assert!(
        w.len() >= nb * quant::block_bytes(format) && xq.len() >= nb * BLOCK && xd.len() >= nb && xs.len() >= nb,
        "qlinear::tile_sums: slices shorter than {nb} blocks"
    );
    assert!(v.supported(), "variant {} is not supported by this CPU", v.name());
    let mut acc = [0.0f32; TILE];
    match v {
        // SAFETY: the variant runs on this CPU and the slices hold nb blocks (checked above).
        #[cfg(target_arch = "x86_64")]
        QVariant::Avx512Vnni => unsafe { x86::tile_vnni(format, w, xq, xd, xs, nb, &mut acc) },
        #[cfg(target_arch = "x86_64")]
        QVariant::Avx2 => unsafe { x86::tile_avx2(format, w, xq, xd, xs, nb, &mut acc) },
        _ => tile_scalar(format, w, xq, xd, nb, &mut acc),
    }
    acc
}

/// The portable tile: per row, block by block, as the reference.
fn tile_scalar(format: QuantFormat, w: &[u8], xq: &[i8], xd: &[f32], nb: usize, acc: &mut [f32; TILE]) {
    let (bb, qb) = (quant::block_bytes(format), TILE * format.quant_bytes());
    let off = format.offset();
    for b in 0..nb {
        let block = &w[b * bb..(b + 1) * bb];
        let x = &xq[b * BLOCK..(b + 1) * BLOCK];
        for (r, acc) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for (i, &xi) in x.iter().enumerate() {
                let (byte, high) = quant::quant_at(format, r, i);
                let u = match format {
                    QuantFormat::Q8_0 => block[byte],
                    QuantFormat::Q4_0 if high => block[byte] >> 4,
                    QuantFormat::Q4_0 => block[byte] & 15,
                };
                isum += (u as i32 - off) * xi as i32;
            }
            let dw = quant::f16_value(u16::from_le_bytes([block[qb + 2 * r], block[qb + 2 * r + 1]]));
            *acc += (dw * xd[b]) * isum as f32;
        }
    }
}

/// Element `i` of a bias of dtype `d`, as f32.
unsafe fn read(p: *const u8, d: DType, i: usize) -> f32 {
    // SAFETY: the caller's buffer has element i.
    unsafe {
        match d {
            DType::BF16 => f32::from_bits(((p as *const u16).add(i).read_unaligned() as u32) << 16),
            _ => (p as *const f32).add(i).read_unaligned(),
        }
    }
}

/// Round `s` to `d` and store it as element `i`.
unsafe fn write(p: *mut u8, d: DType, i: usize, s: f32) {
    // SAFETY: the caller's buffer has element i.
    unsafe {
        match d {
            DType::BF16 => (p as *mut u16).add(i).write_unaligned(crate::gemm::bf16_bits(s)),
            _ => (p as *mut f32).add(i).write_unaligned(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * if s.is_multiple_of(7) { 8.0 } else { 1.0 }
            })
            .collect()
    }

    /// Every variant this CPU has returns the reference's bits, for both
    /// formats, sizes with and without a tail of blocks (k not a multiple
    /// of 32, of 128, of 256), with a bias, f32 and bf16 activations.
    #[test]
    fn every_variant_matches_the_reference_bit_for_bit() {
        let variants: Vec<QVariant> = QVariant::ALL.into_iter().filter(|v| v.supported()).collect();
        eprintln!("qlinear variants on this CPU: {variants:?}");
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for (n, k, tokens) in [
                (5, 256, 1),
                (3, 688, 3),
                (4, 32, 2),
                (2, 40, 1),
                (3, 512, 2),
                (2, 2048, 1),
                (2, 416, 2),
            ] {
                let w = values(n * k, (k + n) as u32);
                let wq = quant::quantise(format, &w, n, k).unwrap();
                let bias = values(n, 99);
                for act in [DType::F32, DType::BF16] {
                    let x: Vec<f32> = values(tokens * k, k as u32 ^ 5)
                        .into_iter()
                        .map(|v| act.round(v))
                        .collect();
                    let want: Vec<f32> = quant::linear(format, &x, &wq, Some(&bias), n, k)
                        .into_iter()
                        .map(|v| act.round(v))
                        .collect();
                    let xb: Vec<u8> = ouroc_driver::codec::encode(&x, act);
                    let mut rows = QuantRows::default();
                    // SAFETY: tokens rows of k elements.
                    unsafe { rows.fill(xb.as_ptr(), act, k, tokens, k) };
                    for &v in &variants {
                        let mut y = vec![0u8; tokens * n * act.size_bytes()];
                        let p = QLinearArgs {
                            tokens,
                            n,
                            k,
                            format,
                            x: &rows,
                            w: wq.as_ptr(),
                            bias: bias.as_ptr() as *const u8,
                            bias_dtype: DType::F32,
                            act,
                            y: y.as_mut_ptr(),
                            y_stride: n,
                        };
                        // Two tile ranges, as two threads would take them.
                        let tiles = quant::tiles(n);
                        // SAFETY: the buffers have the shapes above.
                        unsafe {
                            qlinear_with(v, &p, 0..tiles / 2);
                            qlinear_with(v, &p, tiles / 2..tiles);
                        }
                        let got = ouroc_driver::codec::decode(&y, act);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{format} {} n={n} k={k} tokens={tokens} {act} element {i}: {g} vs {w}",
                                v.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
