//! `Linear`: `y[t, o] = round(sum_k x[t, k] * W[o, k] + b[o])`.

use super::{Emit, mf};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value, types};
use ouroc_ir::DType;
use ouroc_kernels::spec::LinearSpec;

pub(super) fn emit(e: &mut Emit, act: DType, l: &LinearSpec) {
    let res = 2 + l.bias as usize;
    let (x, w, y) = (e.arg(0), e.arg(1), e.arg(res));
    let bias = if l.bias { Some(e.arg(2)) } else { None };
    let (sx, sy) = (e.stride_bytes(0, act), e.stride_bytes(res, act));
    // With n == k a result row may be its own input row (in place): read x
    // from a private copy of the row then.
    let copy = (l.n == l.k).then(|| {
        let bytes = (l.k * act.size_bytes()).next_multiple_of(16) as u32;
        e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4))
    });
    e.for_tokens(|e, t| {
        let mut xr = e.row(x, sx, t);
        let yr = e.row(y, sy, t);
        if let Some(slot) = copy {
            let tmp = e.b.ins().stack_addr(e.ptr, slot, 0);
            copy_bytes(e, xr, tmp, l.k * act.size_bytes());
            xr = tmp;
        }
        let ctx = Rows {
            l,
            act,
            xr,
            w,
            bias,
            yr,
        };
        let blocks = l.n / 4 * 4;
        if blocks > 0 {
            let (zero, end) = (e.iconst(0), e.iconst(blocks));
            e.for_loop(zero, end, 4, &[], |e, o, _| {
                ctx.emit(e, o, 4);
                Vec::new()
            });
        }
        if !l.n.is_multiple_of(4) {
            let (start, end) = (e.iconst(blocks), e.iconst(l.n));
            e.for_loop(start, end, 1, &[], |e, o, _| {
                ctx.emit(e, o, 1);
                Vec::new()
            });
        }
    });
}

/// Copy `bytes` bytes from `src` to `dst`: 16 at a time, then single bytes.
pub(super) fn copy_bytes(e: &mut Emit, src: Value, dst: Value, bytes: usize) {
    let chunks = bytes / 16;
    e.for_const(chunks, &[], |e, i, _| {
        let off = e.b.ins().imul_imm_u(i, 16);
        let (s, d) = (e.b.ins().iadd(src, off), e.b.ins().iadd(dst, off));
        let v = e.b.ins().load(types::I8X16, mf(), s, 0);
        e.b.ins().store(mf(), v, d, 0);
        Vec::new()
    });
    for i in chunks * 16..bytes {
        let v = e.b.ins().load(types::I8, mf(), src, i as i32);
        e.b.ins().store(mf(), v, dst, i as i32);
    }
}

/// What one block of output rows needs.
struct Rows<'a> {
    l: &'a LinearSpec,
    act: DType,
    xr: Value,
    w: Value,
    bias: Option<Value>,
    yr: Value,
}

impl Rows<'_> {
    /// Outputs `o .. o + r` of the current token.
    fn emit(&self, e: &mut Emit, o: Value, r: usize) {
        let (l, act, wd) = (self.l, self.act, self.l.weight);
        let (xs, ws) = (act.size_bytes() as i32, wd.size_bytes() as i32);
        let row_bytes = (l.k * wd.size_bytes()) as i64;
        let w_off = e.b.ins().imul_imm_u(o, row_bytes);
        let w0 = e.b.ins().iadd(self.w, w_off);
        let wr: Vec<Value> = (0..r as i64)
            .map(|j| {
                if j == 0 {
                    w0
                } else {
                    e.b.ins().iadd_imm_u(w0, j * row_bytes)
                }
            })
            .collect();
        let zero = e.b.ins().f32const(0.0);
        let zero = e.b.ins().splat(types::F32X4, zero);
        // 2r accumulators: [j] over the first 4 of each 8 columns, [r + j] over the second.
        let mut acc = vec![zero; 2 * r];
        let k8 = l.k / 8 * 8;
        if k8 > 0 {
            let (start, end) = (e.iconst(0), e.iconst(k8));
            let xr = self.xr;
            acc = e.for_loop(start, end, 8, &acc, |e, kk, acc| {
                let xp = e.elem_addr(xr, kk, act);
                let xa = e.load_v(act, xp, 0);
                let xb = e.load_v(act, xp, 4 * xs);
                let mut next = acc.to_vec();
                for j in 0..r {
                    let wp = e.elem_addr(wr[j], kk, wd);
                    let wa = e.load_v(wd, wp, 0);
                    next[j] = e.b.ins().fma(wa, xa, acc[j]);
                    let wb = e.load_v(wd, wp, 4 * ws);
                    next[r + j] = e.b.ins().fma(wb, xb, acc[r + j]);
                }
                next
            });
        }
        let mut k0 = k8;
        if l.k - k8 >= 4 {
            let xa = e.load_v(act, self.xr, k8 as i32 * xs);
            for j in 0..r {
                let wa = e.load_v(wd, wr[j], k8 as i32 * ws);
                acc[j] = e.b.ins().fma(wa, xa, acc[j]);
            }
            k0 += 4;
        }
        let xtail: Vec<Value> = (k0..l.k).map(|kk| e.load_s(act, self.xr, kk as i32 * xs)).collect();
        let bias = self.bias.map(|b| e.elem_addr(b, o, wd));
        let yp = e.elem_addr(self.yr, o, act);
        for j in 0..r {
            let v = e.b.ins().fadd(acc[j], acc[r + j]);
            let lane: Vec<Value> = (0..4u8).map(|i| e.b.ins().extractlane(v, i)).collect();
            let lo = e.b.ins().fadd(lane[0], lane[1]);
            let hi = e.b.ins().fadd(lane[2], lane[3]);
            let mut sum = e.b.ins().fadd(lo, hi);
            for (i, &xv) in xtail.iter().enumerate() {
                let wv = e.load_s(wd, wr[j], (k0 + i) as i32 * ws);
                sum = e.b.ins().fma(wv, xv, sum);
            }
            if let Some(bp) = bias {
                let bv = e.load_s(wd, bp, j as i32 * ws);
                sum = e.b.ins().fadd(sum, bv);
            }
            e.store_s(act, sum, yp, j as i32 * xs);
        }
    }
}
