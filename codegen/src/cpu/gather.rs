//! `Gather`: `out[t] = table[ids[t]]`, a row copy (no rounding point when
//! the table is stored in the activation dtype).

use super::linear::copy_bytes;
use super::{Emit, mf};
use cranelift_codegen::ir::{InstBuilder, types};
use ouroc_ir::DType;
use ouroc_kernels::spec::GatherSpec;

pub(super) fn emit(e: &mut Emit, act: DType, g: &GatherSpec) {
    let (table, ids, out) = (e.arg(0), e.arg(1), e.arg(2));
    let (s_ids, s_out) = (e.stride_bytes(1, DType::I32), e.stride_bytes(2, act));
    let row_bytes = g.width * g.table.size_bytes();
    e.for_tokens(|e, t| {
        let p = e.row(ids, s_ids, t);
        // The id is read as unsigned: the caller guarantees 0 <= id < rows
        // (the reference rejects other ids before running).
        let id = e.b.ins().load(types::I32, mf(), p, 0);
        let id = if e.ptr == types::I32 {
            id
        } else {
            e.b.ins().uextend(e.ptr, id)
        };
        let off = e.b.ins().imul_imm_u(id, row_bytes as i64);
        let src = e.b.ins().iadd(table, off);
        let dst = e.row(out, s_out, t);
        if g.table == act {
            copy_bytes(e, src, dst, row_bytes);
        } else {
            // Widened (bf16 table, f32 activations) or rounded (f32 table,
            // bf16 activations: the only value a bf16 buffer can hold).
            e.for_const(g.width, &[], |e, i, _| {
                let ps = e.elem_addr(src, i, g.table);
                let v = e.load_s(g.table, ps, 0);
                let pd = e.elem_addr(dst, i, act);
                e.store_s(act, v, pd, 0);
                Vec::new()
            });
        }
    });
}
