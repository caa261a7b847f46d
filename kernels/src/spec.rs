//! Kernel specs: what one kernel computes, independent of any target.
//!
//! A [`KernelSpec`] is data: a stable name (`l0.qkv`), the activation dtype
//! and a [`Family`] with the family's sizes, weight dtypes and, where the
//! family allows fusion, a small description of the fused parts (an
//! [`Expr`] tree for elementwise kernels, the add / norm / gate / next-norm
//! parts of a [`RowReduceSpec`]).
//!
//! Shapes are per token: every activation operand and result is a matrix of
//! `tokens` rows (tokens = batch x seq, a runtime value: decode has one row
//! per sequence, prefill many; a backend picks GEMV or GEMM from it) whose
//! row length the spec gives. Weights have fixed shapes.
//!
//! Numerics (the contract every backend is checked against, and what
//! `exec` implements): arithmetic in f32; a *rounding point* rounds an f32
//! to the activation dtype `act` (round-to-nearest-even; a no-op for f32).
//! Each family documents its operands, results and rounding points; they
//! are the interpreter's (`ouroc_ir::interp`), so a bf16 program reproduces
//! the bf16 reference. Sums may be reordered by a backend (that is what the
//! comparison tolerance is for); rounding points may not be moved.

use crate::quant::QuantFormat;
use ouroc_ir::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// serde for `ouroc_ir::DType` as its IR name (`"f32"`, `"bf16"`, ...).
pub(crate) mod dtype_serde {
    use ouroc_ir::DType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let s = String::deserialize(d)?;
        DType::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown dtype `{s}`")))
    }
}

/// One kernel: its name, activation dtype and family.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelSpec {
    /// Unique in a program and stable for a given graph: `l{layer}.{role}`
    /// inside a layer (`l0.qkv`, `l1.attn`), `{role}` outside (`embed`,
    /// `step_end`, `lm_head`); repeated roles get a count (`l0.add_norm2`).
    pub name: String,
    /// Dtype of every activation operand and result, and of every rounding point.
    #[serde(with = "dtype_serde")]
    pub act: DType,
    pub family: Family,
}

/// The kernel families. Operand and result lists are in this order in
/// `Kernel::inputs` / `Kernel::outputs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gather(GatherSpec),
    RopeTable(RopeTableSpec),
    Linear(LinearSpec),
    RowReduce(RowReduceSpec),
    Rope(RopeSpec),
    Attention(AttentionSpec),
    Elementwise(ElementwiseSpec),
}

/// Embedding lookup. Operands: `table: weight [rows, width]`, `ids: i32 [1]`
/// per token. Result: `[width]` per token, `out[t] = table[ids[t]]` (a copy:
/// no rounding point; the table is already in its dtype).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatherSpec {
    pub rows: usize,
    pub width: usize,
    #[serde(with = "dtype_serde")]
    pub table: DType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trig {
    Cos,
    Sin,
}

/// RoPE table. Operand: `pos: i32 [1]` per token. Result: `[head_dim]` per
/// token, `f(pos * inv_freq[j % (head_dim/2)])` rounded, where
/// `inv_freq[j] = 1 / (theta as f32)^((2j) as f32 / head_dim as f32)` in
/// f32 and `f` is cos or sin (both halves of the row are equal).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeTableSpec {
    pub func: Trig,
    pub head_dim: usize,
    pub theta: f64,
}

/// `y = x W^T (+ b)`. Operands: `x: [k]` per token, `w: weight [n, k]`
/// (stored `[out, in]`), with `bias` `b: weight [n]`. Result `[n]` per
/// token: the f32 dot product plus the bias, rounded once. One family for
/// decode (GEMV, one row) and prefill (GEMM, many rows): M = tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearSpec {
    pub n: usize,
    pub k: usize,
    /// The weight's dtype as built by its recipe (and of the bias).
    #[serde(with = "dtype_serde")]
    pub weight: DType,
    pub bias: bool,
    /// Set: the weight operand is read in this quantised format instead of
    /// `weight`, with the numerics of [`crate::quant`] (activations quantised
    /// per block, integer block sums, a fixed f32 order; then the bias and
    /// the one rounding point as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantFormat>,
}

/// How a weight operand is stored: a dense dtype, or a quantised format
/// ([`crate::quant`]). Devices keep weights by (weight id, encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Encoding {
    Dense(DType),
    Quant(QuantFormat),
}

impl Encoding {
    /// `f32`, `bf16`, ... or `q8_0`, `q4_0`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Dense(d) => d.name(),
            Encoding::Quant(q) => q.name(),
        }
    }

    pub fn parse(s: &str) -> Option<Encoding> {
        DType::parse(s)
            .map(Encoding::Dense)
            .or_else(|| QuantFormat::parse(s).map(Encoding::Quant))
    }

    /// Bytes of a weight of `shape` (a quantised one is a matrix `[n, k]`);
    /// None when the size overflows or a quantised shape is not a matrix.
    pub fn bytes(self, shape: &[usize]) -> Option<usize> {
        match self {
            Encoding::Dense(d) => shape.iter().try_fold(d.size_bytes(), |a, &n| a.checked_mul(n)),
            Encoding::Quant(q) => match shape {
                [n, k] => crate::quant::matrix_bytes_checked(q, *n, *k),
                _ => None,
            },
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an RMS norm multiplies by a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormWeight {
    /// `rms_norm(x, w)`: one weight operand `[width]`.
    Weighted,
    /// `rms_scale(x)`: the weight was folded into the consuming linears.
    Unweighted,
}

/// A row-wise reduction: one row (token) at a time, up to four fused parts
/// in this order (`x0`, `x1` are the first activation operands):
/// 1. `add`: `s = x0 + x1` (the residual add), rounded; a result. Without
///    it `s = x0`.
/// 2. the norm: `n = rms(s)`, with `rms(x) = x * (1 / sqrt(mean(x^2) + eps))`
///    (sum of squares and scale in f32, eps as f32), rounded; times the
///    weight and rounded again when `norm` is weighted. Always a result.
/// 3. `gate`: `lambda = sigmoid(round(n . gate_w + gate_b))` rounded, one
///    value per row (gate_w: weight `[1, width]`, gate_b: weight `[1]`).
/// 4. `next`: the next loop step's input norm of `n` (weighted or not), as
///    in 2.
///
/// Operands: `x0`, `x1` if add, `w` if the norm is weighted, `gate_w`,
/// `gate_b` if gate, `next_w` if next is weighted. Results: `s` if add, `n`,
/// `lambda` (`[1]` per token) if gate, `next` if next. These are the IR's
/// `rms_norm`, `rms_scale`, `add_rms_norm` and `step_end`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowReduceSpec {
    pub width: usize,
    pub eps: f64,
    pub add: bool,
    pub norm: NormWeight,
    pub gate: bool,
    pub next: Option<NormWeight>,
}

/// RoPE, rotate-half layout. Operands: `x: [heads * head_dim]`, `cos`,
/// `sin: [head_dim]` per token. Result like x: per head,
/// `round(round(x[j] * cos[j]) + round(rot[j] * sin[j]))` with
/// `rot = [-x[half..], x[..half]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeSpec {
    pub heads: usize,
    pub head_dim: usize,
}

/// Causal attention over a KV-cache slot. Operands: `q: [heads * head_dim]`,
/// `k`, `v: [kv_heads * head_dim]` per token, and with `rope` the tables
/// `cos`, `sin: [head_dim]` (then q and k are first rotated exactly as
/// [`RopeSpec`] says). Result: `[heads * head_dim]` per token.
///
/// State: the slot (loop step, `layer`) of the program's KV cache, one per
/// sequence of the batch. The kernel appends the new tokens' k (after RoPE)
/// and v rows to the slot, then a new token at absolute position p attends
/// to positions 0..=p. Query head h reads kv head `h / (heads / kv_heads)`.
/// Scores `round(round(q . k) * scale)` with `scale = head_dim^-0.5`
/// computed in f64 and rounded to f32; softmax in f32 (max subtracted);
/// probabilities rounded; output `sum_j p_j v_j` in f32, rounded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: bool,
}

/// An elementwise kernel over rows of `width` elements. Operands: `inputs`
/// activations of `[width]` per token (`x0`, `x1`, ...; an operand may be a
/// column window of a wider buffer). Result: `[width]` per token, `expr`
/// evaluated per element.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElementwiseSpec {
    pub width: usize,
    pub inputs: usize,
    pub expr: Expr,
}

/// An elementwise expression. Every node except `Input` is a rounding
/// point (its f32 result is rounded to the kernel's `act`), which is
/// exactly where the unfused ops would round: `swiglu` is
/// `mul(silu(x0), x1)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    /// `x{i}`: the element of operand i.
    Input(usize),
    /// `x / (1 + exp(-x))`.
    Silu(Box<Expr>),
    /// `1 / (1 + exp(-x))`.
    Sigmoid(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn input(i: usize) -> Expr {
        Expr::Input(i)
    }

    pub fn silu(a: Expr) -> Expr {
        Expr::Silu(Box::new(a))
    }

    pub fn sigmoid(a: Expr) -> Expr {
        Expr::Sigmoid(Box::new(a))
    }

    /// Evaluate on one element of each operand; `round` is the rounding point.
    pub fn eval(&self, x: &[f32], round: &dyn Fn(f32) -> f32) -> f32 {
        match self {
            Expr::Input(i) => x[*i],
            Expr::Silu(a) => {
                let v = a.eval(x, round);
                round(v / (1.0 + (-v).exp()))
            }
            Expr::Sigmoid(a) => round(1.0 / (1.0 + (-a.eval(x, round)).exp())),
            Expr::Add(a, b) => round(a.eval(x, round) + b.eval(x, round)),
            Expr::Mul(a, b) => round(a.eval(x, round) * b.eval(x, round)),
        }
    }

    /// The largest input index + 1.
    pub fn arity(&self) -> usize {
        match self {
            Expr::Input(i) => i + 1,
            Expr::Silu(a) | Expr::Sigmoid(a) => a.arity(),
            Expr::Add(a, b) | Expr::Mul(a, b) => a.arity().max(b.arity()),
        }
    }
}

/// `a + b` builds `add(a, b)`.
impl std::ops::Add for Expr {
    type Output = Expr;

    fn add(self, b: Expr) -> Expr {
        Expr::Add(Box::new(self), Box::new(b))
    }
}

/// `a * b` builds `mul(a, b)`.
impl std::ops::Mul for Expr {
    type Output = Expr;

    fn mul(self, b: Expr) -> Expr {
        Expr::Mul(Box::new(self), Box::new(b))
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Input(i) => write!(f, "x{i}"),
            Expr::Silu(a) => write!(f, "silu({a})"),
            Expr::Sigmoid(a) => write!(f, "sigmoid({a})"),
            Expr::Add(a, b) => write!(f, "add({a}, {b})"),
            Expr::Mul(a, b) => write!(f, "mul({a}, {b})"),
        }
    }
}

impl RowReduceSpec {
    pub fn operands(&self) -> usize {
        1 + self.add as usize
            + (self.norm == NormWeight::Weighted) as usize
            + 2 * self.gate as usize
            + (self.next == Some(NormWeight::Weighted)) as usize
    }

    pub fn results(&self) -> usize {
        1 + self.add as usize + self.gate as usize + self.next.is_some() as usize
    }
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Family::Gather(_) => "gather",
            Family::RopeTable(_) => "rope_table",
            Family::Linear(_) => "linear",
            Family::RowReduce(_) => "row_reduce",
            Family::Rope(_) => "rope",
            Family::Attention(_) => "attention",
            Family::Elementwise(_) => "elementwise",
        }
    }

    /// Number of operands (activations and weights) a kernel of this spec takes.
    pub fn operands(&self) -> usize {
        match self {
            Family::Gather(_) => 2,
            Family::RopeTable(_) => 1,
            Family::Linear(l) => 2 + l.bias as usize,
            Family::RowReduce(r) => r.operands(),
            Family::Rope(_) => 3,
            Family::Attention(a) => 3 + 2 * a.rope as usize,
            Family::Elementwise(e) => e.inputs,
        }
    }

    /// Number of results.
    pub fn results(&self) -> usize {
        match self {
            Family::RowReduce(r) => r.results(),
            _ => 1,
        }
    }

    /// Row length of each result, per token.
    pub fn result_widths(&self) -> Vec<usize> {
        match self {
            Family::Gather(g) => vec![g.width],
            Family::RopeTable(t) => vec![t.head_dim],
            Family::Linear(l) => vec![l.n],
            Family::RowReduce(r) => {
                let mut w = vec![r.width; r.results()];
                if r.gate {
                    w[r.add as usize + 1] = 1;
                }
                w
            }
            // Saturating: a corrupt spec then matches no buffer, and `Program::check` says so.
            Family::Rope(r) => vec![r.heads.saturating_mul(r.head_dim)],
            Family::Attention(a) => vec![a.heads.saturating_mul(a.head_dim)],
            Family::Elementwise(e) => vec![e.width],
        }
    }
}

fn norm_text(w: NormWeight, x: &str, weight: &str) -> String {
    match w {
        NormWeight::Weighted => format!("rms_norm({x}, {weight})"),
        NormWeight::Unweighted => format!("rms_scale({x})"),
    }
}

impl fmt::Display for RowReduceSpec {
    /// `{width = 32, eps = 1e-6} s = add(x0, x1); n = rms_norm(s, w)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{width = {}, eps = {:?}}} ", self.width, self.eps)?;
        let x = if self.add {
            f.write_str("s = add(x0, x1); ")?;
            "s"
        } else {
            "x0"
        };
        write!(f, "n = {}", norm_text(self.norm, x, "w"))?;
        if self.gate {
            f.write_str("; lambda = sigmoid(linear(n, gate_w, gate_b))")?;
        }
        if let Some(next) = self.next {
            write!(f, "; next = {}", norm_text(next, "n", "next_w"))?;
        }
        Ok(())
    }
}

impl KernelSpec {
    /// The attributes and fused parts: `{n = 96, k = 32, weight = f32}`,
    /// `{width = 88} mul(silu(x0), x1)`.
    pub fn attrs(&self) -> String {
        match &self.family {
            Family::Gather(g) => format!("{{rows = {}, width = {}, table = {}}}", g.rows, g.width, g.table),
            Family::RopeTable(t) => {
                let func = match t.func {
                    Trig::Cos => "cos",
                    Trig::Sin => "sin",
                };
                format!("{{{func}, head_dim = {}, theta = {:?}}}", t.head_dim, t.theta)
            }
            Family::Linear(l) => {
                let bias = if l.bias { ", bias" } else { "" };
                match l.quant {
                    Some(q) => format!("{{n = {}, k = {}, weight = {q} (from {}){bias}}}", l.n, l.k, l.weight),
                    None => format!("{{n = {}, k = {}, weight = {}{bias}}}", l.n, l.k, l.weight),
                }
            }
            Family::RowReduce(r) => r.to_string(),
            Family::Rope(r) => format!("{{heads = {}, head_dim = {}}}", r.heads, r.head_dim),
            Family::Attention(a) => {
                let rope = if a.rope { ", rope" } else { "" };
                format!(
                    "{{layer = {}, heads = {}, kv_heads = {}, head_dim = {}{rope}}}",
                    a.layer, a.heads, a.kv_heads, a.head_dim
                )
            }
            Family::Elementwise(e) => format!("{{width = {}}} {}", e.width, e.expr),
        }
    }
}

impl KernelSpec {
    /// What the kernel's code depends on: the spec without its name and
    /// without attention's layer (which only selects the KV slot). Kernels
    /// with equal keys compute the same function of their operands, so a
    /// backend compiles one function per key.
    pub fn code_key(&self) -> String {
        let mut s = self.clone();
        if let Family::Attention(a) = &mut s.family {
            a.layer = 0;
        }
        format!("{}<{}> {}", s.family.name(), s.act, s.attrs())
    }
}

/// The dtype each operand of a kernel is read in, in operand order, for
/// every backend: activations in `act`; a gather table in its own dtype and
/// the ids i32; RopeTable positions i32; Linear weights (and bias) in the
/// weight dtype; every other weight (norm and gate weights) in `act`.
pub fn operand_dtypes(spec: &KernelSpec) -> Vec<DType> {
    let act = spec.act;
    match &spec.family {
        Family::Gather(g) => vec![g.table, DType::I32],
        Family::RopeTable(_) => vec![DType::I32],
        Family::Linear(l) => {
            let mut d = vec![act, l.weight];
            if l.bias {
                d.push(l.weight);
            }
            d
        }
        f => vec![act; f.operands()],
    }
}

/// How each operand is stored: [`operand_dtypes`], dense, except a
/// quantised Linear's weight (its bias stays dense).
pub fn operand_encodings(spec: &KernelSpec) -> Vec<Encoding> {
    let mut e: Vec<Encoding> = operand_dtypes(spec).into_iter().map(Encoding::Dense).collect();
    if let Family::Linear(LinearSpec { quant: Some(q), .. }) = &spec.family {
        e[1] = Encoding::Quant(*q);
    }
    e
}

impl fmt::Display for KernelSpec {
    /// `linear<f32> {n = 96, k = 32, weight = f32}`: family, activation
    /// dtype, attributes (the name and operands are printed by the program).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}<{}> {}", self.family.name(), self.act, self.attrs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_expression_prints_and_rounds_like_the_unfused_ops() {
        let e = Expr::silu(Expr::input(0)) * Expr::input(1);
        assert_eq!(e.to_string(), "mul(silu(x0), x1)");
        assert_eq!(e.arity(), 2);
        let bf = |x: f32| DType::BF16.round(x);
        let (g, u) = (1.3f32, 0.7f32);
        let silu = bf(g / (1.0 + (-g).exp()));
        assert_eq!(e.eval(&[g, u], &bf), bf(silu * u));
    }

    #[test]
    fn row_reduce_describes_its_parts() {
        let step_end = RowReduceSpec {
            width: 32,
            eps: 1e-6,
            add: false,
            norm: NormWeight::Weighted,
            gate: true,
            next: Some(NormWeight::Unweighted),
        };
        assert_eq!(
            step_end.to_string(),
            "{width = 32, eps = 1e-6} n = rms_norm(x0, w); lambda = sigmoid(linear(n, gate_w, gate_b)); \
             next = rms_scale(n)"
        );
        assert_eq!((step_end.operands(), step_end.results()), (4, 3));
        assert_eq!(Family::RowReduce(step_end).result_widths(), vec![32, 1, 32]);
    }
}
