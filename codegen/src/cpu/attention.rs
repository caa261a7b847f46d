//! `Attention`: append the new tokens' K (after RoPE) and V rows to each
//! sequence's KV slot, then causal softmax attention per token and query
//! head, in the reference's order of operations (see the ABI in `super`).

use super::rope::rope_head;
use super::{Emit, mf};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use ouroc_ir::DType;
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
    let batch = e.b.ins().udiv(e.tokens, seq);
    let row_bytes = (kvw * size) as i64;
    let head_bytes = (hd * size) as i64;

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
        e.for_loop(zero, seq, 1, &[], |e, t, _| {
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
        e.for_loop(zero, seq, 1, &[], |e, t, _| {
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
                let kvh = if group == 1 {
                    h
                } else {
                    e.b.ins().udiv_imm_u(h, group as i64)
                };
                let kvoff = e.b.ins().imul_imm_u(kvh, head_bytes);
                let (kb, vb) = (e.b.ins().iadd(kc, kvoff), e.b.ins().iadd(vc, kvoff));
                head(e, act, &qv, kb, vb, n, row_bytes, scratch, scale, or, qoff);
                Vec::new()
            });
            Vec::new()
        });
        Vec::new()
    });
}

/// One query head: scores into `scratch`, softmax, the weighted sum of V,
/// stored at `or + qoff`.
#[allow(clippy::too_many_arguments)]
fn head(
    e: &mut Emit,
    act: DType,
    qv: &[Value],
    kb: Value,
    vb: Value,
    n: Value,
    row_bytes: i64,
    scratch: Value,
    scale: f32,
    or: Value,
    qoff: Value,
) {
    let hd = qv.len();
    let size = act.size_bytes() as i32;
    let zero = e.iconst(0);
    // Pass 1: s_j = round(round(q . k_j) * scale), the sequential dot
    // product of the reference (its f32 sum starts at -0.0, so the first
    // product is the first partial sum); the running max.
    let ninf = e.b.ins().f32const(f32::NEG_INFINITY);
    let max = e.for_loop(zero, n, 1, &[ninf], |e, j, m| {
        let off = e.b.ins().imul_imm_u(j, row_bytes);
        let kj = e.b.ins().iadd(kb, off);
        let mut dot = None;
        for (d, &x) in qv.iter().enumerate() {
            let y = e.load_s(act, kj, d as i32 * size);
            let p = e.b.ins().fmul(x, y);
            dot = Some(match dot {
                None => p,
                Some(acc) => e.b.ins().fadd(acc, p),
            });
        }
        let dot = e.round_s(act, dot.expect("head_dim > 0"));
        let sc = e.b.ins().f32const(scale);
        let s = e.b.ins().fmul(dot, sc);
        let s = e.round_s(act, s);
        let sp = e.elem_addr(scratch, j, DType::F32);
        e.b.ins().store(mf(), s, sp, 0);
        // f32::max of non-NaN values (a NaN score propagates here).
        vec![e.b.ins().fmax(m[0], s)]
    })[0];
    // Pass 2: e_j = exp(s_j - max) over the scores, their sum from +0.0.
    let fzero = e.b.ins().f32const(0.0);
    let sum = e.for_loop(zero, n, 1, &[fzero], |e, j, acc| {
        let sp = e.elem_addr(scratch, j, DType::F32);
        let s = e.b.ins().load(types::F32, mf(), sp, 0);
        let d = e.b.ins().fsub(s, max);
        let x = e.exp(d);
        e.b.ins().store(mf(), x, sp, 0);
        vec![e.b.ins().fadd(acc[0], x)]
    })[0];
    // Pass 3: o += round(e_j / sum) * v_j, four lanes of o per f32x4 (each
    // lane's sum in the reference's order, j ascending, mul then add).
    let (vecs, tail) = (hd / 4, hd % 4);
    let vzero = e.b.ins().splat(types::F32X4, fzero);
    let mut init = vec![vzero; vecs];
    init.extend(std::iter::repeat_n(fzero, tail));
    let accs = e.for_loop(zero, n, 1, &init, |e, j, acc| {
        let sp = e.elem_addr(scratch, j, DType::F32);
        let x = e.b.ins().load(types::F32, mf(), sp, 0);
        let p = e.b.ins().fdiv(x, sum);
        let p = e.round_s(act, p);
        let pv = e.b.ins().splat(types::F32X4, p);
        let off = e.b.ins().imul_imm_u(j, row_bytes);
        let vj = e.b.ins().iadd(vb, off);
        let mut next = Vec::with_capacity(acc.len());
        for (c, &a) in acc[..vecs].iter().enumerate() {
            let y = e.load_v(act, vj, (4 * c) as i32 * size);
            let m = e.b.ins().fmul(pv, y);
            next.push(e.b.ins().fadd(a, m));
        }
        for (i, &a) in acc[vecs..].iter().enumerate() {
            let y = e.load_s(act, vj, (4 * vecs + i) as i32 * size);
            let m = e.b.ins().fmul(p, y);
            next.push(e.b.ins().fadd(a, m));
        }
        next
    });
    let oh = e.b.ins().iadd(or, qoff);
    for (c, &a) in accs[..vecs].iter().enumerate() {
        if act == DType::F32 {
            e.b.ins().store(mf(), a, oh, (16 * c) as i32);
        } else {
            for l in 0..4u8 {
                let x = e.b.ins().extractlane(a, l);
                e.store_s(act, x, oh, (4 * c + l as usize) as i32 * size);
            }
        }
    }
    for (i, &a) in accs[vecs..].iter().enumerate() {
        e.store_s(act, a, oh, (4 * vecs + i) as i32 * size);
    }
}
