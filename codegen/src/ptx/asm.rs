//! A small PTX text builder shared by the emitters: virtual registers of
//! five kinds (declared at the end, one `.reg` line each), instructions as
//! formatted lines, labels, and the helpers every family needs (parameter
//! loads, dtype-aware loads / stores / rounding, exp, sin / cos, warp and
//! block reductions, counted loops). Emitters write PTX almost verbatim:
//! `ins!(b, "add.rn.f32 {d}, {x}, {y}")`.

use ouroc_ir::DType;
use std::fmt::{self, Write};

/// A register kind: its `.reg` type and name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Pred = 0,
    H = 1,
    R = 2,
    F = 3,
    D = 4,
}

const KINDS: [(&str, &str); 5] = [("pred", "p"), ("b16", "h"), ("b32", "r"), ("f32", "f"), ("b64", "rd")];

/// A virtual register (`%f3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reg(Kind, u32);

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}{}", KINDS[self.0 as usize].1, self.1)
    }
}

/// One instruction line: `ins!(b, "mov.u32 {d}, %tid.x")`.
macro_rules! ins {
    ($b:expr, $($t:tt)*) => { $b.line(format!($($t)*)) };
}
pub(crate) use ins;

/// An f32 immediate in PTX's exact hex form (`0f3F800000`).
pub(crate) fn f32_imm(x: f32) -> String {
    format!("0f{:08X}", x.to_bits())
}

/// Bytes of one element of `d` (the emitters only see f32, bf16 and i32).
pub(crate) fn size(d: DType) -> u32 {
    d.size_bytes() as u32
}

/// Comparison operators of `min`/`max`-style reductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Red {
    Sum,
    Max,
}

impl Red {
    fn op(self) -> &'static str {
        match self {
            Red::Sum => "add.rn.f32",
            Red::Max => "max.f32",
        }
    }
}

/// The body of one `.entry`: instructions, register counts, labels, and
/// function-scope `.shared` declarations.
#[derive(Default)]
pub(crate) struct Body {
    text: String,
    decls: String,
    regs: [u32; 5],
    labels: u32,
}

impl Body {
    pub fn line(&mut self, s: String) {
        let _ = writeln!(self.text, "\t{s};");
    }

    pub fn comment(&mut self, s: &str) {
        let _ = writeln!(self.text, "\t// {s}");
    }

    pub fn reg(&mut self, k: Kind) -> Reg {
        let n = self.regs[k as usize];
        self.regs[k as usize] += 1;
        Reg(k, n)
    }

    pub fn f(&mut self) -> Reg {
        self.reg(Kind::F)
    }

    pub fn r(&mut self) -> Reg {
        self.reg(Kind::R)
    }

    pub fn p(&mut self) -> Reg {
        self.reg(Kind::Pred)
    }

    /// A fresh label `$L_{name}_{n}`.
    pub fn label(&mut self, name: &str) -> String {
        self.labels += 1;
        format!("$L_{name}_{}", self.labels)
    }

    pub fn place(&mut self, label: &str) {
        let _ = writeln!(self.text, "{label}:");
    }

    /// A function-scope shared array of `bytes` bytes, 16-byte aligned.
    pub fn shared(&mut self, name: &str, bytes: u32) {
        let _ = writeln!(self.decls, "\t.shared .align 16 .b8 {name}[{bytes}];");
    }

    /// `d = op a, b, ...` into a fresh register of kind `k`.
    pub fn def(&mut self, k: Kind, op: &str, args: &[&dyn fmt::Display]) -> Reg {
        let d = self.reg(k);
        let a: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.line(format!("{op} {d}, {}", a.join(", ")));
        d
    }

    /// A u32 register holding `v` (a special register or an immediate).
    pub fn mov_u32(&mut self, v: &dyn fmt::Display) -> Reg {
        self.def(Kind::R, "mov.u32", &[v])
    }

    pub fn mov_f32(&mut self, x: f32) -> Reg {
        self.def(Kind::F, "mov.f32", &[&f32_imm(x)])
    }

    /// A global pointer parameter, converted to a global address.
    pub fn param_ptr(&mut self, name: &str) -> Reg {
        let g = self.def(Kind::D, "ld.param.u64", &[&format!("[{name}]")]);
        self.def(Kind::D, "cvta.to.global.u64", &[&g])
    }

    pub fn param_u32(&mut self, name: &str) -> Reg {
        self.def(Kind::R, "ld.param.u32", &[&format!("[{name}]")])
    }

    /// `base + idx * scale` (u32 index, u64 address).
    pub fn addr(&mut self, base: Reg, idx: &dyn fmt::Display, scale: u32) -> Reg {
        self.def(Kind::D, "mad.wide.u32", &[idx, &scale, &base])
    }

    /// Row `row` of an activation: `base + row * stride * size`, `stride` in elements.
    pub fn row(&mut self, base: Reg, row: &dyn fmt::Display, stride: Reg, dtype: DType) -> Reg {
        let bytes = self.def(Kind::R, "mul.lo.u32", &[&stride, &size(dtype)]);
        self.def(Kind::D, "mad.wide.u32", &[row, &bytes, &base])
    }

    /// Load one element of `dtype` at `[a+off]` widened to f32 (bf16: the
    /// 16 bits shifted into the high half, exact). `nc`: read-only path.
    pub fn load(&mut self, dtype: DType, a: Reg, off: u32, nc: bool) -> Reg {
        let nc = if nc { ".nc" } else { "" };
        match dtype {
            DType::BF16 => {
                let h = self.def(Kind::R, &format!("ld.global{nc}.u16"), &[&format!("[{a}+{off}]")]);
                let w = self.def(Kind::R, "shl.b32", &[&h, &16]);
                self.def(Kind::F, "mov.b32", &[&w])
            }
            _ => self.def(Kind::F, &format!("ld.global{nc}.f32"), &[&format!("[{a}+{off}]")]),
        }
    }

    /// Like [`Body::load`] under predicate `p`; 0.0 where `p` is false.
    pub fn load_if(&mut self, p: Reg, dtype: DType, a: Reg, off: u32, nc: bool) -> Reg {
        let nc = if nc { ".nc" } else { "" };
        match dtype {
            DType::BF16 => {
                let h = self.mov_u32(&0);
                ins!(self, "@{p} ld.global{nc}.u16 {h}, [{a}+{off}]");
                let w = self.def(Kind::R, "shl.b32", &[&h, &16]);
                self.def(Kind::F, "mov.b32", &[&w])
            }
            _ => {
                let f = self.mov_f32(0.0);
                ins!(self, "@{p} ld.global{nc}.f32 {f}, [{a}+{off}]");
                f
            }
        }
    }

    /// The rounding point: `x` rounded to `act` (RNE), as f32. bf16:
    /// `cvt.rn.bf16x2.f32` puts round(x) in the high half; the low half is cleared.
    pub fn round(&mut self, act: DType, x: Reg) -> Reg {
        if act != DType::BF16 {
            return x;
        }
        let r = self.def(Kind::R, "cvt.rn.bf16x2.f32", &[&x, &x]);
        let r = self.def(Kind::R, "and.b32", &[&r, &"-65536"]);
        self.def(Kind::F, "mov.b32", &[&r])
    }

    /// Store `x` at `[a+off]` as `act` (bf16: rounded, RNE), under an optional predicate.
    pub fn store(&mut self, act: DType, a: Reg, off: u32, x: Reg, pred: Option<Reg>) {
        let g = pred.map(|p| format!("@{p} ")).unwrap_or_default();
        match act {
            DType::BF16 => {
                let h = self.def(Kind::H, "cvt.rn.bf16.f32", &[&x]);
                ins!(self, "{g}st.global.b16 [{a}+{off}], {h}");
            }
            _ => ins!(self, "{g}st.global.f32 [{a}+{off}], {x}"),
        }
    }

    /// Copy one element of `act` bit for bit from `[src]` to `[dst]`.
    pub fn copy(&mut self, act: DType, src: Reg, dst: Reg) {
        let b = size(act) * 8;
        let v = self.def(Kind::R, &format!("ld.global.nc.u{b}"), &[&format!("[{src}]")]);
        ins!(self, "st.global.b{b} [{dst}], {v}");
    }

    /// Widen four packed words of bf16 pairs (or four f32 words) to f32 values.
    pub fn widen(&mut self, dtype: DType, words: &[Reg]) -> Vec<Reg> {
        let mut out = Vec::new();
        for &w in words {
            match dtype {
                DType::BF16 => {
                    let lo = self.def(Kind::R, "shl.b32", &[&w, &16]);
                    let hi = self.def(Kind::R, "and.b32", &[&w, &"-65536"]);
                    out.push(self.def(Kind::F, "mov.b32", &[&lo]));
                    out.push(self.def(Kind::F, "mov.b32", &[&hi]));
                }
                _ => out.push(self.def(Kind::F, "mov.b32", &[&w])),
            }
        }
        out
    }

    /// `ld{space}.v4.u32` of 16 bytes at `[a+off]`.
    pub fn load_v4(&mut self, space: &str, a: Reg, off: u32) -> [Reg; 4] {
        let r = [self.r(), self.r(), self.r(), self.r()];
        ins!(
            self,
            "ld{space}.v4.u32 {{{}, {}, {}, {}}}, [{a}+{off}]",
            r[0],
            r[1],
            r[2],
            r[3]
        );
        r
    }

    /// `exp(x)` as `ex2.approx.f32(x * log2 e)`.
    pub fn exp(&mut self, x: Reg) -> Reg {
        let t = self.def(Kind::F, "mul.rn.f32", &[&x, &f32_imm(std::f32::consts::LOG2_E)]);
        self.def(Kind::F, "ex2.approx.f32", &[&t])
    }

    /// `1 / (1 + exp(-x))` (`rcp.rn` is the IEEE reciprocal).
    pub fn sigmoid(&mut self, x: Reg) -> Reg {
        let n = self.def(Kind::F, "neg.f32", &[&x]);
        let e = self.exp(n);
        let d = self.def(Kind::F, "add.rn.f32", &[&e, &f32_imm(1.0)]);
        self.def(Kind::F, "rcp.rn.f32", &[&d])
    }

    /// `x / (1 + exp(-x))`.
    pub fn silu(&mut self, x: Reg) -> Reg {
        let n = self.def(Kind::F, "neg.f32", &[&x]);
        let e = self.exp(n);
        let d = self.def(Kind::F, "add.rn.f32", &[&e, &f32_imm(1.0)]);
        self.def(Kind::F, "div.rn.f32", &[&x, &d])
    }

    /// `sin(x)` or `cos(x)` to about 1 ulp for |x| < 2^17: Cody-Waite
    /// reduction by pi/2 in three FMA steps, then the cephes minimax
    /// polynomials on [-pi/4, pi/4]; the quadrant picks and signs them.
    /// (At most 2 ulp from `f32::sin` / `f32::cos` over every RoPE angle of
    /// 65536 positions, head_dim 128, theta 1e6.)
    #[allow(clippy::excessive_precision)] // cephes' published decimal constants
    pub fn sincos(&mut self, x: Reg, cos: bool) -> Reg {
        let kf = self.def(Kind::F, "mul.rn.f32", &[&x, &f32_imm(std::f32::consts::FRAC_2_PI)]);
        let kf = self.def(Kind::F, "cvt.rni.f32.f32", &[&kf]);
        let mut r = x;
        for c in [-1.5703125f32, -4.837512969970703125e-4, -7.549789954891882e-8] {
            r = self.def(Kind::F, "fma.rn.f32", &[&kf, &f32_imm(c), &r]);
        }
        let q = self.def(Kind::R, "cvt.rzi.s32.f32", &[&kf]);
        let q = if cos {
            self.def(Kind::R, "add.s32", &[&q, &1])
        } else {
            q
        };
        let z = self.def(Kind::F, "mul.rn.f32", &[&r, &r]);
        // sin(r) = r + r z (S1 + z (S2 + z S3))
        let s = self.def(
            Kind::F,
            "fma.rn.f32",
            &[&z, &f32_imm(-1.9515295891e-4), &f32_imm(8.3321608736e-3)],
        );
        let s = self.def(Kind::F, "fma.rn.f32", &[&s, &z, &f32_imm(-1.6666654611e-1)]);
        let rz = self.def(Kind::F, "mul.rn.f32", &[&r, &z]);
        let s = self.def(Kind::F, "fma.rn.f32", &[&s, &rz, &r]);
        // cos(r) = 1 - z/2 + z^2 (C1 + z (C2 + z C3))
        let c = self.def(
            Kind::F,
            "fma.rn.f32",
            &[&z, &f32_imm(2.443315711809948e-5), &f32_imm(-1.388731625493765e-3)],
        );
        let c = self.def(Kind::F, "fma.rn.f32", &[&c, &z, &f32_imm(4.166664568298827e-2)]);
        let zz = self.def(Kind::F, "mul.rn.f32", &[&z, &z]);
        let h = self.def(Kind::F, "fma.rn.f32", &[&z, &f32_imm(-0.5), &f32_imm(1.0)]);
        let c = self.def(Kind::F, "fma.rn.f32", &[&c, &zz, &h]);
        let q1 = self.def(Kind::R, "and.b32", &[&q, &1]);
        let odd = self.def(Kind::Pred, "setp.ne.u32", &[&q1, &0]);
        let v = self.def(Kind::F, "selp.f32", &[&c, &s, &odd]);
        let q2 = self.def(Kind::R, "and.b32", &[&q, &2]);
        let neg = self.def(Kind::Pred, "setp.ne.u32", &[&q2, &0]);
        let nv = self.def(Kind::F, "neg.f32", &[&v]);
        self.def(Kind::F, "selp.f32", &[&nv, &v, &neg])
    }

    /// Reduce each of `vals` over the 32 lanes of the warp (butterfly, so
    /// every lane gets the result).
    pub fn warp_reduce(&mut self, red: Red, vals: &[Reg]) -> Vec<Reg> {
        let mut out = vals.to_vec();
        for off in [16, 8, 4, 2, 1] {
            for v in out.iter_mut() {
                let t = self.def(Kind::F, "shfl.sync.bfly.b32", &[v, &off, &31, &"-1"]);
                *v = self.def(Kind::F, red.op(), &[v, &t]);
            }
        }
        out
    }

    /// Reduce each of `vals` over a block of `warps` warps; every thread
    /// gets the results. `smem` is a shared array of `warps * vals.len()`
    /// f32 that no other reduction uses.
    pub fn block_reduce(&mut self, red: Red, vals: &[Reg], warps: u32, smem: &str, tid: Reg) -> Vec<Reg> {
        let w = self.warp_reduce(red, vals);
        if warps == 1 {
            return w;
        }
        let lane = self.def(Kind::R, "and.b32", &[&tid, &31]);
        let warp = self.def(Kind::R, "shr.u32", &[&tid, &5]);
        let first = self.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);
        let base = self.mov_u32(&smem);
        let slot = self.def(Kind::R, "mad.lo.u32", &[&warp, &(4 * vals.len() as u32), &base]);
        for (i, v) in w.iter().enumerate() {
            ins!(self, "@{first} st.shared.f32 [{slot}+{}], {v}", 4 * i);
        }
        ins!(self, "bar.sync 0");
        let mut out = Vec::new();
        for i in 0..vals.len() {
            let mut acc = self.def(Kind::F, "ld.shared.f32", &[&format!("[{base}+{}]", 4 * i)]);
            for j in 1..warps as usize {
                let x = self.def(
                    Kind::F,
                    "ld.shared.f32",
                    &[&format!("[{base}+{}]", 4 * (j * vals.len() + i))],
                );
                acc = self.def(Kind::F, red.op(), &[&acc, &x]);
            }
            out.push(acc);
        }
        out
    }

    /// `for (i = start; i < end; i += step) body(i)` with a u32 counter.
    pub fn for_range(
        &mut self,
        start: Reg,
        end: &dyn fmt::Display,
        step: &dyn fmt::Display,
        body: impl FnOnce(&mut Self, Reg),
    ) {
        let (top, done) = (self.label("loop"), self.label("done"));
        let i = self.def(Kind::R, "mov.u32", &[&start]);
        self.place(&top);
        let p = self.def(Kind::Pred, "setp.ge.u32", &[&i, end]);
        ins!(self, "@{p} bra {done}");
        body(self, i);
        ins!(self, "add.u32 {i}, {i}, {step}");
        ins!(self, "bra.uni {top}");
        self.place(&done);
    }

    /// Run `body` only where `p` is false (a forward branch over it).
    pub fn skip_if(&mut self, p: Reg, body: impl FnOnce(&mut Self)) {
        let l = self.label("skip");
        ins!(self, "@{p} bra {l}");
        body(self);
        self.place(&l);
    }

    /// Run `body` only where `p` is true.
    pub fn skip_if_not(&mut self, p: Reg, body: impl FnOnce(&mut Self)) {
        let l = self.label("skip");
        ins!(self, "@!{p} bra {l}");
        body(self);
        self.place(&l);
    }

    /// The `{ .reg ...; .shared ...; body }` of the entry.
    pub fn finish(self) -> String {
        let mut s = String::from("{\n");
        for (k, n) in KINDS.iter().zip(self.regs) {
            if n > 0 {
                let _ = writeln!(s, "\t.reg .{} %{}<{n}>;", k.0, k.1);
            }
        }
        s.push_str(&self.decls);
        s.push('\n');
        s.push_str(&self.text);
        s.push_str("\tret;\n}\n");
        s
    }
}
