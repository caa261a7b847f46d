//! `Elementwise`: an expression tree per element, every node but the
//! inputs rounded to the activation dtype; four elements per f32x4, the
//! row's last `width % 4` one at a time.

use super::Emit;
use cranelift_codegen::ir::{InstBuilder, Value, types};
use ouroc_ir::DType;
use ouroc_kernels::Expr;
use ouroc_kernels::spec::ElementwiseSpec;

pub(super) fn emit(e: &mut Emit, act: DType, s: &ElementwiseSpec) {
    let n = s.inputs;
    let bases: Vec<Value> = (0..=n).map(|i| e.arg(i)).collect();
    let strides: Vec<Value> = (0..=n).map(|i| e.stride_bytes(i, act)).collect();
    let used: Vec<bool> = (0..n).map(|i| uses(&s.expr, i)).collect();
    let size = act.size_bytes() as i32;
    let vecs = s.width / 4;
    e.for_tokens(|e, t| {
        let rows: Vec<Value> = (0..=n).map(|i| e.row(bases[i], strides[i], t)).collect();
        // Four elements at a time: each lane the scalar arithmetic, so the
        // same results; every operand is read before the result is written
        // (in place).
        let (zero, end) = (e.iconst(0), e.iconst(4 * vecs));
        e.for_loop(zero, end, 4, &[], |e, i, _| {
            let ptrs: Vec<Value> = rows.iter().map(|&r| e.elem_addr(r, i, act)).collect();
            let xs: Vec<Option<Value>> = (0..n).map(|j| used[j].then(|| e.load_v(act, ptrs[j], 0))).collect();
            let v = eval(e, act, &s.expr, &xs, Lanes::Four);
            e.store_v(act, v, ptrs[n], 0);
            Vec::new()
        });
        for i in 4 * vecs..s.width {
            let off = i as i32 * size;
            let xs: Vec<Option<Value>> = (0..n).map(|j| used[j].then(|| e.load_s(act, rows[j], off))).collect();
            let v = eval(e, act, &s.expr, &xs, Lanes::One);
            e.store_s(act, v, rows[n], off);
        }
    });
}

/// Whether values are scalars or f32x4 vectors.
#[derive(Clone, Copy, PartialEq)]
enum Lanes {
    One,
    Four,
}

fn uses(x: &Expr, i: usize) -> bool {
    match x {
        Expr::Input(j) => *j == i,
        Expr::Silu(a) | Expr::Sigmoid(a) => uses(a, i),
        Expr::Add(a, b) | Expr::Mul(a, b) => uses(a, i) || uses(b, i),
    }
}

/// `Expr::eval` in CLIF: the same f32 operations in the same order (on
/// each lane of a vector).
fn eval(e: &mut Emit, act: DType, x: &Expr, xs: &[Option<Value>], lanes: Lanes) -> Value {
    let round = |e: &mut Emit, v: Value| match lanes {
        Lanes::One => e.round_s(act, v),
        Lanes::Four => e.round_v(act, v),
    };
    let one = |e: &mut Emit| {
        let c = e.b.ins().f32const(1.0);
        match lanes {
            Lanes::One => c,
            Lanes::Four => e.b.ins().splat(types::F32X4, c),
        }
    };
    let exp = |e: &mut Emit, v: Value| match lanes {
        Lanes::One => e.exp(v),
        Lanes::Four => e.exp_v(v),
    };
    match x {
        Expr::Input(i) => xs[*i].expect("loaded: the expression uses it"),
        Expr::Silu(a) => {
            let v = eval(e, act, a, xs, lanes);
            let neg = e.b.ins().fneg(v);
            let ex = exp(e, neg);
            let one = one(e);
            let den = e.b.ins().fadd(one, ex);
            let r = e.b.ins().fdiv(v, den);
            round(e, r)
        }
        Expr::Sigmoid(a) => {
            // `Emit::sigmoid`: round(1 / (1 + exp(-x))).
            let v = eval(e, act, a, xs, lanes);
            let neg = e.b.ins().fneg(v);
            let ex = exp(e, neg);
            let one = one(e);
            let den = e.b.ins().fadd(one, ex);
            let r = e.b.ins().fdiv(one, den);
            round(e, r)
        }
        Expr::Add(a, b) => {
            let (a, b) = (eval(e, act, a, xs, lanes), eval(e, act, b, xs, lanes));
            let r = e.b.ins().fadd(a, b);
            round(e, r)
        }
        Expr::Mul(a, b) => {
            let (a, b) = (eval(e, act, a, xs, lanes), eval(e, act, b, xs, lanes));
            let r = e.b.ins().fmul(a, b);
            round(e, r)
        }
    }
}
