//! Operands -> [`Src`], [`Dst`], [`PredSrc`] and [`Addr`]: names resolved
//! in scope, literals converted to the bits of the instruction type, and
//! register types checked with the ISA's compatibility rules.

use crate::ast::{Lit, Operand};
use crate::decode::{DResult, Decoder};
use crate::ir::*;
use crate::lower::{RegRef, align_up};
use crate::num::{self, Round, mask};
use crate::ty::Ty;
use crate::{CONST_WINDOW, SHARED_WINDOW};

/// The bits of literal `l` as an operand of type `ty`.
pub(crate) fn lit_bits(l: Lit, ty: Ty) -> Result<u64, String> {
    Ok(match ty {
        Ty::F32 => match l {
            Lit::Int(v) => u64::from((v as f64 as f32).to_bits()),
            Lit::F32(b) => u64::from(b),
            Lit::F64(b) => num::f64_to_format(f64::from_bits(b), num::F32, Round::Nearest),
            Lit::Dec(f) => num::f64_to_format(f, num::F32, Round::Nearest),
        },
        Ty::F64 => match l {
            Lit::Int(v) => (v as f64).to_bits(),
            Lit::F32(b) => f64::from(f32::from_bits(b)).to_bits(),
            Lit::F64(b) => b,
            Lit::Dec(f) => f.to_bits(),
        },
        Ty::F16 | Ty::Bf16 => {
            let fmt = if ty == Ty::F16 { num::F16 } else { num::BF16 };
            match l {
                Lit::Int(v) => (v as u64) & 0xffff,
                Lit::F32(b) => num::f64_to_format(f64::from(f32::from_bits(b)), fmt, Round::Nearest),
                Lit::F64(b) => num::f64_to_format(f64::from_bits(b), fmt, Round::Nearest),
                Lit::Dec(f) => num::f64_to_format(f, fmt, Round::Nearest),
            }
        }
        Ty::Pred => match l {
            Lit::Int(v) => u64::from(v != 0),
            _ => return Err("a predicate constant must be 0 or 1".into()),
        },
        _ => match l {
            Lit::Int(v) => (v as u64) & mask(ty.bits()),
            Lit::F32(b) if ty.bits() == 32 && ty.is_bit() => u64::from(b),
            Lit::F64(b) if ty.bits() == 64 && ty.is_bit() => b,
            _ => return Err(format!("a float literal is not a .{} operand", ty.name())),
        },
    })
}

/// PTX operand type compatibility (section "Operand Type Information"): same
/// size, and bit types match anything, integers match integers.
fn compatible(reg: Ty, inst: Ty) -> bool {
    reg.bits() == inst.bits() && (reg == inst || reg.is_bit() || inst.is_bit() || (reg.is_int() && inst.is_int()))
}

/// The relaxed rule of ld/st/cvt data operands: a register wider than the
/// instruction type (integer and bit types).
fn relaxed(reg: Ty, inst: Ty) -> bool {
    compatible(reg, inst) || (reg.bits() > inst.bits() && !inst.is_float() && !reg.is_float())
}

impl Decoder<'_> {
    /// The shared-window offset of a `.shared` variable, if `name` is one.
    fn shared_var(&self, name: &str) -> Option<u64> {
        if let Some(&offset) = self.f.shared.get(name).or_else(|| self.g.shared.get(name)) {
            return Some(offset);
        }
        let dyn_align = self.f.dyn_align.max(16);
        if self.f.dyn_shared.iter().any(|n| n == name) || self.g.dyn_shared.iter().any(|n| n == name) {
            return Some(align_up(self.f.shared_size, dyn_align));
        }
        None
    }

    fn reg(&self, name: &str) -> DResult<(u32, Ty)> {
        match self.f.lookup(name) {
            Some(RegRef::R(i, t)) => Ok((i, t)),
            Some(RegRef::P(_)) => Err(format!("`{name}` is a predicate, not a data register")),
            None => Err(format!("undeclared register `{name}`")),
        }
    }

    pub(crate) fn pred(&self, name: &str) -> DResult<u32> {
        match self.f.lookup(name) {
            Some(RegRef::P(i)) => Ok(i),
            _ => Err(format!("`{name}` is not a declared predicate")),
        }
    }

    pub(crate) fn pred_src(&self, r: &Operand) -> DResult<PredSrc> {
        match r {
            Operand::Name(n, 0) => Ok(PredSrc {
                idx: self.pred(n)?,
                neg: false,
            }),
            Operand::Not(n) => Ok(PredSrc {
                idx: self.pred(n)?,
                neg: true,
            }),
            _ => Err(format!("expected a predicate, found {r:?}")),
        }
    }

    pub(crate) fn pred_dst(&self, r: &Operand) -> DResult<u32> {
        match r {
            Operand::Name(n, 0) => self.pred(n),
            _ => Err(format!("expected a predicate destination, found {r:?}")),
        }
    }

    /// A source of instruction type `ty`; `wide` allows wider registers (ld,
    /// st, cvt).
    pub(crate) fn src_w(&self, r: &Operand, ty: Ty, wide: bool) -> DResult<Src> {
        match r {
            Operand::Lit(l) => Ok(Src::Imm(lit_bits(*l, ty)?)),
            Operand::Name(n, off) => {
                if let Some(sr) = Sreg::parse(n) {
                    if *off != 0 || ty.bits() != 32 || ty.is_float() {
                        return Err(format!(
                            "special register {n} is .u32; it cannot be a .{} operand",
                            ty.name()
                        ));
                    }
                    return Ok(Src::Sreg(sr));
                }
                if let Some(o) = self.f.lookup(n) {
                    let RegRef::R(i, rt) = o else {
                        return Err(format!("`{n}` is a predicate, not a data register"));
                    };
                    if *off != 0 {
                        return Err(format!("`{n}+{off}` is not an operand"));
                    }
                    let ok = if wide { relaxed(rt, ty) } else { compatible(rt, ty) };
                    if !ok {
                        return Err(format!(
                            "register `{n}` (.{}) is not a .{} operand",
                            rt.name(),
                            ty.name()
                        ));
                    }
                    return Ok(Src::Reg(i));
                }
                if let Some(addr) = self.shared_var(n).or_else(|| self.g.consts.get(n).copied()) {
                    if ty.bits() < 32 || ty.is_float() {
                        return Err(format!("the address of `{n}` is not a .{} value", ty.name()));
                    }
                    return Ok(Src::Imm((addr as i64 + off) as u64 & mask(ty.bits())));
                }
                Err(format!("unknown operand `{n}`"))
            }
            _ => Err(format!("expected a .{} operand, found {r:?}", ty.name())),
        }
    }

    pub(crate) fn src(&self, r: &Operand, ty: Ty) -> DResult<Src> {
        self.src_w(r, ty, false)
    }

    pub(crate) fn dst_w(&self, r: &Operand, ty: Ty, wide: bool) -> DResult<Dst> {
        match r {
            Operand::Sink => Ok(Dst::Sink),
            Operand::Name(n, 0) => {
                let (i, rt) = self.reg(n)?;
                let ok = if wide { relaxed(rt, ty) } else { compatible(rt, ty) };
                if !ok {
                    return Err(format!(
                        "register `{n}` (.{}) cannot receive a .{} result",
                        rt.name(),
                        ty.name()
                    ));
                }
                Ok(Dst::Reg {
                    idx: i,
                    bits: rt.bits(),
                })
            }
            _ => Err(format!("expected a destination register, found {r:?}")),
        }
    }

    pub(crate) fn dst(&self, r: &Operand, ty: Ty) -> DResult<Dst> {
        self.dst_w(r, ty, false)
    }

    /// `[...]` in state space `space`.
    pub(crate) fn addr(&self, r: &Operand, space: Space) -> DResult<Addr> {
        let Operand::Addr(base, off) = r else {
            return Err(format!("expected an address `[...]`, found {r:?}"));
        };
        let Some(b) = base else {
            return Ok(Addr { base: None, off: *off });
        };
        if let Some(o) = self.f.lookup(b) {
            let RegRef::R(i, t) = o else {
                return Err(format!("`{b}` is a predicate, not an address"));
            };
            if !(t.bits() == 32 || t.bits() == 64) || t.is_float() {
                return Err(format!("address register `{b}` must be a 32- or 64-bit integer"));
            }
            return Ok(Addr {
                base: Some(i),
                off: *off,
            });
        }
        if let Some(a) = self.shared_var(b) {
            return match space {
                Space::Shared => Ok(Addr {
                    base: None,
                    off: a as i64 + off,
                }),
                Space::Generic => Ok(Addr {
                    base: None,
                    off: (SHARED_WINDOW + a) as i64 + off,
                }),
                _ => Err(format!("`{b}` is a .shared variable, not in .{}", space.name())),
            };
        }
        if let Some(&a) = self.g.consts.get(b) {
            return match space {
                Space::Const => Ok(Addr {
                    base: None,
                    off: a as i64 + off,
                }),
                Space::Generic => Ok(Addr {
                    base: None,
                    off: (CONST_WINDOW + a) as i64 + off,
                }),
                _ => Err(format!("`{b}` is a .const variable, not in .{}", space.name())),
            };
        }
        if let Some(o) = self.f.params.get(b) {
            return match space {
                Space::Param => Ok(Addr {
                    base: None,
                    off: *o as i64 + off,
                }),
                _ => Err(format!("kernel parameter `{b}` must be read with ld.param")),
            };
        }
        Err(format!("unknown address `{b}`"))
    }

    pub(crate) fn vec_or_one<'r>(&self, r: &'r Operand) -> Vec<&'r Operand> {
        match r {
            Operand::Vec(v) => v.iter().collect(),
            other => vec![other],
        }
    }
}
