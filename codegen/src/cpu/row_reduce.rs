//! `RowReduce`: add, RMS norm, gate and next norm of one row at a time, in
//! the reference's order of operations (sequential f32 sums), four
//! elements per f32x4.

use super::{Emit, norm_weighted};
use cranelift_codegen::ir::{InstBuilder, Value, types};
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
        // Every pass takes four elements per f32x4 and then the row's last
        // `width % 4` one at a time; sums add the lanes one by one, in
        // element order, so they are the reference's sequential sums.
        // Pass 1: s = round(x0 + x1) (stored), sum of squares of s.
        let pass1 = |e: &mut Emit, lanes: Lanes, at: At, acc: &[Value]| {
            let a = lanes.load(e, act, x0r, at);
            let s = if r.add {
                let b = lanes.load(e, act, x1r, at);
                let sum = e.b.ins().fadd(a, b);
                let s = lanes.round(e, act, sum);
                lanes.store(e, act, s, sr, at);
                s
            } else {
                a
            };
            let sq = e.b.ins().fmul(s, s);
            vec![lanes.add_in_order(e, acc[0], sq)]
        };
        let ss = passes(e, width, &[zero], pass1)[0];
        let inv = inv_rms(e, ss, width, r.eps);
        // Pass 2: n (stored), the gate's dot product, next's sum of squares.
        let src = if r.add { sr } else { x0r };
        let pass2 = |e: &mut Emit, lanes: Lanes, at: At, acc: &[Value]| {
            let v = lanes.load(e, act, src, at);
            let n = norm(e, act, lanes, v, inv, w, at);
            lanes.store(e, act, n, nr, at);
            let mut next = acc.to_vec();
            if let Some(gw) = gw {
                let g = lanes.load(e, act, gw, at);
                let prod = e.b.ins().fmul(n, g);
                next[0] = lanes.add_in_order(e, acc[0], prod);
            }
            if r.next.is_some() {
                let sq = e.b.ins().fmul(n, n);
                next[1] = lanes.add_in_order(e, acc[1], sq);
            }
            next
        };
        let sums = passes(e, width, &[zero, zero], pass2);
        if let Some(gb) = gb {
            let b = e.load_s(act, gb, 0);
            let z = e.b.ins().fadd(sums[0], b);
            let z = e.round_s(act, z);
            let lam = e.sigmoid(act, z);
            e.store_s(act, lam, lr, 0);
        }
        if r.next.is_some() {
            let inv2 = inv_rms(e, sums[1], width, r.eps);
            let pass3 = |e: &mut Emit, lanes: Lanes, at: At, _: &[Value]| {
                let v = lanes.load(e, act, nr, at);
                let m = norm(e, act, lanes, v, inv2, nw, at);
                lanes.store(e, act, m, xr, at);
                Vec::new()
            };
            passes(e, width, &[], pass3);
        }
    });
}

/// Where a pass is in the row: a run-time element index (vector loop) or
/// a constant one (the scalar tail).
#[derive(Clone, Copy)]
enum At {
    Index(Value),
    Const(usize),
}

/// Whether a pass step handles one element or four (an f32x4).
#[derive(Clone, Copy, PartialEq)]
enum Lanes {
    One,
    Four,
}

impl Lanes {
    fn addr(e: &mut Emit, act: DType, p: Value, at: At) -> (Value, i32) {
        match at {
            At::Index(i) => (e.elem_addr(p, i, act), 0),
            At::Const(i) => (p, (i * act.size_bytes()) as i32),
        }
    }

    fn load(self, e: &mut Emit, act: DType, p: Value, at: At) -> Value {
        let (p, off) = Lanes::addr(e, act, p, at);
        match self {
            Lanes::One => e.load_s(act, p, off),
            Lanes::Four => e.load_v(act, p, off),
        }
    }

    fn store(self, e: &mut Emit, act: DType, v: Value, p: Value, at: At) {
        let (p, off) = Lanes::addr(e, act, p, at);
        match self {
            Lanes::One => e.store_s(act, v, p, off),
            Lanes::Four => e.store_v(act, v, p, off),
        }
    }

    fn round(self, e: &mut Emit, act: DType, v: Value) -> Value {
        match self {
            Lanes::One => e.round_s(act, v),
            Lanes::Four => e.round_v(act, v),
        }
    }

    fn splat(self, e: &mut Emit, x: Value) -> Value {
        match self {
            Lanes::One => x,
            Lanes::Four => e.b.ins().splat(types::F32X4, x),
        }
    }

    /// `acc + v` (scalar), or `acc + v0 + v1 + v2 + v3` added one lane at a
    /// time (the sequential order).
    fn add_in_order(self, e: &mut Emit, acc: Value, v: Value) -> Value {
        match self {
            Lanes::One => e.b.ins().fadd(acc, v),
            Lanes::Four => (0..4u8).fold(acc, |a, l| {
                let x = e.b.ins().extractlane(v, l);
                e.b.ins().fadd(a, x)
            }),
        }
    }
}

/// One pass over a row of `width` elements: `step` on four elements at a
/// time, then on each of the last `width % 4`, threading `init` through.
fn passes(
    e: &mut Emit,
    width: usize,
    init: &[Value],
    step: impl Fn(&mut Emit, Lanes, At, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    let vecs = width / 4;
    let mut acc = init.to_vec();
    if vecs > 0 {
        let (zero, end) = (e.iconst(0), e.iconst(4 * vecs));
        acc = e.for_loop(zero, end, 4, &acc, |e, i, acc| step(e, Lanes::Four, At::Index(i), acc));
    }
    for i in 4 * vecs..width {
        acc = step(e, Lanes::One, At::Const(i), &acc);
    }
    acc
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
fn norm(e: &mut Emit, act: DType, lanes: Lanes, v: Value, inv: Value, w: Option<Value>, at: At) -> Value {
    let inv = lanes.splat(e, inv);
    let n = e.b.ins().fmul(v, inv);
    let n = lanes.round(e, act, n);
    match w {
        Some(w) => {
            let wv = lanes.load(e, act, w, at);
            let m = e.b.ins().fmul(wv, n);
            lanes.round(e, act, m)
        }
        None => n,
    }
}
