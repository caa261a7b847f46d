//! `Linear`: `y[t, o] = round(sum_k x[t, k] * W[o, k] + b[o])` for the
//! output rows `o` in `row0 .. row1` (extra arguments).

use super::{Emit, mf, vbits};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value, types};
use ouroc_ir::DType;
use ouroc_kernels::spec::LinearSpec;

pub(super) fn emit(e: &mut Emit, act: DType, l: &LinearSpec) {
    let res = 2 + l.bias as usize;
    let (x, w, y) = (e.arg(0), e.arg(1), e.arg(res));
    let bias = if l.bias { Some(e.arg(2)) } else { None };
    let (sx, sy) = (e.stride_bytes(0, act), e.stride_bytes(res, act));
    // The output rows computed (see the ABI): extra arguments after y.
    let (row0, row1) = (e.stride(res + 1), e.stride(res + 2));
    // bf16 weights are read 8 at a time (16 bytes) and split into their
    // even and odd elements (`<< 16`, `& 0xffff0000`): x must then be in
    // the same order, so its row is first copied, as f32, to a private
    // buffer with each group of 8 stored evens first (see `swizzle_row`).
    let swizzle = l.weight == DType::BF16;
    // With n == k a result row may be its own input row (in place): read x
    // from a private copy of the row then.
    let copy = (l.n == l.k || swizzle).then(|| {
        let elem = if swizzle { 4 } else { act.size_bytes() };
        let bytes = (l.k * elem).next_multiple_of(16) as u32;
        e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4))
    });
    let xd = if swizzle { DType::F32 } else { act };
    e.for_tokens(|e, t| {
        let mut xr = e.row(x, sx, t);
        let yr = e.row(y, sy, t);
        if let Some(slot) = copy {
            let tmp = e.b.ins().stack_addr(e.ptr, slot, 0);
            if swizzle {
                swizzle_row(e, act, xr, tmp, l.k);
            } else {
                copy_bytes(e, xr, tmp, l.k * act.size_bytes());
            }
            xr = tmp;
        }
        let ctx = Rows {
            l,
            act,
            xd,
            swizzled: swizzle,
            xr,
            w,
            bias,
            yr,
        };
        // Rows row0 .. row1: blocks of 4 from row0, then one at a time.
        let blocks = e.b.ins().isub(row1, row0);
        let blocks = e.b.ins().band_imm_u(blocks, !3u64 as i64);
        let blocks_end = e.b.ins().iadd(row0, blocks);
        if l.n >= 4 {
            e.for_loop(row0, blocks_end, 4, &[], |e, o, _| {
                ctx.emit(e, o, 4);
                Vec::new()
            });
        }
        e.for_loop(blocks_end, row1, 1, &[], |e, o, _| {
            ctx.emit(e, o, 1);
            Vec::new()
        });
    });
}

/// Copy the `k` elements of an `act` row at `src` to `dst` as f32, each
/// whole group of 8 as `x0 x2 x4 x6 x1 x3 x5 x7` (the order of the even
/// and odd halves of 8 bf16 weights), the `k % 8` last ones in order.
fn swizzle_row(e: &mut Emit, act: DType, src: Value, dst: Value, k: usize) {
    let xs = act.size_bytes() as i64;
    e.for_const(k / 8, &[], |e, g, _| {
        let s = e.b.ins().imul_imm_u(g, 8 * xs);
        let s = e.b.ins().iadd(src, s);
        let d = e.b.ins().imul_imm_u(g, 32);
        let d = e.b.ins().iadd(dst, d);
        for i in 0..8 {
            let v = e.load_s(act, s, (i * xs) as i32);
            let at = if i % 2 == 0 { i / 2 } else { 4 + i / 2 };
            e.b.ins().store(mf(), v, d, (at * 4) as i32);
        }
        Vec::new()
    });
    for i in k / 8 * 8..k {
        let v = e.load_s(act, src, (i as i64 * xs) as i32);
        e.b.ins().store(mf(), v, dst, (i * 4) as i32);
    }
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
    /// The result's dtype.
    act: DType,
    /// The dtype of the x row read (f32 when swizzled).
    xd: DType,
    /// x is in `swizzle_row` order and W is bf16: read 8 weights at a time.
    swizzled: bool,
    xr: Value,
    w: Value,
    bias: Option<Value>,
    yr: Value,
}

impl Rows<'_> {
    /// Outputs `o .. o + r` of the current token.
    fn emit(&self, e: &mut Emit, o: Value, r: usize) {
        let (l, act, wd, xd) = (self.l, self.act, self.l.weight, self.xd);
        let (xs, ws) = (xd.size_bytes() as i32, wd.size_bytes() as i32);
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
            let (xr, swizzled) = (self.xr, self.swizzled);
            let high = if swizzled {
                let m = e.b.ins().iconst(types::I32, 0xffff_0000u32 as i64);
                Some(e.b.ins().splat(types::I32X4, m))
            } else {
                None
            };
            acc = e.for_loop(start, end, 8, &acc, |e, kk, acc| {
                let xp = e.elem_addr(xr, kk, xd);
                let xa = e.load_v(xd, xp, 0);
                let xb = e.load_v(xd, xp, 4 * xs);
                let mut next = acc.to_vec();
                for j in 0..r {
                    let wp = e.elem_addr(wr[j], kk, wd);
                    let (wa, wb) = match high {
                        // 8 bf16 as 4 u32 lanes: low halves are the even
                        // elements, high halves the odd ones.
                        Some(high) => {
                            let v = e.b.ins().load(types::I32X4, mf(), wp, 0);
                            let even = e.b.ins().ishl_imm_u(v, 16);
                            let odd = e.b.ins().band(v, high);
                            (
                                e.b.ins().bitcast(types::F32X4, vbits(), even),
                                e.b.ins().bitcast(types::F32X4, vbits(), odd),
                            )
                        }
                        None => (e.load_v(wd, wp, 0), e.load_v(wd, wp, 4 * ws)),
                    };
                    next[j] = e.b.ins().fma(wa, xa, acc[j]);
                    next[r + j] = e.b.ins().fma(wb, xb, acc[r + j]);
                }
                next
            });
        }
        let mut k0 = k8;
        if l.k - k8 >= 4 {
            let xa = e.load_v(xd, self.xr, k8 as i32 * xs);
            for j in 0..r {
                let wa = e.load_v(wd, wr[j], k8 as i32 * ws);
                acc[j] = e.b.ins().fma(wa, xa, acc[j]);
            }
            k0 += 4;
        }
        let xtail: Vec<Value> = (k0..l.k).map(|kk| e.load_s(xd, self.xr, kk as i32 * xs)).collect();
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
            e.store_s(act, sum, yp, j as i32 * act.size_bytes() as i32);
        }
    }
}
