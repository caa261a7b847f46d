//! Instruction decoding: an opcode with its dotted modifiers and operands
//! -> the executable [`Op`], with every modifier consumed and checked
//! (anything unknown is an error) and operand types checked against the
//! instruction type.

use crate::ast::{Lit, Operand};
use crate::ir::*;
use crate::lower::{Func, Globals, RegRef};
use crate::num::Round;
use crate::ty::Ty;

/// Modifiers of one opcode, consumed by the decoder; leftovers are errors.
struct Mods {
    list: Vec<String>,
}

impl Mods {
    fn take(&mut self, m: &str) -> bool {
        if let Some(i) = self.list.iter().position(|x| x == m) {
            self.list.remove(i);
            true
        } else {
            false
        }
    }
    fn take_any(&mut self, set: &[&str]) -> Option<String> {
        let i = self.list.iter().position(|x| set.contains(&x.as_str()))?;
        Some(self.list.remove(i))
    }
    fn take_ty(&mut self) -> Option<Ty> {
        let i = self.list.iter().position(|x| Ty::parse(x).is_some())?;
        Ty::parse(&self.list.remove(i))
    }
    fn take_round(&mut self) -> Option<Round> {
        Some(match self.take_any(&["rn", "rz", "rm", "rp"])?.as_str() {
            "rn" => Round::Nearest,
            "rz" => Round::Zero,
            "rm" => Round::Down,
            _ => Round::Up,
        })
    }
    fn take_iround(&mut self) -> Option<Round> {
        Some(match self.take_any(&["rni", "rzi", "rmi", "rpi"])?.as_str() {
            "rni" => Round::Nearest,
            "rzi" => Round::Zero,
            "rmi" => Round::Down,
            _ => Round::Up,
        })
    }
    fn done(&self) -> Result<(), String> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(format!("unsupported modifier(s) .{}", self.list.join(" .")))
        }
    }
}

/// Decodes instructions against the names in scope.
pub(crate) struct Decoder<'a> {
    pub f: &'a Func,
    pub g: &'a Globals,
}

pub(crate) type DResult<T> = Result<T, String>;

fn n_ops(ops: &[Operand], n: usize) -> DResult<()> {
    if ops.len() == n {
        Ok(())
    } else {
        Err(format!("expected {n} operands, found {}", ops.len()))
    }
}

impl Decoder<'_> {
    /// Decodes `opcode` (`base.mod.mod...`) applied to `ops`.
    pub(crate) fn decode(&self, opcode: &str, ops: &[Operand]) -> DResult<Op> {
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or_default();
        let mods = Mods {
            list: parts.map(str::to_string).collect(),
        };
        self.decode_op(base, mods, ops)
    }

    fn space(&self, m: &mut Mods, allowed: &[Space]) -> DResult<Space> {
        let s = match m.take_any(&["global", "shared", "shared::cta", "param", "const", "local"]) {
            None => Space::Generic,
            Some(s) => match s.as_str() {
                "global" => Space::Global,
                "shared" | "shared::cta" => Space::Shared,
                "param" => Space::Param,
                "const" => Space::Const,
                other => return Err(format!("state space .{other} is not supported")),
            },
        };
        if allowed.contains(&s) {
            Ok(s)
        } else {
            Err(format!("state space .{} is not allowed here", s.name()))
        }
    }

    fn decode_op(&self, base: &str, mut m: Mods, ops: &[Operand]) -> DResult<Op> {
        let op = match base {
            "mov" => self.mov(&mut m, ops)?,
            "ld" | "st" => self.ld_st(base == "ld", &mut m, ops)?,
            "cvta" => {
                let to = m.take("to");
                let shared = match m.take_any(&["global", "shared", "shared::cta"]).as_deref() {
                    Some("global") => false,
                    Some(_) => true,
                    None => return Err("cvta needs .global or .shared".into()),
                };
                let ty = m.take_ty().ok_or("cvta needs a type")?;
                if !matches!(ty, Ty::U32 | Ty::U64) {
                    return Err("cvta type must be .u32 or .u64".into());
                }
                n_ops(ops, 2)?;
                Op::Cvta {
                    to,
                    shared,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                }
            }
            "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" => {
                self.binary(base, &mut m, ops)?
            }
            "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "rcp" | "sqrt" | "rsqrt" | "ex2" | "lg2"
            | "sin" | "cos" | "tanh" => self.unary(base, &mut m, ops)?,
            "mad" | "fma" => self.mad(base, &mut m, ops)?,
            "bfe" => {
                let ty = m.take_ty().ok_or("bfe needs a type")?;
                if !matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64) {
                    return Err("bfe type must be .u32/.s32/.u64/.s64".into());
                }
                n_ops(ops, 4)?;
                Op::Bfe {
                    ty,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    b: self.src(&ops[2], Ty::U32)?,
                    c: self.src(&ops[3], Ty::U32)?,
                }
            }
            "prmt" => {
                if m.take_ty() != Some(Ty::B32) {
                    return Err("prmt is .b32 (only the default mode is supported)".into());
                }
                n_ops(ops, 4)?;
                Op::Prmt {
                    d: self.dst(&ops[0], Ty::B32)?,
                    a: self.src(&ops[1], Ty::B32)?,
                    b: self.src(&ops[2], Ty::B32)?,
                    c: self.src(&ops[3], Ty::B32)?,
                }
            }
            "dp4a" => {
                let sign = |t: Option<Ty>| match t {
                    Some(Ty::S32) => Ok(true),
                    Some(Ty::U32) => Ok(false),
                    _ => Err("dp4a is .{u32,s32}.{u32,s32}".to_string()),
                };
                let (a_signed, b_signed) = (sign(m.take_ty())?, sign(m.take_ty())?);
                // d and c are .s32 when either input is signed, else .u32.
                let dty = if a_signed || b_signed { Ty::S32 } else { Ty::U32 };
                n_ops(ops, 4)?;
                Op::Dp4a {
                    a_signed,
                    b_signed,
                    d: self.dst(&ops[0], dty)?,
                    a: self.src(&ops[1], Ty::B32)?,
                    b: self.src(&ops[2], Ty::B32)?,
                    c: self.src(&ops[3], dty)?,
                }
            }
            "setp" => self.setp(&mut m, ops)?,
            "selp" => {
                let ty = m.take_ty().ok_or("selp needs a type")?;
                if ty == Ty::Pred || ty.bits() < 16 {
                    return Err(format!("selp.{} is not a valid type", ty.name()));
                }
                n_ops(ops, 4)?;
                Op::Selp {
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    b: self.src(&ops[2], ty)?,
                    c: self.pred_src(&ops[3])?,
                }
            }
            "cvt" => self.cvt(&mut m, ops)?,
            "shfl" => {
                if !m.take("sync") {
                    return Err("shfl without .sync is not supported on sm_70+".into());
                }
                let mode = match m.take_any(&["up", "down", "bfly", "idx"]).as_deref() {
                    Some("up") => ShflMode::Up,
                    Some("down") => ShflMode::Down,
                    Some("bfly") => ShflMode::Bfly,
                    Some(_) => ShflMode::Idx,
                    None => return Err("shfl needs a mode".into()),
                };
                if m.take_ty() != Some(Ty::B32) {
                    return Err("shfl.sync is .b32".into());
                }
                n_ops(ops, 5)?;
                let (d, p) = match &ops[0] {
                    Operand::Pipe(d, p) => (self.dst(&Operand::Name(d.clone(), 0), Ty::B32)?, Some(self.pred(p)?)),
                    other => (self.dst(other, Ty::B32)?, None),
                };
                Op::Shfl {
                    mode,
                    d,
                    p,
                    a: self.src(&ops[1], Ty::B32)?,
                    b: self.src(&ops[2], Ty::B32)?,
                    c: self.src(&ops[3], Ty::B32)?,
                    mask: self.src(&ops[4], Ty::B32)?,
                }
            }
            "vote" => {
                if !m.take("sync") {
                    return Err("vote without .sync is not supported on sm_70+".into());
                }
                let mode = match m.take_any(&["all", "any", "uni", "ballot"]).as_deref() {
                    Some("all") => VoteMode::All,
                    Some("any") => VoteMode::Any,
                    Some("uni") => VoteMode::Uni,
                    Some(_) => VoteMode::Ballot,
                    None => return Err("vote needs a mode".into()),
                };
                let ty = m.take_ty().ok_or("vote needs a type")?;
                n_ops(ops, 3)?;
                let (d, dp) = if mode == VoteMode::Ballot {
                    if ty != Ty::B32 {
                        return Err("vote.ballot is .b32".into());
                    }
                    (self.dst(&ops[0], Ty::B32)?, None)
                } else {
                    if ty != Ty::Pred {
                        return Err("vote.all/any/uni is .pred".into());
                    }
                    (Dst::Sink, Some(self.pred_dst(&ops[0])?))
                };
                Op::Vote {
                    mode,
                    d,
                    dp,
                    a: self.pred_src(&ops[1])?,
                    mask: self.src(&ops[2], Ty::B32)?,
                }
            }
            "redux" => {
                if !m.take("sync") {
                    return Err("redux needs .sync".into());
                }
                let op = match m.take_any(&["add", "min", "max", "and", "or", "xor"]).as_deref() {
                    Some("add") => ReduxOp::Add,
                    Some("min") => ReduxOp::Min,
                    Some("max") => ReduxOp::Max,
                    Some("and") => ReduxOp::And,
                    Some("or") => ReduxOp::Or,
                    Some(_) => ReduxOp::Xor,
                    None => return Err("redux needs an operation".into()),
                };
                let ty = m.take_ty().ok_or("redux needs a type")?;
                let ok = match op {
                    ReduxOp::And | ReduxOp::Or | ReduxOp::Xor => ty == Ty::B32,
                    _ => matches!(ty, Ty::U32 | Ty::S32),
                };
                if !ok {
                    return Err(format!("redux type .{} is not valid for this operation", ty.name()));
                }
                n_ops(ops, 3)?;
                Op::Redux {
                    op,
                    ty,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    mask: self.src(&ops[2], Ty::B32)?,
                }
            }
            "activemask" => {
                if m.take_ty() != Some(Ty::B32) {
                    return Err("activemask is .b32".into());
                }
                n_ops(ops, 1)?;
                Op::Activemask {
                    d: self.dst(&ops[0], Ty::B32)?,
                }
            }
            "bra" => {
                let uni = m.take("uni");
                n_ops(ops, 1)?;
                Op::Bra { target: u32::MAX, uni }
            }
            "ret" | "exit" => {
                n_ops(ops, 0)?;
                Op::Exit
            }
            "bar" | "barrier" => {
                m.take("cta");
                if base == "bar" && m.take("warp") {
                    if !m.take("sync") {
                        return Err("bar.warp needs .sync".into());
                    }
                    m.done()?;
                    n_ops(ops, 1)?;
                    return Ok(Op::BarWarp {
                        mask: self.src(&ops[0], Ty::B32)?,
                    });
                }
                if !m.take("sync") {
                    return Err("only bar.sync / barrier.sync are supported".into());
                }
                let aligned = base == "bar" || m.take("aligned");
                if ops.is_empty() || ops.len() > 2 {
                    return Err("bar.sync takes a barrier and an optional thread count".into());
                }
                Op::Bar {
                    id: self.src(&ops[0], Ty::U32)?,
                    count: ops.get(1).map(|o| self.src(o, Ty::U32)).transpose()?,
                    aligned,
                }
            }
            "membar" => {
                m.take_any(&["cta", "gl", "sys"]).ok_or("membar needs a level")?;
                n_ops(ops, 0)?;
                Op::Nop
            }
            "fence" => {
                m.take_any(&["sc", "acq_rel"]);
                m.take_any(&["cta", "gpu", "sys"]).ok_or("fence needs a scope")?;
                n_ops(ops, 0)?;
                Op::Nop
            }
            "cp" => self.cp_async(&mut m, ops)?,
            "ldmatrix" => {
                for q in ["sync", "aligned", "m8n8"] {
                    if !m.take(q) {
                        return Err(format!("ldmatrix needs .{q} (only .m8n8 is supported)"));
                    }
                }
                let num = match m.take_any(&["x1", "x2", "x4"]).as_deref() {
                    Some("x1") => 1,
                    Some("x2") => 2,
                    Some(_) => 4,
                    None => return Err("ldmatrix needs .x1/.x2/.x4".into()),
                };
                let trans = m.take("trans");
                self.space(&mut m, &[Space::Shared])
                    .map_err(|_| "ldmatrix reads .shared (generic addressing is not supported)".to_string())?;
                if m.take_ty() != Some(Ty::B16) {
                    return Err("ldmatrix.m8n8 is .b16".into());
                }
                n_ops(ops, 2)?;
                let ds = self.vec_or_one(&ops[0]);
                if ds.len() != num || !matches!(ops[0], Operand::Vec(_)) {
                    return Err(format!("ldmatrix .x{num} needs a vector of {num} registers"));
                }
                let ds = ds
                    .into_iter()
                    .map(|r| self.dst(r, Ty::B32))
                    .collect::<DResult<Vec<_>>>()?;
                Op::Ldmatrix {
                    trans,
                    ds,
                    addr: self.addr(&ops[1], Space::Shared)?,
                }
            }
            "mma" => self.mma(&mut m, ops)?,
            "atom" | "red" => self.atom(base == "atom", &mut m, ops)?,
            other => return Err(format!("unknown or unsupported instruction `{other}`")),
        };
        m.done()?;
        Ok(op)
    }

    fn mov(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let ty = m.take_ty().ok_or("mov needs a type")?;
        n_ops(ops, 2)?;
        if ty == Ty::Pred {
            let d = self.pred_dst(&ops[0])?;
            return Ok(match &ops[1] {
                Operand::Lit(Lit::Int(v)) => Op::SetPredConst { d, v: *v != 0 },
                other => Op::MovPred {
                    d,
                    a: self.pred_src(other)?,
                },
            });
        }
        if matches!(ty, Ty::B8 | Ty::U8 | Ty::S8) {
            return Err("mov has no 8-bit types".into());
        }
        if let Operand::Vec(parts) = &ops[0] {
            if !ty.is_bit() || !(parts.len() == 2 || parts.len() == 4) {
                return Err("unpacking mov needs .b32/.b64 and 2 or 4 elements".into());
            }
            let part_bits = ty.bits() / parts.len() as u32;
            let pty = bit_ty(part_bits)?;
            let ds = parts.iter().map(|r| self.dst(r, pty)).collect::<DResult<Vec<_>>>()?;
            return Ok(Op::Unpack {
                ds,
                a: self.src(&ops[1], ty)?,
                part_bits,
            });
        }
        if let Operand::Vec(parts) = &ops[1] {
            if !ty.is_bit() || !(parts.len() == 2 || parts.len() == 4) {
                return Err("packing mov needs .b32/.b64 and 2 or 4 elements".into());
            }
            let part_bits = ty.bits() / parts.len() as u32;
            let pty = bit_ty(part_bits)?;
            let parts = parts.iter().map(|r| self.src(r, pty)).collect::<DResult<Vec<_>>>()?;
            return Ok(Op::Pack {
                d: self.dst(&ops[0], ty)?,
                parts,
                part_bits,
            });
        }
        Ok(Op::Mov {
            d: self.dst(&ops[0], ty)?,
            a: self.src(&ops[1], ty)?,
            bits: ty.bits(),
        })
    }

    fn ld_st(&self, is_ld: bool, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let space = self.space(
            m,
            &[Space::Global, Space::Shared, Space::Param, Space::Const, Space::Generic],
        )?;
        if space == Space::Const && !is_ld {
            return Err("st.const is not allowed".into());
        }
        let nc = m.take("nc");
        if nc && (space != Space::Global || !is_ld) {
            return Err(".nc is only for ld.global".into());
        }
        m.take("volatile");
        m.take_any(&["ca", "cg", "cs", "lu", "cv", "wb", "wt"]);
        m.take_any(&[
            "L1::evict_normal",
            "L1::evict_unchanged",
            "L1::evict_first",
            "L1::evict_last",
            "L1::no_allocate",
        ]);
        m.take_any(&["L2::64B", "L2::128B", "L2::256B"]);
        let n = match m.take_any(&["v2", "v4"]).as_deref() {
            Some("v2") => 2,
            Some(_) => 4,
            None => 1,
        };
        let ty = m.take_ty().ok_or("ld/st needs a type")?;
        if !(ty.is_bit() || ty.is_int() || matches!(ty, Ty::F32 | Ty::F64)) {
            return Err(format!(
                "ld/st.{} is not supported (use .b16 for 16-bit floats)",
                ty.name()
            ));
        }
        if ty.bytes() * n > 16 {
            return Err("vector accesses are at most 16 bytes".into());
        }
        if space == Space::Param && n != 1 && !is_ld {
            return Err("st.param is not supported".into());
        }
        n_ops(ops, 2)?;
        let (data, addr) = if is_ld { (&ops[0], &ops[1]) } else { (&ops[1], &ops[0]) };
        if n > 1 && !matches!(data, Operand::Vec(v) if v.len() == n as usize) {
            return Err(format!(".v{n} needs a vector of {n} operands"));
        }
        if n == 1 && matches!(data, Operand::Vec(_)) {
            return Err("a vector operand needs .v2/.v4".into());
        }
        let addr = self.addr(addr, space)?;
        let elems = self.vec_or_one(data);
        if is_ld {
            let ds = elems
                .iter()
                .map(|r| self.dst_w(r, ty, true))
                .collect::<DResult<Vec<_>>>()?;
            Ok(Op::Ld { space, ty, ds, addr })
        } else {
            if space == Space::Param {
                return Err("st.param is not supported".into());
            }
            let srcs = elems
                .iter()
                .map(|r| self.src_w(r, ty, true))
                .collect::<DResult<Vec<_>>>()?;
            Ok(Op::St { space, ty, srcs, addr })
        }
    }

    fn fmods(&self, m: &mut Mods, ty: Ty) -> DResult<FMods> {
        let fm = FMods {
            ftz: m.take("ftz"),
            sat: m.take("sat"),
        };
        if (fm.ftz || fm.sat) && ty != Ty::F32 {
            return Err(".ftz/.sat are only supported on .f32".into());
        }
        Ok(fm)
    }

    fn binary(&self, base: &str, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let rnd = m.take_round();
        if let Some(r) = rnd
            && r != Round::Nearest
        {
            return Err(format!("rounding mode {r:?} is not emulated (only .rn)"));
        }
        let kind = m.take_any(&["lo", "hi", "wide"]);
        let approx = m.take_any(&["approx", "full"]);
        let nan = m.take("NaN");
        let sat_int = m.take("sat");
        let ftz = m.take("ftz");
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = FMods {
            ftz,
            sat: sat_int && ty.is_float(),
        };
        if (ftz || fm.sat) && ty != Ty::F32 {
            return Err(".ftz/.sat are only supported on .f32 here".into());
        }
        if nan && !ty.is_float() {
            return Err(".NaN is only for floats".into());
        }
        if nan {
            return Err(".NaN min/max is not emulated".into());
        }
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        let is_f = ty.is_float();
        let logic = matches!(base, "and" | "or" | "xor");
        if logic && !(ty.is_bit() && ty.bits() >= 16 || ty == Ty::Pred) {
            return Err(format!("{base} takes .pred or .b16/.b32/.b64"));
        }
        if logic && ty == Ty::Pred {
            n_ops(ops, 3)?;
            let op = match base {
                "and" => BoolOp::And,
                "or" => BoolOp::Or,
                _ => BoolOp::Xor,
            };
            return Ok(Op::PredLogic {
                op,
                d: self.pred_dst(&ops[0])?,
                a: self.pred_src(&ops[1])?,
                b: self.pred_src(&ops[2])?,
            });
        }
        if ty.bits() < 16 {
            return Err(format!("{base}.{} is not a valid type", ty.name()));
        }
        if (rnd.is_some() || approx.is_some()) && !is_f {
            return Err("rounding modifiers are for float types".into());
        }
        if !logic && !matches!(base, "shl" | "shr") && ty.is_bit() {
            return Err(format!("{base} needs a typed (not .b) operand type"));
        }
        if sat_int && !is_f && !(matches!(base, "add" | "sub") && ty == Ty::S32) {
            return Err(".sat on integers is only add/sub.s32".into());
        }
        let op = match base {
            "add" if sat_int && !is_f => BinOp::AddSat,
            "sub" if sat_int && !is_f => BinOp::SubSat,
            "add" => BinOp::Add,
            "sub" => BinOp::Sub,
            "mul" if is_f => {
                if kind.is_some() {
                    return Err("mul.lo/hi/wide are integer forms".into());
                }
                BinOp::Mul
            }
            "mul" => match kind.as_deref() {
                Some("lo") => BinOp::MulLo,
                Some("hi") => BinOp::MulHi,
                Some(_) => BinOp::MulWide,
                None => return Err("integer mul needs .lo, .hi or .wide".into()),
            },
            "div" => {
                if is_f && ty == Ty::F32 && approx.is_none() && rnd.is_none() {
                    return Err("div.f32 needs .approx, .full or .rn".into());
                }
                BinOp::Div
            }
            "rem" => BinOp::Rem,
            "min" => BinOp::Min,
            "max" => BinOp::Max,
            "and" => BinOp::And,
            "or" => BinOp::Or,
            "xor" => BinOp::Xor,
            "shl" => BinOp::Shl,
            _ => BinOp::Shr,
        };
        if kind.is_some() && op != BinOp::MulLo && op != BinOp::MulHi && op != BinOp::MulWide {
            return Err(format!(".{} is not a modifier of {base}", kind.unwrap_or_default()));
        }
        if approx.is_some() && op != BinOp::Div {
            return Err(".approx/.full are div modifiers".into());
        }
        if is_f && matches!(op, BinOp::Rem | BinOp::Shl | BinOp::Shr) {
            return Err(format!("{base} has no float form"));
        }
        if op == BinOp::Shl && !ty.is_bit() {
            return Err("shl is .b16/.b32/.b64".into());
        }
        n_ops(ops, 3)?;
        let dty = if op == BinOp::MulWide {
            if ty.bits() == 64 {
                return Err("mul.wide takes 16- or 32-bit operands".into());
            }
            wide_ty(ty)
        } else {
            ty
        };
        let bty = if matches!(op, BinOp::Shl | BinOp::Shr) {
            Ty::U32
        } else {
            ty
        };
        Ok(Op::Bin {
            op,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], bty)?,
            fm,
        })
    }

    fn unary(&self, base: &str, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let approx = m.take("approx");
        let rnd = m.take_round();
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = self.fmods(m, ty)?;
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        if let Some(r) = rnd
            && r != Round::Nearest
        {
            return Err(format!("rounding mode {r:?} is not emulated (only .rn)"));
        }
        let op = match base {
            "neg" => UnOp::Neg,
            "abs" => UnOp::Abs,
            "not" => UnOp::Not,
            "cnot" => UnOp::Cnot,
            "popc" => UnOp::Popc,
            "clz" => UnOp::Clz,
            "brev" => UnOp::Brev,
            "rcp" => UnOp::Rcp,
            "sqrt" => UnOp::Sqrt,
            "rsqrt" => UnOp::Rsqrt,
            "ex2" => UnOp::Ex2,
            "lg2" => UnOp::Lg2,
            "sin" => UnOp::Sin,
            "cos" => UnOp::Cos,
            _ => UnOp::Tanh,
        };
        n_ops(ops, 2)?;
        if op == UnOp::Not && ty == Ty::Pred {
            return Ok(Op::PredNot {
                d: self.pred_dst(&ops[0])?,
                a: self.pred_src(&ops[1])?,
            });
        }
        let float_only = matches!(
            op,
            UnOp::Rcp | UnOp::Sqrt | UnOp::Rsqrt | UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh
        );
        let bit_only = matches!(op, UnOp::Not | UnOp::Cnot | UnOp::Popc | UnOp::Clz | UnOp::Brev);
        if float_only {
            if !matches!(ty, Ty::F32 | Ty::F64) {
                return Err(format!("{base} is a float instruction"));
            }
            let needs_approx = matches!(
                op,
                UnOp::Rsqrt | UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh
            );
            if needs_approx && !approx {
                return Err(format!("{base} needs .approx"));
            }
            if matches!(op, UnOp::Rcp | UnOp::Sqrt) && approx == rnd.is_some() {
                return Err(format!("{base} needs exactly one of .approx or .rn"));
            }
            if matches!(op, UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh) && ty != Ty::F32 {
                return Err(format!("{base}.approx is .f32"));
            }
        } else if approx || rnd.is_some() {
            return Err(format!("{base} takes no rounding modifier"));
        }
        if bit_only && !(ty.is_bit() && ty.bits() >= 16) {
            return Err(format!("{base} is a .b16/.b32/.b64 instruction"));
        }
        if matches!(op, UnOp::Popc | UnOp::Clz) && ty.bits() < 32 {
            return Err(format!("{base} is .b32/.b64"));
        }
        if matches!(op, UnOp::Neg | UnOp::Abs)
            && !(ty.is_signed() && ty.bits() >= 16 || matches!(ty, Ty::F32 | Ty::F64))
        {
            return Err(format!("{base} takes .s16/.s32/.s64/.f32/.f64"));
        }
        let dty = if matches!(op, UnOp::Popc | UnOp::Clz) {
            Ty::U32
        } else {
            ty
        };
        Ok(Op::Un {
            op,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            fm,
        })
    }

    fn mad(&self, base: &str, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let rnd = m.take_round();
        let kind = m.take_any(&["lo", "hi", "wide"]);
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = self.fmods(m, ty)?;
        n_ops(ops, 4)?;
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        if ty.is_float() {
            if kind.is_some() {
                return Err(format!("{base}.{} takes no .lo/.hi/.wide", ty.name()));
            }
            match rnd {
                Some(Round::Nearest) => {}
                Some(r) => return Err(format!("rounding mode {r:?} is not emulated (only .rn)")),
                None => return Err(format!("{base}.{} needs a rounding modifier", ty.name())),
            }
            return Ok(Op::Fma {
                ty,
                d: self.dst(&ops[0], ty)?,
                a: self.src(&ops[1], ty)?,
                b: self.src(&ops[2], ty)?,
                c: self.src(&ops[3], ty)?,
                fm,
            });
        }
        if base == "fma" {
            return Err("fma is a float instruction".into());
        }
        if !ty.is_int() || ty.bits() < 16 || rnd.is_some() {
            return Err(format!("mad.{} is not valid", ty.name()));
        }
        let kind = match kind.as_deref() {
            Some("lo") => MadKind::Lo,
            Some("hi") => MadKind::Hi,
            Some(_) => MadKind::Wide,
            None => return Err("integer mad needs .lo, .hi or .wide".into()),
        };
        let dty = if kind == MadKind::Wide {
            if ty.bits() == 64 {
                return Err("mad.wide takes 16- or 32-bit operands".into());
            }
            wide_ty(ty)
        } else {
            ty
        };
        Ok(Op::Mad {
            kind,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], ty)?,
            c: self.src(&ops[3], dty)?,
        })
    }

    fn setp(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let cmp = match m
            .take_any(&[
                "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu", "leu", "gtu", "geu",
                "num", "nan",
            ])
            .as_deref()
        {
            Some("eq") => Cmp::Eq,
            Some("ne") => Cmp::Ne,
            Some("lt") => Cmp::Lt,
            Some("le") => Cmp::Le,
            Some("gt") => Cmp::Gt,
            Some("ge") => Cmp::Ge,
            Some("lo") => Cmp::Lo,
            Some("ls") => Cmp::Ls,
            Some("hi") => Cmp::Hi,
            Some("hs") => Cmp::Hs,
            Some("equ") => Cmp::Equ,
            Some("neu") => Cmp::Neu,
            Some("ltu") => Cmp::Ltu,
            Some("leu") => Cmp::Leu,
            Some("gtu") => Cmp::Gtu,
            Some("geu") => Cmp::Geu,
            Some("num") => Cmp::Num,
            Some(_) => Cmp::Nan,
            None => return Err("setp needs a comparison".into()),
        };
        let bop = match m.take_any(&["and", "or", "xor"]).as_deref() {
            Some("and") => Some(BoolOp::And),
            Some("or") => Some(BoolOp::Or),
            Some(_) => Some(BoolOp::Xor),
            None => None,
        };
        let ftz = m.take("ftz");
        let ty = m.take_ty().ok_or("setp needs a type")?;
        if ty == Ty::Pred || ty.bits() < 16 || matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!("setp.{} is not supported", ty.name()));
        }
        if ftz && ty != Ty::F32 {
            return Err(".ftz is only for .f32".into());
        }
        let float_cmp = matches!(
            cmp,
            Cmp::Equ | Cmp::Neu | Cmp::Ltu | Cmp::Leu | Cmp::Gtu | Cmp::Geu | Cmp::Num | Cmp::Nan
        );
        let uns_cmp = matches!(cmp, Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs);
        if float_cmp && !ty.is_float() {
            return Err(format!("comparison {cmp:?} is for floats"));
        }
        if uns_cmp && !(ty.is_unsigned() || ty.is_bit()) {
            return Err(format!("comparison {cmp:?} is for unsigned integers"));
        }
        if ty.is_bit() && !matches!(cmp, Cmp::Eq | Cmp::Ne) {
            return Err("bit types compare only with .eq/.ne".into());
        }
        let n = if bop.is_some() { 4 } else { 3 };
        n_ops(ops, n)?;
        let (p, q) = match &ops[0] {
            Operand::Pipe(p, q) => (Some(self.pred(p)?), Some(self.pred(q)?)),
            Operand::Sink => (None, None),
            other => (Some(self.pred_dst(other)?), None),
        };
        let comb = match bop {
            Some(b) => Some((b, self.pred_src(&ops[3])?)),
            None => None,
        };
        Ok(Op::Setp {
            cmp,
            ty,
            ftz,
            p,
            q,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], ty)?,
            comb,
        })
    }

    fn cvt(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        let irnd = m.take_iround();
        let frnd = m.take_round();
        let ftz = m.take("ftz");
        let sat = m.take("sat");
        let relu = m.take("relu");
        let satfinite = m.take("satfinite");
        let dty = m.take_ty().ok_or("cvt needs a destination type")?;
        let aty = if matches!(dty, Ty::F16x2 | Ty::Bf16x2) {
            Ty::F32
        } else {
            m.take_ty().ok_or("cvt needs a source type")?
        };
        if matches!(dty, Ty::F16x2 | Ty::Bf16x2) && m.take_ty() != Some(Ty::F32) {
            return Err("cvt to .f16x2/.bf16x2 converts two .f32".into());
        }
        if irnd.is_some() && frnd.is_some() {
            return Err("cvt takes one rounding modifier".into());
        }
        for t in [dty, aty] {
            if t == Ty::Pred || t.is_bit() {
                return Err(format!("cvt has no .{} type", t.name()));
            }
        }
        let df = dty.is_float();
        let af = aty.is_float();
        let rnd = match (irnd, frnd) {
            (Some(r), None) => {
                if !af {
                    return Err("integer rounding (.rni...) needs a float source".into());
                }
                CvtRound::Int(r)
            }
            (None, Some(r)) => {
                if !df {
                    return Err("float rounding (.rn...) needs a float destination".into());
                }
                CvtRound::Float(r)
            }
            _ => CvtRound::None,
        };
        // Rounding is mandatory for narrowing float conversions, float->int,
        // int->float and packed conversions.
        let narrowing_f = df && af && dty.bits() < aty.bits();
        let need_f = narrowing_f || (df && !af) || matches!(dty, Ty::F16x2 | Ty::Bf16x2);
        let need_i = af && !df;
        match rnd {
            CvtRound::None if need_f || need_i => return Err("this cvt needs a rounding modifier".into()),
            CvtRound::Float(_) if !need_f => return Err("this cvt takes no float rounding modifier".into()),
            CvtRound::Int(_) if !(need_i || (df && af && dty == aty)) => {
                return Err("integer rounding is for float->int or float->same-float".into());
            }
            _ => {}
        }
        if let CvtRound::Float(r) = rnd
            && matches!(dty, Ty::Bf16 | Ty::Bf16x2 | Ty::F16 | Ty::F16x2)
            && aty == Ty::F32
            && !matches!(r, Round::Nearest | Round::Zero)
        {
            return Err("cvt to 16-bit floats rounds with .rn or .rz".into());
        }
        if (relu || satfinite) && !matches!(dty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(".relu/.satfinite are for 16-bit float destinations".into());
        }
        if ftz && !(aty == Ty::F32 || dty == Ty::F32) {
            return Err(".ftz needs an .f32 operand".into());
        }
        let packed = matches!(dty, Ty::F16x2 | Ty::Bf16x2);
        n_ops(ops, if packed { 3 } else { 2 })?;
        let d = self.dst_w(&ops[0], dty, !df)?;
        let a = self.src_w(&ops[1], aty, !af)?;
        let b = if packed {
            Some(self.src(&ops[2], Ty::F32)?)
        } else {
            None
        };
        Ok(Op::Cvt {
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
        })
    }

    fn cp_async(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        if !m.take("async") {
            return Err("only cp.async is supported".into());
        }
        if m.take("commit_group") {
            n_ops(ops, 0)?;
            return Ok(Op::CpCommit);
        }
        if m.take("wait_group") {
            n_ops(ops, 1)?;
            let Operand::Lit(Lit::Int(n)) = ops[0] else {
                return Err("cp.async.wait_group takes an integer constant".into());
            };
            return Ok(Op::CpWait {
                n: n as u32,
                all: false,
            });
        }
        if m.take("wait_all") {
            n_ops(ops, 0)?;
            return Ok(Op::CpWait { n: 0, all: true });
        }
        let cg = match m.take_any(&["ca", "cg"]).as_deref() {
            Some("cg") => true,
            Some(_) => false,
            None => return Err("cp.async needs .ca or .cg".into()),
        };
        if !(m.take("shared") || m.take("shared::cta")) || !m.take("global") {
            return Err("cp.async copies .shared{::cta}.global".into());
        }
        m.take_any(&["L2::64B", "L2::128B", "L2::256B"]);
        if m.take("L2::cache_hint") {
            return Err(".L2::cache_hint is not supported".into());
        }
        if ops.len() < 3 || ops.len() > 4 {
            return Err("cp.async takes [dst], [src], cp-size{, src-size | ignore-src}".into());
        }
        let size = match ops[2] {
            Operand::Lit(Lit::Int(s)) if s == 4 || s == 8 || s == 16 => s as u32,
            _ => return Err("cp-size must be 4, 8 or 16".into()),
        };
        if cg && size != 16 {
            return Err("cp.async.cg copies 16 bytes".into());
        }
        let (mut src_size, mut ignore) = (None, None);
        if let Some(x) = ops.get(3) {
            let is_pred = match x {
                Operand::Not(_) => true,
                Operand::Name(n, 0) => matches!(self.f.lookup(n), Some(RegRef::P(_))),
                _ => false,
            };
            if is_pred {
                ignore = Some(self.pred_src(x)?);
            } else {
                let s = self.src(x, Ty::U32)?;
                if let Src::Imm(v) = s
                    && v > u64::from(size)
                {
                    return Err("src-size larger than cp-size".into());
                }
                src_size = Some(s);
            }
        }
        Ok(Op::CpAsync(CpAsync {
            dst: self.addr(&ops[0], Space::Shared)?,
            src: self.addr(&ops[1], Space::Global)?,
            size,
            src_size,
            ignore,
        }))
    }

    fn mma(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        for q in ["sync", "aligned"] {
            if !m.take(q) {
                return Err(format!("mma needs .{q}"));
            }
        }
        if m.take("m16n8k32") {
            return self.mma_int(m, ops);
        }
        let k = match m.take_any(&["m16n8k16", "m16n8k8"]).as_deref() {
            Some("m16n8k16") => 16,
            Some(_) => 8,
            None => return Err("only mma .m16n8k16, .m16n8k8 and (8-bit integers) .m16n8k32 are supported".into()),
        };
        if !m.take("row") || !m.take("col") {
            return Err("mma.m16n8k* is .row.col".into());
        }
        let dty = m.take_ty().ok_or("mma needs types")?;
        let aty = m.take_ty().ok_or("mma needs types")?;
        let bty = m.take_ty().ok_or("mma needs types")?;
        let cty = m.take_ty().ok_or("mma needs types")?;
        let f16_inputs = match (aty, bty) {
            (Ty::Bf16, Ty::Bf16) => false,
            (Ty::F16, Ty::F16) => true,
            _ => return Err("mma supports .bf16.bf16 and .f16.f16 inputs".into()),
        };
        let acc_ok = |t: Ty| t == Ty::F32 || (f16_inputs && t == Ty::F16);
        if !acc_ok(dty) || !acc_ok(cty) {
            return Err("mma accumulators are .f32 (or .f16 with .f16 inputs)".into());
        }
        n_ops(ops, 4)?;
        let regs = |r: &Operand, n: usize, what: &str| -> DResult<Vec<Operand>> {
            match r {
                Operand::Vec(v) if v.len() == n => Ok(v.clone()),
                _ => Err(format!("mma operand {what} needs a vector of {n} registers")),
            }
        };
        let nd = if dty == Ty::F32 { 4 } else { 2 };
        let nc = if cty == Ty::F32 { 4 } else { 2 };
        let na = if k == 16 { 4 } else { 2 };
        let nb = if k == 16 { 2 } else { 1 };
        let dt = if dty == Ty::F32 { Ty::F32 } else { Ty::B32 };
        let ct = if cty == Ty::F32 { Ty::F32 } else { Ty::B32 };
        let d = regs(&ops[0], nd, "d")?
            .iter()
            .map(|r| self.dst(r, dt))
            .collect::<DResult<Vec<_>>>()?;
        let a = regs(&ops[1], na, "a")?
            .iter()
            .map(|r| self.src(r, Ty::B32))
            .collect::<DResult<Vec<_>>>()?;
        let b = regs(&ops[2], nb, "b")?
            .iter()
            .map(|r| self.src(r, Ty::B32))
            .collect::<DResult<Vec<_>>>()?;
        let c = regs(&ops[3], nc, "c")?
            .iter()
            .map(|r| self.src(r, ct))
            .collect::<DResult<Vec<_>>>()?;
        Ok(Op::Mma {
            k,
            f16_inputs,
            c_f16: cty == Ty::F16,
            d_f16: dty == Ty::F16,
            d,
            a,
            b,
            c,
        })
    }

    /// `mma.sync.aligned.m16n8k32.row.col{.satfinite}.s32.atype.btype.s32`,
    /// atype and btype `.s8` or `.u8`: A 4, B 2, C and D 4 registers.
    fn mma_int(&self, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        if !m.take("row") || !m.take("col") {
            return Err("mma.m16n8k32 is .row.col".into());
        }
        let satfinite = m.take("satfinite");
        let tys: Vec<Option<Ty>> = (0..4).map(|_| m.take_ty()).collect();
        let sign = |t: Option<Ty>| match t {
            Some(Ty::S8) => Ok(true),
            Some(Ty::U8) => Ok(false),
            _ => Err("mma.m16n8k32 multiplies .s8/.u8".to_string()),
        };
        if tys[0] != Some(Ty::S32) || tys[3] != Some(Ty::S32) {
            return Err("mma.m16n8k32 accumulates in .s32".into());
        }
        let (a_signed, b_signed) = (sign(tys[1])?, sign(tys[2])?);
        n_ops(ops, 4)?;
        let regs = |r: &Operand, n: usize, what: &str| -> DResult<Vec<Operand>> {
            match r {
                Operand::Vec(v) if v.len() == n => Ok(v.clone()),
                _ => Err(format!("mma operand {what} needs a vector of {n} registers")),
            }
        };
        let srcs = |r: &Operand, n: usize, what: &str, ty: Ty| -> DResult<Vec<Src>> {
            regs(r, n, what)?.iter().map(|x| self.src(x, ty)).collect()
        };
        let d = regs(&ops[0], 4, "d")?
            .iter()
            .map(|r| self.dst(r, Ty::S32))
            .collect::<DResult<Vec<_>>>()?;
        let a = srcs(&ops[1], 4, "a", Ty::B32)?;
        let b = srcs(&ops[2], 2, "b", Ty::B32)?;
        let c = srcs(&ops[3], 4, "c", Ty::S32)?;
        Ok(Op::MmaInt {
            a_signed,
            b_signed,
            satfinite,
            d,
            a,
            b,
            c,
        })
    }

    fn atom(&self, is_atom: bool, m: &mut Mods, ops: &[Operand]) -> DResult<Op> {
        m.take_any(&["relaxed", "acquire", "release", "acq_rel"]);
        m.take_any(&["cta", "gpu", "sys"]);
        let space = self.space(m, &[Space::Global, Space::Shared, Space::Generic])?;
        let op = match m
            .take_any(&["add", "min", "max", "and", "or", "xor", "exch", "cas"])
            .as_deref()
        {
            Some("add") => AtomOp::Add,
            Some("min") => AtomOp::Min,
            Some("max") => AtomOp::Max,
            Some("and") => AtomOp::And,
            Some("or") => AtomOp::Or,
            Some("xor") => AtomOp::Xor,
            Some("exch") => AtomOp::Exch,
            Some("cas") => AtomOp::Cas,
            _ => return Err("unsupported atomic operation".into()),
        };
        let ty = m.take_ty().ok_or("atom needs a type")?;
        let ok = match op {
            AtomOp::Add => matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::F32 | Ty::F64),
            AtomOp::Min | AtomOp::Max => matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64),
            AtomOp::And | AtomOp::Or | AtomOp::Xor => matches!(ty, Ty::B32 | Ty::B64),
            AtomOp::Exch | AtomOp::Cas => matches!(ty, Ty::B32 | Ty::B64),
        };
        if !ok {
            return Err(format!("atomic {op:?} on .{} is not supported", ty.name()));
        }
        if !is_atom && matches!(op, AtomOp::Exch | AtomOp::Cas) {
            return Err("red has no exch/cas".into());
        }
        let n = usize::from(is_atom) + 2 + usize::from(op == AtomOp::Cas);
        n_ops(ops, n)?;
        let (d, rest) = if is_atom {
            (self.dst(&ops[0], ty)?, &ops[1..])
        } else {
            (Dst::Sink, ops)
        };
        Ok(Op::Atom {
            space,
            op,
            ty,
            d,
            addr: self.addr(&rest[0], space)?,
            b: self.src(&rest[1], ty)?,
            c: rest.get(2).map(|r| self.src(r, ty)).transpose()?,
        })
    }
}

fn bit_ty(bits: u32) -> DResult<Ty> {
    Ok(match bits {
        16 => Ty::B16,
        32 => Ty::B32,
        8 => return Err("8-bit packing is not supported".into()),
        _ => return Err(format!("bad element width {bits}")),
    })
}

fn wide_ty(t: Ty) -> Ty {
    match t {
        Ty::U16 => Ty::U32,
        Ty::S16 => Ty::S32,
        Ty::U32 => Ty::U64,
        _ => Ty::S64,
    }
}
