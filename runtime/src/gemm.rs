//! A prefill GEMM for the `Linear` family:
//! `y[t, o] = round_act(sum_k x[t, k] * W[o, k] + b[o])` for many tokens at
//! once (the Cranelift kernel re-streams W once per token; this one keeps a
//! tile of W rows in cache while a block of tokens passes over it).
//!
//! Numerics (the contract of `ouroc_kernels::spec`): products and sums in
//! f32 (the order of the sum is the kernel's), the bias added to the f32
//! sum, one rounding to the activation dtype at the end (bf16:
//! round-to-nearest-even exactly as `half::bf16::from_f32`). The AVX-512
//! BF16 variant multiplies bf16 pairs with `vdpbf16ps`: a product of two
//! bf16 values is exact in f32 and is accumulated in f32, so it meets the
//! same contract (the instruction treats subnormal inputs and results as
//! zero: a difference below 1.2e-38 per term, far inside the reordering
//! tolerance).
//!
//! Blocking: both operands are contiguous along k, so a register tile of
//! [`Variant::tile`] output rows x tokens keeps one f32 vector accumulator
//! per (row, token) pair along k (dot-product form: W is read where it
//! lies, one horizontal sum per pair at the end of a block of k). The
//! driver takes blocks of up to 256 tokens' x rows (read where they lie,
//! or copied to a private buffer first when y overwrites x), cuts k into blocks whose x slice fits in L2 (partial sums kept
//! in f32), and passes every tile of W rows (a few KiB to a few tens of
//! KiB, in L1/L2) over all the block's tokens: W streams from memory once
//! per token block instead of once per token.
//!
//! bf16 x bf16 on a CPU without `vdpbf16ps` (AVX-512F, AVX2): with at
//! least 16 tokens, x rows and each W tile are widened to f32 once per
//! token block (exact) and an f32 micro-kernel runs, with no conversions
//! in its inner loop: on AVX-512 in outer-product form ([`drive_panel`]:
//! W tiles transposed into k-major panels, one accumulator lane per
//! output, no horizontal sums), on AVX2 the f32 dot-product tiles; fewer
//! tokens (decode) use the pair kernels, which widen in registers. The driver loop is compiled per vector ISA
//! (`drive_avx512`, `drive_avx2`) and keeps no closures, so its own work
//! (widening, bias, rounding, stores) uses the same instructions.
//!
//! Dispatch: [`Variant::best`] is chosen once by run-time CPU feature
//! detection; [`linear`] uses it and [`linear_with`] forces one (tests).
//! Work can be split across threads by output rows (`rows`).

use ouroc_ir::DType;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::has_avx512;

/// One implementation of the kernel, chosen by CPU features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// AVX-512 with BF16 (`vdpbf16ps`) for bf16 activations x bf16 weights;
    /// the other dtype pairs run as [`Variant::Avx512F`].
    Avx512Bf16,
    /// AVX-512 F/BW/VL: f32 FMA on 16 lanes, bf16 widened by shifts.
    Avx512F,
    /// AVX2 + FMA: f32 FMA on 8 lanes, bf16 widened by shifts.
    Avx2Fma,
    /// Portable Rust (no target features).
    Scalar,
}

impl Variant {
    /// Every variant, fastest first.
    pub const ALL: [Variant; 4] = [Variant::Avx512Bf16, Variant::Avx512F, Variant::Avx2Fma, Variant::Scalar];

    /// A stable short name (`avx512bf16`, `avx512f`, `avx2fma`, `scalar`).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Avx512Bf16 => "avx512bf16",
            Variant::Avx512F => "avx512f",
            Variant::Avx2Fma => "avx2fma",
            Variant::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run the variant.
    pub fn supported(self) -> bool {
        match self {
            Variant::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512Bf16 => x86::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512F => x86::has_avx512(),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The variants this CPU supports, fastest first.
    pub fn supported_all() -> Vec<Variant> {
        Variant::ALL.into_iter().filter(|v| v.supported()).collect()
    }

    /// The fastest supported variant (detected once).
    pub fn best() -> Variant {
        static BEST: OnceLock<Variant> = OnceLock::new();
        *BEST.get_or_init(|| {
            Variant::ALL
                .into_iter()
                .find(|v| v.supported())
                .unwrap_or(Variant::Scalar)
        })
    }

    /// The register tile (output rows, tokens) the variant uses for the
    /// given dtypes. A caller splitting `rows` across threads should cut at
    /// multiples of the row count where it can.
    pub fn tile(self, act: DType, weight: DType) -> (usize, usize) {
        self.micro(act, weight).map_or((1, 1), |m| (m.rows, m.tokens))
    }

    fn micro(self, act: DType, weight: DType) -> Option<Micro> {
        let (xb, wb) = (is_bf16(act)?, is_bf16(weight)?);
        match self {
            Variant::Scalar => Some(scalar_micro(xb, wb)),
            #[cfg(target_arch = "x86_64")]
            _ => x86::micro(self, xb, wb),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }
}

/// The name of the variant [`linear`] uses on this CPU.
pub fn available() -> &'static str {
    Variant::best().name()
}

/// Whether a vector microkernel (not the scalar fallback) handles this
/// dtype pair on this CPU: what the CPU runtime dispatches `Linear` to.
pub fn microkernel(act: DType, weight: DType) -> bool {
    supports(act, weight) && Variant::best() != Variant::Scalar
}

/// Whether [`linear`] handles this activation / weight dtype pair (f32 and
/// bf16 in any combination; f16 is not handled here).
pub fn supports(act: DType, weight: DType) -> bool {
    is_bf16(act).is_some() && is_bf16(weight).is_some()
}

fn is_bf16(d: DType) -> Option<bool> {
    match d {
        DType::F32 => Some(false),
        DType::BF16 => Some(true),
        _ => None,
    }
}

/// The operands of one `Linear` launch. Element types: `x` and `y` are
/// `act` (f32, or bf16 as u16 bits), `w` and `bias` are `weight`; all
/// little-endian host values, no alignment required.
#[derive(Clone, Copy, Debug)]
pub struct LinearArgs {
    pub tokens: usize,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    pub act: DType,
    pub weight: DType,
    /// Row t of x (k elements) starts at `x + t * x_stride` elements.
    pub x: *const u8,
    pub x_stride: usize,
    /// W, row-major `[n, k]`, rows contiguous.
    pub w: *const u8,
    /// `[n]` or null for no bias.
    pub bias: *const u8,
    /// Row t of y (n elements) starts at `y + t * y_stride` elements.
    pub y: *mut u8,
    pub y_stride: usize,
}

// SAFETY: plain pointers to buffers the caller owns; concurrent calls write
// disjoint `rows` of y (see `linear`).
unsafe impl Send for LinearArgs {}
unsafe impl Sync for LinearArgs {}

impl LinearArgs {
    /// Whether y's rows overlap x's rows in memory (an in-place launch).
    pub fn aliased(&self) -> bool {
        if self.tokens == 0 {
            return false;
        }
        let s = self.act.size_bytes();
        let x0 = self.x as usize;
        let x1 = x0 + ((self.tokens - 1) * self.x_stride + self.k) * s;
        let y0 = self.y as usize;
        let y1 = y0 + ((self.tokens - 1) * self.y_stride + self.n) * s;
        x0 < y1 && y0 < x1
    }
}

/// Compute outputs `rows` (a subrange of `0..n`) of every token with the
/// fastest variant ([`Variant::best`]).
///
/// # Safety
/// The pointers address buffers of the documented shapes and dtypes for
/// `p.tokens` tokens; `supports(p.act, p.weight)`. y may share memory with x
/// only row for row (row t of y inside row t of x) and then only when one
/// call computes all of `0..n` (x is copied per token block before y is
/// written); a caller splitting an in-place launch across threads must copy
/// x first ([`LinearArgs::aliased`]). Concurrent calls must use disjoint
/// `rows`.
pub unsafe fn linear(p: &LinearArgs, rows: Range<usize>) {
    unsafe { linear_with(Variant::best(), p, rows) }
}

/// [`linear`] with a given variant. Panics if the CPU does not support it or
/// the dtypes are not handled.
///
/// # Safety
/// As [`linear`].
pub unsafe fn linear_with(v: Variant, p: &LinearArgs, rows: Range<usize>) {
    assert!(v.supported(), "gemm variant {} is not supported by this CPU", v.name());
    let m = v
        .micro(p.act, p.weight)
        .unwrap_or_else(|| panic!("gemm: unsupported dtypes act={} weight={}", p.act, p.weight));
    assert!(
        rows.start <= rows.end && rows.end <= p.n,
        "rows {rows:?} outside 0..{}",
        p.n
    );
    if rows.is_empty() || p.tokens == 0 {
        return;
    }
    // bf16 x bf16 without a bf16 dot-product instruction: widen both to f32
    // once per block (x rows, W tiles) and run the f32 kernel, whose inner
    // loop has no conversions, when enough tokens share each W tile.
    let widen = matches!(v, Variant::Avx512F | Variant::Avx2Fma)
        && p.act == DType::BF16
        && p.weight == DType::BF16
        && p.tokens >= WIDEN_MIN_TOKENS;
    let m = if widen {
        v.micro(DType::F32, DType::F32).expect("every vector variant has f32")
    } else {
        m
    };
    // SAFETY: the caller's contract; `m` runs on this CPU.
    unsafe {
        match v {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512F if widen => drive_panel(p, rows),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512Bf16 | Variant::Avx512F => drive_avx512(p, rows, &m, widen),
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2Fma => drive_avx2(p, rows, &m, widen),
            _ => drive(p, rows, &m, widen),
        }
    }
}

/// Fewest tokens for which bf16 x bf16 is widened to f32 (see
/// [`linear_with`]): below that, converting a W tile costs more than its
/// few token tiles save.
const WIDEN_MIN_TOKENS: usize = 16;

/// One register tile for a micro-kernel: W rows `w + r * ws` (bytes) for
/// `r < nr`, x rows `x + t * xs` for `t < nt`, `k` elements from each.
/// The first `head` elements are taken first (masked loads) so that the rest
/// of W row 0 is read at 64-byte aligned addresses (0 where the kernel does
/// not align).
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub w: *const u8,
    pub ws: usize,
    pub nr: usize,
    pub x: *const u8,
    pub xs: usize,
    pub nt: usize,
    pub k: usize,
    pub head: usize,
    /// Where a later W tile starts (as many rows, right after one another:
    /// `ws` = `k` elements, one block of k), which the kernel hints into
    /// the cache as it goes (a hint: results never depend on it); null for
    /// none.
    pub pf: *const u8,
}

/// A micro-kernel: `out[t * MAX_R + r] = sum_i x_t[i] * w_r[i]` over the
/// tile (f32, in the kernel's order).
pub(crate) type TileFn = unsafe fn(&Tile, &mut [f32; MAX_TILE]);

/// Largest tile: rows x tokens, `out` holds `MAX_T` tokens of `MAX_R`
/// (token-major, like y).
pub(crate) const MAX_R: usize = 8;
pub(crate) const MAX_T: usize = 8;
pub(crate) const MAX_TILE: usize = MAX_R * MAX_T;

/// A micro-kernel: its tile and function.
#[derive(Clone, Copy)]
pub(crate) struct Micro {
    pub rows: usize,
    pub tokens: usize,
    /// Whether the kernel takes a `head` to align its loads of W.
    pub align: bool,
    pub tile: TileFn,
}

/// Bytes of the x slice (a token block's rows, a block of k) that stays in
/// L2 while every W tile of the block of k passes over it (Zen 4: 1 MiB of
/// L2 per core; measured: 256 KiB loses a fifth, 768 KiB about ties).
const X_BLOCK_BYTES: usize = 512 << 10;

/// Most tokens in a token block: W streams from memory once per block.
const MAX_BLOCK_TOKENS: usize = 256;

/// Whether the AVX-512 kernels peel a masked head to read W aligned (see
/// `head` in [`linear_with`]: off, for results independent of addresses).
/// Off, the kernels compile without their head loop: its masked steps kept
/// registers live that the 6 x 4 tile's main loop then lacked (one
/// accumulator spilled per step; 128 tokens ran 13-15% slower).
pub(crate) const ALIGN_W: bool = false;

/// The cache line (and AVX-512 vector) size the copies are aligned to.
const LINE: usize = 64;

thread_local! {
    /// This thread's copy of a token block of x rows.
    static XCOPY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// This thread's f32 partial sums over the blocks of k, `[token][row]`.
    static PARTIAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// This thread's W tile widened to f32 (bf16 x bf16 on f32 FMA).
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// This thread's token block of x rows widened to f32 ([`drive_panel`]).
    static WIDE_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The loops around the micro-kernel, outermost first:
/// - token blocks of up to `MAX_BLOCK_TOKENS` tokens, whose x rows are
///   read where they lie, except in an in-place launch, where they are
///   first copied to a thread-private buffer (rows a whole number of cache
///   lines apart), so x is read before y is written;
/// - blocks of k, sized so that the block's x slice fits `X_BLOCK_BYTES`;
/// - tiles of W rows, each passing over all the block's tokens while it is
///   in L1/L2;
/// - token tiles: the micro-kernel, then its sums added to the partial sums
///   (f32) or, in the last block of k, finished: bias, rounding, store.
#[inline(always)]
unsafe fn drive(p: &LinearArgs, rows: Range<usize>, m: &Micro, widen: bool) {
    let (xsz, wsz) = (p.act.size_bytes(), p.weight.size_bytes());
    // Bytes of an x element as the micro-kernel reads it (f32 when widened).
    let csz = if widen { 4 } else { xsz };
    let row_bytes = p.k * csz;
    let stride = row_bytes.next_multiple_of(LINE);
    let mc = p.tokens.min(MAX_BLOCK_TOKENS);
    // Blocks of k: a multiple of 32 elements (whole lines in f32 and bf16),
    // balanced so that the last is not a sliver.
    let kc = (X_BLOCK_BYTES / (mc * csz)).max(256) / 32 * 32;
    let kblocks = p.k.div_ceil(kc).max(1);
    let kc = p.k.div_ceil(kblocks).next_multiple_of(32).min(p.k);
    let w_at = |o: usize, k0: usize| p.w.wrapping_add((o * p.k + k0) * wsz);
    // Elements before W[o, k0..] reaches a 64-byte boundary. Off: the head
    // moves elements between the masked and the main accumulation, so sums
    // (and bf16 roundings) would depend on where the weights happen to lie
    // and on which tile a row falls in; results must be identical for every
    // allocation and thread split.
    let head = |o: usize, k0: usize| {
        let a = w_at(o, k0) as usize % LINE;
        if ALIGN_W && m.align && a.is_multiple_of(wsz) {
            (LINE - a) % LINE / wsz
        } else {
            0
        }
    };
    // x rows start where x[head] is aligned when W[head] is (for every tile
    // and block of k when k * size(W) is a multiple of 64, as in real models).
    let x_phase = (LINE - head(rows.start, 0) * csz % LINE) % LINE;
    let nrows = rows.len();
    // The thread's buffers, taken out of their thread-locals for the call
    // (a closure would not inherit the caller's target features).
    let (mut copy, mut partial, mut wide) = (XCOPY.take(), PARTIAL.take(), WIDE.take());
    {
        let (copy, partial, wide) = (&mut copy, &mut partial, &mut wide);
        copy.resize(mc * stride + 2 * LINE, 0);
        if kblocks > 1 {
            partial.resize(mc * nrows, 0.0);
        }
        let base = copy.as_mut_ptr();
        // SAFETY: LINE + x_phase + mc * stride fits in the buffer.
        let xb = unsafe { base.add(base.align_offset(LINE) + x_phase) };
        let mut sums = [0f32; MAX_TILE];
        // x is read where it lies unless y overwrites it (in place):
        // the copy costs more than unaligned loads of rows in cache.
        let direct = !p.aliased() && !widen;
        let mut t0 = 0;
        while t0 < p.tokens {
            let tb = mc.min(p.tokens - t0);
            let (xb, stride) = if direct {
                (p.x.wrapping_add(t0 * p.x_stride * xsz) as *mut u8, p.x_stride * xsz)
            } else {
                for t in 0..tb {
                    // SAFETY: row t0 + t of x (k elements) into row t of the copy.
                    unsafe {
                        let src = p.x.add((t0 + t) * p.x_stride * xsz);
                        if widen {
                            widen_bf16(src, xb.add(t * stride) as *mut f32, p.k);
                        } else {
                            std::ptr::copy_nonoverlapping(src, xb.add(t * stride), row_bytes);
                        }
                    }
                }
                (xb, stride)
            };
            for kb in 0..kblocks {
                let k0 = kb * kc;
                let kl = kc.min(p.k - k0);
                let (first, last) = (kb == 0, kb + 1 == kblocks);
                let mut o = rows.start;
                while o < rows.end {
                    let nr = m.rows.min(rows.end - o);
                    let h = head(o, k0).min(kl);
                    let bias = if last { bias_of(p, o, nr) } else { [0.0; MAX_R] };
                    // W rows PREFETCH_TILES tiles ahead on their way to the
                    // cache while this tile runs (the first tiles' at the
                    // start): without it, widening a tile and decode's
                    // single pass stalled on memory.
                    let ahead = |d: usize| (o + d * m.rows).min(rows.end)..(o + (d + 1) * m.rows).min(rows.end);
                    let from = if o == rows.start { 1 } else { PREFETCH_TILES };
                    let to = if kl * wsz <= PREFETCH_ROW_BYTES {
                        PREFETCH_TILES
                    } else {
                        0
                    };
                    for d in from..=to {
                        for r in ahead(d) {
                            prefetch_row(w_at(r, k0), kl * wsz, true);
                        }
                    }
                    // The tile's W rows: where they lie, or widened to
                    // f32 rows of `kl` here (once for all the block's tokens).
                    let (w, ws) = if widen {
                        let ws = kl.next_multiple_of(16);
                        wide.resize(nr * ws + LINE / 4, 0.0);
                        let base = wide.as_mut_ptr();
                        // SAFETY: aligned inside the buffer, nr rows of ws.
                        let wb = unsafe { base.add(base.align_offset(LINE)) };
                        for r in 0..nr {
                            // SAFETY: row o + r of W, elements k0 .. k0 + kl.
                            unsafe { widen_bf16(w_at(o + r, k0), wb.add(r * ws), kl) };
                        }
                        (wb as *const u8, ws * 4)
                    } else {
                        (w_at(o, k0), p.k * wsz)
                    };
                    // Several token tiles per W tile: the first of them
                    // hints the W tile after next into L2 as it goes, so
                    // that memory keeps streaming while the later token
                    // tiles compute on W rows already in cache. Without it
                    // the two alternate: 8 decode rows of the 1.4B shape
                    // cost 1.44-1.64x one row, with it 1.23-1.29x (next
                    // tile: 1.25-1.30x; `examples/batch_gemm_timing.rs`).
                    let pf = if !widen && kblocks == 1 && tb > m.tokens && o + 2 * nr < rows.end {
                        w_at(o + 2 * nr, 0)
                    } else {
                        std::ptr::null()
                    };
                    let mut t = 0;
                    while t < tb {
                        let nt = m.tokens.min(tb - t);
                        // SAFETY: rows o .. o + nr of W and t .. t + nt
                        // of the copy, elements k0 .. k0 + kl.
                        let tile = Tile {
                            w,
                            ws,
                            nr,
                            x: unsafe { xb.add(t * stride + k0 * csz) },
                            xs: stride,
                            nt,
                            k: kl,
                            head: h,
                            pf: if t == 0 { pf } else { std::ptr::null() },
                        };
                        unsafe { (m.tile)(&tile, &mut sums) };
                        for j in (0..nt).filter(|_| kblocks > 1) {
                            let part = &mut partial[(t + j) * nrows + o - rows.start..][..nr];
                            let s = &mut sums[j * MAX_R..][..nr];
                            match (first, last) {
                                (true, _) => part.copy_from_slice(s),
                                (false, false) => part.iter_mut().zip(s).for_each(|(p, s)| *p += *s),
                                (false, true) => s.iter_mut().zip(part).for_each(|(s, p)| *s += *p),
                            }
                        }
                        if last {
                            // SAFETY: outputs o .. o + nr of tokens t0 + t ..
                            unsafe { store_tile(p, &sums, &bias, o, nr, t0 + t, nt) };
                        }
                        t += nt;
                    }
                    o += nr;
                }
            }
            t0 += tb;
        }
    }
    XCOPY.set(copy);
    PARTIAL.set(partial);
    WIDE.set(wide);
}

/// The longest W row (bytes of one block of k) the driver prefetches:
/// on short rows (k = 512 in bf16) the prefetch sped the small shape's
/// decode by a tenth, on the 1.4B shape's 4 KiB rows it slowed decode by a
/// fifth (the hardware prefetcher already streams long rows).
const PREFETCH_ROW_BYTES: usize = 2048;

/// How many W tiles ahead of the one computing the driver prefetches.
const PREFETCH_TILES: usize = 2;

/// Ask for the `bytes` at `p` to be brought into L1 (`to_l1`) or only into
/// L2 (a hint: no effect on results, none on targets without one).
#[inline(always)]
pub(crate) fn prefetch_row(p: *const u8, bytes: usize, to_l1: bool) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(LINE) {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let a = p.wrapping_add(off) as *const i8;
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            if to_l1 {
                _mm_prefetch::<_MM_HINT_T0>(a)
            } else {
                _mm_prefetch::<_MM_HINT_T1>(a)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes, to_l1);
}

/// `n` bf16 values at `src` (u16 bits) as f32 at `dst` (exact).
///
/// # Safety
/// `src` holds `n` bf16, `dst` room for `n` f32; they do not overlap.
#[inline(always)]
unsafe fn widen_bf16(src: *const u8, dst: *mut f32, n: usize) {
    for i in 0..n {
        // SAFETY: i < n in both.
        unsafe {
            let h = (src as *const u16).add(i).read_unaligned();
            dst.add(i).write(f32::from_bits((h as u32) << 16));
        }
    }
}

/// [`drive`] compiled for AVX-512, so that its own loops (bias, rounding,
/// stores of each tile) use the same vector width as the micro-kernel.
///
/// # Safety
/// As [`drive`], on a CPU with AVX-512 F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn drive_avx512(p: &LinearArgs, rows: Range<usize>, m: &Micro, widen: bool) {
    unsafe { drive(p, rows, m, widen) }
}

/// Elements of k per block of [`drive_panel`]: a panel of `PANEL_R` rows
/// (32 KiB in f32) stays in L1 while the block's token tiles pass.
#[cfg(target_arch = "x86_64")]
const PANEL_KC: usize = 256;

/// bf16 x bf16 on AVX-512 F with many tokens, in outer-product form: x
/// rows widened to f32 once per token block; each tile of `PANEL_R` W
/// rows widened and transposed into a k-major f32 panel (16 x 16 vector
/// transposes); then per tile of `PANEL_T` tokens [`x86::outer`] keeps one
/// accumulator per (token, 16 rows): each lane one output, summed over k
/// in order with one fused multiply-add per element, no horizontal sums,
/// and a token's 32 outputs stored with one rounding pass. Blocks of k
/// keep f32 partial sums in the accumulators' layout. x is copied before
/// any y row of its block is written (in place).
///
/// # Safety
/// As [`drive`], bf16 activations and weights, on a CPU with AVX-512 F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn drive_panel(p: &LinearArgs, rows: Range<usize>) {
    use std::arch::x86_64::{__m512, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps};
    use x86::{PANEL_R, PANEL_T};
    debug_assert!(p.act == DType::BF16 && p.weight == DType::BF16);
    let mc = p.tokens.min(MAX_BLOCK_TOKENS);
    let stride = (p.k * 4).next_multiple_of(LINE) / 4;
    let kblocks = p.k.div_ceil(PANEL_KC).max(1);
    let kc = p.k.div_ceil(kblocks).next_multiple_of(16).min(p.k);
    let w_at = |o: usize, k0: usize| p.w.wrapping_add((o * p.k + k0) * 2);
    let tiles = rows.len().div_ceil(PANEL_R);
    let (mut xcopy, mut partial, mut panel) = (WIDE_X.take(), PARTIAL.take(), WIDE.take());
    xcopy.resize(mc * stride + LINE / 4, 0.0);
    panel.resize(kc * PANEL_R, 0.0);
    if kblocks > 1 {
        partial.resize(mc * tiles * PANEL_R, 0.0);
    }
    let mut t0 = 0;
    while t0 < p.tokens {
        let tb = mc.min(p.tokens - t0);
        for t in 0..tb {
            // SAFETY: row t0 + t of x (k bf16) into row t of the copy.
            unsafe {
                widen_bf16(
                    p.x.add((t0 + t) * p.x_stride * 2),
                    xcopy.as_mut_ptr().add(t * stride),
                    p.k,
                )
            };
        }
        for kb in 0..kblocks {
            let k0 = kb * kc;
            let kl = kc.min(p.k - k0);
            let (first, last) = (kb == 0, kb + 1 == kblocks);
            for tile in 0..tiles {
                let o = rows.start + tile * PANEL_R;
                let nr = PANEL_R.min(rows.end - o);
                if kl * 2 <= PREFETCH_ROW_BYTES {
                    for r in (o + nr).min(rows.end)..(o + nr + PANEL_R).min(rows.end) {
                        prefetch_row(w_at(r, k0), kl * 2, true);
                    }
                }
                // SAFETY: rows o .. o + nr of W from element k0; the panel
                // holds kc >= kl rows of PANEL_R.
                unsafe { x86::panel(w_at(o, k0), p.k * 2, nr, kl, panel.as_mut_ptr()) };
                let mut bias = [0f32; PANEL_R];
                if last && !p.bias.is_null() {
                    for (r, b) in bias[..nr].iter_mut().enumerate() {
                        // SAFETY: o + r < n bias elements.
                        *b = unsafe { load_elem(p.bias, o + r, true) };
                    }
                }
                let mut t = 0;
                while t < tb {
                    let nt = PANEL_T.min(tb - t);
                    let zero = _mm512_setzero_ps();
                    let mut acc: [[__m512; 2]; PANEL_T] = [[zero; 2]; PANEL_T];
                    // Partial sums of this tile's outputs: [token][tile][PANEL_R].
                    let part = |j: usize| ((t + j) * tiles + tile) * PANEL_R;
                    if !first {
                        for (j, a) in acc.iter_mut().enumerate().take(nt) {
                            // SAFETY: PANEL_R floats of the partial sums.
                            unsafe {
                                a[0] = _mm512_loadu_ps(partial.as_ptr().add(part(j)));
                                a[1] = _mm512_loadu_ps(partial.as_ptr().add(part(j) + 16));
                            }
                        }
                    }
                    // SAFETY: kl panel rows; nt x rows of the copy from k0.
                    unsafe {
                        x86::outer(
                            panel.as_ptr(),
                            xcopy.as_ptr().add(t * stride + k0),
                            stride,
                            nt,
                            kl,
                            &mut acc,
                        )
                    };
                    for (j, a) in acc.iter().enumerate().take(nt) {
                        if last {
                            // SAFETY: outputs o .. o + nr of token t0 + t + j.
                            unsafe {
                                let y = (p.y as *mut u16).add((t0 + t + j) * p.y_stride + o);
                                x86::store_bf16(a, &bias, nr, y);
                            }
                        } else {
                            // SAFETY: PANEL_R floats of the partial sums.
                            unsafe {
                                _mm512_storeu_ps(partial.as_mut_ptr().add(part(j)), a[0]);
                                _mm512_storeu_ps(partial.as_mut_ptr().add(part(j) + 16), a[1]);
                            }
                        }
                    }
                    t += nt;
                }
            }
        }
        t0 += tb;
    }
    WIDE_X.set(xcopy);
    PARTIAL.set(partial);
    WIDE.set(panel);
}

/// [`drive`] compiled for AVX2 + FMA.
///
/// # Safety
/// As [`drive`], on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn drive_avx2(p: &LinearArgs, rows: Range<usize>, m: &Micro, widen: bool) {
    unsafe { drive(p, rows, m, widen) }
}

/// Bias of outputs `o .. o + nr` (zero where there is none).
#[inline(always)]
fn bias_of(p: &LinearArgs, o: usize, nr: usize) -> [f32; MAX_R] {
    let mut bias = [0f32; MAX_R];
    if !p.bias.is_null() {
        for (r, b) in bias[..nr].iter_mut().enumerate() {
            // SAFETY: bias has n elements and o + r < n.
            *b = unsafe { load_elem(p.bias, o + r, p.weight == DType::BF16) };
        }
    }
    bias
}

/// Add the bias, round, and store a tile of sums (whole `MAX_R` rows
/// computed, branch-free, so that it vectorises; `nr` stored).
#[inline(always)]
unsafe fn store_tile(
    p: &LinearArgs,
    sums: &[f32; MAX_TILE],
    bias: &[f32; MAX_R],
    o: usize,
    nr: usize,
    t: usize,
    nt: usize,
) {
    let ysz = p.act.size_bytes();
    for (j, s) in sums.chunks_exact(MAX_R).take(nt).enumerate() {
        let mut v = [0f32; MAX_R];
        for r in 0..MAX_R {
            v[r] = s[r] + bias[r];
        }
        // SAFETY: row t + j of y, outputs o .. o + nr.
        let yr = unsafe { p.y.add(((t + j) * p.y_stride + o) * ysz) };
        // SAFETY: nr outputs of row t + j.
        unsafe {
            if p.act == DType::BF16 {
                store_first(&v.map(bf16_bits), yr as *mut u16, nr);
            } else {
                store_first(&v, yr as *mut f32, nr);
            }
        }
    }
}

/// The first `n` (at most `MAX_R`) of `v` to `dst` (unaligned), as moves
/// of a constant size: a copy of a run-time length of a few elements
/// compiles to a call of `memcpy`, which cost 7% of a prefill.
///
/// # Safety
/// `dst` has room for `n` elements.
#[inline(always)]
unsafe fn store_first<T: Copy>(v: &[T; MAX_R], dst: *mut T, n: usize) {
    #[inline(always)]
    unsafe fn first<T: Copy, const N: usize>(v: &[T; MAX_R], dst: *mut T) {
        // SAFETY: N <= MAX_R elements of v; the caller's room at dst.
        unsafe { (dst as *mut [T; N]).write_unaligned(*(v.as_ptr() as *const [T; N])) }
    }
    unsafe {
        match n {
            0 => {}
            1 => first::<T, 1>(v, dst),
            2 => first::<T, 2>(v, dst),
            3 => first::<T, 3>(v, dst),
            4 => first::<T, 4>(v, dst),
            5 => first::<T, 5>(v, dst),
            6 => first::<T, 6>(v, dst),
            7 => first::<T, 7>(v, dst),
            _ => first::<T, MAX_R>(v, dst),
        }
    }
}

/// Element `i` of an f32 or bf16 array, as f32.
#[inline(always)]
pub(crate) unsafe fn load_elem(p: *const u8, i: usize, bf16: bool) -> f32 {
    unsafe {
        if bf16 {
            f32::from_bits(((p as *const u16).add(i).read_unaligned() as u32) << 16)
        } else {
            (p as *const f32).add(i).read_unaligned()
        }
    }
}

/// The bits of `x` rounded to bf16, round-to-nearest-even, exactly as
/// `half::bf16::from_f32` (a NaN stays a NaN, made quiet). Branch-free:
/// adding `0x7fff` plus the lowest kept bit carries into the kept bits
/// exactly when the dropped half is above the tie, or at the tie with an
/// odd kept part (a data-dependent branch here costs a mispredict for every
/// other output).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x0040;
    (if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

// ---------------------------------------------------------------- scalar

const SCALAR_R: usize = 2;
const SCALAR_T: usize = 2;
/// Lanes of the portable kernel's partial sums (a shape LLVM can keep in
/// SIMD registers without reassociating anything itself).
const LANES: usize = 8;

fn scalar_micro(xb: bool, wb: bool) -> Micro {
    let tile: TileFn = match (xb, wb) {
        (false, false) => scalar_tile::<false, false>,
        (false, true) => scalar_tile::<false, true>,
        (true, false) => scalar_tile::<true, false>,
        (true, true) => scalar_tile::<true, true>,
    };
    Micro {
        rows: SCALAR_R,
        tokens: SCALAR_T,
        align: false,
        tile,
    }
}

unsafe fn scalar_tile<const XB: bool, const WB: bool>(tile: &Tile, out: &mut [f32; MAX_TILE]) {
    let Tile {
        w,
        ws,
        nr,
        x,
        xs,
        nt,
        k,
        head,
        ..
    } = *tile;
    // The portable kernel reads W where it lies: any head is fine.
    debug_assert!(head <= k);
    for r in 0..nr {
        // SAFETY: row r < nr of the tile, k elements.
        let wr = unsafe { w.add(r * ws) };
        for t in 0..nt {
            let xr = unsafe { x.add(t * xs) };
            let mut acc = [0f32; LANES];
            let full = k / LANES * LANES;
            let mut i = 0;
            while i < full {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += unsafe { load_elem(xr, i + l, XB) * load_elem(wr, i + l, WB) };
                }
                i += LANES;
            }
            let mut s = 0f32;
            for a in acc {
                s += a;
            }
            for i in full..k {
                s += unsafe { load_elem(xr, i, XB) * load_elem(wr, i, WB) };
            }
            out[t * MAX_R + r] = s;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod panel_tests {
    use super::*;

    /// The vector 16 x 16 transposes lay W rows out k-major, element for
    /// element, for row and element counts that are and are not whole blocks.
    #[test]
    fn panel_is_the_transposed_tile() {
        if !has_avx512() {
            return;
        }
        let (n, k) = (40, 70);
        let w: Vec<u16> = (0..n * k).map(|i| bf16_bits(i as f32 * 0.25 - 100.0)).collect();
        for (nr, kl) in [(32, 64), (17, 70), (1, 5), (32, 16), (5, 33)] {
            let mut panel = vec![f32::NAN; kl * x86::PANEL_R];
            // SAFETY: rows of k bf16; the panel holds kl rows of PANEL_R.
            unsafe { x86::panel(w.as_ptr() as *const u8, k * 2, nr, kl, panel.as_mut_ptr()) };
            for i in 0..kl {
                for r in 0..x86::PANEL_R {
                    let want = if r < nr {
                        f32::from_bits((w[r * k + i] as u32) << 16)
                    } else {
                        0.0
                    };
                    assert_eq!(
                        panel[i * x86::PANEL_R + r].to_bits(),
                        want.to_bits(),
                        "nr {nr} kl {kl} row {r} element {i}"
                    );
                }
            }
        }
    }
}
