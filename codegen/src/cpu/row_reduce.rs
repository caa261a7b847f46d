//! `RowReduce`: add, RMS norm, gate and next norm of one row at a time, in
//! the reference's order of operations (sequential f32 sums).

use super::{Emit, norm_weighted};
use cranelift_codegen::ir::{InstBuilder, Value};
use ouroc_ir::DType;
use ouroc_kernels::spec::RowReduceSpec;

pub(super) fn emit(e: &mut Emit, act: DType, r: &RowReduceSpec) {
    // Operand and result indices in the ABI's argument list.
    let mut next_arg = 0..;
    let mut take = |on: bool| on.then(|| next_arg.next().expect("unbounded"));
    let x0 = take(true).expect("always");
    let x1 = take(r.add);
    let w = take(norm_weighted(r.norm));
    let gw = take(r.gate);
    let gb = take(r.gate);
    let nw = take(r.next.is_some_and(norm_weighted));
    let s_out = take(r.add);
    let n_out = take(true).expect("always");
    let lam_out = take(r.gate);
    let next_out = take(r.next.is_some());

    let base = |e: &mut Emit, i: Option<usize>| i.map(|i| (e.arg(i), e.stride_bytes(i, act)));
    let acts = [
        x0,
        x1.unwrap_or(x0),
        s_out.unwrap_or(n_out),
        n_out,
        lam_out.unwrap_or(n_out),
        next_out.unwrap_or(n_out),
    ];
    let acts: Vec<(Value, Value)> = acts.iter().map(|&i| base(e, Some(i)).expect("some")).collect();
    let weights: Vec<Option<Value>> = [w, gw, gb, nw].iter().map(|&i| i.map(|i| e.arg(i))).collect();
    let (w, gw, gb, nw) = (weights[0], weights[1], weights[2], weights[3]);
    let width = r.width;

    e.for_tokens(|e, t| {
        let rows: Vec<Value> = acts.iter().map(|&(b, s)| e.row(b, s, t)).collect();
        let (x0r, x1r, sr, nr, lr, xr) = (rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]);
        let zero = e.b.ins().f32const(0.0);
        // Pass 1: s = round(x0 + x1) (stored), sum of squares of s.
        let ss = e.for_const(width, &[zero], |e, i, acc| {
            let p0 = e.elem_addr(x0r, i, act);
            let a = e.load_s(act, p0, 0);
            let s = if r.add {
                let p1 = e.elem_addr(x1r, i, act);
                let b = e.load_s(act, p1, 0);
                let sum = e.b.ins().fadd(a, b);
                let s = e.round_s(act, sum);
                let ps = e.elem_addr(sr, i, act);
                e.store_s(act, s, ps, 0);
                s
            } else {
                a
            };
            let sq = e.b.ins().fmul(s, s);
            vec![e.b.ins().fadd(acc[0], sq)]
        })[0];
        let inv = inv_rms(e, ss, width, r.eps);
        // Pass 2: n (stored), the gate's dot product, next's sum of squares.
        let src = if r.add { sr } else { x0r };
        let sums = e.for_const(width, &[zero, zero], |e, i, acc| {
            let p = e.elem_addr(src, i, act);
            let v = e.load_s(act, p, 0);
            let n = norm(e, act, v, inv, w, i);
            let pn = e.elem_addr(nr, i, act);
            e.store_s(act, n, pn, 0);
            let mut next = acc.to_vec();
            if let Some(gw) = gw {
                let pg = e.elem_addr(gw, i, act);
                let g = e.load_s(act, pg, 0);
                let prod = e.b.ins().fmul(n, g);
                next[0] = e.b.ins().fadd(acc[0], prod);
            }
            if r.next.is_some() {
                let sq = e.b.ins().fmul(n, n);
                next[1] = e.b.ins().fadd(acc[1], sq);
            }
            next
        });
        if let Some(gb) = gb {
            let b = e.load_s(act, gb, 0);
            let z = e.b.ins().fadd(sums[0], b);
            let z = e.round_s(act, z);
            let lam = e.sigmoid(act, z);
            e.store_s(act, lam, lr, 0);
        }
        if r.next.is_some() {
            let inv2 = inv_rms(e, sums[1], width, r.eps);
            e.for_const(width, &[], |e, i, _| {
                let p = e.elem_addr(nr, i, act);
                let v = e.load_s(act, p, 0);
                let m = norm(e, act, v, inv2, nw, i);
                let px = e.elem_addr(xr, i, act);
                e.store_s(act, m, px, 0);
                Vec::new()
            });
        }
    });
}

/// `1 / sqrt(ss / width + eps)`.
fn inv_rms(e: &mut Emit, ss: Value, width: usize, eps: f64) -> Value {
    let wf = e.b.ins().f32const(width as f32);
    let ms = e.b.ins().fdiv(ss, wf);
    let eps = e.b.ins().f32const(eps as f32);
    let d = e.b.ins().fadd(ms, eps);
    let root = e.b.ins().sqrt(d);
    let one = e.b.ins().f32const(1.0);
    e.b.ins().fdiv(one, root)
}

/// `round(v * inv)`, times `w[i]` and rounded again when weighted.
fn norm(e: &mut Emit, act: DType, v: Value, inv: Value, w: Option<Value>, i: Value) -> Value {
    let n = e.b.ins().fmul(v, inv);
    let n = e.round_s(act, n);
    match w {
        Some(w) => {
            let p = e.elem_addr(w, i, act);
            let wv = e.load_s(act, p, 0);
            let m = e.b.ins().fmul(wv, n);
            e.round_s(act, m)
        }
        None => n,
    }
}
