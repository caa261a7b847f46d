//! Pre-decoded instructions: registers are indices, immediates are bits of
//! the instruction type, labels are instruction indices, modifiers are enums.

use crate::num::Round;
use crate::ty::Ty;

/// Special registers (all `.u32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
    Warpid,
    Nwarpid,
    LanemaskEq,
    LanemaskLt,
    LanemaskLe,
    LanemaskGt,
    LanemaskGe,
    DynSmem,
    TotalSmem,
}

impl Sreg {
    pub(crate) fn parse(s: &str) -> Option<Sreg> {
        let dim = |d: &str| match d {
            "x" => Some(0u8),
            "y" => Some(1),
            "z" => Some(2),
            _ => None,
        };
        if let Some((base, d)) = s.split_once('.') {
            let d = dim(d)?;
            return Some(match base {
                "%tid" => Sreg::Tid(d),
                "%ntid" => Sreg::Ntid(d),
                "%ctaid" => Sreg::Ctaid(d),
                "%nctaid" => Sreg::Nctaid(d),
                _ => return None,
            });
        }
        Some(match s {
            "%laneid" => Sreg::Laneid,
            "%warpid" => Sreg::Warpid,
            "%nwarpid" => Sreg::Nwarpid,
            "%lanemask_eq" => Sreg::LanemaskEq,
            "%lanemask_lt" => Sreg::LanemaskLt,
            "%lanemask_le" => Sreg::LanemaskLe,
            "%lanemask_gt" => Sreg::LanemaskGt,
            "%lanemask_ge" => Sreg::LanemaskGe,
            "%dynamic_smem_size" => Sreg::DynSmem,
            "%total_smem_size" => Sreg::TotalSmem,
            _ => return None,
        })
    }
}

/// A source operand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Src {
    /// Register index into the warp's register file.
    Reg(u32),
    /// Raw bits of the instruction type.
    Imm(u64),
    Sreg(Sreg),
}

/// A destination: a register (with its width, to mask writes) or the sink `_`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Dst {
    Reg { idx: u32, bits: u32 },
    Sink,
}

/// A predicate source: index and negation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PredSrc {
    pub idx: u32,
    pub neg: bool,
}

/// State spaces an address may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Param,
    Const,
    Generic,
}

impl Space {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Space::Global => "global",
            Space::Shared => "shared",
            Space::Param => "param",
            Space::Const => "const",
            Space::Generic => "generic",
        }
    }
}

/// `[base + off]`; `base` None means an absolute address (a variable's
/// address folded into `off`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Addr {
    pub base: Option<u32>,
    pub off: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    AddSat,
    SubSat,
    MulLo,
    MulHi,
    MulWide,
    Mul,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnOp {
    Neg,
    Abs,
    Not,
    Cnot,
    Popc,
    Clz,
    Brev,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MadKind {
    Lo,
    Hi,
    Wide,
}

/// Float modifiers shared by arithmetic instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FMods {
    pub ftz: bool,
    pub sat: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduxOp {
    Add,
    Min,
    Max,
    And,
    Or,
    Xor,
}

/// How `cvt` rounds: nothing, to an integral value (`.rni`...), or to the
/// destination format (`.rn`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CvtRound {
    None,
    Int(Round),
    Float(Round),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Mov {
        d: Dst,
        a: Src,
        bits: u32,
    },
    MovPred {
        d: u32,
        a: PredSrc,
    },
    SetPredConst {
        d: u32,
        v: bool,
    },
    Pack {
        d: Dst,
        parts: Vec<Src>,
        part_bits: u32,
    },
    Unpack {
        ds: Vec<Dst>,
        a: Src,
        part_bits: u32,
    },
    Ld {
        space: Space,
        ty: Ty,
        ds: Vec<Dst>,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        srcs: Vec<Src>,
        addr: Addr,
    },
    Cvta {
        to: bool,
        shared: bool,
        d: Dst,
        a: Src,
    },
    Bin {
        op: BinOp,
        ty: Ty,
        d: Dst,
        a: Src,
        b: Src,
        fm: FMods,
    },
    Un {
        op: UnOp,
        ty: Ty,
        d: Dst,
        a: Src,
        fm: FMods,
    },
    Mad {
        kind: MadKind,
        ty: Ty,
        d: Dst,
        a: Src,
        b: Src,
        c: Src,
    },
    Fma {
        ty: Ty,
        d: Dst,
        a: Src,
        b: Src,
        c: Src,
        fm: FMods,
    },
    Bfe {
        ty: Ty,
        d: Dst,
        a: Src,
        b: Src,
        c: Src,
    },
    Prmt {
        d: Dst,
        a: Src,
        b: Src,
        c: Src,
    },
    /// `dp4a.atype.btype`: `c` plus the four byte products of `a` and `b`
    /// (each byte signed or not), modulo 2^32.
    Dp4a {
        a_signed: bool,
        b_signed: bool,
        d: Dst,
        a: Src,
        b: Src,
        c: Src,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        ftz: bool,
        p: Option<u32>,
        q: Option<u32>,
        a: Src,
        b: Src,
        comb: Option<(BoolOp, PredSrc)>,
    },
    Selp {
        d: Dst,
        a: Src,
        b: Src,
        c: PredSrc,
    },
    PredLogic {
        op: BoolOp,
        d: u32,
        a: PredSrc,
        b: PredSrc,
    },
    PredNot {
        d: u32,
        a: PredSrc,
    },
    Cvt {
        dty: Ty,
        aty: Ty,
        rnd: CvtRound,
        ftz: bool,
        sat: bool,
        relu: bool,
        satfinite: bool,
        d: Dst,
        a: Src,
        b: Option<Src>,
    },
    Shfl {
        mode: ShflMode,
        d: Dst,
        p: Option<u32>,
        a: Src,
        b: Src,
        c: Src,
        mask: Src,
    },
    Vote {
        mode: VoteMode,
        d: Dst,
        dp: Option<u32>,
        a: PredSrc,
        mask: Src,
    },
    Redux {
        op: ReduxOp,
        ty: Ty,
        d: Dst,
        a: Src,
        mask: Src,
    },
    Activemask {
        d: Dst,
    },
    Bra {
        target: u32,
        uni: bool,
    },
    Exit,
    Bar {
        id: Src,
        count: Option<Src>,
        aligned: bool,
    },
    BarWarp {
        mask: Src,
    },
    Nop,
    CpAsync(CpAsync),
    CpCommit,
    CpWait {
        n: u32,
        all: bool,
    },
    Ldmatrix {
        trans: bool,
        ds: Vec<Dst>,
        addr: Addr,
    },
    Mma {
        k: u32,
        f16_inputs: bool,
        c_f16: bool,
        d_f16: bool,
        d: Vec<Dst>,
        a: Vec<Src>,
        b: Vec<Src>,
        c: Vec<Src>,
    },
    /// `mma.sync.aligned.m16n8k32.row.col.s32.{s8,u8}.{s8,u8}.s32`
    /// (exact integer sums, wrapping; `.satfinite` clamps to i32).
    MmaInt {
        a_signed: bool,
        b_signed: bool,
        satfinite: bool,
        d: Vec<Dst>,
        a: Vec<Src>,
        b: Vec<Src>,
        c: Vec<Src>,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: Ty,
        d: Dst,
        addr: Addr,
        b: Src,
        c: Option<Src>,
    },
}

/// `cp.async` of `size` bytes; `src_size` bytes are read (the rest is
/// zero), none when `ignore` holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CpAsync {
    pub dst: Addr,
    pub src: Addr,
    pub size: u32,
    pub src_size: Option<Src>,
    pub ignore: Option<PredSrc>,
}

/// One instruction with its guard and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct Inst {
    pub guard: Option<PredSrc>,
    pub op: Op,
    pub line: u32,
    pub text: String,
}
