//! `Attention` over the KV cache: `append`, then decode (`scores`, `pv`,
//! `combine`, split over the KV length) or `prefill` (tiled). The cache
//! layout, scratch layout and entry order are in the module docs of
//! [`super`].

use super::asm::{Body, Kind, Red, Reg, f32_imm, ins, size};
use super::simple::{act_row, rope_pair, threads};
use super::{Dim, Emitted, Launch, When, decode_splits};
use ouroc_ir::DType;
use ouroc_kernels::spec::AttentionSpec;

const QTILE: u32 = 16;
const KTILE: u32 = 32;
const WARPS: u32 = 4;

pub(crate) fn emit(act: DType, a: &AttentionSpec) -> Vec<Emitted> {
    vec![
        append(act, a),
        scores(act, a),
        pv(act, a),
        combine(act, a),
        prefill(act, a),
    ]
}

/// The K and V stores and `past` of sequence `seq_idx`.
fn seq_desc(b: &mut Body, seq_idx: Reg) -> (Reg, Reg, Reg) {
    let kv = b.param_ptr("kv");
    let d = b.addr(kv, &seq_idx, 24);
    let k = b.def(Kind::D, "ld.global.nc.u64", &[&format!("[{d}]")]);
    let v = b.def(Kind::D, "ld.global.nc.u64", &[&format!("[{d}+8]")]);
    let past = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{d}+16]")]);
    (k, v, past)
}

/// Start of head `kvh`'s plane in a store: `base + kvh * kv_cap * head_dim * size`.
fn plane(b: &mut Body, base: Reg, kvh: Reg, cap: Reg, hd: u32, act: DType) -> Reg {
    let r = b.def(Kind::R, "mul.lo.u32", &[&kvh, &cap]);
    b.addr(base, &r, hd * size(act))
}

/// Row `t`'s query head `h` and its cos / sin rows (with `rope`).
struct QRow {
    q: Reg,
    trig: Option<[Reg; 2]>,
}

fn q_row(b: &mut Body, act: DType, a: &AttentionSpec, t: Reg, h: Reg) -> QRow {
    let qrow = act_row(b, "q", t, act);
    let q = b.addr(qrow, &h, a.head_dim as u32 * size(act));
    let trig = a.rope.then(|| ["cos", "sin"].map(|n| act_row(b, n, t, act)));
    QRow { q, trig }
}

/// Element `d` of a query head, rotated when `rope` (the reference's
/// roundings), and whether `d < head_dim` (else the value is 0).
fn query(b: &mut Body, act: DType, a: &AttentionSpec, r: &QRow, d: Reg) -> (Reg, Reg) {
    let (hd, asz) = (a.head_dim as u32, size(act));
    let ok = b.def(Kind::Pred, "setp.lt.u32", &[&d, &hd]);
    let dc = b.def(Kind::R, "min.u32", &[&d, &(hd - 1)]);
    let qa = b.addr(r.q, &dc, asz);
    let x = b.load(act, qa, 0, true);
    let v = match r.trig {
        Some([cos, sin]) => {
            let half = hd / 2;
            let lo = b.def(Kind::Pred, "setp.lt.u32", &[&dc, &half]);
            let up = b.def(Kind::R, "add.u32", &[&dc, &half]);
            let down = b.def(Kind::R, "sub.u32", &[&dc, &half]);
            let pd = b.def(Kind::R, "selp.b32", &[&up, &down, &lo]);
            let pa = b.addr(r.q, &pd, asz);
            let xp = b.load(act, pa, 0, true);
            let nxp = b.def(Kind::F, "neg.f32", &[&xp]);
            let rot = b.def(Kind::F, "selp.f32", &[&nxp, &xp, &lo]);
            let [c, s] = [cos, sin].map(|row| {
                let ad = b.addr(row, &dc, asz);
                b.load(act, ad, 0, true)
            });
            let p = b.def(Kind::F, "mul.rn.f32", &[&x, &c]);
            let p = b.round(act, p);
            let r = b.def(Kind::F, "mul.rn.f32", &[&rot, &s]);
            let r = b.round(act, r);
            let v = b.def(Kind::F, "add.rn.f32", &[&p, &r]);
            b.round(act, v)
        }
        None => x,
    };
    (b.def(Kind::F, "selp.f32", &[&v, &f32_imm(0.0), &ok]), ok)
}

/// The query head's KV head: `h / (heads / kv_heads)`.
fn kv_head(b: &mut Body, a: &AttentionSpec, h: Reg) -> Reg {
    match a.heads / a.kv_heads {
        1 => h,
        g => b.def(Kind::R, "div.u32", &[&h, &g]),
    }
}

/// `round(round(dot) * scale)`.
fn score(b: &mut Body, act: DType, a: &AttentionSpec, dot: Reg) -> Reg {
    let scale = (a.head_dim as f64).powf(-0.5) as f32;
    let d = b.round(act, dot);
    let s = b.def(Kind::F, "mul.rn.f32", &[&d, &f32_imm(scale)]);
    b.round(act, s)
}

/// Write the new tokens' K (rotated) and V rows at `past + s`.
fn append(act: DType, a: &AttentionSpec) -> Emitted {
    let mut b = Body::default();
    let (hd, half, asz) = (a.head_dim as u32, a.head_dim as u32 / 2, size(act));
    let kvw = a.kv_heads * a.head_dim;
    let block = threads(kvw);
    let t = b.mov_u32(&"%ctaid.x");
    let tid = b.mov_u32(&"%tid.x");
    let seq = b.param_u32("seq");
    let cap = b.param_u32("kv_cap");
    let sidx = b.def(Kind::R, "div.u32", &[&t, &seq]);
    let s = b.def(Kind::R, "rem.u32", &[&t, &seq]);
    let (kst, vst, past) = seq_desc(&mut b, sidx);
    let pos = b.def(Kind::R, "add.u32", &[&past, &s]);
    let [krow, vrow] = ["k", "v"].map(|n| act_row(&mut b, n, t, act));
    // Element (head, d) of the store at position pos.
    let slot = |b: &mut Body, base: Reg, h: Reg, d: Reg| {
        let hp = b.def(Kind::R, "mad.lo.u32", &[&h, &cap, &pos]);
        let row = b.addr(base, &hp, hd * asz);
        b.addr(row, &d, asz)
    };
    if a.rope {
        let [cos, sin] = ["cos", "sin"].map(|n| act_row(&mut b, n, t, act));
        b.comment("K: a thread per (head, j < half) pair, rotated");
        b.for_range(tid, &(a.kv_heads as u32 * half), &block, |b, i| {
            let h = b.def(Kind::R, "div.u32", &[&i, &half]);
            let j = b.def(Kind::R, "rem.u32", &[&i, &half]);
            let e = b.def(Kind::R, "mad.lo.u32", &[&h, &half, &i]);
            let xa = b.addr(krow, &e, asz);
            let ca = b.addr(cos, &j, asz);
            let sa = b.addr(sin, &j, asz);
            let off = half * asz;
            let xs = [b.load(act, xa, 0, true), b.load(act, xa, off, true)];
            let cs = [b.load(act, ca, 0, true), b.load(act, ca, off, true)];
            let ss = [b.load(act, sa, 0, true), b.load(act, sa, off, true)];
            let o = rope_pair(b, act, xs, cs, ss);
            let dst = slot(b, kst, h, j);
            b.store(act, dst, 0, o[0], None);
            b.store(act, dst, off, o[1], None);
        });
    }
    let copies: &[(Reg, Reg)] = if a.rope {
        &[(vrow, vst)]
    } else {
        &[(krow, kst), (vrow, vst)]
    };
    for &(src, dst) in copies {
        b.comment("copy a row into the store (bit for bit)");
        b.for_range(tid, &kvw, &block, |b, i| {
            let h = b.def(Kind::R, "div.u32", &[&i, &hd]);
            let d = b.def(Kind::R, "rem.u32", &[&i, &hd]);
            let s = b.addr(src, &i, asz);
            let dd = slot(b, dst, h, d);
            b.copy(act, s, dd);
        });
    }
    let launch = Launch {
        grid: [Dim::Tokens { per: 1 }, Dim::Fixed(1), Dim::Fixed(1)],
        block,
        shared_bytes: 0,
    };
    Emitted::new("append", When::Always, launch, b)
}

/// Common decode setup: (head, sequence, kv head, this split's key range
/// [lo, hi), the sequence's scratch, kv_cap, past).
struct Split {
    sp: Reg,
    h: Reg,
    sidx: Reg,
    kvh: Reg,
    lo: Reg,
    hi: Reg,
    scr: Reg,
    cap: Reg,
    desc: (Reg, Reg, Reg),
}

fn split(b: &mut Body, a: &AttentionSpec) -> Split {
    let splits = decode_splits(a);
    let sp = b.mov_u32(&"%ctaid.x");
    let h = b.mov_u32(&"%ctaid.y");
    let sidx = b.mov_u32(&"%ctaid.z");
    let cap = b.param_u32("kv_cap");
    let desc = seq_desc(b, sidx);
    let len = b.def(Kind::R, "add.u32", &[&desc.2, &1]);
    let kvh = kv_head(b, a, h);
    let chunk = b.def(Kind::R, "add.u32", &[&len, &(splits - 1)]);
    let chunk = b.def(Kind::R, "div.u32", &[&chunk, &splits]);
    let lo = b.def(Kind::R, "mul.lo.u32", &[&sp, &chunk]);
    let hi = b.def(Kind::R, "add.u32", &[&lo, &chunk]);
    let hi = b.def(Kind::R, "min.u32", &[&hi, &len]);
    let scr = scratch(b, a, sidx, h, cap);
    Split {
        sp,
        h,
        sidx,
        kvh,
        lo,
        hi,
        scr,
        cap,
        desc,
    }
}

/// The scratch of (sequence, head).
fn scratch(b: &mut Body, a: &AttentionSpec, sidx: Reg, h: Reg, cap: Reg) -> Reg {
    let s = b.param_ptr("scratch");
    let bh = b.def(Kind::R, "mad.lo.u32", &[&sidx, &(a.heads as u32), &h]);
    let per = b.def(
        Kind::R,
        "add.u32",
        &[&cap, &(decode_splits(a) * (2 + a.head_dim as u32))],
    );
    let i = b.def(Kind::R, "mul.lo.u32", &[&bh, &per]);
    b.addr(s, &i, 4)
}

fn decode_launch(a: &AttentionSpec, block: u32) -> Launch {
    Launch {
        grid: [Dim::Fixed(decode_splits(a)), Dim::Fixed(a.heads as u32), Dim::Batch],
        block,
        shared_bytes: 0,
    }
}

/// Decode, step 1: a warp per key of the split, the scores to the
/// scratch, the split's max and sum of exp(s - max) after them.
fn scores(act: DType, a: &AttentionSpec) -> Emitted {
    let mut b = Body::default();
    let (hd, asz) = (a.head_dim as u32, size(act));
    let tid = b.mov_u32(&"%tid.x");
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let sp = split(&mut b, a);
    let seq = b.param_u32("seq");
    let t = b.def(Kind::R, "mul.lo.u32", &[&sp.sidx, &seq]);
    b.comment("q in registers: lane holds d = lane + 32 i");
    let per = hd.div_ceil(32);
    let qr = q_row(&mut b, act, a, t, sp.h);
    let lanes: Vec<(Reg, Reg, Reg)> = (0..per)
        .map(|i| {
            let d = b.def(Kind::R, "add.u32", &[&lane, &(32 * i)]);
            let (q, ok) = query(&mut b, act, a, &qr, d);
            (q, ok, d)
        })
        .collect();
    let kh = plane(&mut b, sp.desc.0, sp.kvh, sp.cap, hd, act);
    let m = b.mov_f32(f32::NEG_INFINITY);
    let first = b.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);
    let start = b.def(Kind::R, "add.u32", &[&sp.lo, &warp]);
    b.for_range(start, &sp.hi, &WARPS, |b, j| {
        let krow = b.addr(kh, &j, hd * asz);
        let mut dot = b.mov_f32(0.0);
        for &(q, ok, d) in &lanes {
            let ka = b.addr(krow, &d, asz);
            let k = b.load_if(ok, act, ka, 0, true);
            dot = b.def(Kind::F, "fma.rn.f32", &[&q, &k, &dot]);
        }
        let dot = b.warp_reduce(Red::Sum, &[dot])[0];
        let s = score(b, act, a, dot);
        ins!(b, "max.f32 {m}, {m}, {s}");
        let sa = b.addr(sp.scr, &j, 4);
        ins!(b, "@{first} st.global.f32 [{sa}], {s}");
    });
    ins!(b, "bar.sync 0");
    let mx = b.block_reduce(Red::Max, &[m], WARPS, "redm", tid)[0];
    let l = b.mov_f32(0.0);
    let start = b.def(Kind::R, "add.u32", &[&sp.lo, &tid]);
    b.for_range(start, &sp.hi, &(32 * WARPS), |b, j| {
        let sa = b.addr(sp.scr, &j, 4);
        let s = b.def(Kind::F, "ld.global.f32", &[&format!("[{sa}]")]);
        let z = b.def(Kind::F, "sub.rn.f32", &[&s, &mx]);
        let e = b.exp(z);
        ins!(b, "add.rn.f32 {l}, {l}, {e}");
    });
    let sum = b.block_reduce(Red::Sum, &[l], WARPS, "redl", tid)[0];
    b.shared("redm", 4 * WARPS);
    b.shared("redl", 4 * WARPS);
    let t0 = b.def(Kind::Pred, "setp.eq.u32", &[&tid, &0]);
    let i = b.def(Kind::R, "mad.lo.u32", &[&sp.sp, &2, &sp.cap]);
    let st = b.addr(sp.scr, &i, 4);
    ins!(b, "@{t0} st.global.v2.f32 [{st}], {{{mx}, {sum}}}");
    Emitted::new("scores", When::Decode, decode_launch(a, 32 * WARPS), b)
}

/// Decode, step 2: the global max and sum from every split's statistics,
/// then `sum_j round(exp(s_j - max) / sum) v_j` over the split, a thread per column.
fn pv(act: DType, a: &AttentionSpec) -> Emitted {
    let mut b = Body::default();
    let (hd, asz, splits) = (a.head_dim as u32, size(act), decode_splits(a));
    let d = b.mov_u32(&"%tid.x");
    let sp = split(&mut b, a);
    let stats = b.addr(sp.scr, &sp.cap, 4);
    b.comment("global max, then sum_s l_s exp(m_s - max)");
    let ms: Vec<(Reg, Reg)> = (0..splits)
        .map(|s| {
            let (m, l) = (b.f(), b.f());
            ins!(b, "ld.global.v2.f32 {{{m}, {l}}}, [{stats}+{}]", 8 * s);
            (m, l)
        })
        .collect();
    let mut mx = ms[0].0;
    for &(m, _) in &ms[1..] {
        mx = b.def(Kind::F, "max.f32", &[&mx, &m]);
    }
    let mut sum = b.mov_f32(0.0);
    for &(m, l) in &ms {
        let z = b.def(Kind::F, "sub.rn.f32", &[&m, &mx]);
        let e = b.exp(z);
        sum = b.def(Kind::F, "fma.rn.f32", &[&l, &e, &sum]);
    }
    let ok = b.def(Kind::Pred, "setp.lt.u32", &[&d, &hd]);
    let vh = plane(&mut b, sp.desc.1, sp.kvh, sp.cap, hd, act);
    let vcol = b.addr(vh, &d, asz);
    let acc = b.mov_f32(0.0);
    b.for_range(sp.lo, &sp.hi, &1, |b, j| {
        let sa = b.addr(sp.scr, &j, 4);
        let s = b.def(Kind::F, "ld.global.f32", &[&format!("[{sa}]")]);
        let z = b.def(Kind::F, "sub.rn.f32", &[&s, &mx]);
        let e = b.exp(z);
        let p = b.def(Kind::F, "div.rn.f32", &[&e, &sum]);
        let p = b.round(act, p);
        let va = b.addr(vcol, &j, hd * asz);
        let v = b.load_if(ok, act, va, 0, true);
        ins!(b, "fma.rn.f32 {acc}, {p}, {v}, {acc}");
    });
    let i = b.def(Kind::R, "mad.lo.u32", &[&sp.sp, &hd, &d]);
    let pa = b.addr(stats, &i, 4);
    ins!(b, "@{ok} st.global.f32 [{pa}+{}], {acc}", 8 * splits);
    Emitted::new("pv", When::Decode, decode_launch(a, hd.div_ceil(32) * 32), b)
}

/// Decode, step 3: the sum of the splits' partial outputs, rounded.
fn combine(act: DType, a: &AttentionSpec) -> Emitted {
    let mut b = Body::default();
    let (hd, asz, splits) = (a.head_dim as u32, size(act), decode_splits(a));
    let d = b.mov_u32(&"%tid.x");
    let h = b.mov_u32(&"%ctaid.x");
    let sidx = b.mov_u32(&"%ctaid.y");
    let cap = b.param_u32("kv_cap");
    let seq = b.param_u32("seq");
    let scr = scratch(&mut b, a, sidx, h, cap);
    let ok = b.def(Kind::Pred, "setp.lt.u32", &[&d, &hd]);
    b.skip_if_not(ok, |b| {
        let i = b.def(Kind::R, "add.u32", &[&cap, &(2 * splits)]);
        let i = b.def(Kind::R, "add.u32", &[&i, &d]);
        let part = b.addr(scr, &i, 4);
        let mut acc = b.def(Kind::F, "ld.global.f32", &[&format!("[{part}]")]);
        for s in 1..splits {
            let x = b.def(Kind::F, "ld.global.f32", &[&format!("[{part}+{}]", 4 * s * hd)]);
            acc = b.def(Kind::F, "add.rn.f32", &[&acc, &x]);
        }
        let t = b.def(Kind::R, "mul.lo.u32", &[&sidx, &seq]);
        let out = act_row(b, "out", t, act);
        let col = b.def(Kind::R, "mad.lo.u32", &[&h, &hd, &d]);
        let oa = b.addr(out, &col, asz);
        b.store(act, oa, 0, acc, None);
    });
    let launch = Launch {
        grid: [Dim::Fixed(a.heads as u32), Dim::Batch, Dim::Fixed(1)],
        block: hd.div_ceil(32) * 32,
        shared_bytes: 0,
    };
    Emitted::new("combine", When::Decode, launch, b)
}

/// Prefill: 16 queries per CTA (4 per warp), K / V tiles of 32 positions
/// in shared memory as f32; pass 1 the online max and sum, pass 2 the
/// rounded probabilities times V.
fn prefill(act: DType, a: &AttentionSpec) -> Emitted {
    let mut b = Body::default();
    let (hd, asz) = (a.head_dim as u32, size(act));
    let kpitch = hd + 4; // floats: 16-byte rows, conflict-free v4 reads across lanes
    let (q_bytes, k_bytes) = (QTILE * hd * 4, KTILE * kpitch * 4);
    let shared = q_bytes + k_bytes + KTILE * hd * 4;
    let block = 32 * WARPS;
    let tid = b.mov_u32(&"%tid.x");
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let warp = b.def(Kind::R, "shr.u32", &[&tid, &5]);
    let qt = b.mov_u32(&"%ctaid.x");
    let h = b.mov_u32(&"%ctaid.y");
    let sidx = b.mov_u32(&"%ctaid.z");
    let seq = b.param_u32("seq");
    let cap = b.param_u32("kv_cap");
    let (kst, vst, past) = seq_desc(&mut b, sidx);
    let kvh = kv_head(&mut b, a, h);
    let s0 = b.def(Kind::R, "mul.lo.u32", &[&qt, &QTILE]);
    let last = b.def(Kind::R, "add.u32", &[&s0, &QTILE]);
    let last = b.def(Kind::R, "min.u32", &[&last, &seq]);
    let keys = b.def(Kind::R, "add.u32", &[&past, &last]);
    let t0 = b.def(Kind::R, "mul.lo.u32", &[&sidx, &seq]);
    let qs = b.mov_u32(&"ouroc_smem");
    let ks = b.def(Kind::R, "add.u32", &[&qs, &q_bytes]);
    let vs = b.def(Kind::R, "add.u32", &[&ks, &k_bytes]);

    b.comment("Q tile (rotated, rounded) to shared memory; rows past seq are 0");
    let lastrow = b.def(Kind::R, "sub.u32", &[&seq, &1]);
    b.for_range(tid, &(QTILE * hd), &block, |b, e| {
        let qi = b.def(Kind::R, "div.u32", &[&e, &hd]);
        let d = b.def(Kind::R, "rem.u32", &[&e, &hd]);
        let s = b.def(Kind::R, "add.u32", &[&s0, &qi]);
        let ok = b.def(Kind::Pred, "setp.lt.u32", &[&s, &seq]);
        let sc = b.def(Kind::R, "min.u32", &[&s, &lastrow]);
        let t = b.def(Kind::R, "add.u32", &[&t0, &sc]);
        let qr = q_row(b, act, a, t, h);
        let v = query(b, act, a, &qr, d).0;
        let v = b.def(Kind::F, "selp.f32", &[&v, &f32_imm(0.0), &ok]);
        let sa = b.def(Kind::R, "mad.lo.u32", &[&e, &4, &qs]);
        ins!(b, "st.shared.f32 [{sa}], {v}");
    });
    let kh = plane(&mut b, kst, kvh, cap, hd, act);
    let vh = plane(&mut b, vst, kvh, cap, hd, act);
    // This warp's queries: index s0 + 4 warp + u, position past + that.
    let qpos: Vec<Reg> = (0..4u32)
        .map(|u| {
            let s = b.def(Kind::R, "mad.lo.u32", &[&warp, &4, &s0]);
            let s = b.def(Kind::R, "add.u32", &[&s, &u]);
            b.def(Kind::R, "add.u32", &[&s, &past])
        })
        .collect();
    let vec = if (hd * asz).is_multiple_of(16) { 16 / asz } else { 1 };
    // Stage keys j0 .. j0 + 32 of K (and V) as f32; positions past `keys` are 0.
    let load_tile = |b: &mut Body, j0: Reg, with_v: bool| {
        b.for_range(tid, &(KTILE * hd / vec), &block, |b, c| {
            let e = b.def(Kind::R, "mul.lo.u32", &[&c, &vec]);
            let j = b.def(Kind::R, "div.u32", &[&e, &hd]);
            let d = b.def(Kind::R, "rem.u32", &[&e, &hd]);
            let key = b.def(Kind::R, "add.u32", &[&j0, &j]);
            let ok = b.def(Kind::Pred, "setp.lt.u32", &[&key, &keys]);
            let g = b.def(Kind::R, "mad.lo.u32", &[&j0, &hd, &e]);
            let krow = b.def(Kind::R, "mad.lo.u32", &[&j, &kpitch, &d]);
            let ka = b.def(Kind::R, "mad.lo.u32", &[&krow, &4, &ks]);
            let va = b.def(Kind::R, "mad.lo.u32", &[&e, &4, &vs]);
            let stores: &[(Reg, Reg)] = if with_v { &[(kh, ka), (vh, va)] } else { &[(kh, ka)] };
            for &(src, dst) in stores {
                let ga = b.addr(src, &g, asz);
                let vals = if vec > 1 {
                    let w = [b.r(), b.r(), b.r(), b.r()];
                    ins!(b, "mov.b32 {}, 0", w[0]);
                    for i in 1..4 {
                        ins!(b, "mov.b32 {}, {}", w[i], w[0]);
                    }
                    ins!(
                        b,
                        "@{ok} ld.global.nc.v4.u32 {{{}, {}, {}, {}}}, [{ga}]",
                        w[0],
                        w[1],
                        w[2],
                        w[3]
                    );
                    b.widen(act, &w)
                } else {
                    vec![b.load_if(ok, act, ga, 0, true)]
                };
                if vals.len() >= 4 {
                    for (q, v) in vals.chunks(4).enumerate() {
                        ins!(
                            b,
                            "st.shared.v4.f32 [{dst}+{}], {{{}, {}, {}, {}}}",
                            16 * q,
                            v[0],
                            v[1],
                            v[2],
                            v[3]
                        );
                    }
                } else {
                    ins!(b, "st.shared.f32 [{dst}], {}", vals[0]);
                }
            }
        });
        ins!(b, "bar.sync 0");
    };
    // Lane j's scores against key j0 + j for the warp's 4 queries, masked to -inf past each query.
    let qbase = b.def(Kind::R, "mul.lo.u32", &[&warp, &(4 * hd * 4)]);
    let qbase = b.def(Kind::R, "add.u32", &[&qbase, &qs]);
    let kbase = b.def(Kind::R, "mad.lo.u32", &[&lane, &(kpitch * 4), &ks]);
    let tile_scores = |b: &mut Body, j0: Reg| -> Vec<Reg> {
        let acc: Vec<Reg> = (0..4).map(|_| b.mov_f32(0.0)).collect();
        let zero = b.mov_u32(&0);
        b.for_range(zero, &(hd * 4), &16, |b, o| {
            let ka = b.def(Kind::R, "add.u32", &[&kbase, &o]);
            let k = [b.f(), b.f(), b.f(), b.f()];
            ins!(b, "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{ka}]", k[0], k[1], k[2], k[3]);
            let qa = b.def(Kind::R, "add.u32", &[&qbase, &o]);
            for (u, a) in acc.iter().enumerate() {
                let q = [b.f(), b.f(), b.f(), b.f()];
                ins!(
                    b,
                    "ld.shared.v4.f32 {{{}, {}, {}, {}}}, [{qa}+{}]",
                    q[0],
                    q[1],
                    q[2],
                    q[3],
                    u as u32 * hd * 4
                );
                for i in 0..4 {
                    ins!(b, "fma.rn.f32 {a}, {}, {}, {a}", q[i], k[i]);
                }
            }
        });
        let key = b.def(Kind::R, "add.u32", &[&j0, &lane]);
        acc.iter()
            .zip(&qpos)
            .map(|(dot, pos)| {
                let s = score(b, act, a, *dot);
                let masked = b.def(Kind::Pred, "setp.gt.u32", &[&key, pos]);
                b.def(Kind::F, "selp.f32", &[&f32_imm(f32::NEG_INFINITY), &s, &masked])
            })
            .collect()
    };
    b.comment("pass 1: online max and rescaled sum per query");
    let m: Vec<Reg> = (0..4).map(|_| b.mov_f32(f32::NEG_INFINITY)).collect();
    let l: Vec<Reg> = (0..4).map(|_| b.mov_f32(0.0)).collect();
    let zero = b.mov_u32(&0);
    b.for_range(zero, &keys, &KTILE, |b, j0| {
        load_tile(b, j0, false);
        let s = tile_scores(b, j0);
        let tmax = b.warp_reduce(Red::Max, &s);
        for u in 0..4 {
            let mn = b.def(Kind::F, "max.f32", &[&m[u], &tmax[u]]);
            let z = b.def(Kind::F, "sub.rn.f32", &[&s[u], &mn]);
            let e = b.exp(z);
            let te = b.warp_reduce(Red::Sum, &[e])[0];
            let z = b.def(Kind::F, "sub.rn.f32", &[&m[u], &mn]);
            let r = b.exp(z);
            ins!(b, "fma.rn.f32 {}, {}, {r}, {te}", l[u], l[u]);
            ins!(b, "mov.f32 {}, {mn}", m[u]);
        }
        ins!(b, "bar.sync 0");
    });
    b.comment("pass 2: o += round(exp(s - m) / l) v, lane = output column d = lane + 32 i");
    let per = hd.div_ceil(32);
    let o: Vec<Reg> = (0..4 * per).map(|_| b.mov_f32(0.0)).collect();
    let vcols: Vec<Reg> = (0..per)
        .map(|i| {
            let d = b.def(Kind::R, "add.u32", &[&lane, &(32 * i)]);
            let d = b.def(Kind::R, "min.u32", &[&d, &(hd - 1)]);
            b.def(Kind::R, "mad.lo.u32", &[&d, &4, &vs])
        })
        .collect();
    let zero = b.mov_u32(&0);
    b.for_range(zero, &keys, &KTILE, |b, j0| {
        load_tile(b, j0, true);
        let s = tile_scores(b, j0);
        let p: Vec<Reg> = (0..4)
            .map(|u| {
                let z = b.def(Kind::F, "sub.rn.f32", &[&s[u], &m[u]]);
                let e = b.exp(z);
                let p = b.def(Kind::F, "div.rn.f32", &[&e, &l[u]]);
                b.round(act, p)
            })
            .collect();
        let jz = b.mov_u32(&0);
        b.for_range(jz, &KTILE, &1, |b, j| {
            let pj: Vec<Reg> = p
                .iter()
                .map(|pu| b.def(Kind::F, "shfl.sync.idx.b32", &[pu, &j, &31, &"-1"]))
                .collect();
            let row = b.def(Kind::R, "mul.lo.u32", &[&j, &(hd * 4)]);
            for (i, vc) in vcols.iter().enumerate() {
                let va = b.def(Kind::R, "add.u32", &[vc, &row]);
                let v = b.def(Kind::F, "ld.shared.f32", &[&format!("[{va}]")]);
                for (u, pu) in pj.iter().enumerate() {
                    let acc = o[u * per as usize + i];
                    ins!(b, "fma.rn.f32 {acc}, {pu}, {v}, {acc}");
                }
            }
        });
        ins!(b, "bar.sync 0");
    });
    b.comment("store the rounded rows of the valid queries");
    for u in 0..4u32 {
        let s = b.def(Kind::R, "mad.lo.u32", &[&warp, &4, &s0]);
        let s = b.def(Kind::R, "add.u32", &[&s, &u]);
        let sok = b.def(Kind::Pred, "setp.lt.u32", &[&s, &seq]);
        let t = b.def(Kind::R, "add.u32", &[&t0, &s]);
        let t = b.def(Kind::R, "selp.b32", &[&t, &t0, &sok]);
        let out = act_row(&mut b, "out", t, act);
        let oh = b.addr(out, &h, hd * asz);
        for i in 0..per {
            let d = b.def(Kind::R, "add.u32", &[&lane, &(32 * i)]);
            let ok = b.def(Kind::Pred, "setp.lt.u32", &[&d, &hd]);
            ins!(b, "and.pred {ok}, {ok}, {sok}");
            let oa = b.addr(oh, &d, asz);
            b.store(act, oa, 0, o[(u * per + i) as usize], Some(ok));
        }
    }
    let launch = Launch {
        grid: [Dim::Seq { per: QTILE }, Dim::Fixed(a.heads as u32), Dim::Batch],
        block,
        shared_bytes: shared,
    };
    Emitted::new("prefill", When::Prefill, launch, b)
}
