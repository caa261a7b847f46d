//! `Linear`: GEMV for decode (few tokens), GEMM on bf16 tensor cores for
//! prefill. See the module docs of [`super`] for the tiling.

use super::asm::{Body, Kind, Reg, ins, size};
use super::simple::act_row;
use super::{Dim, Emitted, Launch, When};
use ouroc_ir::DType;
use ouroc_kernels::spec::LinearSpec;

/// Calls with at least this many tokens use the tensor-core GEMM (when the
/// spec allows it), fewer the GEMV.
pub const GEMM_MIN_TOKENS: u32 = 16;

const GEMV_WARPS: u32 = 4;
const GEMV_ROWS: u32 = 4;

pub(crate) fn emit(act: DType, l: &LinearSpec) -> Vec<Emitted> {
    let tensor_cores = act == DType::BF16 && l.weight == DType::BF16 && l.k.is_multiple_of(8) && l.n.is_multiple_of(2);
    if tensor_cores {
        vec![gemv(act, l, When::TokensBelow(GEMM_MIN_TOKENS)), gemm(l)]
    } else {
        vec![gemv(act, l, When::Always)]
    }
}

/// A CTA per (token, 16 output rows): x staged in shared memory as f32,
/// each warp 4 rows of W with 128-bit loads, a butterfly sum, bias, rounding.
fn gemv(act: DType, l: &LinearSpec, when: When) -> Emitted {
    let mut b = Body::default();
    let (n, k) = (l.n as u32, l.k as u32);
    let (asz, wsz) = (size(act), size(l.weight));
    let vec = if (k * wsz).is_multiple_of(16) { 16 / wsz } else { 1 };
    let block = 32 * GEMV_WARPS;
    let t = b.mov_u32(&"%ctaid.x");
    let rb = b.mov_u32(&"%ctaid.y");
    let tid = b.mov_u32(&"%tid.x");
    let x = act_row(&mut b, "x", t, act);
    let y = act_row(&mut b, "y", t, act);
    let w = b.param_ptr("w");
    let smem = b.mov_u32(&"ouroc_smem");
    b.comment("stage the x row in shared memory as f32");
    b.for_range(tid, &k, &block, |b, i| {
        let a = b.addr(x, &i, asz);
        let v = b.load(act, a, 0, true);
        let s = b.def(Kind::R, "mad.lo.u32", &[&i, &4, &smem]);
        ins!(b, "st.shared.f32 [{s}], {v}");
    });
    ins!(b, "bar.sync 0");
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let row0 = b.def(Kind::R, "mul.lo.u32", &[&rb, &(GEMV_WARPS * GEMV_ROWS)]);
    let row0 = b.def(Kind::R, "mad.lo.u32", &[&warp, &GEMV_ROWS, &row0]);
    // Rows past n read row n - 1 (in bounds) and are not stored.
    let rows: Vec<Reg> = (0..GEMV_ROWS)
        .map(|r| {
            let i = b.def(Kind::R, "add.u32", &[&row0, &r]);
            b.def(Kind::R, "min.u32", &[&i, &(n - 1)])
        })
        .collect();
    let wrows: Vec<Reg> = rows.iter().map(|r| b.addr(w, r, k * wsz)).collect();
    let acc: Vec<Reg> = (0..GEMV_ROWS).map(|_| b.mov_f32(0.0)).collect();
    let c0 = b.def(Kind::R, "mul.lo.u32", &[&lane, &vec]);
    b.comment(&format!("{vec} elements of k per lane and step, {GEMV_ROWS} rows"));
    b.for_range(c0, &k, &(32 * vec), |b, c| {
        let sa = b.def(Kind::R, "mad.lo.u32", &[&c, &4, &smem]);
        let xs: Vec<Reg> = if vec >= 4 {
            (0..vec / 4)
                .flat_map(|q| {
                    let v = [b.f(), b.f(), b.f(), b.f()];
                    ins!(
                        b,
                        "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{sa}+{}]",
                        v[0],
                        v[1],
                        v[2],
                        v[3],
                        16 * q
                    );
                    v
                })
                .collect()
        } else {
            vec![b.def(Kind::F, "ld.shared.f32", &[&format!("[{sa}]")])]
        };
        for (wr, a) in wrows.iter().zip(&acc) {
            let wa = b.addr(*wr, &c, wsz);
            let ws = if vec > 1 {
                let words = b.load_v4(".global.nc", wa, 0);
                b.widen(l.weight, &words)
            } else {
                vec![b.load(l.weight, wa, 0, true)]
            };
            for (wv, xv) in ws.iter().zip(&xs) {
                ins!(b, "fma.rn.f32 {a}, {wv}, {xv}, {a}");
            }
        }
    });
    let sums = b.warp_reduce(super::asm::Red::Sum, &acc);
    let first = b.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);
    let bias = l.bias.then(|| b.param_ptr("b"));
    for (r, s) in sums.iter().enumerate() {
        let i = b.def(Kind::R, "add.u32", &[&row0, &r]);
        let p = b.def(Kind::Pred, "setp.lt.u32", &[&i, &n]);
        ins!(b, "and.pred {p}, {p}, {first}");
        let v = match bias {
            Some(bp) => {
                let ba = b.addr(bp, &rows[r], wsz);
                let bv = b.load(l.weight, ba, 0, true);
                b.def(Kind::F, "add.rn.f32", &[s, &bv])
            }
            None => *s,
        };
        let ya = b.addr(y, &i, asz);
        b.store(act, ya, 0, v, Some(p));
    }
    let launch = Launch {
        grid: [
            Dim::Tokens { per: 1 },
            Dim::Fixed(n.div_ceil(GEMV_WARPS * GEMV_ROWS)),
            Dim::Fixed(1),
        ],
        block,
        shared_bytes: 4 * k,
    };
    Emitted::new("gemv", when, launch, b)
}

const BM: u32 = 128;
const BN: u32 = 128;
const BK: u32 = 32;
const STAGES: u32 = 3;
/// One stage: the A tile then the B tile, `BM x BK` and `BN x BK` bf16.
const A_BYTES: u32 = BM * BK * 2;
const STAGE_BYTES: u32 = (BM + BN) * BK * 2;
const GEMM_THREADS: u32 = 256;

/// bf16 tensor-core GEMM: `y[M, n] = x[M, k] W[n, k]^T (+ b)`, M = tokens.
/// Shared tiles are rows of 64 bytes (4 chunks of 16); chunk c of row r
/// lives at chunk `c ^ ((r >> 1) & 3)`, so the 8 row addresses of every
/// `ldmatrix` phase and of the `cp.async` stores hit 8 distinct 16-byte
/// bank groups.
fn gemm(l: &LinearSpec) -> Emitted {
    let mut b = Body::default();
    let (n, k) = (l.n as u32, l.k as u32);
    let ktiles = k.div_ceil(BK);
    let (k_edge, n_edge) = (!k.is_multiple_of(BK), !n.is_multiple_of(BN));
    let tid = b.mov_u32(&"%tid.x");
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let wm = b.def(Kind::R, "shr.u32", &[&warp, &2]);
    let wn = b.def(Kind::R, "and.b32", &[&warp, &3]);
    let bx = b.mov_u32(&"%ctaid.x");
    let by = b.mov_u32(&"%ctaid.y");
    let n0 = b.def(Kind::R, "mul.lo.u32", &[&bx, &BN]);
    let m0 = b.def(Kind::R, "mul.lo.u32", &[&by, &BM]);
    let m = b.param_u32("tokens");
    let x = b.param_ptr("x");
    let xs = b.param_u32("x_stride");
    let w = b.param_ptr("w");
    let smem = b.mov_u32(&"ouroc_smem");

    b.comment("loader: chunk (row, c) for row = tid / 4 + 64 j, c = tid % 4, j = 0, 1");
    let row = b.def(Kind::R, "shr.u32", &[&tid, &2]);
    let c = b.def(Kind::R, "and.b32", &[&tid, &3]);
    let key = b.def(Kind::R, "bfe.u32", &[&row, &1, &2]);
    let sc = b.def(Kind::R, "xor.b32", &[&c, &key]);
    let sc = b.def(Kind::R, "shl.b32", &[&sc, &4]);
    let sw = b.def(Kind::R, "mad.lo.u32", &[&row, &64, &sc]);
    let sw = b.def(Kind::R, "add.u32", &[&sw, &smem]);
    let xs2 = b.def(Kind::R, "shl.b32", &[&xs, &1]);
    let kc = b.def(Kind::R, "shl.b32", &[&c, &3]);
    // (global address of the chunk at k = 0, row in range) per A / B row j.
    let mut srcs: Vec<(Reg, Reg)> = Vec::new();
    let (n_imm, k2) = (n, k * 2);
    let sides: [(Reg, Reg, &dyn std::fmt::Display, &dyn std::fmt::Display); 2] =
        [(x, m0, &m, &xs2), (w, n0, &n_imm, &k2)];
    for (base, first, limit, pitch) in sides {
        for j in 0..2u32 {
            let r = b.def(Kind::R, "add.u32", &[&row, &(j * 64)]);
            let r = b.def(Kind::R, "add.u32", &[&r, &first]);
            let ok = b.def(Kind::Pred, "setp.lt.u32", &[&r, limit]);
            let rowp = b.def(Kind::D, "mad.wide.u32", &[&r, pitch, &base]);
            let rowp = b.def(Kind::D, "selp.b64", &[&rowp, &base, &ok]);
            let a = b.def(Kind::D, "mad.wide.u32", &[&kc, &2, &rowp]);
            srcs.push((a, ok));
        }
    }
    // Issue the cp.async copies of k-tile `k0` into the stage at `stage`.
    let load_tile = |b: &mut Body, stage: &dyn std::fmt::Display, k0: Reg| {
        let kb = b.def(Kind::D, "mul.wide.u32", &[&k0, &2]);
        let kok = k_edge.then(|| {
            let kk = b.def(Kind::R, "add.u32", &[&k0, &kc]);
            b.def(Kind::Pred, "setp.lt.u32", &[&kk, &k])
        });
        let dst = b.def(Kind::R, "add.u32", &[&sw, stage]);
        for (i, (src, ok)) in srcs.iter().enumerate() {
            let ok = match kok {
                Some(kp) => b.def(Kind::Pred, "and.pred", &[ok, &kp]),
                None => *ok,
            };
            let g = b.def(Kind::D, "add.u64", &[src, &kb]);
            let bytes = b.def(Kind::R, "selp.u32", &[&16, &0, &ok]);
            let off = (i as u32 / 2) * A_BYTES + (i as u32 % 2) * 64 * 64;
            ins!(b, "cp.async.cg.shared.global [{dst}+{off}], [{g}], 16, {bytes}");
        }
    };
    b.comment(&format!("prologue: k-tiles 0..{} in flight", STAGES - 1));
    for s in 0..STAGES - 1 {
        if s < ktiles {
            let k0 = b.mov_u32(&(s * BK));
            load_tile(&mut b, &(s * STAGE_BYTES), k0);
        }
        ins!(b, "cp.async.commit_group");
    }

    b.comment("fragment addresses: ldmatrix lane rows (A: lane % 16, B: lane % 8 + 8 (lane / 16)), swizzled");
    let key = b.def(Kind::R, "bfe.u32", &[&lane, &1, &2]);
    let a_row = b.def(Kind::R, "and.b32", &[&lane, &15]);
    let a_row = b.def(Kind::R, "mad.lo.u32", &[&wm, &64, &a_row]);
    let a_hi = b.def(Kind::R, "shr.u32", &[&lane, &4]);
    let b_row = b.def(Kind::R, "and.b32", &[&lane, &7]);
    let b_hi = b.def(Kind::R, "bfe.u32", &[&lane, &4, &1]);
    let b_row = b.def(Kind::R, "mad.lo.u32", &[&b_hi, &8, &b_row]);
    let b_row = b.def(Kind::R, "mad.lo.u32", &[&wn, &32, &b_row]);
    let b_k = b.def(Kind::R, "bfe.u32", &[&lane, &3, &1]);
    let frag_off = |b: &mut Body, row: Reg, khalf: Reg, ks: u32, base: u32| {
        let kc = b.def(Kind::R, "add.u32", &[&khalf, &(2 * ks)]);
        let kc = b.def(Kind::R, "xor.b32", &[&kc, &key]);
        let kc = b.def(Kind::R, "shl.b32", &[&kc, &4]);
        let o = b.def(Kind::R, "mad.lo.u32", &[&row, &64, &kc]);
        let o = b.def(Kind::R, "add.u32", &[&o, &base]);
        b.def(Kind::R, "add.u32", &[&o, &smem])
    };
    let a_off: Vec<Reg> = (0..2).map(|ks| frag_off(&mut b, a_row, a_hi, ks, 0)).collect();
    let b_off: Vec<Reg> = (0..2).map(|ks| frag_off(&mut b, b_row, b_k, ks, A_BYTES)).collect();
    let acc: Vec<Reg> = (0..64).map(|_| b.mov_f32(0.0)).collect();

    let (rs, ws) = (b.mov_u32(&0), b.mov_u32(&((STAGES - 1) * STAGE_BYTES)));
    let knext = b.mov_u32(&((STAGES - 1) * BK));
    let kt = b.mov_u32(&0);
    let (top, skip) = (b.label("ktile"), b.label("no_prefetch"));
    b.place(&top);
    ins!(b, "cp.async.wait_group {}", STAGES - 2);
    ins!(b, "bar.sync 0");
    let more = b.def(Kind::Pred, "setp.ge.u32", &[&knext, &(ktiles * BK)]);
    ins!(b, "@{more} bra.uni {skip}");
    load_tile(&mut b, &ws, knext);
    b.place(&skip);
    ins!(b, "cp.async.commit_group");
    for ks in 0..2 {
        b.comment(&format!("k16 step {ks}: 4 A and 2 B ldmatrix.x4, 16 mma"));
        let aa = b.def(Kind::R, "add.u32", &[&a_off[ks], &rs]);
        let ba = b.def(Kind::R, "add.u32", &[&b_off[ks], &rs]);
        let frags = |b: &mut Body, addr: Reg, count: u32| -> Vec<[Reg; 4]> {
            (0..count)
                .map(|i| {
                    let r = [b.r(), b.r(), b.r(), b.r()];
                    ins!(
                        b,
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{}, {}, {}, {}}}, [{addr}+{}]",
                        r[0],
                        r[1],
                        r[2],
                        r[3],
                        i * 1024
                    );
                    r
                })
                .collect()
        };
        let af = frags(&mut b, aa, 4);
        let bf = frags(&mut b, ba, 2);
        for (mt, a) in af.iter().enumerate() {
            for nt in 0..4 {
                let (b0, b1) = (bf[nt / 2][2 * (nt % 2)], bf[nt / 2][2 * (nt % 2) + 1]);
                let d = &acc[(mt * 4 + nt) * 4..(mt * 4 + nt) * 4 + 4];
                ins!(
                    b,
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{}, {}, {}, {}}}, {{{}, {}, {}, {}}}, {{{b0}, {b1}}}, {{{}, {}, {}, {}}}",
                    d[0],
                    d[1],
                    d[2],
                    d[3],
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    d[0],
                    d[1],
                    d[2],
                    d[3]
                );
            }
        }
    }
    b.comment("next stage (ring of 3)");
    for s in [rs, ws] {
        ins!(b, "add.u32 {s}, {s}, {STAGE_BYTES}");
        let wrap = b.def(Kind::Pred, "setp.eq.u32", &[&s, &(STAGES * STAGE_BYTES)]);
        ins!(b, "selp.b32 {s}, 0, {s}, {wrap}");
    }
    ins!(b, "add.u32 {knext}, {knext}, {BK}");
    ins!(b, "add.u32 {kt}, {kt}, 1");
    let again = b.def(Kind::Pred, "setp.lt.u32", &[&kt, &ktiles]);
    ins!(b, "@{again} bra.uni {top}");
    ins!(b, "cp.async.wait_group 0");

    b.comment("epilogue: c0, c1 at (g, 2 t4 + {0, 1}), c2, c3 at row g + 8; + bias, rounded once");
    let g = b.def(Kind::R, "shr.u32", &[&lane, &2]);
    let t4 = b.def(Kind::R, "and.b32", &[&lane, &3]);
    let col = b.def(Kind::R, "mad.lo.u32", &[&wn, &32, &n0]);
    let col = b.def(Kind::R, "mad.lo.u32", &[&t4, &2, &col]);
    let row = b.def(Kind::R, "mad.lo.u32", &[&wm, &64, &m0]);
    let row = b.def(Kind::R, "add.u32", &[&row, &g]);
    let y = b.param_ptr("y");
    let ys = b.param_u32("y_stride");
    let ys2 = b.def(Kind::R, "shl.b32", &[&ys, &1]);
    let yrow = b.def(Kind::D, "mad.wide.u32", &[&row, &ys2, &y]);
    let ybase = b.def(Kind::D, "mad.wide.u32", &[&col, &2, &yrow]);
    let bias_ptr = l.bias.then(|| b.param_ptr("b"));
    let cols: Vec<(Option<Reg>, [Option<Reg>; 2])> = (0..4u32)
        .map(|nt| {
            let cok = n_edge.then(|| {
                let cc = b.def(Kind::R, "add.u32", &[&col, &(nt * 8)]);
                b.def(Kind::Pred, "setp.lt.u32", &[&cc, &n])
            });
            let bias = bias_ptr.map(|bp| {
                let ba = b.def(Kind::D, "mad.wide.u32", &[&col, &2, &bp]);
                let word = b.r();
                match cok {
                    Some(p) => {
                        ins!(b, "mov.u32 {word}, 0");
                        ins!(b, "@{p} ld.global.nc.u32 {word}, [{ba}+{}]", nt * 16);
                    }
                    None => ins!(b, "ld.global.nc.u32 {word}, [{ba}+{}]", nt * 16),
                }
                let v = b.widen(DType::BF16, &[word]);
                [v[0], v[1]]
            });
            (cok, bias.map_or([None, None], |v| v.map(Some)))
        })
        .collect();
    for mt in 0..4u32 {
        for half in 0..2u32 {
            let dr = mt * 16 + half * 8;
            let r = b.def(Kind::R, "add.u32", &[&row, &dr]);
            let rok = b.def(Kind::Pred, "setp.lt.u32", &[&r, &m]);
            let ya = if dr == 0 {
                ybase
            } else {
                let off = b.def(Kind::D, "mul.wide.u32", &[&ys2, &dr]);
                b.def(Kind::D, "add.u64", &[&ybase, &off])
            };
            for (nt, (cok, bias)) in cols.iter().enumerate() {
                let i = (mt as usize * 4 + nt) * 4 + 2 * half as usize;
                let v: Vec<Reg> = (0..2)
                    .map(|e| match bias[e] {
                        Some(bv) => b.def(Kind::F, "add.rn.f32", &[&acc[i + e], &bv]),
                        None => acc[i + e],
                    })
                    .collect();
                let packed = b.def(Kind::R, "cvt.rn.bf16x2.f32", &[&v[1], &v[0]]);
                let ok = match cok {
                    Some(cp) => b.def(Kind::Pred, "and.pred", &[&rok, cp]),
                    None => rok,
                };
                ins!(b, "@{ok} st.global.b32 [{ya}+{}], {packed}", nt * 16);
            }
        }
    }
    let launch = Launch {
        grid: [Dim::Fixed(n.div_ceil(BN)), Dim::Tokens { per: BM }, Dim::Fixed(1)],
        block: GEMM_THREADS,
        shared_bytes: STAGES * STAGE_BYTES,
    };
    Emitted::new("gemm", When::TokensAtLeast(GEMM_MIN_TOKENS), launch, b)
}
