//! `Elementwise`: an expression tree per element, every node but the
//! inputs rounded to the activation dtype.

use super::Emit;
use cranelift_codegen::ir::{InstBuilder, Value};
use ouroc_ir::DType;
use ouroc_kernels::Expr;
use ouroc_kernels::spec::ElementwiseSpec;

pub(super) fn emit(e: &mut Emit, act: DType, s: &ElementwiseSpec) {
    let n = s.inputs;
    let bases: Vec<Value> = (0..=n).map(|i| e.arg(i)).collect();
    let strides: Vec<Value> = (0..=n).map(|i| e.stride_bytes(i, act)).collect();
    let used: Vec<bool> = (0..n).map(|i| uses(&s.expr, i)).collect();
    e.for_tokens(|e, t| {
        let rows: Vec<Value> = (0..=n).map(|i| e.row(bases[i], strides[i], t)).collect();
        e.for_const(s.width, &[], |e, i, _| {
            // Every operand element is read before the result element is written (in place).
            let xs: Vec<Option<Value>> = (0..n)
                .map(|j| {
                    used[j].then(|| {
                        let p = e.elem_addr(rows[j], i, act);
                        e.load_s(act, p, 0)
                    })
                })
                .collect();
            let v = eval(e, act, &s.expr, &xs);
            let p = e.elem_addr(rows[n], i, act);
            e.store_s(act, v, p, 0);
            Vec::new()
        });
    });
}

fn uses(x: &Expr, i: usize) -> bool {
    match x {
        Expr::Input(j) => *j == i,
        Expr::Silu(a) | Expr::Sigmoid(a) => uses(a, i),
        Expr::Add(a, b) | Expr::Mul(a, b) => uses(a, i) || uses(b, i),
    }
}

/// `Expr::eval` in CLIF: the same f32 operations in the same order.
fn eval(e: &mut Emit, act: DType, x: &Expr, xs: &[Option<Value>]) -> Value {
    match x {
        Expr::Input(i) => xs[*i].expect("loaded: the expression uses it"),
        Expr::Silu(a) => {
            let v = eval(e, act, a, xs);
            let neg = e.b.ins().fneg(v);
            let ex = e.exp(neg);
            let one = e.b.ins().f32const(1.0);
            let den = e.b.ins().fadd(one, ex);
            let r = e.b.ins().fdiv(v, den);
            e.round_s(act, r)
        }
        Expr::Sigmoid(a) => {
            let v = eval(e, act, a, xs);
            e.sigmoid(act, v)
        }
        Expr::Add(a, b) => {
            let (a, b) = (eval(e, act, a, xs), eval(e, act, b, xs));
            let r = e.b.ins().fadd(a, b);
            e.round_s(act, r)
        }
        Expr::Mul(a, b) => {
            let (a, b) = (eval(e, act, a, xs), eval(e, act, b, xs));
            let r = e.b.ins().fmul(a, b);
            e.round_s(act, r)
        }
    }
}
