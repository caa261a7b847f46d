//! `RopeTable` (cos / sin of `pos * inv_freq`) and `Rope` (rotate-half),
//! in the reference's f32 operations and rounding points.

use super::{Emit, Helper, mf};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use ouroc_ir::DType;
use ouroc_kernels::spec::{RopeSpec, RopeTableSpec, Trig};

/// `inv_freq[j] = 1 / (theta as f32)^((2j) as f32 / head_dim as f32)`, the
/// reference's f32 expression, evaluated here and embedded as constants.
pub(super) fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// Per token: `round(f(pos as f32 * inv_freq[j % half]))` for j in 0..head_dim,
/// `f` a call to the same `f32::cos` / `f32::sin` as the reference.
pub(super) fn emit_table(e: &mut Emit, act: DType, s: &RopeTableSpec) {
    let inv = inv_freq(s.theta, s.head_dim);
    let half = inv.len();
    let func = match s.func {
        Trig::Cos => Helper::Cos,
        Trig::Sin => Helper::Sin,
    };
    let (pos, out) = (e.arg(0), e.arg(1));
    let (s_pos, s_out) = (e.stride_bytes(0, DType::I32), e.stride_bytes(1, act));
    let size = act.size_bytes() as i32;
    e.for_tokens(|e, t| {
        let pp = e.row(pos, s_pos, t);
        let p = e.b.ins().load(types::I32, mf(), pp, 0);
        // i32 -> f32 rounds to nearest like the reference's usize -> f32.
        let p = e.b.ins().fcvt_from_sint(types::F32, p);
        let row = e.row(out, s_out, t);
        let vals: Vec<Value> = inv
            .iter()
            .map(|&f| {
                let c = e.b.ins().f32const(f);
                let x = e.b.ins().fmul(p, c);
                let y = e.call_helper(func, x);
                e.round_s(act, y)
            })
            .collect();
        for j in 0..s.head_dim {
            e.store_exact(act, vals[j % half], row, j as i32 * size);
        }
    });
}

/// Per token and head: `round(round(x[j] * cos[j]) + round(rot[j] * sin[j]))`.
pub(super) fn emit(e: &mut Emit, act: DType, r: &RopeSpec) {
    let (x, cos, sin, out) = (e.arg(0), e.arg(1), e.arg(2), e.arg(3));
    let strides: Vec<Value> = (0..4).map(|i| e.stride_bytes(i, act)).collect();
    let head_bytes = r.head_dim * act.size_bytes();
    e.for_tokens(|e, t| {
        let rows: Vec<Value> = [x, cos, sin, out]
            .iter()
            .zip(&strides)
            .map(|(&b, &s)| e.row(b, s, t))
            .collect();
        e.for_const(r.heads, &[], |e, h, _| {
            let off = e.b.ins().imul_imm_u(h, head_bytes as i64);
            let xh = e.b.ins().iadd(rows[0], off);
            let vals = rope_head(e, act, xh, rows[1], rows[2], r.head_dim);
            let oh = e.b.ins().iadd(rows[3], off);
            store_row(e, act, &vals, oh);
            Vec::new()
        });
    });
}

/// The rotated head at `xh` (`head_dim` elements of `act`), with the
/// table rows `cos`, `sin`: every element is loaded before any result is
/// computed, so the caller may store the result over the head (in place).
pub(super) fn rope_head(e: &mut Emit, act: DType, xh: Value, cos: Value, sin: Value, hd: usize) -> Vec<Value> {
    let size = act.size_bytes() as i32;
    let half = hd / 2;
    let xs: Vec<Value> = (0..hd).map(|j| e.load_s(act, xh, j as i32 * size)).collect();
    (0..hd)
        .map(|j| {
            let c = e.load_s(act, cos, j as i32 * size);
            let s = e.load_s(act, sin, j as i32 * size);
            let rot = if j < half {
                e.b.ins().fneg(xs[j + half])
            } else {
                xs[j - half]
            };
            let a = e.b.ins().fmul(xs[j], c);
            let a = e.round_s(act, a);
            let b = e.b.ins().fmul(rot, s);
            let b = e.round_s(act, b);
            let sum = e.b.ins().fadd(a, b);
            e.round_s(act, sum)
        })
        .collect()
}

/// Store `vals`, already rounded to `act`, as consecutive elements at `p`.
pub(super) fn store_row(e: &mut Emit, act: DType, vals: &[Value], p: Value) {
    let size = act.size_bytes() as i32;
    for (j, &v) in vals.iter().enumerate() {
        e.store_exact(act, v, p, j as i32 * size);
    }
}
