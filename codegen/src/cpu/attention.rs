//! `Attention`: append the new tokens' K (after RoPE) and V rows to each
//! sequence's KV slot, then causal softmax attention per token and query
//! head, in the reference's order of operations (see the ABI in `super`).

use super::rope::rope_head;
use super::{Emit, mf, vbits};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{ConstantData, InstBuilder, StackSlotData, StackSlotKind, Value, types};
use ouroc_ir::DType;
use ouroc_kernels::abi::AttentionPhase;
use ouroc_kernels::spec::AttentionSpec;

pub(super) fn emit(e: &mut Emit, act: DType, a: &AttentionSpec) {
    let hd = a.head_dim;
    let size = act.size_bytes();
    let (kvw, group) = (a.kv_heads * hd, a.heads / a.kv_heads);
    let scale = (hd as f64).powf(-0.5) as f32;
    let n_ops = 3 + 2 * a.rope as usize;
    let (out_i, seqs_i, scratch_i) = (n_ops, n_ops + 1, n_ops + 2);
    let (q, k, v, out) = (e.arg(0), e.arg(1), e.arg(2), e.arg(out_i));
    let (sq, sk, sv, so) = (
        e.stride_bytes(0, act),
        e.stride_bytes(1, act),
        e.stride_bytes(2, act),
        e.stride_bytes(out_i, act),
    );
    let tables = a.rope.then(|| {
        let (c, s) = (e.arg(3), e.arg(4));
        let (sc, ss) = (e.stride_bytes(3, act), e.stride_bytes(4, act));
        (c, sc, s, ss)
    });
    let (seqs, scratch) = (e.arg(seqs_i), e.arg(scratch_i));
    let pb = e.ptr.bytes() as i32;
    // strides[seqs] is the number of tokens per sequence (not a row stride).
    let seq = e.b.ins().load(e.ptr, mf(), e.strides, pb * seqs_i as i32);
    // strides[scratch] is the phase (`AttentionPhase`): append unless only
    // attending, attend unless only appending.
    let phase = e.b.ins().load(e.ptr, mf(), e.strides, pb * scratch_i as i32);
    let append =
        e.b.ins()
            .icmp_imm_u(IntCC::NotEqual, phase, AttentionPhase::Attend as i64);
    let attend =
        e.b.ins()
            .icmp_imm_u(IntCC::NotEqual, phase, AttentionPhase::Append as i64);
    let batch = e.b.ins().udiv(e.tokens, seq);
    let row_bytes = (kvw * size) as i64;
    let head_bytes = (hd * size) as i64;

    // The query head (after RoPE), each element splat to an f32x4.
    let qslot =
        e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16 * hd as u32, 4));

    let zero = e.iconst(0);
    e.for_loop(zero, batch, 1, &[], |e, b, _| {
        let desc_off = e.b.ins().imul_imm_u(b, 3 * pb as i64);
        let desc = e.b.ins().iadd(seqs, desc_off);
        let kc = e.b.ins().load(e.ptr, mf(), desc, 0);
        let vc = e.b.ins().load(e.ptr, mf(), desc, pb);
        let past = e.b.ins().load(e.ptr, mf(), desc, 2 * pb);
        let first = e.b.ins().imul(b, seq);
        let table_rows = |e: &mut Emit, tok: Value| tables.map(|(c, sc, s, ss)| (e.row(c, sc, tok), e.row(s, ss, tok)));

        // 1. Append: cache row past + t gets k (rotated) and v of token t.
        let zero = e.iconst(0);
        let end = e.b.ins().select(append, seq, zero);
        e.for_loop(zero, end, 1, &[], |e, t, _| {
            let tok = e.b.ins().iadd(first, t);
            let p = e.b.ins().iadd(past, t);
            let off = e.b.ins().imul_imm_u(p, row_bytes);
            let (kd, vd) = (e.b.ins().iadd(kc, off), e.b.ins().iadd(vc, off));
            let (kr, vr) = (e.row(k, sk, tok), e.row(v, sv, tok));
            match table_rows(e, tok) {
                Some((cr, sr)) => {
                    for h in 0..a.kv_heads {
                        let o = h as i64 * head_bytes;
                        let kh = e.b.ins().iadd_imm_u(kr, o);
                        let vals = rope_head(e, act, kh, cr, sr, hd);
                        let dh = e.b.ins().iadd_imm_u(kd, o);
                        super::rope::store_row(e, act, &vals, dh);
                    }
                }
                None => super::linear::copy_bytes(e, kr, kd, kvw * size),
            }
            super::linear::copy_bytes(e, vr, vd, kvw * size);
            Vec::new()
        });

        // 2. Attend: token t (absolute position past + t) over 0..=past + t.
        let zero = e.iconst(0);
        let end = e.b.ins().select(attend, seq, zero);
        e.for_loop(zero, end, 1, &[], |e, t, _| {
            let tok = e.b.ins().iadd(first, t);
            let n = e.b.ins().iadd(past, t);
            let n = e.b.ins().iadd_imm_u(n, 1);
            let (qr, or) = (e.row(q, sq, tok), e.row(out, so, tok));
            let trows = table_rows(e, tok);
            e.for_const(a.heads, &[], |e, h, _| {
                let qoff = e.b.ins().imul_imm_u(h, head_bytes);
                let qh = e.b.ins().iadd(qr, qoff);
                let qv: Vec<Value> = match trows {
                    Some((cr, sr)) => rope_head(e, act, qh, cr, sr, hd),
                    None => (0..hd).map(|d| e.load_s(act, qh, (d * size) as i32)).collect(),
                };
                // q[d] splat to all four lanes, at 16 * d in the q slot.
                let qs = e.b.ins().stack_addr(e.ptr, qslot, 0);
                for (d, &x) in qv.iter().enumerate() {
                    let xv = e.b.ins().splat(types::F32X4, x);
                    e.b.ins().store(mf().with_aligned(), xv, qs, 16 * d as i32);
                }
                let kvh = if group == 1 {
                    h
                } else {
                    e.b.ins().udiv_imm_u(h, group as i64)
                };
                let kvoff = e.b.ins().imul_imm_u(kvh, head_bytes);
                let (kb, vb) = (e.b.ins().iadd(kc, kvoff), e.b.ins().iadd(vc, kvoff));
                let oh = e.b.ins().iadd(or, qoff);
                let h = Head {
                    act,
                    hd,
                    qs,
                    kb,
                    vb,
                    n,
                    row_bytes,
                    scratch,
                    scale,
                };
                head(e, &h, oh);
                Vec::new()
            });
            Vec::new()
        });
        Vec::new()
    });
}

/// What [`head`] needs of one query head.
struct Head {
    act: DType,
    hd: usize,
    /// The q slot: `q[d]` splat at `16 * d`.
    qs: Value,
    /// K / V cache row 0 of the head's kv head.
    kb: Value,
    vb: Value,
    /// The positions attended to, `0..n`.
    n: Value,
    row_bytes: i64,
    scratch: Value,
    scale: f32,
}

/// Rows of K scored per iteration of the main score loop (two independent
/// groups of four lanes, to hide the latency of each lane's add chain).
const SCORE_ROWS: usize = 8;
/// f32x4 output accumulators per pass over V (32 of `head_dim` in registers).
const V_BLOCK: usize = 8;

/// One query head: scores into `scratch`, softmax, the weighted sum of V,
/// stored at `oh`. Every sum is in the reference's order: the dot products
/// are vectorised across positions (lane l scores row j + l, after a 4x4
/// transpose of four rows' chunks, each lane summing d ascending), the V sum
/// across `head_dim` (each lane summing j ascending), mul then add, no FMA.
fn head(e: &mut Emit, h: &Head, oh: Value) {
    let (act, hd) = (h.act, h.hd);
    let size = act.size_bytes() as i32;
    let zero = e.iconst(0);
    // Pass 1: s_j = round(round(q . k_j) * scale), the sequential dot
    // product of the reference (its f32 sum starts at -0.0, so the first
    // product is the first partial sum); the running max. Eight rows at a
    // time, then four, then one at a time.
    let ninf = e.b.ins().f32const(f32::NEG_INFINITY);
    let vninf = e.b.ins().splat(types::F32X4, ninf);
    let n8 = e.b.ins().band_imm_u(h.n, -(SCORE_ROWS as i64));
    let n4 = e.b.ins().band_imm_u(h.n, -4);
    let m = e.for_loop(zero, n8, SCORE_ROWS, &[vninf], |e, j, m| {
        vec![score_rows(e, h, j, SCORE_ROWS / 4, m[0])]
    })[0];
    let m = e.for_loop(n8, n4, 4, &[m], |e, j, m| vec![score_rows(e, h, j, 1, m[0])])[0];
    let lanes: Vec<Value> = (0..4u8).map(|l| e.b.ins().extractlane(m, l)).collect();
    let m = lanes[1..].iter().fold(lanes[0], |a, &x| e.b.ins().fmax(a, x));
    let max = e.for_loop(n4, h.n, 1, &[m], |e, j, m| {
        let off = e.b.ins().imul_imm_u(j, h.row_bytes);
        let kj = e.b.ins().iadd(h.kb, off);
        let mut dot = None;
        for d in 0..hd {
            let x = e.b.ins().load(types::F32, mf(), h.qs, 16 * d as i32);
            let y = e.load_s(act, kj, d as i32 * size);
            let p = e.b.ins().fmul(x, y);
            dot = Some(match dot {
                None => p,
                Some(acc) => e.b.ins().fadd(acc, p),
            });
        }
        let dot = e.round_s(act, dot.expect("head_dim > 0"));
        let sc = e.b.ins().f32const(h.scale);
        let s = e.b.ins().fmul(dot, sc);
        let s = e.round_s(act, s);
        let sp = e.elem_addr(h.scratch, j, DType::F32);
        e.b.ins().store(mf(), s, sp, 0);
        // f32::max of non-NaN values (a NaN score propagates here).
        vec![e.b.ins().fmax(m[0], s)]
    })[0];
    // Pass 2: e_j = exp(s_j - max) over the scores, their sum from +0.0.
    let fzero = e.b.ins().f32const(0.0);
    let sum = e.for_loop(zero, h.n, 1, &[fzero], |e, j, acc| {
        let sp = e.elem_addr(h.scratch, j, DType::F32);
        let s = e.b.ins().load(types::F32, mf(), sp, 0);
        let d = e.b.ins().fsub(s, max);
        let x = e.exp(d);
        e.b.ins().store(mf(), x, sp, 0);
        vec![e.b.ins().fadd(acc[0], x)]
    })[0];
    // p_j = round(e_j / sum), in place.
    e.for_loop(zero, h.n, 1, &[], |e, j, _| {
        let sp = e.elem_addr(h.scratch, j, DType::F32);
        let x = e.b.ins().load(types::F32, mf(), sp, 0);
        let p = e.b.ins().fdiv(x, sum);
        let p = e.round_s(act, p);
        e.b.ins().store(mf(), p, sp, 0);
        Vec::new()
    });
    // Pass 3: o += p_j * v_j, four lanes of o per f32x4 (each lane's sum in
    // the reference's order, j ascending, mul then add), V_BLOCK vectors of
    // o per pass over the positions (the last pass also the scalar tail of
    // head_dim % 4).
    let (vecs, tail) = (hd / 4, hd % 4);
    let vzero = e.b.ins().splat(types::F32X4, fzero);
    let blocks = vecs.div_ceil(V_BLOCK).max(1);
    for blk in 0..blocks {
        let cs = blk * V_BLOCK..((blk + 1) * V_BLOCK).min(vecs);
        let ntail = if blk + 1 == blocks { tail } else { 0 };
        let mut init = vec![vzero; cs.len()];
        init.extend(std::iter::repeat_n(fzero, ntail));
        let nv = cs.len();
        let accs = e.for_loop(zero, h.n, 1, &init, |e, j, acc| {
            let sp = e.elem_addr(h.scratch, j, DType::F32);
            let p = e.b.ins().load(types::F32, mf(), sp, 0);
            let pv = e.b.ins().splat(types::F32X4, p);
            let off = e.b.ins().imul_imm_u(j, h.row_bytes);
            let vj = e.b.ins().iadd(h.vb, off);
            let mut next = Vec::with_capacity(acc.len());
            for (c, &a) in cs.clone().zip(&acc[..nv]) {
                let y = e.load_v(act, vj, (4 * c) as i32 * size);
                let m = e.b.ins().fmul(pv, y);
                next.push(e.b.ins().fadd(a, m));
            }
            for (i, &a) in acc[nv..].iter().enumerate() {
                let y = e.load_s(act, vj, (4 * vecs + i) as i32 * size);
                let m = e.b.ins().fmul(p, y);
                next.push(e.b.ins().fadd(a, m));
            }
            next
        });
        for (c, &a) in cs.clone().zip(&accs[..nv]) {
            if act == DType::F32 {
                e.b.ins().store(mf(), a, oh, (16 * c) as i32);
            } else {
                for l in 0..4u8 {
                    let x = e.b.ins().extractlane(a, l);
                    e.store_s(act, x, oh, (4 * c + l as usize) as i32 * size);
                }
            }
        }
        for (i, &a) in accs[nv..].iter().enumerate() {
            e.store_s(act, a, oh, (4 * vecs + i) as i32 * size);
        }
    }
}

/// Scores of rows `j .. j + 4 * groups` into the scratch (lane l of group g
/// is row `j + 4g + l`); returns the lanewise max of `m` and the scores.
fn score_rows(e: &mut Emit, h: &Head, j: Value, groups: usize, m: Value) -> Value {
    let (act, hd) = (h.act, h.hd);
    let size = act.size_bytes() as i64;
    let off = e.b.ins().imul_imm_u(j, h.row_bytes);
    let kj = e.b.ins().iadd(h.kb, off);
    // Row r's element d is at kj + r * row_bytes + d * size.
    let at = |r: usize, d: usize| (r as i64 * h.row_bytes + d as i64 * size) as i32;
    let mz = e.b.ins().f32const(-0.0);
    let mz = e.b.ins().splat(types::F32X4, mz);
    let mut acc = vec![mz; groups];
    let qcol = |e: &mut Emit, d: usize| e.b.ins().load(types::F32X4, mf().with_aligned(), h.qs, 16 * d as i32);
    for c in 0..hd / 4 {
        for (g, a) in acc.iter_mut().enumerate() {
            let rows: Vec<Value> = (0..4).map(|l| e.load_v(act, kj, at(4 * g + l, 4 * c))).collect();
            let cols = transpose4(e, &rows);
            for (i, &col) in cols.iter().enumerate() {
                let qd = qcol(e, 4 * c + i);
                let p = e.b.ins().fmul(qd, col);
                *a = e.b.ins().fadd(*a, p);
            }
        }
    }
    for d in 4 * (hd / 4)..hd {
        for (g, a) in acc.iter_mut().enumerate() {
            let x0 = e.load_s(act, kj, at(4 * g, d));
            let mut col = e.b.ins().scalar_to_vector(types::F32X4, x0);
            for l in 1..4 {
                let x = e.load_s(act, kj, at(4 * g + l, d));
                col = e.b.ins().insertlane(col, x, l as u8);
            }
            let qd = qcol(e, d);
            let p = e.b.ins().fmul(qd, col);
            *a = e.b.ins().fadd(*a, p);
        }
    }
    let sc = e.b.ins().f32const(h.scale);
    let sc = e.b.ins().splat(types::F32X4, sc);
    let mut m = m;
    for (g, &a) in acc.iter().enumerate() {
        let dot = e.round_v(act, a);
        let s = e.b.ins().fmul(dot, sc);
        let s = e.round_v(act, s);
        let r = e.b.ins().iadd_imm_u(j, 4 * g as i64);
        let sp = e.elem_addr(h.scratch, r, DType::F32);
        e.b.ins().store(mf(), s, sp, 0);
        m = e.b.ins().fmax(m, s);
    }
    m
}

/// `[a, b, c, d]` (rows) to its columns `[a0 b0 c0 d0]`, ... .
fn transpose4(e: &mut Emit, r: &[Value]) -> [Value; 4] {
    // Byte masks of punpck{l,h}dq and punpck{l,h}qdq (a's bytes 0..16, b's 16..32).
    const LO32: [u8; 16] = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
    const HI32: [u8; 16] = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];
    const LO64: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
    const HI64: [u8; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];
    let mut shuf = |a: Value, b: Value, mask: &[u8; 16]| {
        let imm = e.b.func.dfg.immediates.push(ConstantData::from(&mask[..]));
        let a = e.b.ins().bitcast(types::I8X16, vbits(), a);
        let b = e.b.ins().bitcast(types::I8X16, vbits(), b);
        let s = e.b.ins().shuffle(a, b, imm);
        e.b.ins().bitcast(types::F32X4, vbits(), s)
    };
    let t0 = shuf(r[0], r[1], &LO32);
    let t1 = shuf(r[2], r[3], &LO32);
    let t2 = shuf(r[0], r[1], &HI32);
    let t3 = shuf(r[2], r[3], &HI32);
    [
        shuf(t0, t1, &LO64),
        shuf(t0, t1, &HI64),
        shuf(t2, t3, &LO64),
        shuf(t2, t3, &HI64),
    ]
}
