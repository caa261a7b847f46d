//! Quantised weight formats of a `Linear`: the byte layout, quantisation
//! and the exact arithmetic every backend implements (this file is the
//! reference: the runtime's microkernels are checked bit for bit against
//! [`dot_row`], and the reference device runs [`linear`]).
//!
//! Both formats quantise each weight row in blocks of [`BLOCK`] = 32
//! values along `k` with one f16 scale per block (llama.cpp's Q8_0 and
//! Q4_0 numerics: 8.5 and 4.5 bits per weight); a row whose `k` is not a
//! multiple of 32 is padded with zero weights to whole blocks, and `n` is
//! padded with zero rows to whole tiles. The layout is ouroc's own, chosen
//! for the microkernels (rows interleaved, so one vector holds the same
//! weights of [`TILE`] = 16 rows and its lanes are rows: no horizontal sums):
//!
//! - the matrix is `ceil(n / 16)` tiles of 16 rows, one after another; a
//!   tile is its `nb = ceil(k / 32)` blocks in order; a block is its quants
//!   then the 16 rows' scales (f16, little endian, row order);
//! - `q8_0` quants of a block: 8 runs of 64 bytes, run g holding weights
//!   4g..4g+3 of each of the 16 rows (byte 4r + j: row r, weight 4g + j),
//!   each stored as `q + 128` (q in -127..=127), so an unsigned-by-signed
//!   byte dot product (`vpdpbusd`) reads them against the activation
//!   group broadcast to every lane;
//! - `q4_0` quants: 4 runs of 64 bytes, run p's byte 4r + j holding row
//!   r's weight 4p + j in its low nibble and weight 16 + 4p + j in its high
//!   nibble, each `q + 8` (q in -8..=7).
//!
//! The product (as llama.cpp's CPU path computes it): each token's
//! activation row is quantised to int8 per block ([`quantise_acts`]:
//! scale `amax / 127`, round half to even), each block's integer dot
//! product is exact, and each output is the f32 sum over blocks in order
//! of `(d_w * d_x) * isum` (two f32 products, then the add), then the bias
//! is added and the sum rounded to the activation dtype, as for a dense
//! Linear.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The layout's name: part of the weights cache's key and of a built
/// executable's layout hash, so bytes written in another layout are never
/// read as this one. Change it with the layout.
pub const LAYOUT: &str = "ouroc-quant-tiles16-v1";

/// Weights per block (one scale each).
pub const BLOCK: usize = 32;

/// Rows interleaved in a tile (see the module docs).
pub const TILE: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    pub fn parse(s: &str) -> Option<QuantFormat> {
        match s {
            "q8_0" => Some(QuantFormat::Q8_0),
            "q4_0" => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    /// Bytes of one block's quants.
    pub fn quant_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => BLOCK,
            QuantFormat::Q4_0 => BLOCK / 2,
        }
    }

    /// What is added to a quant to store it unsigned.
    pub fn offset(self) -> i32 {
        match self {
            QuantFormat::Q8_0 => 128,
            QuantFormat::Q4_0 => 8,
        }
    }

    /// The smallest and largest quant.
    fn range(self) -> (i32, i32) {
        match self {
            QuantFormat::Q8_0 => (-127, 127),
            QuantFormat::Q4_0 => (-8, 7),
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which Linears a model reads quantised, and how (`--weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightScheme {
    /// Every weight in the model's dtype.
    Dense,
    /// Every Linear in q8_0.
    Q8,
    /// The layers' Linears in q4_0, the LM head in q8_0 (as llama.cpp keeps
    /// its output matrix at higher precision: it is read once per token,
    /// the layers R times, so it costs little and its errors reach every
    /// logit directly).
    Q4,
}

impl WeightScheme {
    pub fn name(self) -> &'static str {
        match self {
            WeightScheme::Dense => "dense",
            WeightScheme::Q8 => "q8",
            WeightScheme::Q4 => "q4",
        }
    }

    /// Set the Linears' formats of `program` (a freshly lowered, dense
    /// one). Embeddings, norms and the exit gate (inside `step_end`) stay
    /// in the model's dtype: they are a small share of the bytes read per
    /// token and the gate's decision is sensitive to its rounding.
    /// Returns the Linears changed.
    pub fn apply(self, program: &mut crate::Program) -> usize {
        match self {
            WeightScheme::Dense => 0,
            WeightScheme::Q8 => program.quantise(QuantFormat::Q8_0, Some(QuantFormat::Q8_0)),
            WeightScheme::Q4 => program.quantise(QuantFormat::Q4_0, Some(QuantFormat::Q8_0)),
        }
    }
}

/// Blocks of a row of `k` weights.
pub fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// Bytes of one block of a tile: 16 rows' quants, then their scales.
pub fn block_bytes(format: QuantFormat) -> usize {
    TILE * (format.quant_bytes() + 2)
}

/// Bytes of one tile of 16 rows of `k` weights.
pub fn tile_bytes(format: QuantFormat, k: usize) -> usize {
    blocks(k) * block_bytes(format)
}

/// Tiles of `n` rows.
pub fn tiles(n: usize) -> usize {
    n.div_ceil(TILE)
}

/// Bytes of an `[n, k]` weight in `format`.
pub fn matrix_bytes(format: QuantFormat, n: usize, k: usize) -> usize {
    tiles(n) * tile_bytes(format, k)
}

/// [`matrix_bytes`], None when it overflows (a hostile shape).
pub fn matrix_bytes_checked(format: QuantFormat, n: usize, k: usize) -> Option<usize> {
    blocks(k).checked_mul(block_bytes(format))?.checked_mul(tiles(n))
}

/// Where weight `i` (0..32) of row `r` (0..16) sits in a block's quants:
/// (byte, high nibble); q8_0 uses whole bytes (never the high nibble).
pub fn quant_at(format: QuantFormat, r: usize, i: usize) -> (usize, bool) {
    match format {
        QuantFormat::Q8_0 => (64 * (i / 4) + 4 * r + i % 4, false),
        QuantFormat::Q4_0 => {
            let j = i % 16;
            (64 * (j / 4) + 4 * r + j % 4, i >= 16)
        }
    }
}

fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// An f16 scale (its little-endian bits) as f32 (exact).
pub fn f16_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Quantise an `[n, k]` matrix (row-major f32) into `format`, tiles split
/// over the machine's cores (preparing a 1.4B model quantises 1.4 G weights).
/// A block holding a non-finite value, or values too large for an f16
/// scale, is an error naming its row and block (the dense model would
/// compute with them; a quantised one cannot represent them).
pub fn quantise(format: QuantFormat, w: &[f32], n: usize, k: usize) -> Result<Vec<u8>, String> {
    if Some(w.len()) != n.checked_mul(k) {
        return Err(format!("{} values for a [{n}, {k}] matrix", w.len()));
    }
    let tb = tile_bytes(format, k);
    let mut out = vec![0u8; matrix_bytes(format, n, k)];
    if k == 0 {
        return Ok(out);
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    // Tiles per job: whole tiles, at least 4 (64 rows) per thread.
    let per = tiles(n).div_ceil(threads).max(4);
    std::thread::scope(|s| {
        let jobs: Vec<_> = w
            .chunks(per * TILE * k)
            .zip(out.chunks_mut(per * tb))
            .enumerate()
            .map(|(i, (src, dst))| s.spawn(move || quantise_tiles(format, src, k, dst, i * per * TILE)))
            .collect();
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .unwrap_or_else(|_| Err("a quantisation thread panicked".into()))
        })
    })?;
    Ok(out)
}

/// Quantise the rows of `w` (`k` values each; the last tile may be short)
/// into whole tiles of `out` (`first`: the index of the first row, for errors).
fn quantise_tiles(format: QuantFormat, w: &[f32], k: usize, out: &mut [u8], first: usize) -> Result<(), String> {
    let (nb, bb, qb) = (blocks(k), block_bytes(format), TILE * format.quant_bytes());
    let off = format.offset();
    for (t, tile) in out.chunks_exact_mut(nb * bb).enumerate() {
        for b in 0..nb {
            let block = &mut tile[b * bb..(b + 1) * bb];
            let (quants, scales) = block.split_at_mut(qb);
            for r in 0..TILE {
                let row = t * TILE + r;
                let Some(vals) = w.get(row * k..(row + 1) * k) else {
                    // A padding row: zero weights (the stored offset), zero scale.
                    for i in 0..BLOCK {
                        put(format, quants, r, i, off as u8);
                    }
                    continue;
                };
                let vals = &vals[b * BLOCK..((b + 1) * BLOCK).min(k)];
                let (d, qs) = quantise_block(format, vals)
                    .ok_or_else(|| format!("row {}, block {b}: {}", first + row, unrepresentable(format, vals)))?;
                scales[2 * r..2 * r + 2].copy_from_slice(&f16_bits(d).to_le_bytes());
                for (i, &q) in qs.iter().enumerate() {
                    put(format, quants, r, i, (q + off) as u8);
                }
            }
        }
    }
    Ok(())
}

/// Store the unsigned quant `u` of weight `i` of row `r` in a block's quants.
fn put(format: QuantFormat, quants: &mut [u8], r: usize, i: usize, u: u8) {
    let (byte, high) = quant_at(format, r, i);
    if high {
        quants[byte] = (quants[byte] & 0x0f) | (u << 4);
    } else if format == QuantFormat::Q4_0 {
        quants[byte] = (quants[byte] & 0xf0) | u;
    } else {
        quants[byte] = u;
    }
}

fn unrepresentable(format: QuantFormat, vals: &[f32]) -> String {
    match vals.iter().find(|v| !v.is_finite()) {
        Some(v) => format!("holds {v}, which {format} cannot represent"),
        None => format!("its values are too large for an f16 scale of {format}"),
    }
}

/// One block: its scale (an f16 value) and quants (zero past `vals`);
/// None when the block holds a non-finite value or its scale overflows f16.
fn quantise_block(format: QuantFormat, vals: &[f32]) -> Option<(f32, [i32; BLOCK])> {
    let (lo, hi) = format.range();
    let mut q = [0i32; BLOCK];
    if vals.iter().any(|v| !v.is_finite()) {
        return None;
    }
    // The signed value of largest magnitude (the first such).
    let big = vals.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = match format {
        QuantFormat::Q8_0 => big.abs() / 127.0,
        // As Q4_0: the largest magnitude maps to -8, the end with one more step.
        QuantFormat::Q4_0 => big / -8.0,
    };
    let d = f16_value(f16_bits(d));
    if !d.is_finite() {
        return None;
    }
    if d == 0.0 {
        return Some((d, q));
    }
    for (qi, &v) in q.iter_mut().zip(vals) {
        *qi = ((v / d).round_ties_even() as i32).clamp(lo, hi);
    }
    Some((d, q))
}

/// The quants (`nb * 32` signed values) and scales of row `o` of an
/// `[n, k]` matrix in `format`.
pub fn unpack_row(format: QuantFormat, bytes: &[u8], k: usize, o: usize) -> (Vec<i32>, Vec<f32>) {
    let (nb, bb, qb) = (blocks(k), block_bytes(format), TILE * format.quant_bytes());
    let tile = &bytes[(o / TILE) * nb * bb..];
    let r = o % TILE;
    let off = format.offset();
    let mut q = Vec::with_capacity(nb * BLOCK);
    let mut d = Vec::with_capacity(nb);
    for b in 0..nb {
        let block = &tile[b * bb..(b + 1) * bb];
        for i in 0..BLOCK {
            let (byte, high) = quant_at(format, r, i);
            let u = match format {
                QuantFormat::Q8_0 => block[byte],
                QuantFormat::Q4_0 if high => block[byte] >> 4,
                QuantFormat::Q4_0 => block[byte] & 15,
            };
            q.push(u as i32 - off);
        }
        d.push(f16_value(u16::from_le_bytes([
            block[qb + 2 * r],
            block[qb + 2 * r + 1],
        ])));
    }
    (q, d)
}

/// The f32 values an `[n, k]` quantised matrix stands for (`q * d`, exact).
pub fn dequantise(format: QuantFormat, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * k);
    for o in 0..n {
        let (q, d) = unpack_row(format, bytes, k, o);
        out.extend((0..k).map(|i| q[i] as f32 * d[i / BLOCK]));
    }
    out
}

/// A token's activation row quantised per block: `nb * 32` quants (zero
/// padded), and per block its scale and the sum of its quants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantActs {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
}

/// Append the quantised row `x` (its `k` values) to `out`: per block,
/// `d = amax / 127`, `q = round_half_even(x * (1 / d))` (0 when d is 0).
/// A block holding a NaN gets scale NaN (and quants 0), so the NaN reaches
/// the outputs as it would in a dense product.
pub fn quantise_acts(x: &[f32], out: &mut QuantActs) {
    for vals in x.chunks(BLOCK) {
        let nan = vals.iter().any(|v| v.is_nan());
        let amax = vals.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = if nan { f32::NAN } else { amax / 127.0 };
        let id = if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 };
        // Fixed-size arrays and the rounding below, not `round_ties_even`
        // (a libm call per element on baseline x86-64): quantising was a
        // twentieth of the thread that runs it in q8 decode.
        let mut q = [0i8; BLOCK];
        for (q, &v) in q.iter_mut().zip(vals) {
            *q = round_half_even(v * id).clamp(-127.0, 127.0) as i8;
        }
        out.q.extend_from_slice(&q);
        let sum = q.iter().map(|&q| q as i32).sum();
        out.d.push(d);
        out.sum.push(sum);
    }
}

/// `v` rounded to the nearest integer, ties to even, for |v| < 2^22 (and
/// NaN stays NaN): adding 1.5 * 2^23 leaves no fraction bits, so the
/// addition itself rounds in the default mode (nearest, ties to even; the
/// constant is even, so the sum's parity is the integer's).
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Row `o`'s sum before the bias: over blocks in order, `(d_w * d_x) * isum`.
pub fn dot_row(format: QuantFormat, w: &[u8], k: usize, o: usize, xq: &[i8], xd: &[f32]) -> f32 {
    let (q, d) = unpack_row(format, w, k, o);
    let mut acc = 0.0f32;
    for b in 0..blocks(k) {
        let isum: i32 = (0..BLOCK).map(|i| q[b * BLOCK + i] * xq[b * BLOCK + i] as i32).sum();
        acc += (d[b] * xd[b]) * isum as f32;
    }
    acc
}

/// The reference `Linear` on quantised weights: `x` is `tokens` rows of
/// `k` values (already in the activation dtype), `bias` in f32; returns
/// `tokens x n` sums (bias added, not yet rounded).
pub fn linear(format: QuantFormat, x: &[f32], w: &[u8], bias: Option<&[f32]>, n: usize, k: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len() / k.max(1) * n);
    for row in x.chunks_exact(k.max(1)) {
        let mut qa = QuantActs::default();
        quantise_acts(row, &mut qa);
        for o in 0..n {
            y.push(dot_row(format, w, k, o, &qa.q, &qa.d) + bias.map_or(0.0, |b| b[o]));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn activation_rounding_is_round_ties_even() {
        // Every quarter step over the quants' range (ties included), values
        // next to the ties, random values, and the non-finite ones.
        let mut vals: Vec<f32> = (-520..=520).map(|i| i as f32 / 4.0).collect();
        for i in -130..130 {
            let t = i as f32 + 0.5;
            vals.extend([t.next_down(), t.next_up(), -t.next_down()]);
        }
        vals.extend(values(4096, 3).iter().map(|v| v * 131.0));
        vals.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            4_194_303.5,
        ]);
        for v in vals {
            let (got, want) = (round_half_even(v), v.round_ties_even());
            assert!(
                got.to_bits() == want.to_bits() || (got == 0.0 && want == 0.0) || (got.is_nan() && want.is_nan()),
                "{v}: {got} against {want}"
            );
            assert_eq!(got.clamp(-127.0, 127.0) as i8, want.clamp(-127.0, 127.0) as i8, "{v}");
        }
    }

    #[test]
    fn quants_round_trip_within_half_a_step() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for (n, k) in [(3, 32), (2, 88), (4, 256), (1, 200), (2, 160)] {
                let w = values(n * k, 7 + k as u32);
                let q = quantise(format, &w, n, k).unwrap();
                assert_eq!(q.len(), matrix_bytes(format, n, k));
                let back = dequantise(format, &q, n, k);
                for r in 0..n {
                    let (_, d) = unpack_row(format, &q, k, r);
                    for i in 0..k {
                        let err = (back[r * k + i] - w[r * k + i]).abs();
                        // Half a step, plus the f16 rounding of the scale at the
                        // ends; q4_0's range is one step short at the end
                        // opposite the largest value (-8..=7 steps).
                        let step = d[i / BLOCK].abs();
                        let tol = match format {
                            QuantFormat::Q8_0 => 0.5 * step + 127.0 * step * 1e-3,
                            QuantFormat::Q4_0 => step + 8.0 * step * 1e-3,
                        };
                        assert!(err <= tol, "{format} [{n},{k}] ({r},{i}): {err} > {tol}");
                    }
                }
                // Quantising the dequantised values gives the same bytes.
                assert_eq!(quantise(format, &back, n, k).unwrap(), q, "{format} [{n},{k}]");
            }
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        // Two rows of one q4_0 block: row 1's weight 5 in the low nibble of
        // byte 64 * 1 + 4 * 1 + 1, its weight 21 in the high nibble.
        let mut w = vec![0.0f32; 64];
        w[32 + 5] = -0.5; // row 1: d = -1/8 (from w[32 + 6]), q = 4
        w[32 + 6] = 1.0;
        w[32 + 21] = 0.25; // q = -2
        let q = quantise(QuantFormat::Q4_0, &w, 2, 32).unwrap();
        assert_eq!(q.len(), 288);
        assert_eq!(q[64 + 4 + 1], (4 + 8) | ((-2i32 + 8) << 4) as u8);
        // Row 1's scale after the 256 bytes of quants; padding rows zero.
        assert_eq!(f16_value(u16::from_le_bytes([q[256 + 2], q[256 + 3]])), -0.125);
        assert_eq!(&q[256 + 4..288], &[0u8; 28][..]);
        assert_eq!(q[4 * 2], 8 | (8 << 4), "row 2 is padding: zero quants");
        let q8 = quantise(QuantFormat::Q8_0, &w[32..], 1, 32).unwrap();
        assert_eq!(q8.len(), 544);
        // Row 0's weight 6 (the largest, q = 127) at byte 64 * 1 + 2.
        assert_eq!((q8[64 + 2], q8[0]), (255, 128));
        // A padded row: k = 40 is two blocks, the second zero past 8 values.
        let q8 = quantise(QuantFormat::Q8_0, &[1.0; 40], 1, 40).unwrap();
        assert_eq!(q8.len(), 2 * 544);
        assert_eq!(q8[544 + 64 * 2], 128, "weight 8 of block 1 is padding");
        assert_eq!(q8[544 + 64], 255, "weight 4 of block 1 is a 1.0");
    }

    #[test]
    fn unrepresentable_weights_are_refused_and_nan_activations_propagate() {
        let mut w = vec![0.5f32; 64];
        w[40] = f32::INFINITY;
        let e = quantise(QuantFormat::Q8_0, &w, 2, 32).unwrap_err();
        assert!(e.contains("row 1, block 0") && e.contains("inf"), "{e}");
        let e = quantise(QuantFormat::Q4_0, &[1.0e7; 32], 1, 32).unwrap_err();
        assert!(e.contains("too large"), "{e}");
        assert!(quantise(QuantFormat::Q8_0, &[1.0; 5], 2, 3).is_err());
        let q = quantise(QuantFormat::Q8_0, &[1.0; 64], 1, 64).unwrap();
        let mut x = vec![1.0f32; 64];
        x[3] = f32::NAN;
        assert!(linear(QuantFormat::Q8_0, &x, &q, None, 1, 64)[0].is_nan());
    }

    #[test]
    fn the_linear_is_close_to_the_dense_product() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let (n, k) = (5, 200);
            let (w, x) = (values(n * k, 3), values(2 * k, 4));
            let q = quantise(format, &w, n, k).unwrap();
            let deq = dequantise(format, &q, n, k);
            let y = linear(format, &x, &q, None, n, k);
            for t in 0..2 {
                for o in 0..n {
                    let dense: f32 = (0..k).map(|i| x[t * k + i] * deq[o * k + i]).sum();
                    // Only the activations' int8 rounding separates them.
                    let tol = 0.02 * (k as f32).sqrt() * 0.5;
                    assert!(
                        (y[t * n + o] - dense).abs() < tol,
                        "{format}: {} vs {dense}",
                        y[t * n + o]
                    );
                }
            }
        }
    }
}
