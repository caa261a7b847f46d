//! The SIMT executor: CTAs one after another, warps of 32 lanes in lockstep
//! with per-lane program counters (a warp runs the group of lanes at the
//! lowest PC), warp-granular barriers, deferred `cp.async`.

use std::collections::VecDeque;

use crate::ir::*;
use crate::module::Kernel;
use crate::num::{self, Round, canon32, canon64, ftz32, mask, sext};
use crate::ty::Ty;
use crate::{CONST_WINDOW, EmuError, LaunchDims, LaunchStats, Memory, SHARED_WINDOW};

/// Bytes fresh shared memory is filled with: 0xff makes any f32/bf16 read of
/// unwritten shared memory a NaN.
const SHARED_POISON: u8 = 0xff;

/// One `cp.async` whose write to shared memory is deferred to the wait.
#[derive(Debug, Clone)]
struct Copy {
    dst: u32,
    len: u8,
    data: [u8; 16],
}

#[derive(Debug, Default, Clone)]
struct LaneAsync {
    pending: Vec<Copy>,
    groups: VecDeque<Vec<Copy>>,
}

struct Warp {
    id: u32,
    regs: Vec<u64>,
    preds: Vec<u32>,
    pc: [u32; 32],
    /// lanes that exist and have not exited
    live: u32,
    /// lanes blocked at a barrier
    waiting: u32,
    bar_id: u32,
    bar_expected: u32,
    arrived: bool,
    tid: [[u32; 3]; 32],
    asyncs: Vec<LaneAsync>,
}

#[derive(Default, Clone)]
struct BarState {
    arrived: u32,
    expected: u32,
    warps: Vec<usize>,
}

/// Read-only facts of a launch.
pub(crate) struct Ctx<'a> {
    pub k: &'a Kernel,
    pub dims: LaunchDims,
    pub params: &'a [u8],
    pub consts: &'a [u8],
    pub ctaid: [u32; 3],
    pub nwarps: u32,
}

/// The value of `v` read as type `ty`, as an exact integer.
fn int_val(v: u64, ty: Ty) -> i128 {
    if ty.is_signed() {
        i128::from(sext(v, ty.bits()))
    } else {
        i128::from(v & mask(ty.bits()))
    }
}

/// Iterates the set bits of a lane mask.
#[inline]
fn lanes(mut m: u32) -> impl Iterator<Item = usize> {
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

fn f32_of(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

impl Ctx<'_> {
    fn fault(&self, inst: &Inst, warp: &Warp, lane: usize, msg: impl Into<String>) -> EmuError {
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
    fn rd(&self, w: &Warp, s: Src, l: usize) -> u64 {
        match s {
            Src::Reg(r) => w.regs[r as usize * 32 + l],
            Src::Imm(v) => v,
            Src::Sreg(sr) => u64::from(self.sreg(w, sr, l)),
        }
    }

    fn sreg(&self, w: &Warp, sr: Sreg, l: usize) -> u32 {
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
    fn addr(&self, w: &Warp, a: Addr, l: usize) -> u64 {
        let base = a.base.map_or(0, |r| w.regs[r as usize * 32 + l]);
        base.wrapping_add(a.off as u64)
    }
}

#[inline]
fn wr(w: &mut Warp, d: Dst, l: usize, v: u64) {
    if let Dst::Reg { idx, bits } = d {
        w.regs[idx as usize * 32 + l] = v & mask(bits);
    }
}

#[inline]
fn pred(w: &Warp, p: PredSrc) -> u32 {
    let v = w.preds[p.idx as usize];
    if p.neg { !v } else { v }
}

#[inline]
fn set_pred(w: &mut Warp, p: u32, exec: u32, vals: u32) {
    let cur = &mut w.preds[p as usize];
    *cur = (*cur & !exec) | (vals & exec);
}

/// Where an address of a state space lands.
enum Loc {
    Global(u64),
    Shared(usize),
    Param(usize),
    Const(usize),
}

fn resolve(space: Space, addr: u64) -> Loc {
    match space {
        Space::Global => Loc::Global(addr),
        Space::Shared => Loc::Shared(addr as usize),
        Space::Param => Loc::Param(addr as usize),
        Space::Const => Loc::Const(addr as usize),
        Space::Generic => {
            if (SHARED_WINDOW..SHARED_WINDOW + (1 << 32)).contains(&addr) {
                Loc::Shared((addr - SHARED_WINDOW) as usize)
            } else if (CONST_WINDOW..CONST_WINDOW + (1 << 32)).contains(&addr) {
                Loc::Const((addr - CONST_WINDOW) as usize)
            } else {
                Loc::Global(addr)
            }
        }
    }
}

fn read_mem(ctx: &Ctx, space: Space, addr: u64, buf: &mut [u8], shared: &[u8], mem: &Memory) -> Result<(), String> {
    let n = buf.len();
    match resolve(space, addr) {
        Loc::Global(a) => buf.copy_from_slice(mem.slice(a, n)?),
        Loc::Shared(o) => {
            let s = shared.get(o..o.wrapping_add(n)).ok_or_else(|| {
                format!(
                    "shared access of {n} bytes at offset {o:#x} is out of bounds ({} bytes of shared memory)",
                    shared.len()
                )
            })?;
            buf.copy_from_slice(s);
        }
        Loc::Param(o) => {
            let s = ctx
                .params
                .get(o..o.wrapping_add(n))
                .ok_or_else(|| format!("param access of {n} bytes at offset {o} is out of bounds"))?;
            buf.copy_from_slice(s);
        }
        Loc::Const(o) => {
            let s = ctx.consts.get(o..o.wrapping_add(n)).ok_or_else(|| {
                format!(
                    "const access of {n} bytes at offset {o:#x} is out of bounds ({} bytes of .const data)",
                    ctx.consts.len()
                )
            })?;
            buf.copy_from_slice(s);
        }
    }
    Ok(())
}

fn write_mem(space: Space, addr: u64, data: &[u8], shared: &mut [u8], mem: &mut Memory) -> Result<(), String> {
    let n = data.len();
    match resolve(space, addr) {
        Loc::Global(a) => mem.slice_mut(a, n)?.copy_from_slice(data),
        Loc::Shared(o) => {
            let len = shared.len();
            let s = shared.get_mut(o..o.wrapping_add(n)).ok_or_else(|| {
                format!("shared access of {n} bytes at offset {o:#x} is out of bounds ({len} bytes of shared memory)")
            })?;
            s.copy_from_slice(data);
        }
        Loc::Param(_) => return Err("writes to .param are not allowed".into()),
        Loc::Const(_) => return Err("writes to .const are not allowed".into()),
    }
    Ok(())
}

fn bin_int(op: BinOp, ty: Ty, a: u64, b: u64) -> Result<u64, String> {
    let bits = ty.bits();
    let m = mask(bits);
    let (a, b) = (
        a & m,
        if matches!(op, BinOp::Shl | BinOp::Shr) {
            b & 0xffff_ffff
        } else {
            b & m
        },
    );
    let s = ty.is_signed();
    let (sa, sb) = (sext(a, bits), sext(b, bits));
    Ok(match op {
        BinOp::Add => a.wrapping_add(b) & m,
        BinOp::Sub => a.wrapping_sub(b) & m,
        BinOp::AddSat => {
            (i64::from(sa as i32)
                .saturating_add(sb)
                .clamp(i32::MIN.into(), i32::MAX.into()) as u64)
                & m
        }
        BinOp::SubSat => (sa.saturating_sub(sb).clamp(i32::MIN.into(), i32::MAX.into()) as u64) & m,
        BinOp::MulLo => a.wrapping_mul(b) & m,
        BinOp::MulHi => {
            if s {
                ((i128::from(sa) * i128::from(sb)) >> bits) as u64 & m
            } else {
                ((u128::from(a) * u128::from(b)) >> bits) as u64 & m
            }
        }
        BinOp::MulWide => {
            let wm = mask(bits * 2);
            if s {
                ((i128::from(sa) * i128::from(sb)) as u64) & wm
            } else {
                a.wrapping_mul(b) & wm
            }
        }
        BinOp::Div | BinOp::Rem => {
            if b == 0 {
                return Err("integer division by zero".into());
            }
            let r = if s {
                (if op == BinOp::Div {
                    sa.wrapping_div(sb)
                } else {
                    sa.wrapping_rem(sb)
                }) as u64
            } else if op == BinOp::Div {
                a / b
            } else {
                a % b
            };
            r & m
        }
        BinOp::Min => {
            if s {
                sa.min(sb) as u64 & m
            } else {
                a.min(b)
            }
        }
        BinOp::Max => {
            if s {
                sa.max(sb) as u64 & m
            } else {
                a.max(b)
            }
        }
        BinOp::And => a & b,
        BinOp::Or => a | b,
        BinOp::Xor => a ^ b,
        BinOp::Shl => {
            if b >= u64::from(bits) {
                0
            } else {
                (a << b) & m
            }
        }
        BinOp::Shr => {
            if s {
                let sh = b.min(u64::from(bits) - 1);
                (sa >> sh) as u64 & m
            } else if b >= u64::from(bits) {
                0
            } else {
                a >> b
            }
        }
        BinOp::Mul => unreachable!("float mul on an integer type is rejected by the decoder"),
    })
}

fn fmin(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a < b {
        a
    } else if b < a {
        b
    } else if a.is_sign_negative() {
        a
    } else {
        b
    }
}

fn fmax(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a > b {
        a
    } else if b > a {
        b
    } else if a.is_sign_positive() {
        a
    } else {
        b
    }
}

fn fin32(v: u64, fm: FMods) -> f32 {
    let x = f32_of(v);
    if fm.ftz { ftz32(x) } else { x }
}

fn fout32(x: f32, fm: FMods) -> u64 {
    let mut x = x;
    if fm.sat {
        x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    }
    if fm.ftz {
        x = ftz32(x);
    }
    u64::from(canon32(x))
}

fn bin_float(op: BinOp, ty: Ty, a: u64, b: u64, fm: FMods) -> u64 {
    if ty == Ty::F64 {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        let r = match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Min => fmin(x, y),
            _ => fmax(x, y),
        };
        return canon64(r);
    }
    let (x, y) = (fin32(a, fm), fin32(b, fm));
    let r = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => x / y,
        BinOp::Min => fmin(f64::from(x), f64::from(y)) as f32,
        _ => fmax(f64::from(x), f64::from(y)) as f32,
    };
    fout32(r, fm)
}

fn un_int(op: UnOp, ty: Ty, a: u64) -> u64 {
    let bits = ty.bits();
    let m = mask(bits);
    let a = a & m;
    match op {
        UnOp::Neg => a.wrapping_neg() & m,
        UnOp::Abs => sext(a, bits).wrapping_abs() as u64 & m,
        UnOp::Not => !a & m,
        UnOp::Cnot => u64::from(a == 0),
        UnOp::Popc => u64::from(a.count_ones()),
        UnOp::Clz => u64::from(a.leading_zeros() - (64 - bits)),
        UnOp::Brev => a.reverse_bits() >> (64 - bits),
        _ => unreachable!("float unary op on an integer type is rejected by the decoder"),
    }
}

fn un_float(op: UnOp, ty: Ty, a: u64, fm: FMods) -> u64 {
    if ty == Ty::F64 {
        let x = f64::from_bits(a);
        let r = match op {
            UnOp::Neg => return a ^ (1 << 63),
            UnOp::Abs => return a & !(1 << 63),
            UnOp::Rcp => 1.0 / x,
            UnOp::Sqrt => x.sqrt(),
            _ => 1.0 / x.sqrt(),
        };
        return canon64(r);
    }
    let x = fin32(a, fm);
    let r = match op {
        UnOp::Neg => return fout32(f32::from_bits(x.to_bits() ^ 0x8000_0000), FMods { sat: false, ..fm }),
        UnOp::Abs => return fout32(x.abs(), FMods { sat: false, ..fm }),
        UnOp::Rcp => 1.0 / x,
        UnOp::Sqrt => x.sqrt(),
        UnOp::Rsqrt => (1.0 / f64::from(x).sqrt()) as f32,
        UnOp::Ex2 => f64::from(x).exp2() as f32,
        UnOp::Lg2 => f64::from(x).log2() as f32,
        UnOp::Sin => f64::from(x).sin() as f32,
        UnOp::Cos => f64::from(x).cos() as f32,
        _ => f64::from(x).tanh() as f32,
    };
    fout32(r, fm)
}

fn compare(cmp: Cmp, ty: Ty, ftz: bool, a: u64, b: u64) -> bool {
    if ty.is_float() {
        let (x, y) = if ty == Ty::F64 {
            (f64::from_bits(a), f64::from_bits(b))
        } else {
            let f = |v| if ftz { ftz32(f32_of(v)) } else { f32_of(v) };
            (f64::from(f(a)), f64::from(f(b)))
        };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => !nan && x < y,
            Cmp::Le => !nan && x <= y,
            Cmp::Gt => !nan && x > y,
            Cmp::Ge => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => unreachable!("rejected by the decoder"),
        };
    }
    let bits = ty.bits();
    let (ua, ub) = (a & mask(bits), b & mask(bits));
    let (x, y) = if ty.is_signed() {
        (i128::from(sext(a, bits)), i128::from(sext(b, bits)))
    } else {
        (i128::from(ua), i128::from(ub))
    };
    match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
        Cmp::Lo => ua < ub,
        Cmp::Ls => ua <= ub,
        Cmp::Hi => ua > ub,
        Cmp::Hs => ua >= ub,
        _ => unreachable!("rejected by the decoder"),
    }
}

fn bool_op(op: BoolOp, a: u32, b: u32) -> u32 {
    match op {
        BoolOp::And => a & b,
        BoolOp::Or => a | b,
        BoolOp::Xor => a ^ b,
    }
}

fn int_range(ty: Ty) -> (i128, i128) {
    let bits = ty.bits();
    if ty.is_signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    }
}

/// A float operand of `cvt` as f64 (exact for every source format).
fn float_in(ty: Ty, v: u64, ftz: bool) -> f64 {
    match ty {
        Ty::F64 => f64::from_bits(v),
        Ty::F32 => f64::from(if ftz { ftz32(f32_of(v)) } else { f32_of(v) }),
        Ty::F16 => f64::from(num::f16_to_f32(v as u16)),
        _ => f64::from(num::bf16_to_f32(v as u16)),
    }
}

/// Rounds an exact value to float type `ty`.
fn float_out(ty: Ty, x: f64, mode: Round, relu: bool, satfinite: bool, sat: bool, ftz: bool) -> u64 {
    let mut x = x;
    if relu && !x.is_nan() && x < 0.0 {
        x = 0.0;
    }
    if sat {
        x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    }
    let (fmt, bits) = match ty {
        Ty::F64 => return canon64(x),
        Ty::F32 => (num::F32, 32),
        Ty::F16 | Ty::F16x2 => (num::F16, 16),
        _ => (num::BF16, 16),
    };
    let mut r = num::f64_to_format(x, fmt, mode);
    if satfinite && !x.is_nan() && r & !(1u64 << (bits - 1)) == fmt.inf(false) {
        r = fmt.max_finite(x < 0.0);
    }
    if ftz && ty == Ty::F32 {
        r = u64::from(ftz32(f32::from_bits(r as u32)).to_bits());
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn cvt(dty: Ty, aty: Ty, rnd: CvtRound, ftz: bool, sat: bool, relu: bool, satfinite: bool, a: u64) -> u64 {
    let round = match rnd {
        CvtRound::Float(r) | CvtRound::Int(r) => r,
        CvtRound::None => Round::Nearest,
    };
    if aty.is_int() {
        let v = int_val(a, aty);
        if dty.is_int() {
            let (lo, hi) = int_range(dty);
            let r = if sat { v.clamp(lo, hi) } else { v };
            let r = r as u64 & mask(dty.bits());
            return if dty.is_signed() { sext(r, dty.bits()) as u64 } else { r };
        }
        let x = match dty {
            Ty::F32 => f64::from(f32::from_bits(num::int_to_format(v, num::F32, round) as u32)),
            Ty::F64 => num::int_to_f64(v, round),
            Ty::F16 => f64::from(num::f16_to_f32(num::int_to_format(v, num::F16, round) as u16)),
            _ => f64::from(num::bf16_to_f32(num::int_to_format(v, num::BF16, round) as u16)),
        };
        return float_out(dty, x, Round::Nearest, relu, satfinite, sat, ftz);
    }
    let x = float_in(aty, a, ftz);
    if dty.is_int() {
        let (lo, hi) = int_range(dty);
        let r = num::float_to_int(x, round, lo, hi) as u64 & mask(dty.bits());
        return if dty.is_signed() { sext(r, dty.bits()) as u64 } else { r };
    }
    if let CvtRound::Int(r) = rnd {
        let y = if x.is_nan() { x } else { num::round_integral(x, r) };
        return float_out(dty, y, Round::Nearest, relu, satfinite, sat, ftz);
    }
    float_out(dty, x, round, relu, satfinite, sat, ftz)
}

fn bfe(ty: Ty, a: u64, pos: u64, len: u64) -> u64 {
    let bits = u64::from(ty.bits());
    let (pos, len) = (pos & 0xff, len & 0xff);
    let a = a & mask(ty.bits());
    let sbit = if ty.is_signed() && len != 0 {
        (a >> (pos + len - 1).min(bits - 1)) & 1
    } else {
        0
    };
    let mut d = 0u64;
    for i in 0..bits {
        let bit = if i < len && pos + i < bits {
            (a >> (pos + i)) & 1
        } else {
            sbit
        };
        d |= bit << i;
    }
    d
}

fn prmt(a: u64, b: u64, c: u64) -> u64 {
    let bytes = (b << 32) | (a & 0xffff_ffff);
    let mut d = 0u64;
    for i in 0..4 {
        let nib = (c >> (4 * i)) & 0xf;
        let mut byte = (bytes >> (8 * (nib & 7))) & 0xff;
        if nib & 8 != 0 {
            byte = if byte & 0x80 != 0 { 0xff } else { 0 };
        }
        d |= byte << (8 * i);
    }
    d
}

pub(crate) struct Cta<'a, 'm> {
    ctx: &'a Ctx<'a>,
    mem: &'m mut Memory,
    shared: Vec<u8>,
    warps: Vec<Warp>,
    bars: Vec<BarState>,
    stats: &'a mut LaunchStats,
    step_limit: u64,
}

impl<'a, 'm> Cta<'a, 'm> {
    pub(crate) fn new(ctx: &'a Ctx<'a>, mem: &'m mut Memory, stats: &'a mut LaunchStats, step_limit: u64) -> Self {
        let k = ctx.k;
        let (bx, by, bz) = ctx.dims.block;
        let nthreads = bx * by * bz;
        let shared_len = (k.dyn_shared_offset + ctx.dims.shared_bytes as usize).max(k.static_shared);
        let mut warps = Vec::with_capacity(ctx.nwarps as usize);
        let mut regs0 = vec![0u64; k.reg_bits.len() * 32];
        for (r, &bits) in k.reg_bits.iter().enumerate() {
            regs0[r * 32..r * 32 + 32].fill(mask(bits));
        }
        for wid in 0..ctx.nwarps {
            let mut tid = [[0u32; 3]; 32];
            let mut live = 0u32;
            for (l, t) in tid.iter_mut().enumerate() {
                let lin = wid * 32 + l as u32;
                if lin < nthreads {
                    live |= 1 << l;
                    *t = [lin % bx, (lin / bx) % by, lin / (bx * by)];
                }
            }
            warps.push(Warp {
                id: wid,
                regs: regs0.clone(),
                preds: vec![0; k.npreds],
                pc: [0; 32],
                live,
                waiting: 0,
                bar_id: 0,
                bar_expected: 0,
                arrived: false,
                tid,
                asyncs: vec![LaneAsync::default(); 32],
            });
        }
        Cta {
            ctx,
            mem,
            shared: vec![SHARED_POISON; shared_len],
            warps,
            bars: vec![BarState::default(); 16],
            stats,
            step_limit,
        }
    }

    pub(crate) fn run(&mut self) -> Result<(), EmuError> {
        loop {
            let mut progress = false;
            for w in 0..self.warps.len() {
                while self.step(w)? {
                    progress = true;
                    self.check_arrival(w)?;
                }
                self.check_arrival(w)?;
            }
            if self.warps.iter().all(|w| w.live == 0) {
                return Ok(());
            }
            if !progress {
                return Err(self.deadlock());
            }
        }
    }

    fn deadlock(&self) -> EmuError {
        let mut parts = Vec::new();
        for (id, b) in self.bars.iter().enumerate() {
            if b.arrived > 0 {
                let line = self.warps[b.warps[0]]
                    .pc
                    .iter()
                    .zip(0..)
                    .find(|(_, l)| self.warps[b.warps[0]].waiting >> l & 1 == 1);
                let at = line
                    .and_then(|(pc, _)| self.ctx.k.insts.get(*pc as usize))
                    .map(|i| format!(" (line {} `{}`)", i.line, i.text))
                    .unwrap_or_default();
                parts.push(format!(
                    "barrier {id}{at} reached by {} of {} warps (warps {:?})",
                    b.arrived, b.expected, b.warps
                ));
            }
        }
        let exited: Vec<u32> = self.warps.iter().filter(|w| w.live == 0).map(|w| w.id).collect();
        if !exited.is_empty() {
            parts.push(format!("warps {exited:?} exited without reaching it"));
        }
        let partial: Vec<u32> = self
            .warps
            .iter()
            .filter(|w| w.live != 0 && w.waiting != 0 && !w.arrived)
            .map(|w| w.id)
            .collect();
        if !partial.is_empty() {
            parts.push(format!(
                "warps {partial:?} have lanes blocked at a barrier while others cannot run"
            ));
        }
        EmuError::Deadlock {
            kernel: self.ctx.k.name.clone(),
            cta: self.ctx.ctaid,
            msg: parts.join("; "),
        }
    }

    /// A warp arrives at its barrier once every non-exited lane waits there.
    fn check_arrival(&mut self, w: usize) -> Result<(), EmuError> {
        let warp = &self.warps[w];
        if warp.arrived || warp.waiting == 0 || warp.live & !warp.waiting != 0 {
            return Ok(());
        }
        let (id, expected) = (warp.bar_id as usize, warp.bar_expected);
        let st = &mut self.bars[id];
        if st.arrived == 0 {
            st.expected = expected;
        } else if st.expected != expected {
            let lane = warp.waiting.trailing_zeros() as usize;
            let inst = &self.ctx.k.insts[warp.pc[lane] as usize];
            return Err(self.ctx.fault(
                inst,
                warp,
                lane,
                format!(
                    "barrier {id} expects {expected} warps here but {} elsewhere",
                    st.expected
                ),
            ));
        }
        st.arrived += 1;
        st.warps.push(w);
        self.warps[w].arrived = true;
        if self.bars[id].arrived == self.bars[id].expected {
            let st = std::mem::take(&mut self.bars[id]);
            self.stats.barriers += 1;
            for wi in st.warps {
                let wp = &mut self.warps[wi];
                for l in lanes(wp.waiting) {
                    wp.pc[l] += 1;
                }
                wp.waiting = 0;
                wp.arrived = false;
            }
        }
        Ok(())
    }

    /// Runs one warp-instruction of warp `w`; false when no lane can run.
    fn step(&mut self, w: usize) -> Result<bool, EmuError> {
        let ctx = self.ctx;
        let k = ctx.k;
        let warp = &mut self.warps[w];
        let runnable = warp.live & !warp.waiting;
        if runnable == 0 {
            return Ok(false);
        }
        let mut pc = u32::MAX;
        for l in lanes(runnable) {
            pc = pc.min(warp.pc[l]);
        }
        let mut active = 0u32;
        for l in lanes(runnable) {
            if warp.pc[l] == pc {
                active |= 1 << l;
            }
        }
        let Some(inst) = k.insts.get(pc as usize) else {
            // falling off the end of the kernel ends the threads
            warp.live &= !active;
            return Ok(true);
        };
        self.stats.warp_instructions += 1;
        if self.stats.warp_instructions > self.step_limit {
            return Err(EmuError::StepLimit {
                kernel: k.name.clone(),
                limit: self.step_limit,
            });
        }
        let exec = match inst.guard {
            None => active,
            Some(g) => active & pred(warp, g),
        };
        self.stats.thread_instructions += u64::from(exec.count_ones());
        let mut advance = active;
        let shared = &mut self.shared;
        let mem = &mut *self.mem;
        let first = exec.trailing_zeros() as usize;
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
                    read_mem(ctx, *space, a, &mut buf[..total], shared, mem)
                        .map_err(|e| ctx.fault(inst, warp, l, e))?;
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
                        MadKind::Wide => {
                            bin_int(BinOp::MulWide, *ty, x, y).unwrap_or(0).wrapping_add(z) & mask(bits * 2)
                        }
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
            Op::Bra { target, uni } => {
                if *uni && exec != active && exec != 0 {
                    return Err(ctx.fault(
                        inst,
                        warp,
                        first,
                        format!("bra.uni diverges: taken by lanes {exec:#010x} of {active:#010x}"),
                    ));
                }
                for l in lanes(exec) {
                    warp.pc[l] = *target;
                }
                advance &= !exec;
            }
            Op::Exit => {
                warp.live &= !exec;
                advance &= !exec;
            }
            Op::Bar { id, count, aligned } => {
                if exec != 0 {
                    if *aligned && exec != warp.live {
                        return Err(ctx.fault(
                            inst,
                            warp,
                            first,
                            format!(
                                "bar.sync (aligned) executed by lanes {exec:#010x} but live lanes are {:#010x}: \
                                 the warp is not converged (use barrier.sync for divergent code)",
                                warp.live
                            ),
                        ));
                    }
                    let bid = ctx.rd(warp, *id, first);
                    let cnt = count.map(|c| ctx.rd(warp, c, first));
                    for l in lanes(exec) {
                        if ctx.rd(warp, *id, l) != bid || count.map(|c| ctx.rd(warp, c, l)) != cnt {
                            return Err(ctx.fault(inst, warp, l, "barrier id/count differ between lanes"));
                        }
                    }
                    if bid >= 16 {
                        return Err(ctx.fault(inst, warp, first, format!("barrier {bid} is out of range 0..15")));
                    }
                    let expected = match cnt {
                        None => ctx.nwarps,
                        Some(c) => {
                            if c == 0 || !c.is_multiple_of(32) {
                                return Err(ctx.fault(
                                    inst,
                                    warp,
                                    first,
                                    format!("thread count {c} is not a positive multiple of 32"),
                                ));
                            }
                            (c / 32) as u32
                        }
                    };
                    if warp.waiting != 0 && (warp.bar_id != bid as u32 || warp.bar_expected != expected) {
                        return Err(ctx.fault(inst, warp, first, "lanes of one warp wait at different barriers"));
                    }
                    warp.waiting |= exec;
                    warp.bar_id = bid as u32;
                    warp.bar_expected = expected;
                    advance &= !exec;
                }
            }
            Op::BarWarp { mask: mm } => {
                check_members(ctx, inst, warp, exec, *mm)?;
            }
            Op::Nop => {}
            Op::CpAsync {
                dst,
                src,
                size,
                src_size,
                ignore,
            } => {
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
                    if da.saturating_add(size as u64) > shared.len() as u64 {
                        return Err(ctx.fault(
                            inst,
                            warp,
                            l,
                            format!(
                                "cp.async destination {da:#x}+{size} is outside the {} bytes of shared memory",
                                shared.len()
                            ),
                        ));
                    }
                    let mut data = [0u8; 16];
                    if n > 0 {
                        let s = mem.slice(sa, n).map_err(|e| ctx.fault(inst, warp, l, e))?;
                        data[..n].copy_from_slice(s);
                    }
                    warp.asyncs[l].pending.push(Copy {
                        dst: da as u32,
                        len: size as u8,
                        data,
                    });
                }
            }
            Op::CpCommit => {
                for l in lanes(exec) {
                    let a = &mut warp.asyncs[l];
                    let g = std::mem::take(&mut a.pending);
                    a.groups.push_back(g);
                }
            }
            Op::CpWait { n, all } => {
                for l in lanes(exec) {
                    let a = &mut warp.asyncs[l];
                    if *all {
                        let g = std::mem::take(&mut a.pending);
                        a.groups.push_back(g);
                    }
                    while a.groups.len() > *n as usize {
                        for c in a.groups.pop_front().unwrap_or_default() {
                            let o = c.dst as usize;
                            shared[o..o + c.len as usize].copy_from_slice(&c.data[..c.len as usize]);
                        }
                    }
                }
            }
            Op::Ldmatrix { trans, ds, addr } => {
                require_full_warp(ctx, inst, warp, exec)?;
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
                        read_mem(ctx, Space::Shared, a, &mut buf, shared, mem)
                            .map_err(|e| ctx.fault(inst, warp, l, e))?;
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
                require_full_warp(ctx, inst, warp, exec)?;
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
                    write_mem(*space, a, &new.to_le_bytes()[..sz], shared, mem)
                        .map_err(|e| ctx.fault(inst, warp, l, e))?;
                    wr(warp, *d, l, old);
                }
            }
        }
        for l in lanes(advance) {
            warp.pc[l] += 1;
        }
        Ok(true)
    }
}

/// `.sync` warp collectives: every executing lane is in `membermask`, and
/// every lane named in it executes this instruction.
fn check_members(ctx: &Ctx, inst: &Inst, warp: &Warp, exec: u32, mm: Src) -> Result<(), EmuError> {
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
fn require_full_warp(ctx: &Ctx, inst: &Inst, warp: &Warp, exec: u32) -> Result<(), EmuError> {
    if exec != u32::MAX {
        let first = (exec | warp.live).trailing_zeros().min(31) as usize;
        return Err(ctx.fault(
            inst,
            warp,
            first,
            format!("needs all 32 lanes of the warp converged and executing; executing lanes are {exec:#010x}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfe_extracts_and_sign_extends() {
        assert_eq!(bfe(Ty::U32, 0b10110, 1, 2), 0b11);
        // bits 1..5 of 0b10110 are 1011: negative as a 4-bit field
        assert_eq!(bfe(Ty::S32, 0b10110, 1, 4), 0xffff_fffb);
        assert_eq!(bfe(Ty::U32, 0xffff_ffff, 30, 8), 0b11);
        // a field running past bit 31 takes the top bit as its sign
        assert_eq!(bfe(Ty::S32, 0x8000_0000, 31, 4), 0xffff_ffff);
        assert_eq!(bfe(Ty::U32, 0x1234, 4, 0), 0);
    }

    #[test]
    fn prmt_selects_and_replicates_bytes() {
        let (a, b) = (0x3322_1100, 0x7766_5544);
        assert_eq!(prmt(a, b, 0x3210), 0x3322_1100);
        assert_eq!(prmt(a, b, 0x7654), 0x7766_5544);
        assert_eq!(prmt(a, b, 0x5410), 0x5544_1100);
        // bit 3 of a selector replicates the sign of the byte; selector 0
        // copies byte 0 as is
        assert_eq!(prmt(0x0000_0080, 0, 0x0008), 0x8080_80ff);
        assert_eq!(prmt(0x0000_0070, 0, 0x0008), 0x7070_7000);
    }

    #[test]
    fn integer_edge_cases() {
        assert_eq!(bin_int(BinOp::Shr, Ty::S32, 0x8000_0000, 40).unwrap(), 0xffff_ffff);
        assert_eq!(bin_int(BinOp::Shl, Ty::B32, 1, 32).unwrap(), 0);
        assert_eq!(
            bin_int(BinOp::MulHi, Ty::S32, (-2i32) as u32 as u64, 3).unwrap(),
            0xffff_ffff
        );
        assert_eq!(
            bin_int(BinOp::MulWide, Ty::S32, (-2i32) as u32 as u64, 3).unwrap(),
            (-6i64) as u64
        );
        assert_eq!(
            bin_int(BinOp::AddSat, Ty::S32, i32::MAX as u64, 1).unwrap(),
            i32::MAX as u64
        );
        assert!(bin_int(BinOp::Div, Ty::U32, 1, 0).is_err());
        assert_eq!(un_int(UnOp::Clz, Ty::B32, 1), 31);
        assert_eq!(un_int(UnOp::Brev, Ty::B32, 1), 0x8000_0000);
    }
}
