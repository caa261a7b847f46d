//! The quantised `Linear` (`q8_0`, `q4_0`): the arithmetic of
//! `ouroc_kernels::quant` (its module docs are the contract) on 8-bit
//! integer units, reading the interleaved tiles as they are stored.
//!
//! Both entries quantise the activations per block of 32 on the fly, a warp
//! per block and a lane per value ([`quantise_lane`]: `amax` by
//! `redux.sync.max.u32` on the magnitudes' bits, `d = amax / 127` by
//! `div.rn`, `1 / d` by `rcp.rn`, `cvt.rni`): the reference's bits. Each
//! block's integer dot product is exact, and each output adds
//! `(d_w * d_x) * isum` block after block in order, starting from +0.0,
//! then the bias, then one rounding: the reference's order, so both entries
//! return the reference's bits (the tests check it bit for bit).
//!
//! - `gemv` (`T < GEMM_MIN_TOKENS`; grid (T, tiles), block 128): the
//!   token's row quantised into shared memory (quants, scales, quant sums);
//!   then each lane a (row r of the tile, block) pair: the stored unsigned
//!   quants against the activation quants by `dp4a.u32.s32` (q8_0: 8 words
//!   of a block's row, 4 weights each; q4_0: 4 words, low and high nibbles
//!   masked), minus the format's offset times the block's quant sum. The
//!   16 blocks of a pass leave their f32 terms in shared memory (double
//!   buffered, one barrier per pass) and 16 threads, one per row, add them
//!   in block order.
//! - `gemm` (`T >= GEMM_MIN_TOKENS`; grid (ceil(n / 128), ceil(T / 64)),
//!   block 256, 8 warps of 32 x 32): per block of k the CTA quantises its
//!   64 rows into shared memory (double buffered), and each warp runs
//!   `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32` (one k32 step is
//!   exactly one quant block, so each result is that block's `isum`). The
//!   layout's words are the B fragments as they are (4 consecutive weights
//!   of one row per word; q4_0's low and high nibbles are k and k + 16),
//!   read from global memory and made signed in registers (q8_0: `xor
//!   0x80` per byte; q4_0: `(u + 0x78) xor 0x80` per byte).

use super::asm::{Body, Kind, Reg, f32_imm, ins, size};
use super::linear::GEMM_MIN_TOKENS;
use super::simple::act_row;
use super::{Dim, Emitted, Launch, When};
use ouroc_ir::DType;
use ouroc_kernels::quant::{self, BLOCK, QuantFormat, TILE};
use ouroc_kernels::spec::LinearSpec;

const GEMV_WARPS: u32 = 4;
/// Blocks of k each GEMV lane handles per pass (the pass covers
/// `2 * GEMV_WARPS * GEMV_UNROLL` blocks: two half-warps per warp).
const GEMV_UNROLL: u32 = 2;
const PASS_BLOCKS: u32 = 2 * GEMV_WARPS * GEMV_UNROLL;

pub(crate) fn emit(act: DType, l: &LinearSpec, format: QuantFormat) -> Vec<Emitted> {
    vec![gemv(act, l, format), gemm(act, l, format)]
}

/// Sizes of a spec's layout: (blocks, bytes per block, quant bytes per block, bytes per tile, tiles).
fn layout(l: &LinearSpec, format: QuantFormat) -> (u32, u32, u32, u32, u32) {
    let nb = quant::blocks(l.k) as u32;
    let bb = quant::block_bytes(format) as u32;
    let qb = (TILE * format.quant_bytes()) as u32;
    (
        nb,
        bb,
        qb,
        quant::tile_bytes(format, l.k) as u32,
        quant::tiles(l.n) as u32,
    )
}

/// Warp-wide, a lane per value of one block of 32 (`x`, 0.0 past k): the
/// lane's quant (s32) and the block's scale, as `quant::quantise_acts`.
/// `amax` is the largest magnitude's bits (`redux.sync.max.u32`: magnitudes
/// order like their bits, and a NaN's lie above +inf, so a NaN in the block
/// makes `amax` and `d` NaN, as the reference's). `1 / d` where
/// `0 < d < inf`, else 0; `cvt.rni` turns NaN into 0 as Rust's `as` does.
fn quantise_lane(b: &mut Body, x: Reg) -> (Reg, Reg) {
    let bits = b.def(Kind::R, "mov.b32", &[&x]);
    let mag = b.def(Kind::R, "and.b32", &[&bits, &0x7fff_ffffu32]);
    let amax = b.def(Kind::R, "redux.sync.max.u32", &[&mag, &"-1"]);
    let amax = b.def(Kind::F, "mov.b32", &[&amax]);
    let d = b.def(Kind::F, "div.rn.f32", &[&amax, &f32_imm(127.0)]);
    let pos = b.def(Kind::Pred, "setp.gt.f32", &[&d, &f32_imm(0.0)]);
    let fin = b.def(Kind::Pred, "setp.lt.f32", &[&d, &f32_imm(f32::INFINITY)]);
    ins!(b, "and.pred {pos}, {pos}, {fin}");
    let r = b.def(Kind::F, "rcp.rn.f32", &[&d]);
    let id = b.def(Kind::F, "selp.f32", &[&r, &f32_imm(0.0), &pos]);
    let v = b.def(Kind::F, "mul.rn.f32", &[&x, &id]);
    let q = b.def(Kind::R, "cvt.rni.s32.f32", &[&v]);
    let q = b.def(Kind::R, "max.s32", &[&q, &-127]);
    let q = b.def(Kind::R, "min.s32", &[&q, &127]);
    (q, d)
}

/// A CTA per (token, tile of 16 rows); see the module docs.
fn gemv(act: DType, l: &LinearSpec, format: QuantFormat) -> Emitted {
    let mut b = Body::default();
    let (n, k) = (l.n as u32, l.k as u32);
    let (nb, _, qb, tb, _) = layout(l, format);
    let asz = size(act);
    let block = 32 * GEMV_WARPS;
    // Shared: quants (32 bytes per block), scales (f32), quant sums (s32),
    // then two buffers of a pass's terms (PASS_BLOCKS x 16 f32).
    let (xd_off, xs_off) = (nb * 32, nb * 36);
    let terms_off = (nb * 40).next_multiple_of(16);
    let buf_bytes = PASS_BLOCKS * TILE as u32 * 4;
    let t = b.mov_u32(&"%ctaid.x");
    let tile = b.mov_u32(&"%ctaid.y");
    let tid = b.mov_u32(&"%tid.x");
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let x = act_row(&mut b, "x", t, act);
    let y = act_row(&mut b, "y", t, act);
    let w = b.param_ptr("w");
    let smem = b.mov_u32(&"ouroc_smem");

    b.comment("quantise the x row per block of 32 into shared memory: a warp per block, a lane per value");
    let first = b.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);
    b.for_range(warp, &nb, &GEMV_WARPS, |b, blk| {
        let i = b.def(Kind::R, "mad.lo.u32", &[&blk, &(BLOCK as u32), &lane]);
        let ok = b.def(Kind::Pred, "setp.lt.u32", &[&i, &k]);
        let a = b.addr(x, &i, asz);
        let v = b.load_if(ok, act, a, 0, true);
        let (q, d) = quantise_lane(b, v);
        let sum = b.def(Kind::R, "redux.sync.add.s32", &[&q, &"-1"]);
        let qa = b.def(Kind::R, "add.u32", &[&i, &smem]);
        ins!(b, "st.shared.b8 [{qa}], {q}");
        let da = b.def(Kind::R, "mad.lo.u32", &[&blk, &4, &smem]);
        ins!(b, "@{first} st.shared.f32 [{da}+{xd_off}], {d}");
        ins!(b, "@{first} st.shared.u32 [{da}+{xs_off}], {sum}");
    });
    ins!(b, "bar.sync 0");

    b.comment(&format!(
        "lane: row r = lane % 16 of the tile, blocks b0 + slot (+ {}) of each pass of {PASS_BLOCKS}",
        2 * GEMV_WARPS
    ));
    let r = b.def(Kind::R, "and.b32", &[&lane, &15]);
    let h = b.def(Kind::R, "shr.u32", &[&lane, &4]);
    let slot = b.def(Kind::R, "mad.lo.u32", &[&warp, &2, &h]);
    let tile_base = b.addr(w, &tile, tb);
    let r4 = b.def(Kind::R, "shl.b32", &[&r, &2]);
    let qbase = b.def(Kind::D, "mad.wide.u32", &[&r4, &1, &tile_base]);
    let r2 = b.def(Kind::R, "shl.b32", &[&r, &1]);
    let r2 = b.def(Kind::R, "add.u32", &[&r2, &qb]);
    let sbase = b.def(Kind::D, "mad.wide.u32", &[&r2, &1, &tile_base]);
    // This lane's term slots in the first buffer.
    let tslot = b.def(Kind::R, "mad.lo.u32", &[&slot, &(TILE as u32 * 4), &r4]);
    let tslot = b.def(Kind::R, "add.u32", &[&tslot, &smem]);
    let adder = b.def(Kind::Pred, "setp.lt.u32", &[&tid, &(TILE as u32)]);
    let rsum = b.def(Kind::R, "mad.lo.u32", &[&tid, &4, &smem]);
    let acc = b.mov_f32(0.0);
    let buf = b.mov_u32(&terms_off);
    let zero = b.mov_u32(&0);
    b.for_range(zero, &nb, &PASS_BLOCKS, |b, b0| {
        for u in 0..GEMV_UNROLL {
            let mut blk = b.def(Kind::R, "add.u32", &[&b0, &slot]);
            if u > 0 {
                blk = b.def(Kind::R, "add.u32", &[&blk, &(u * 2 * GEMV_WARPS)]);
            }
            // Past the last block: read the last one (in bounds), add +0.0
            // (the sum starts at +0.0 and never becomes -0.0, so adding +0.0
            // leaves it unchanged).
            let valid = b.def(Kind::Pred, "setp.lt.u32", &[&blk, &nb]);
            let blk = b.def(Kind::R, "min.u32", &[&blk, &(nb - 1)]);
            let term = gemv_block(b, format, blk, qbase, sbase, smem, [xd_off, xs_off]);
            let term = b.def(Kind::F, "selp.f32", &[&term, &f32_imm(0.0), &valid]);
            let ta = b.def(Kind::R, "add.u32", &[&tslot, &buf]);
            ins!(
                b,
                "st.shared.f32 [{ta}+{}], {term}",
                u * 2 * GEMV_WARPS * TILE as u32 * 4
            );
        }
        ins!(b, "bar.sync 0");
        b.comment("16 threads, one per row, add the pass's terms in block order");
        b.skip_if_not(adder, |b| {
            let ra = b.def(Kind::R, "add.u32", &[&rsum, &buf]);
            for j in 0..PASS_BLOCKS {
                let v = b.def(Kind::F, "ld.shared.f32", &[&format!("[{ra}+{}]", j * TILE as u32 * 4)]);
                ins!(b, "add.rn.f32 {acc}, {acc}, {v}");
            }
        });
        // The other buffer next: a thread writes it again only after the
        // next barrier, which the adders reach after reading this one.
        ins!(b, "xor.b32 {buf}, {buf}, {}", terms_off ^ (terms_off + buf_bytes));
    });
    b.skip_if_not(adder, |b| {
        let row = b.def(Kind::R, "mad.lo.u32", &[&tile, &(TILE as u32), &tid]);
        let ok = b.def(Kind::Pred, "setp.lt.u32", &[&row, &n]);
        let v = match l.bias.then(|| b.param_ptr("b")) {
            Some(bp) => {
                let rc = b.def(Kind::R, "min.u32", &[&row, &(n - 1)]);
                let ba = b.addr(bp, &rc, size(l.weight));
                let bv = b.load(l.weight, ba, 0, true);
                b.def(Kind::F, "add.rn.f32", &[&acc, &bv])
            }
            None => acc,
        };
        let ya = b.addr(y, &row, asz);
        b.store(act, ya, 0, v, Some(ok));
    });
    let launch = Launch {
        grid: [
            Dim::Tokens { per: 1 },
            Dim::Fixed(quant::tiles(l.n) as u32),
            Dim::Fixed(1),
        ],
        block,
        shared_bytes: terms_off + 2 * buf_bytes,
    };
    Emitted::new("gemv", When::TokensBelow(GEMM_MIN_TOKENS), launch, b)
}

/// One lane's term of block `blk` (row r of the tile): `(d_w * d_x) * isum`.
/// `qbase` / `sbase`: the tile's first block at the lane's row quants / scale.
fn gemv_block(b: &mut Body, format: QuantFormat, blk: Reg, qbase: Reg, sbase: Reg, smem: Reg, offs: [u32; 2]) -> Reg {
    let bb = quant::block_bytes(format) as u32;
    let qa = b.def(Kind::D, "mad.wide.u32", &[&blk, &bb, &qbase]);
    let xa = b.def(Kind::R, "mad.lo.u32", &[&blk, &(BLOCK as u32), &smem]);
    let xw: Vec<Reg> = (0..2)
        .flat_map(|i| {
            let v = [b.r(), b.r(), b.r(), b.r()];
            ins!(
                b,
                "ld.shared.v4.u32 {{{}, {}, {}, {}}}, [{xa}+{}]",
                v[0],
                v[1],
                v[2],
                v[3],
                16 * i
            );
            v
        })
        .collect();
    let isum = b.mov_u32(&0);
    match format {
        QuantFormat::Q8_0 => {
            // Run g: weights 4g..4g+3 of the row, stored q + 128.
            for (g, xv) in xw.iter().enumerate() {
                let wv = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{qa}+{}]", 64 * g)]);
                ins!(b, "dp4a.u32.s32 {isum}, {wv}, {xv}, {isum}");
            }
        }
        QuantFormat::Q4_0 => {
            // Run p: low nibbles weights 4p..4p+3, high nibbles 16 + 4p.., stored q + 8.
            for p in 0..4 {
                let wv = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{qa}+{}]", 64 * p)]);
                let lo = b.def(Kind::R, "and.b32", &[&wv, &0x0f0f_0f0fu32]);
                let hi = b.def(Kind::R, "shr.u32", &[&wv, &4]);
                let hi = b.def(Kind::R, "and.b32", &[&hi, &0x0f0f_0f0fu32]);
                ins!(b, "dp4a.u32.s32 {isum}, {lo}, {}, {isum}", xw[p]);
                ins!(b, "dp4a.u32.s32 {isum}, {hi}, {}, {isum}", xw[4 + p]);
            }
        }
    }
    let sa = b.def(Kind::R, "mad.lo.u32", &[&blk, &4, &smem]);
    let xsum = b.def(Kind::R, "ld.shared.u32", &[&format!("[{sa}+{}]", offs[1])]);
    let isum = b.def(Kind::R, "mad.lo.s32", &[&xsum, &-format.offset(), &isum]);
    let dx = b.def(Kind::F, "ld.shared.f32", &[&format!("[{sa}+{}]", offs[0])]);
    let wa = b.def(Kind::D, "mad.wide.u32", &[&blk, &bb, &sbase]);
    let hw = b.def(Kind::H, "ld.global.nc.b16", &[&format!("[{wa}]")]);
    let dw = b.def(Kind::F, "cvt.f32.f16", &[&hw]);
    scaled_term(b, dw, dx, isum)
}

/// `(d_w * d_x) * isum` (two f32 products, as the reference).
fn scaled_term(b: &mut Body, dw: Reg, dx: Reg, isum: Reg) -> Reg {
    let s = b.def(Kind::F, "mul.rn.f32", &[&dw, &dx]);
    let f = b.def(Kind::F, "cvt.rn.f32.s32", &[&isum]);
    b.def(Kind::F, "mul.rn.f32", &[&s, &f])
}

const BM: u32 = 64;
const BN: u32 = 128;
const GEMM_THREADS: u32 = 256;
/// Bytes per quantised activation row in shared memory: 32 quants padded
/// to 48, so the 8 rows x 4 words of an A fragment load hit 32 distinct banks.
const XQ_PITCH: u32 = 48;
/// One buffer: the 64 rows' quants, then their scales.
const XBUF: u32 = BM * XQ_PITCH + BM * 4;

/// Tensor-core GEMM on int8 `mma.m16n8k32`; see the module docs.
fn gemm(act: DType, l: &LinearSpec, format: QuantFormat) -> Emitted {
    let mut b = Body::default();
    let (n, k) = (l.n as u32, l.k as u32);
    let (nb, bb, qb, tb, tiles) = layout(l, format);
    let asz = size(act);
    let tid = b.mov_u32(&"%tid.x");
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let wm = b.def(Kind::R, "shr.u32", &[&warp, &2]);
    let wn = b.def(Kind::R, "and.b32", &[&warp, &3]);
    let g = b.def(Kind::R, "shr.u32", &[&lane, &2]);
    let t4 = b.def(Kind::R, "and.b32", &[&lane, &3]);
    let bx = b.mov_u32(&"%ctaid.x");
    let by = b.mov_u32(&"%ctaid.y");
    let n0 = b.def(Kind::R, "mul.lo.u32", &[&bx, &BN]);
    let m0 = b.def(Kind::R, "mul.lo.u32", &[&by, &BM]);
    let m = b.param_u32("tokens");
    let x = b.param_ptr("x");
    let xs = b.param_u32("x_stride");
    let w = b.param_ptr("w");
    let smem = b.mov_u32(&"ouroc_smem");

    b.comment("quantiser: warp w quantises rows 8w..8w+7 of the CTA's 64, a lane per value");
    let xpitch = b.def(Kind::R, "mul.lo.u32", &[&xs, &asz]);
    let qrow0 = b.def(Kind::R, "shl.b32", &[&warp, &3]);
    let rows: Vec<(Reg, Reg)> = (0..8u32)
        .map(|j| {
            let rr = b.def(Kind::R, "add.u32", &[&qrow0, &j]);
            let row = b.def(Kind::R, "add.u32", &[&rr, &m0]);
            let ok = b.def(Kind::Pred, "setp.lt.u32", &[&row, &m]);
            let xa = b.def(Kind::D, "mad.wide.u32", &[&row, &xpitch, &x]);
            let xa = b.def(Kind::D, "selp.b64", &[&xa, &x, &ok]);
            (xa, ok)
        })
        .collect();
    // Shared addresses of the quantiser's first row: quant (+ lane), scale.
    let qdst = b.def(Kind::R, "mad.lo.u32", &[&qrow0, &XQ_PITCH, &lane]);
    let qdst = b.def(Kind::R, "add.u32", &[&qdst, &smem]);
    let ddst = b.def(Kind::R, "mad.lo.u32", &[&qrow0, &4, &smem]);
    let first = b.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);

    b.comment("B fragments: n8 tile j of the warp is rows 8 (j % 2) + g of tile (n0 + 32 wn) / 16 + j / 2");
    let tile0 = b.def(Kind::R, "mad.lo.u32", &[&wn, &32, &n0]);
    let tile0 = b.def(Kind::R, "shr.u32", &[&tile0, &4]);
    let run = b.def(Kind::R, "shl.b32", &[&t4, &6]);
    let frag: Vec<(Reg, Reg)> = (0..4u32)
        .map(|j| {
            // Tiles past the matrix (n not a multiple of 128) read the last
            // one: in bounds, and their columns are never stored.
            let t = b.def(Kind::R, "add.u32", &[&tile0, &(j / 2)]);
            let t = b.def(Kind::R, "min.u32", &[&t, &(tiles - 1)]);
            let base = b.addr(w, &t, tb);
            let r = b.def(Kind::R, "add.u32", &[&g, &(8 * (j % 2))]);
            let qo = b.def(Kind::R, "mad.lo.u32", &[&r, &4, &run]);
            let qa = b.def(Kind::D, "mad.wide.u32", &[&qo, &1, &base]);
            // Scales of columns 2 t4, 2 t4 + 1: rows 8 (j % 2) + 2 t4 + {0, 1}.
            let so = b.def(Kind::R, "mad.lo.u32", &[&t4, &4, &(qb + 16 * (j % 2))]);
            let sa = b.def(Kind::D, "mad.wide.u32", &[&so, &1, &base]);
            (qa, sa)
        })
        .collect();
    b.comment("A fragments: rows 32 wm + 16 mt + g (+ 8), bytes 4 t4 (+ 16)");
    let arow = b.def(Kind::R, "mad.lo.u32", &[&wm, &32, &g]);
    let aoff = b.def(Kind::R, "mad.lo.u32", &[&arow, &XQ_PITCH, &smem]);
    let aoff = b.def(Kind::R, "mad.lo.u32", &[&t4, &4, &aoff]);
    let doff = b.def(Kind::R, "mad.lo.u32", &[&arow, &4, &smem]);
    let zero = b.mov_u32(&0);
    let acc: Vec<Reg> = (0..32).map(|_| b.mov_f32(0.0)).collect();
    let buf = b.mov_u32(&0);

    let kb0 = b.mov_u32(&0);
    b.for_range(kb0, &nb, &1, |b, kb| {
        b.comment("this block's B fragments and scales (issued first: global latency)");
        let koff = b.def(Kind::D, "mul.wide.u32", &[&kb, &bb]);
        let mut bfrag = Vec::new();
        let mut dws = Vec::new();
        for (qa, sa) in &frag {
            let qa = b.def(Kind::D, "add.u64", &[qa, &koff]);
            let words = match format {
                QuantFormat::Q8_0 => [0, 256].map(|o| {
                    // Runs t4 and 4 + t4: k 4 t4.. and 16 + 4 t4..; q + 128 -> q.
                    let wv = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{qa}+{o}]")]);
                    b.def(Kind::R, "xor.b32", &[&wv, &0x8080_8080u32])
                }),
                QuantFormat::Q4_0 => {
                    let wv = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{qa}]")]);
                    let hi = b.def(Kind::R, "shr.u32", &[&wv, &4]);
                    [wv, hi].map(|v| {
                        // Nibble u -> u - 8 as a byte: u + 0x78 stays in its
                        // byte, and xor 0x80 subtracts 128 modulo 256.
                        let v = b.def(Kind::R, "and.b32", &[&v, &0x0f0f_0f0fu32]);
                        let v = b.def(Kind::R, "add.u32", &[&v, &0x7878_7878u32]);
                        b.def(Kind::R, "xor.b32", &[&v, &0x8080_8080u32])
                    })
                }
            };
            bfrag.push(words);
            let sa = b.def(Kind::D, "add.u64", &[sa, &koff]);
            let sw = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{sa}]")]);
            let (h0, h1) = (b.reg(Kind::H), b.reg(Kind::H));
            ins!(b, "mov.b32 {{{h0}, {h1}}}, {sw}");
            dws.push([h0, h1].map(|h| b.def(Kind::F, "cvt.f32.f16", &[&h])));
        }
        b.comment("quantise the 64 rows' block kb into the buffer");
        let ki = b.def(Kind::R, "mad.lo.u32", &[&kb, &(BLOCK as u32), &lane]);
        let kok = b.def(Kind::Pred, "setp.lt.u32", &[&ki, &k]);
        let kbytes = b.def(Kind::D, "mul.wide.u32", &[&ki, &asz]);
        let qd = b.def(Kind::R, "add.u32", &[&qdst, &buf]);
        let dd = b.def(Kind::R, "add.u32", &[&ddst, &buf]);
        for (j, (xa, ok)) in rows.iter().enumerate() {
            let p = b.def(Kind::Pred, "and.pred", &[ok, &kok]);
            let a = b.def(Kind::D, "add.u64", &[xa, &kbytes]);
            let v = b.load_if(p, act, a, 0, true);
            let (q, d) = quantise_lane(b, v);
            ins!(b, "st.shared.b8 [{qd}+{}], {q}", j as u32 * XQ_PITCH);
            ins!(b, "@{first} st.shared.f32 [{dd}+{}], {d}", BM * XQ_PITCH + j as u32 * 4);
        }
        ins!(b, "bar.sync 0");
        b.comment("2 x 4 mma.m16n8k32 (one quant block each), each result scaled and added in block order");
        let aa = b.def(Kind::R, "add.u32", &[&aoff, &buf]);
        let da = b.def(Kind::R, "add.u32", &[&doff, &buf]);
        for mt in 0..2u32 {
            let a = [0, 8 * XQ_PITCH, 16, 8 * XQ_PITCH + 16]
                .map(|o| b.def(Kind::R, "ld.shared.u32", &[&format!("[{aa}+{}]", 16 * mt * XQ_PITCH + o)]));
            let dx = [0, 8].map(|o| {
                b.def(
                    Kind::F,
                    "ld.shared.f32",
                    &[&format!("[{da}+{}]", BM * XQ_PITCH + 4 * (16 * mt + o))],
                )
            });
            for (nt, (bf, dw)) in bfrag.iter().zip(&dws).enumerate() {
                let s = [b.r(), b.r(), b.r(), b.r()];
                ins!(
                    b,
                    "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {{{}, {}, {}, {}}}, {{{}, {}, {}, {}}}, {{{}, {}}}, {{{zero}, {zero}, {zero}, {zero}}}",
                    s[0],
                    s[1],
                    s[2],
                    s[3],
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    bf[0],
                    bf[1]
                );
                for (e, isum) in s.iter().enumerate() {
                    let term = scaled_term(b, dw[e & 1], dx[e >> 1], *isum);
                    let c = &acc[(mt as usize * 4 + nt) * 4 + e];
                    ins!(b, "add.rn.f32 {c}, {c}, {term}");
                }
            }
        }
        // The other buffer next: a warp writes this one again only after the
        // next barrier, which every warp reaches after reading it.
        ins!(b, "xor.b32 {buf}, {buf}, {XBUF}");
    });

    b.comment("epilogue: c0, c1 at (g, 2 t4 + {0, 1}), c2, c3 at row g + 8; + bias, rounded once");
    let y = b.param_ptr("y");
    let ys = b.param_u32("y_stride");
    let ypitch = b.def(Kind::R, "mul.lo.u32", &[&ys, &asz]);
    let row0 = b.def(Kind::R, "add.u32", &[&m0, &arow]);
    let col0 = b.def(Kind::R, "mad.lo.u32", &[&wn, &32, &n0]);
    let col0 = b.def(Kind::R, "mad.lo.u32", &[&t4, &2, &col0]);
    let bias = l.bias.then(|| b.param_ptr("b"));
    let cols: Vec<(Reg, Reg, Option<Reg>)> = (0..8u32)
        .map(|c| {
            let col = b.def(Kind::R, "add.u32", &[&col0, &(8 * (c / 2) + c % 2)]);
            let ok = b.def(Kind::Pred, "setp.lt.u32", &[&col, &n]);
            let bv = bias.map(|bp| {
                let cc = b.def(Kind::R, "min.u32", &[&col, &(n - 1)]);
                let ba = b.addr(bp, &cc, size(l.weight));
                b.load(l.weight, ba, 0, true)
            });
            (col, ok, bv)
        })
        .collect();
    for mt in 0..2u32 {
        for half in 0..2u32 {
            let row = b.def(Kind::R, "add.u32", &[&row0, &(16 * mt + 8 * half)]);
            let rok = b.def(Kind::Pred, "setp.lt.u32", &[&row, &m]);
            let yrow = b.def(Kind::D, "mad.wide.u32", &[&row, &ypitch, &y]);
            for nt in 0..4u32 {
                for e in 0..2u32 {
                    let (col, cok, bv) = cols[(2 * nt + e) as usize];
                    let v = acc[((mt * 4 + nt) * 4 + 2 * half + e) as usize];
                    let v = match bv {
                        Some(bv) => b.def(Kind::F, "add.rn.f32", &[&v, &bv]),
                        None => v,
                    };
                    let ok = b.def(Kind::Pred, "and.pred", &[&rok, &cok]);
                    let ya = b.addr(yrow, &col, asz);
                    b.store(act, ya, 0, v, Some(ok));
                }
            }
        }
    }
    let launch = Launch {
        grid: [Dim::Fixed(n.div_ceil(BN)), Dim::Tokens { per: BM }, Dim::Fixed(1)],
        block: GEMM_THREADS,
        shared_bytes: 2 * XBUF,
    };
    Emitted::new("gemm", When::TokensAtLeast(GEMM_MIN_TOKENS), launch, b)
}
