//! Instruction semantics: what one instruction computes for the executing
//! lanes of a warp, reading and writing their registers and memory.
//! Control flow, barriers and the `cp.async` queues are the scheduler's
//! ([`crate::sched`]).

use crate::alu::{
    bfe, bin_float, bin_int, bool_op, compare, cvt, dp4a, f32_of, fin32, fout32, mma_m16n8k32, prmt, un_float, un_int,
};
use crate::ir::*;
use crate::module::Kernel;
use crate::num::{self, Round, canon32, canon64, mask, sext};
use crate::space::{read_mem, write_mem};
use crate::ty::Ty;
use crate::{EmuError, LaunchDims, Memory, SHARED_WINDOW};

/// Read-only facts of a launch.
pub(crate) struct Ctx<'a> {
    pub k: &'a Kernel,
    pub dims: LaunchDims,
    pub params: &'a [u8],
    pub consts: &'a [u8],
    pub ctaid: [u32; 3],
    pub nwarps: u32,
}

/// The state of a warp that instructions read and write.
pub(crate) struct WarpRegs {
    /// `%warpid`
    pub id: u32,
    /// `%tid` of each lane
    pub tid: [[u32; 3]; 32],
    /// register `r` of lane `l` at `r * 32 + l`
    pub vals: Vec<u64>,
    /// predicate `p` as a lane mask
    pub preds: Vec<u32>,
}

/// The lanes of a warp at one issue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Issue {
    /// lanes at the PC whose guard holds
    pub exec: u32,
    /// lanes at the PC (`activemask`)
    pub active: u32,
    /// lanes that exist and have not exited
    pub live: u32,
}

/// A `cp.async` copy, its source read at issue; the scheduler writes it to
/// shared memory when the lane's wait retires its group.
#[derive(Debug, Clone)]
pub(crate) struct AsyncCopy {
    pub dst: u32,
    pub len: u8,
    pub data: [u8; 16],
}

/// Iterates the set bits of a lane mask.
#[inline]
pub(crate) fn lanes(mut m: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            Some(l)
        }
    })
}

impl Ctx<'_> {
    pub(crate) fn fault(&self, inst: &Inst, warp: &WarpRegs, lane: usize, msg: impl Into<String>) -> EmuError {
        EmuError::Fault {
            kernel: self.k.name.clone(),
            line: inst.line,
            inst: inst.text.clone(),
            cta: self.ctaid,
            thread: warp.tid[lane],
            msg: msg.into(),
        }
    }

    #[inline]
    pub(crate) fn rd(&self, w: &WarpRegs, s: Src, l: usize) -> u64 {
        match s {
            Src::Reg(r) => w.vals[r as usize * 32 + l],
            Src::Imm(v) => v,
            Src::Sreg(sr) => u64::from(self.sreg(w, sr, l)),
        }
    }

    fn sreg(&self, w: &WarpRegs, sr: Sreg, l: usize) -> u32 {
        let b = [self.dims.block.0, self.dims.block.1, self.dims.block.2];
        let g = [self.dims.grid.0, self.dims.grid.1, self.dims.grid.2];
        let bit = 1u32 << l;
        match sr {
            Sreg::Tid(d) => w.tid[l][d as usize],
            Sreg::Ntid(d) => b[d as usize],
            Sreg::Ctaid(d) => self.ctaid[d as usize],
            Sreg::Nctaid(d) => g[d as usize],
            Sreg::Laneid => l as u32,
            Sreg::Warpid => w.id,
            Sreg::Nwarpid => self.nwarps,
            Sreg::LanemaskEq => bit,
            Sreg::LanemaskLt => bit - 1,
            Sreg::LanemaskLe => bit | (bit - 1),
            Sreg::LanemaskGt => !(bit | (bit - 1)),
            Sreg::LanemaskGe => !(bit - 1),
            Sreg::DynSmem => self.dims.shared_bytes,
            Sreg::TotalSmem => {
                (self.k.dyn_shared_offset as u32).max(self.k.static_shared as u32) + self.dims.shared_bytes
            }
        }
    }

    #[inline]
    fn addr(&self, w: &WarpRegs, a: Addr, l: usize) -> u64 {
        let base = a.base.map_or(0, |r| w.vals[r as usize * 32 + l]);
        base.wrapping_add(a.off as u64)
    }
}

#[inline]
fn wr(w: &mut WarpRegs, d: Dst, l: usize, v: u64) {
    if let Dst::Reg { idx, bits } = d {
        w.vals[idx as usize * 32 + l] = v & mask(bits);
    }
}

#[inline]
pub(crate) fn pred(w: &WarpRegs, p: PredSrc) -> u32 {
    let v = w.preds[p.idx as usize];
    if p.neg { !v } else { v }
}

#[inline]
fn set_pred(w: &mut WarpRegs, p: u32, exec: u32, vals: u32) {
    let cur = &mut w.preds[p as usize];
    *cur = (*cur & !exec) | (vals & exec);
}

/// Runs data instruction `inst` on the lanes of `issue.exec`.
pub(crate) fn execute(
    ctx: &Ctx,
    inst: &Inst,
    warp: &mut WarpRegs,
    issue: Issue,
    shared: &mut [u8],
    mem: &mut Memory,
) -> Result<(), EmuError> {
    let Issue { exec, active, live } = issue;
    match &inst.op {
        Op::Mov { d, a, bits } => {
            for l in lanes(exec) {
                let v = ctx.rd(warp, *a, l) & mask(*bits);
                wr(warp, *d, l, v);
            }
        }
        Op::MovPred { d, a } => {
            let v = pred(warp, *a);
            set_pred(warp, *d, exec, v);
        }
        Op::SetPredConst { d, v } => set_pred(warp, *d, exec, if *v { u32::MAX } else { 0 }),
        Op::Pack { d, parts, part_bits } => {
            for l in lanes(exec) {
                let mut v = 0u64;
                for (i, p) in parts.iter().enumerate() {
                    v |= (ctx.rd(warp, *p, l) & mask(*part_bits)) << (i as u32 * part_bits);
                }
                wr(warp, *d, l, v);
            }
        }
        Op::Unpack { ds, a, part_bits } => {
            for l in lanes(exec) {
                let v = ctx.rd(warp, *a, l);
                for (i, d) in ds.iter().enumerate() {
                    wr(warp, *d, l, (v >> (i as u32 * part_bits)) & mask(*part_bits));
                }
            }
        }
        Op::Ld { space, ty, ds, addr } => {
            let sz = ty.bytes() as usize;
            let total = sz * ds.len();
            for l in lanes(exec) {
                let a = ctx.addr(warp, *addr, l);
                if !a.is_multiple_of(total as u64) {
                    return Err(ctx.fault(inst, warp, l, format!("misaligned {total}-byte load at {a:#x}")));
                }
                let mut buf = [0u8; 16];
                read_mem(ctx, *space, a, &mut buf[..total], shared, mem).map_err(|e| ctx.fault(inst, warp, l, e))?;
                for (i, d) in ds.iter().enumerate() {
                    let mut raw = [0u8; 8];
                    raw[..sz].copy_from_slice(&buf[i * sz..(i + 1) * sz]);
                    let v = u64::from_le_bytes(raw);
                    let v = if ty.is_signed() { sext(v, ty.bits()) as u64 } else { v };
                    wr(warp, *d, l, v);
                }
            }
        }
        Op::St { space, ty, srcs, addr } => {
            let sz = ty.bytes() as usize;
            let total = sz * srcs.len();
            for l in lanes(exec) {
                let a = ctx.addr(warp, *addr, l);
                if !a.is_multiple_of(total as u64) {
                    return Err(ctx.fault(inst, warp, l, format!("misaligned {total}-byte store at {a:#x}")));
                }
                let mut buf = [0u8; 16];
                for (i, s) in srcs.iter().enumerate() {
                    let v = ctx.rd(warp, *s, l);
                    buf[i * sz..(i + 1) * sz].copy_from_slice(&v.to_le_bytes()[..sz]);
                }
                write_mem(*space, a, &buf[..total], shared, mem).map_err(|e| ctx.fault(inst, warp, l, e))?;
            }
        }
        Op::Cvta { to, shared: sh, d, a } => {
            for l in lanes(exec) {
                let v = ctx.rd(warp, *a, l);
                let r = match (*sh, *to) {
                    (false, _) => v,
                    (true, true) => v.wrapping_sub(SHARED_WINDOW),
                    (true, false) => v.wrapping_add(SHARED_WINDOW),
                };
                wr(warp, *d, l, r);
            }
        }
        Op::Bin { op, ty, d, a, b, fm } => {
            if ty.is_float() {
                for l in lanes(exec) {
                    let r = bin_float(*op, *ty, ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), *fm);
                    wr(warp, *d, l, r);
                }
            } else {
                for l in lanes(exec) {
                    let r = bin_int(*op, *ty, ctx.rd(warp, *a, l), ctx.rd(warp, *b, l))
                        .map_err(|e| ctx.fault(inst, warp, l, e))?;
                    wr(warp, *d, l, r);
                }
            }
        }
        Op::Un { op, ty, d, a, fm } => {
            for l in lanes(exec) {
                let v = ctx.rd(warp, *a, l);
                let r = if ty.is_float() {
                    un_float(*op, *ty, v, *fm)
                } else {
                    un_int(*op, *ty, v)
                };
                wr(warp, *d, l, r);
            }
        }
        Op::Mad { kind, ty, d, a, b, c } => {
            let bits = ty.bits();
            for l in lanes(exec) {
                let (x, y, z) = (ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), ctx.rd(warp, *c, l));
                let r = match kind {
                    MadKind::Lo => x.wrapping_mul(y).wrapping_add(z) & mask(bits),
                    MadKind::Hi => bin_int(BinOp::MulHi, *ty, x, y).unwrap_or(0).wrapping_add(z) & mask(bits),
                    MadKind::Wide => bin_int(BinOp::MulWide, *ty, x, y).unwrap_or(0).wrapping_add(z) & mask(bits * 2),
                };
                wr(warp, *d, l, r);
            }
        }
        Op::Fma { ty, d, a, b, c, fm } => {
            for l in lanes(exec) {
                let (x, y, z) = (ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), ctx.rd(warp, *c, l));
                let r = if *ty == Ty::F64 {
                    canon64(f64::from_bits(x).mul_add(f64::from_bits(y), f64::from_bits(z)))
                } else {
                    fout32(fin32(x, *fm).mul_add(fin32(y, *fm), fin32(z, *fm)), *fm)
                };
                wr(warp, *d, l, r);
            }
        }
        Op::Bfe { ty, d, a, b, c } => {
            for l in lanes(exec) {
                let r = bfe(*ty, ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), ctx.rd(warp, *c, l));
                wr(warp, *d, l, r);
            }
        }
        Op::Prmt { d, a, b, c } => {
            for l in lanes(exec) {
                let r = prmt(ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), ctx.rd(warp, *c, l));
                wr(warp, *d, l, r);
            }
        }
        Op::Dp4a {
            a_signed,
            b_signed,
            d,
            a,
            b,
            c,
        } => {
            for l in lanes(exec) {
                let (x, y, z) = (ctx.rd(warp, *a, l), ctx.rd(warp, *b, l), ctx.rd(warp, *c, l));
                wr(warp, *d, l, dp4a(*a_signed, *b_signed, x, y, z));
            }
        }
        Op::Setp {
            cmp,
            ty,
            ftz,
            p,
            q,
            a,
            b,
            comb,
        } => {
            let mut t = 0u32;
            for l in lanes(exec) {
                if compare(*cmp, *ty, *ftz, ctx.rd(warp, *a, l), ctx.rd(warp, *b, l)) {
                    t |= 1 << l;
                }
            }
            let (tp, tq) = match comb {
                Some((op, c)) => {
                    let cv = pred(warp, *c);
                    (bool_op(*op, t, cv), bool_op(*op, !t, cv))
                }
                None => (t, !t),
            };
            if let Some(p) = p {
                set_pred(warp, *p, exec, tp);
            }
            if let Some(q) = q {
                set_pred(warp, *q, exec, tq);
            }
        }
        Op::Selp { d, a, b, c } => {
            let cv = pred(warp, *c);
            for l in lanes(exec) {
                let v = if cv >> l & 1 == 1 {
                    ctx.rd(warp, *a, l)
                } else {
                    ctx.rd(warp, *b, l)
                };
                wr(warp, *d, l, v);
            }
        }
        Op::PredLogic { op, d, a, b } => {
            let v = bool_op(*op, pred(warp, *a), pred(warp, *b));
            set_pred(warp, *d, exec, v);
        }
        Op::PredNot { d, a } => {
            let v = !pred(warp, *a);
            set_pred(warp, *d, exec, v);
        }
        Op::Cvt {
            dty,
            aty,
            rnd,
            ftz,
            sat,
            relu,
            satfinite,
            d,
            a,
            b,
        } => {
            for l in lanes(exec) {
                let x = ctx.rd(warp, *a, l);
                let r = match b {
                    Some(b) => {
                        let e = if *dty == Ty::F16x2 { Ty::F16 } else { Ty::Bf16 };
                        let hi = cvt(e, *aty, *rnd, *ftz, *sat, *relu, *satfinite, x);
                        let lo = cvt(e, *aty, *rnd, *ftz, *sat, *relu, *satfinite, ctx.rd(warp, *b, l));
                        (hi << 16) | (lo & 0xffff)
                    }
                    None => cvt(*dty, *aty, *rnd, *ftz, *sat, *relu, *satfinite, x),
                };
                wr(warp, *d, l, r);
            }
        }
        Op::Shfl {
            mode,
            d,
            p,
            a,
            b,
            c,
            mask: mm,
        } => {
            check_members(ctx, inst, warp, exec, *mm)?;
            let mut src = [0u64; 32];
            for l in lanes(exec) {
                src[l] = ctx.rd(warp, *a, l);
            }
            let mut pv = 0u32;
            let mut out = [0u64; 32];
            for l in lanes(exec) {
                let bval = (ctx.rd(warp, *b, l) & 0x1f) as i32;
                let cv = ctx.rd(warp, *c, l);
                let cval = (cv & 0x1f) as i32;
                let segmask = ((cv >> 8) & 0x1f) as i32;
                let lane = l as i32;
                let max_lane = (lane & segmask) | (cval & !segmask);
                let min_lane = lane & segmask;
                let (j, ok) = match mode {
                    ShflMode::Up => (lane - bval, lane - bval >= max_lane),
                    ShflMode::Down => (lane + bval, lane + bval <= max_lane),
                    ShflMode::Bfly => (lane ^ bval, (lane ^ bval) <= max_lane),
                    ShflMode::Idx => {
                        let j = min_lane | (bval & !segmask);
                        (j, j <= max_lane)
                    }
                };
                let j = if ok { j as usize } else { l };
                if exec >> j & 1 == 0 {
                    return Err(ctx.fault(
                        inst,
                        warp,
                        l,
                        format!("shfl.sync reads lane {j}, which did not execute it"),
                    ));
                }
                out[l] = src[j];
                if ok {
                    pv |= 1 << l;
                }
            }
            for l in lanes(exec) {
                wr(warp, *d, l, out[l]);
            }
            if let Some(p) = p {
                set_pred(warp, *p, exec, pv);
            }
        }
        Op::Vote {
            mode,
            d,
            dp,
            a,
            mask: mm,
        } => {
            check_members(ctx, inst, warp, exec, *mm)?;
            let v = pred(warp, *a) & exec;
            match mode {
                VoteMode::Ballot => {
                    for l in lanes(exec) {
                        wr(warp, *d, l, u64::from(v));
                    }
                }
                VoteMode::All => set_pred(warp, dp.unwrap_or(0), exec, if v == exec { u32::MAX } else { 0 }),
                VoteMode::Any => set_pred(warp, dp.unwrap_or(0), exec, if v != 0 { u32::MAX } else { 0 }),
                VoteMode::Uni => set_pred(
                    warp,
                    dp.unwrap_or(0),
                    exec,
                    if v == 0 || v == exec { u32::MAX } else { 0 },
                ),
            }
        }
        Op::Redux { op, ty, d, a, mask: mm } => {
            check_members(ctx, inst, warp, exec, *mm)?;
            let vals: Vec<u64> = lanes(exec).map(|l| ctx.rd(warp, *a, l) & 0xffff_ffff).collect();
            let signed = *ty == Ty::S32;
            let r = vals
                .iter()
                .copied()
                .reduce(|x, y| match op {
                    ReduxOp::Add => x.wrapping_add(y) & 0xffff_ffff,
                    ReduxOp::And => x & y,
                    ReduxOp::Or => x | y,
                    ReduxOp::Xor => x ^ y,
                    ReduxOp::Min if signed => (sext(x, 32).min(sext(y, 32)) as u64) & 0xffff_ffff,
                    ReduxOp::Max if signed => (sext(x, 32).max(sext(y, 32)) as u64) & 0xffff_ffff,
                    ReduxOp::Min => x.min(y),
                    ReduxOp::Max => x.max(y),
                })
                .unwrap_or(0);
            for l in lanes(exec) {
                wr(warp, *d, l, r);
            }
        }
        Op::Activemask { d } => {
            for l in lanes(exec) {
                wr(warp, *d, l, u64::from(active));
            }
        }
        Op::BarWarp { mask: mm } => {
            check_members(ctx, inst, warp, exec, *mm)?;
        }
        Op::Nop => {}
        Op::Ldmatrix { trans, ds, addr } => {
            require_full_warp(ctx, inst, warp, exec, live)?;
            let mut rows = [[0u16; 8]; 32];
            for (m, _) in ds.iter().enumerate() {
                for r in 0..8 {
                    let l = m * 8 + r;
                    let a = ctx.addr(warp, *addr, l);
                    if !a.is_multiple_of(16) {
                        return Err(ctx.fault(
                            inst,
                            warp,
                            l,
                            format!("ldmatrix row address {a:#x} is not 16-byte aligned"),
                        ));
                    }
                    let mut buf = [0u8; 16];
                    read_mem(ctx, Space::Shared, a, &mut buf, shared, mem).map_err(|e| ctx.fault(inst, warp, l, e))?;
                    for c in 0..8 {
                        rows[l][c] = u16::from_le_bytes([buf[2 * c], buf[2 * c + 1]]);
                    }
                }
            }
            for (m, d) in ds.iter().enumerate() {
                for l in 0..32 {
                    let (lo, hi) = if *trans {
                        let c = l / 4;
                        let r = (l % 4) * 2;
                        (rows[m * 8 + r][c], rows[m * 8 + r + 1][c])
                    } else {
                        let r = l / 4;
                        let c = (l % 4) * 2;
                        (rows[m * 8 + r][c], rows[m * 8 + r][c + 1])
                    };
                    wr(warp, *d, l, u64::from(lo) | (u64::from(hi) << 16));
                }
            }
        }
        Op::Mma {
            k: kk,
            f16_inputs,
            c_f16,
            d_f16,
            d,
            a,
            b,
            c,
        } => {
            require_full_warp(ctx, inst, warp, exec, live)?;
            let kk = *kk as usize;
            let half = |h: u64| -> f64 {
                if *f16_inputs {
                    f64::from(num::f16_to_f32(h as u16))
                } else {
                    f64::from(num::bf16_to_f32(h as u16))
                }
            };
            let mut am = [[0f64; 16]; 16];
            let mut bm = [[0f64; 8]; 16];
            let mut cm = [[0f64; 8]; 16];
            for l in 0..32 {
                let (g, t) = (l / 4, l % 4);
                for (r, s) in a.iter().enumerate() {
                    let v = ctx.rd(warp, *s, l);
                    let row = g + 8 * (r & 1);
                    let col = t * 2 + 8 * (r >> 1);
                    am[row][col] = half(v & 0xffff);
                    am[row][col + 1] = half((v >> 16) & 0xffff);
                }
                for (r, s) in b.iter().enumerate() {
                    let v = ctx.rd(warp, *s, l);
                    let kr = t * 2 + 8 * r;
                    bm[kr][g] = half(v & 0xffff);
                    bm[kr + 1][g] = half((v >> 16) & 0xffff);
                }
                if *c_f16 {
                    for (r, s) in c.iter().enumerate() {
                        let v = ctx.rd(warp, *s, l);
                        cm[g + 8 * r][t * 2] = f64::from(num::f16_to_f32(v as u16));
                        cm[g + 8 * r][t * 2 + 1] = f64::from(num::f16_to_f32((v >> 16) as u16));
                    }
                } else {
                    for (r, s) in c.iter().enumerate() {
                        cm[g + 8 * (r >> 1)][t * 2 + (r & 1)] = f64::from(f32_of(ctx.rd(warp, *s, l)));
                    }
                }
            }
            let mut dm = [[0f64; 8]; 16];
            for (i, row) in dm.iter_mut().enumerate() {
                for (j, out) in row.iter_mut().enumerate() {
                    let mut acc = 0f64;
                    for kx in 0..kk {
                        acc += am[i][kx] * bm[kx][j];
                    }
                    *out = acc + cm[i][j];
                }
            }
            for l in 0..32 {
                let (g, t) = (l / 4, l % 4);
                if *d_f16 {
                    for (r, dd) in d.iter().enumerate() {
                        let lo = num::f64_to_format(dm[g + 8 * r][t * 2], num::F16, Round::Nearest);
                        let hi = num::f64_to_format(dm[g + 8 * r][t * 2 + 1], num::F16, Round::Nearest);
                        wr(warp, *dd, l, lo | (hi << 16));
                    }
                } else {
                    for (r, dd) in d.iter().enumerate() {
                        let v = dm[g + 8 * (r >> 1)][t * 2 + (r & 1)];
                        wr(warp, *dd, l, u64::from(canon32(v as f32)));
                    }
                }
            }
        }
        Op::MmaInt {
            a_signed,
            b_signed,
            satfinite,
            d,
            a,
            b,
            c,
        } => {
            require_full_warp(ctx, inst, warp, exec, live)?;
            let frag = |v: &[Src]| -> Vec<[u64; 32]> {
                v.iter().map(|s| std::array::from_fn(|l| ctx.rd(warp, *s, l))).collect()
            };
            let (fa, fb, fc) = (frag(a), frag(b), frag(c));
            let out = mma_m16n8k32(*a_signed, *b_signed, *satfinite, &fa, &fb, &fc);
            for (dd, vals) in d.iter().zip(&out) {
                for (l, &v) in vals.iter().enumerate() {
                    wr(warp, *dd, l, v);
                }
            }
        }
        Op::Atom {
            space,
            op,
            ty,
            d,
            addr,
            b,
            c,
        } => {
            let sz = ty.bytes() as usize;
            for l in lanes(exec) {
                let a = ctx.addr(warp, *addr, l);
                if !a.is_multiple_of(sz as u64) {
                    return Err(ctx.fault(inst, warp, l, format!("misaligned {sz}-byte atomic at {a:#x}")));
                }
                let mut buf = [0u8; 8];
                read_mem(ctx, *space, a, &mut buf[..sz], shared, mem).map_err(|e| ctx.fault(inst, warp, l, e))?;
                let old = u64::from_le_bytes(buf);
                let bv = ctx.rd(warp, *b, l);
                let new = match op {
                    AtomOp::Add if *ty == Ty::F32 => u64::from((f32_of(old) + f32_of(bv)).to_bits()),
                    AtomOp::Add if *ty == Ty::F64 => (f64::from_bits(old) + f64::from_bits(bv)).to_bits(),
                    AtomOp::Add => bin_int(BinOp::Add, *ty, old, bv).unwrap_or(0),
                    AtomOp::Min => bin_int(BinOp::Min, *ty, old, bv).unwrap_or(0),
                    AtomOp::Max => bin_int(BinOp::Max, *ty, old, bv).unwrap_or(0),
                    AtomOp::And => old & bv,
                    AtomOp::Or => old | bv,
                    AtomOp::Xor => old ^ bv,
                    AtomOp::Exch => bv,
                    AtomOp::Cas => {
                        let cv = c.map_or(0, |c| ctx.rd(warp, c, l));
                        if old & mask(ty.bits()) == bv & mask(ty.bits()) {
                            cv
                        } else {
                            old
                        }
                    }
                };
                write_mem(*space, a, &new.to_le_bytes()[..sz], shared, mem).map_err(|e| ctx.fault(inst, warp, l, e))?;
                wr(warp, *d, l, old);
            }
        }
        Op::Bra { .. } | Op::Exit | Op::Bar { .. } | Op::CpAsync(_) | Op::CpCommit | Op::CpWait { .. } => {
            unreachable!("control flow, barriers and cp.async queues are the scheduler's")
        }
    }
    Ok(())
}

/// Issues `cp.async` for the lanes of `exec`: checks the addresses and
/// reads the sources now; returns each lane's copy for the scheduler to
/// defer.
pub(crate) fn cp_async(
    ctx: &Ctx,
    inst: &Inst,
    cp: &CpAsync,
    warp: &WarpRegs,
    exec: u32,
    shared_len: usize,
    mem: &Memory,
) -> Result<Vec<(usize, AsyncCopy)>, EmuError> {
    let CpAsync {
        dst,
        src,
        size,
        src_size,
        ignore,
    } = cp;
    let mut copies = Vec::new();
    let size = *size as usize;
    let ign = ignore.map_or(0, |p| pred(warp, p));
    for l in lanes(exec) {
        let da = ctx.addr(warp, *dst, l);
        let sa = ctx.addr(warp, *src, l);
        let n = if ign >> l & 1 == 1 {
            0
        } else {
            src_size.map_or(size as u64, |s| ctx.rd(warp, s, l) & 0xffff_ffff) as usize
        };
        if n > size {
            return Err(ctx.fault(inst, warp, l, format!("src-size {n} exceeds cp-size {size}")));
        }
        if !da.is_multiple_of(size as u64) || !sa.is_multiple_of(size as u64) {
            return Err(ctx.fault(
                inst,
                warp,
                l,
                format!("cp.async of {size} bytes misaligned: dst {da:#x}, src {sa:#x}"),
            ));
        }
        if da.saturating_add(size as u64) > shared_len as u64 {
            return Err(ctx.fault(
                inst,
                warp,
                l,
                format!("cp.async destination {da:#x}+{size} is outside the {shared_len} bytes of shared memory"),
            ));
        }
        let mut data = [0u8; 16];
        if n > 0 {
            let s = mem.slice(sa, n).map_err(|e| ctx.fault(inst, warp, l, e))?;
            data[..n].copy_from_slice(s);
        }
        copies.push((
            l,
            AsyncCopy {
                dst: da as u32,
                len: size as u8,
                data,
            },
        ));
    }
    Ok(copies)
}

/// `.sync` warp collectives: every executing lane is in `membermask`, and
/// every lane named in it executes this instruction.
fn check_members(ctx: &Ctx, inst: &Inst, warp: &WarpRegs, exec: u32, mm: Src) -> Result<(), EmuError> {
    if exec == 0 {
        return Ok(());
    }
    let first = exec.trailing_zeros() as usize;
    let m = ctx.rd(warp, mm, first) as u32;
    for l in lanes(exec) {
        if ctx.rd(warp, mm, l) as u32 != m {
            return Err(ctx.fault(inst, warp, l, "membermask differs between lanes"));
        }
    }
    if exec & !m != 0 {
        return Err(ctx.fault(
            inst,
            warp,
            first,
            format!(
                "lanes {:#010x} execute it but are not in membermask {m:#010x}",
                exec & !m
            ),
        ));
    }
    if m & !exec != 0 {
        return Err(ctx.fault(
            inst,
            warp,
            first,
            format!(
                "membermask {m:#010x} names lanes {:#010x} that do not execute this instruction (diverged, \
                 predicated off, exited or absent)",
                m & !exec
            ),
        ));
    }
    Ok(())
}

/// `.sync.aligned` matrix instructions need all 32 lanes, converged.
fn require_full_warp(ctx: &Ctx, inst: &Inst, warp: &WarpRegs, exec: u32, live: u32) -> Result<(), EmuError> {
    if exec != u32::MAX {
        let first = (exec | live).trailing_zeros().min(31) as usize;
        return Err(ctx.fault(
            inst,
            warp,
            first,
            format!("needs all 32 lanes of the warp converged and executing; executing lanes are {exec:#010x}"),
        ));
    }
    Ok(())
}
