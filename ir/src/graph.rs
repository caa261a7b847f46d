//! The graph: SSA values with types, ops in blocks, and the `loop` region.
//!
//! A graph has one top-level block whose arguments are the inputs
//! (`%ids: i32[batch, seq]`, `%pos: i32[batch, seq]` for a language model)
//! and which ends in `return`. A `loop` op owns a body block whose arguments
//! are the step index and the carried values; the body ends in
//! `yield next(..) out(..) exit(..)`: the carried values for the next step,
//! the step's output (what the exit policy selects or mixes) and the step's
//! exit signal (lambda, shape of `out` with last dim 1). Values defined
//! before the loop (weights, RoPE tables) are visible inside it and are
//! loop-invariant by construction.

use crate::policy::ExitPolicy;
use crate::types::Type;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ValueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// RoPE table attributes: `inv_freq[j] = theta^(-2j/head_dim)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeTable {
    pub head_dim: usize,
    pub theta: f64,
}

/// Attention attributes. `layer` names the KV-cache slot within a loop step:
/// the slot used is (enclosing loop step, layer); outside a loop the step is 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attention {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// A named checkpoint tensor; no inputs.
    Weight {
        name: String,
    },
    /// `embedding(table[V, H], ids[..]) -> [.., H]`: row lookup.
    Embedding,
    /// `rms_norm(x[.., H], w[H])`: x * rsqrt(mean(x^2) + eps) in f32, rounded
    /// to the result dtype, then times w (rounded again).
    RmsNorm {
        eps: f64,
    },
    /// `linear(x[.., in], w[out, in] [, bias[out]]) -> [.., out]`: y = x W^T (+ b).
    Linear,
    /// `rope_cos(pos[b, s]) -> [b, s, head_dim]`: cos of the angles, both halves.
    RopeCos(RopeTable),
    /// `rope_sin(pos[b, s]) -> [b, s, head_dim]`.
    RopeSin(RopeTable),
    /// `rope(x[b, s, heads*hd], cos, sin)`: x*cos + rotate_half(x)*sin per head
    /// (rotate_half: first/second halves, not interleaved).
    Rope {
        heads: usize,
        head_dim: usize,
    },
    /// `attention(q, k, v[, cos, sin])`: causal attention of the new tokens
    /// over the cache slot plus themselves; appends k and v to the slot.
    /// With cos/sin it first applies RoPE to q and k (rope + KV-cache write
    /// fused into the attention op), rounding exactly as `rope` does.
    Attention(Attention),
    Silu,
    Sigmoid,
    Add,
    Mul,
    /// `rms_scale(x)`: `rms_norm` without its weight (the weight was folded
    /// into the consuming linears).
    RmsScale {
        eps: f64,
    },
    /// `scale_cols(w[out, in], s[in])`: `w[o, i] * s[i]`, a weight transform
    /// (folds a norm weight into the linear that consumes the norm).
    ScaleCols,
    /// `concat(a, b, ..) {axis}`: concatenation along one axis (axis 0 of
    /// linear weights merges projections that share an input).
    Concat {
        axis: usize,
    },
    /// `slice(x) {start, len}`: a window of the last dim (a view, no copy).
    Slice {
        start: usize,
        len: usize,
    },
    /// `swiglu(g, u)`: silu(g) * u (silu rounded, then the product); the
    /// one-operand form `swiglu(gu)` takes g and u as the two halves of the
    /// last dim (after a merged gate/up projection).
    Swiglu,
    /// `add_rms_norm(h, a[, w]) -> (s, n)`: s = h + a (the residual add) and
    /// n = rms_norm(s, w), or the unweighted norm when w was folded away.
    AddRmsNorm {
        eps: f64,
    },
    /// `step_end(h, norm_w[, gate_w, gate_b][, next_w]) -> (hn[, lambda][, next])`:
    /// the end of a loop step as one op: hn = rms_norm(h, norm_w), with
    /// `gate` lambda = sigmoid(linear(hn, gate_w, gate_b)), and with `next` =
    /// "scale" or "norm" the next step's input norm of hn (unweighted, or
    /// with next_w): fusion across the loop boundary. Without `gate` (a policy
    /// that never reads the exit signal) the gate is not computed at all.
    StepEnd {
        eps: f64,
        next: NextNorm,
        gate: bool,
    },
    /// `exit_select(out_0.., lambda_0..) {policy}`: an unrolled graph's exit
    /// policy over R step outputs and R exit signals (what `loop` does for a
    /// rolled graph).
    ExitSelect {
        policy: ExitPolicy,
    },
    Loop(Box<Loop>),
}

/// Which next-step input norm a `step_end` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextNorm {
    None,
    /// Unweighted (the weight is folded into the consumers).
    Scale,
    /// With a weight operand.
    Norm,
}

impl NextNorm {
    pub fn name(self) -> &'static str {
        match self {
            NextNorm::None => "none",
            NextNorm::Scale => "scale",
            NextNorm::Norm => "norm",
        }
    }

    pub fn parse(s: &str) -> Option<NextNorm> {
        Some(match s {
            "none" => NextNorm::None,
            "scale" => NextNorm::Scale,
            "norm" => NextNorm::Norm,
            _ => return None,
        })
    }
}

impl OpKind {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Weight { .. } => "weight",
            OpKind::Embedding => "embedding",
            OpKind::RmsNorm { .. } => "rms_norm",
            OpKind::Linear => "linear",
            OpKind::RopeCos(_) => "rope_cos",
            OpKind::RopeSin(_) => "rope_sin",
            OpKind::Rope { .. } => "rope",
            OpKind::Attention(_) => "attention",
            OpKind::Silu => "silu",
            OpKind::Sigmoid => "sigmoid",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::RmsScale { .. } => "rms_scale",
            OpKind::ScaleCols => "scale_cols",
            OpKind::Concat { .. } => "concat",
            OpKind::Slice { .. } => "slice",
            OpKind::Swiglu => "swiglu",
            OpKind::AddRmsNorm { .. } => "add_rms_norm",
            OpKind::StepEnd { .. } => "step_end",
            OpKind::ExitSelect { .. } => "exit_select",
            OpKind::Loop(_) => "loop",
        }
    }

    /// Every op name, for help text and parsers.
    pub const NAMES: [&'static str; 21] = [
        "weight",
        "embedding",
        "rms_norm",
        "linear",
        "rope_cos",
        "rope_sin",
        "rope",
        "attention",
        "silu",
        "sigmoid",
        "add",
        "mul",
        "rms_scale",
        "scale_cols",
        "concat",
        "slice",
        "swiglu",
        "add_rms_norm",
        "step_end",
        "exit_select",
        "loop",
    ];
}

#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    pub steps: usize,
    pub policy: ExitPolicy,
    /// Arguments: `[step: i32[], carried...]`; terminator: `Yield`.
    pub body: Block,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// One value per result; most ops have exactly one.
    pub results: Vec<ValueId>,
    pub kind: OpKind,
    pub inputs: Vec<ValueId>,
}

impl Op {
    /// The first (for most ops, the only) result.
    pub fn result(&self) -> ValueId {
        self.results[0]
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Terminator {
    Return(Vec<ValueId>),
    Yield {
        next: Vec<ValueId>,
        out: ValueId,
        /// The step's exit signal; absent when the policy never reads it
        /// (`last`, `step:K`).
        exit: Option<ValueId>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub args: Vec<ValueId>,
    pub ops: Vec<Op>,
    pub term: Terminator,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub name: String,
    /// Type of every value, indexed by `ValueId`.
    pub types: Vec<Type>,
    pub body: Block,
}

impl Graph {
    pub fn ty(&self, v: ValueId) -> &Type {
        &self.types[v.index()]
    }

    /// The graph's inputs (arguments of the top block).
    pub fn inputs(&self) -> &[ValueId] {
        &self.body.args
    }

    pub fn outputs(&self) -> &[ValueId] {
        match &self.body.term {
            Terminator::Return(v) => v,
            Terminator::Yield { .. } => &[],
        }
    }

    /// Every op, depth first in textual order (loop op before its body).
    pub fn walk(&self) -> Vec<&Op> {
        fn visit<'a>(b: &'a Block, out: &mut Vec<&'a Op>) {
            for op in &b.ops {
                out.push(op);
                if let OpKind::Loop(l) = &op.kind {
                    visit(&l.body, out);
                }
            }
        }
        let mut out = Vec::new();
        visit(&self.body, &mut out);
        out
    }

    /// The first loop op of the top block, if any.
    pub fn find_loop(&self) -> Option<&Loop> {
        self.body.ops.iter().find_map(|op| match &op.kind {
            OpKind::Loop(l) => Some(l.as_ref()),
            _ => None,
        })
    }

    /// Loop steps and exit policy: of the loop, or of the `exit_select` of an
    /// unrolled graph (what a runtime needs whichever form it was given).
    pub fn exit_control(&self) -> Option<(usize, ExitPolicy)> {
        self.body.ops.iter().find_map(|op| match &op.kind {
            OpKind::Loop(l) => Some((l.steps, l.policy)),
            OpKind::ExitSelect { policy } => Some((op.inputs.len() / 2, *policy)),
            _ => None,
        })
    }

    /// Renumber values in textual order (block args, then each op's result,
    /// a loop's result before its body). The parser produces graphs in this
    /// numbering, so `parse(print(g)) == g.canonicalize()`.
    pub fn canonicalize(&self) -> Graph {
        let mut map = vec![u32::MAX; self.types.len()];
        let mut types = Vec::with_capacity(self.types.len());
        fn number(b: &Block, map: &mut [u32], types: &mut Vec<Type>, g: &Graph) {
            let def = |v: ValueId, map: &mut [u32], types: &mut Vec<Type>| {
                map[v.index()] = types.len() as u32;
                types.push(g.ty(v).clone());
            };
            for &a in &b.args {
                def(a, map, types);
            }
            for op in &b.ops {
                for &r in &op.results {
                    def(r, map, types);
                }
                if let OpKind::Loop(l) = &op.kind {
                    number(&l.body, map, types, g);
                }
            }
        }
        number(&self.body, &mut map, &mut types, self);
        let m = |v: &ValueId| ValueId(map[v.index()]);
        fn remap(b: &Block, m: &dyn Fn(&ValueId) -> ValueId) -> Block {
            Block {
                args: b.args.iter().map(m).collect(),
                ops: b
                    .ops
                    .iter()
                    .map(|op| Op {
                        results: op.results.iter().map(m).collect(),
                        inputs: op.inputs.iter().map(m).collect(),
                        kind: match &op.kind {
                            OpKind::Loop(l) => OpKind::Loop(Box::new(Loop {
                                steps: l.steps,
                                policy: l.policy,
                                body: remap(&l.body, m),
                            })),
                            k => k.clone(),
                        },
                    })
                    .collect(),
                term: match &b.term {
                    Terminator::Return(v) => Terminator::Return(v.iter().map(m).collect()),
                    Terminator::Yield { next, out, exit } => Terminator::Yield {
                        next: next.iter().map(m).collect(),
                        out: m(out),
                        exit: exit.as_ref().map(m),
                    },
                },
            }
        }
        Graph {
            name: self.name.clone(),
            types,
            body: remap(&self.body, &m),
        }
    }
}
