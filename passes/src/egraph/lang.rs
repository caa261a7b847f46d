//! The e-graph language: one e-node per IR op, attributes as leaf children.
//!
//! Attributes (eps, slice window, concat axis, RoPE and attention
//! parameters) are leaf e-nodes ([`Leaf`]) placed as the first children of
//! the op that carries them, so a rewrite pattern binds them like any other
//! operand (`(rms_norm ?eps ?x ?w)`) and a rule never mixes up ops whose
//! attributes differ: two attentions with different `layer` have different
//! attribute leaves, hence are different e-nodes, and can never merge.
//!
//! Values the region reads but does not define (block arguments, weights,
//! RoPE tables, any other outside value) are opaque leaves `%N`. Ops the
//! language does not model (embedding, rope tables, exit_select, ...) are
//! [`Node::Opaque`] nodes: an index into a side table plus their operands.
//!
//! Multi-result ops (`add_rms_norm`, `step_end`) are tuple nodes; their
//! results are projections `(get I tuple)`.
//!
//! | e-node | children |
//! |---|---|
//! | `rms_norm` | eps, x, w |
//! | `rms_scale` | eps, x |
//! | `linear` | x, w [, bias] |
//! | `rope` | rope attrs, x, cos, sin |
//! | `attention` | attention attrs, q, k, v [, cos, sin] |
//! | `silu`, `sigmoid` | x |
//! | `add`, `mul` | a, b |
//! | `scale_cols` | w, s |
//! | `concat` | axis, parts.. |
//! | `slice` | start, len, x |
//! | `swiglu` | g, u, or gu |
//! | `add_rms_norm` | eps, h, a [, w] (a tuple of 2) |
//! | `step_end` | eps, next, h, norm_w, gate_w, gate_b [, next_w] (a tuple of 2 or 3) |
//! | `get` | index, tuple |

use egg::{Analysis, DidMerge, EGraph, Id, define_language};
use ouroc_ir::graph::NextNorm;
use ouroc_ir::infer::infer;
use ouroc_ir::{Attention, DType, OpKind, Type};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// A leaf: an attribute of the op above it, or a value from outside the region.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    /// `%N`: a value defined outside the region (or a block argument).
    Value(u32),
    /// A plain number: slice start/len, concat axis, projection index.
    Int(usize),
    /// `eps:1e-6`: a norm's epsilon (the f64's bits, so it hashes exactly).
    Eps(u64),
    /// `rope:HEADS:HEAD_DIM`.
    Rope { heads: usize, head_dim: usize },
    /// `attn:LAYER:HEADS:KV_HEADS:HEAD_DIM`.
    Attn {
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    /// `next:none|scale|norm`: a step_end's next-step norm.
    Next(NextCode),
}

/// [`NextNorm`] as an orderable, hashable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextCode {
    None,
    Scale,
    Norm,
}

impl NextCode {
    pub fn of(n: NextNorm) -> NextCode {
        match n {
            NextNorm::None => NextCode::None,
            NextNorm::Scale => NextCode::Scale,
            NextNorm::Norm => NextCode::Norm,
        }
    }

    pub fn norm(self) -> NextNorm {
        match self {
            NextCode::None => NextNorm::None,
            NextCode::Scale => NextNorm::Scale,
            NextCode::Norm => NextNorm::Norm,
        }
    }
}

impl Leaf {
    pub fn eps(eps: f64) -> Leaf {
        Leaf::Eps(eps.to_bits())
    }

    pub fn attn(a: &Attention) -> Leaf {
        Leaf::Attn {
            layer: a.layer,
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
        }
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Value(v) => write!(f, "%{v}"),
            Leaf::Int(i) => write!(f, "{i}"),
            Leaf::Eps(b) => write!(f, "eps:{:?}", f64::from_bits(*b)),
            Leaf::Rope { heads, head_dim } => write!(f, "rope:{heads}:{head_dim}"),
            Leaf::Attn {
                layer,
                heads,
                kv_heads,
                head_dim,
            } => write!(f, "attn:{layer}:{heads}:{kv_heads}:{head_dim}"),
            Leaf::Next(n) => write!(f, "next:{}", n.norm().name()),
        }
    }
}

impl FromStr for Leaf {
    type Err = String;

    fn from_str(s: &str) -> Result<Leaf, String> {
        let bad = || format!("not an e-graph leaf: `{s}`");
        if let Some(v) = s.strip_prefix('%') {
            return v.parse().map(Leaf::Value).map_err(|_| bad());
        }
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.parse::<usize>().map_err(|_| bad());
        match parts.as_slice() {
            [n] => num(n).map(Leaf::Int),
            ["eps", e] => e.parse::<f64>().map(Leaf::eps).map_err(|_| bad()),
            ["rope", h, d] => Ok(Leaf::Rope {
                heads: num(h)?,
                head_dim: num(d)?,
            }),
            ["attn", l, h, kv, d] => Ok(Leaf::Attn {
                layer: num(l)?,
                heads: num(h)?,
                kv_heads: num(kv)?,
                head_dim: num(d)?,
            }),
            ["next", n] => NextNorm::parse(n).map(|n| Leaf::Next(NextCode::of(n))).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// Index of an opaque op in [`Ctx::opaque`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpaqueKey(pub u32);

impl fmt::Display for OpaqueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

impl FromStr for OpaqueKey {
    type Err = String;

    fn from_str(s: &str) -> Result<OpaqueKey, String> {
        s.strip_prefix("op#")
            .and_then(|n| n.parse().ok())
            .map(OpaqueKey)
            .ok_or_else(|| format!("not an opaque op: `{s}`"))
    }
}

define_language! {
    /// One e-node per IR op (see the module docs for the children).
    pub enum Node {
        "rms_norm" = RmsNorm([Id; 3]),
        "rms_scale" = RmsScale([Id; 2]),
        "linear" = Linear(Box<[Id]>),
        "rope" = Rope([Id; 4]),
        "attention" = Attention(Box<[Id]>),
        "silu" = Silu([Id; 1]),
        "sigmoid" = Sigmoid([Id; 1]),
        "add" = Add([Id; 2]),
        "mul" = Mul([Id; 2]),
        "scale_cols" = ScaleCols([Id; 2]),
        "concat" = Concat(Box<[Id]>),
        "slice" = Slice([Id; 3]),
        "swiglu" = Swiglu(Box<[Id]>),
        "add_rms_norm" = AddRmsNorm(Box<[Id]>),
        "step_end" = StepEnd(Box<[Id]>),
        "get" = Get([Id; 2]),
        Leaf(Leaf),
        Opaque(OpaqueKey, Box<[Id]>),
    }
}

/// An op the language does not model, kept as it is.
#[derive(Clone, Debug)]
pub struct OpaqueOp {
    pub kind: OpKind,
    pub types: Vec<Type>,
}

/// The e-class analysis: what the rules, the cost model and the conversion
/// back to IR need to know about a class.
#[derive(Clone, Debug)]
pub struct Data {
    /// Result types: one for a value, two or three for a tuple, none for an
    /// attribute leaf.
    pub types: Vec<Type>,
    /// The attribute, for a leaf class.
    pub leaf: Option<Leaf>,
    /// Computed from weights only (a weight or a weight transform): done once
    /// at load time, not per token.
    pub constant: bool,
    /// A weight built by concatenation (a merged projection): not merged again.
    pub merged: bool,
    /// Position of the first op of this class in the input region (new
    /// classes get later numbers): a stable key for ordering.
    pub order: u32,
}

impl Data {
    /// The type of a single-valued class.
    pub fn ty(&self) -> Option<&Type> {
        match self.types.as_slice() {
            [t] => Some(t),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<usize> {
        match self.leaf {
            Some(Leaf::Int(i)) => Some(i),
            _ => None,
        }
    }
}

/// Analysis state: what the region's leaves are.
#[derive(Clone, Debug, Default)]
pub struct Ctx {
    /// Types of the outside values the region reads (by value number).
    pub value_types: HashMap<u32, Type>,
    /// Outside values that are constants (weights, weight transforms).
    pub constants: HashSet<u32>,
    /// Ops kept opaque, indexed by [`OpaqueKey`].
    pub opaque: Vec<OpaqueOp>,
    counter: u32,
}

pub type EG = EGraph<Node, Ctx>;

/// Whether an op's value depends on the position or the loop step (so it is
/// never a load-time constant even with constant operands), or has an effect.
pub fn impure(kind: &OpKind) -> bool {
    matches!(
        kind,
        OpKind::RopeCos(_) | OpKind::RopeSin(_) | OpKind::Attention(_) | OpKind::Loop(_)
    )
}

/// The IR op an e-node stands for, with its operand classes (attributes
/// read from the leaf children). None for leaves, projections and opaque ops.
pub fn ir_kind(eg: &EG, n: &Node) -> Option<(OpKind, Vec<Id>)> {
    let leaf = |id: Id| eg[id].data.leaf.clone();
    let int = |id: Id| eg[id].data.int();
    let eps = |id: Id| match leaf(id) {
        Some(Leaf::Eps(b)) => Some(f64::from_bits(b)),
        _ => None,
    };
    Some(match n {
        Node::RmsNorm([e, x, w]) => (OpKind::RmsNorm { eps: eps(*e)? }, vec![*x, *w]),
        Node::RmsScale([e, x]) => (OpKind::RmsScale { eps: eps(*e)? }, vec![*x]),
        Node::Linear(c) => (OpKind::Linear, c.to_vec()),
        Node::Rope([a, x, c, s]) => match leaf(*a)? {
            Leaf::Rope { heads, head_dim } => (OpKind::Rope { heads, head_dim }, vec![*x, *c, *s]),
            _ => return None,
        },
        Node::Attention(c) => {
            let (a, rest) = c.split_first()?;
            match leaf(*a)? {
                Leaf::Attn {
                    layer,
                    heads,
                    kv_heads,
                    head_dim,
                } => (
                    OpKind::Attention(Attention {
                        layer,
                        heads,
                        kv_heads,
                        head_dim,
                    }),
                    rest.to_vec(),
                ),
                _ => return None,
            }
        }
        Node::Silu([x]) => (OpKind::Silu, vec![*x]),
        Node::Sigmoid([x]) => (OpKind::Sigmoid, vec![*x]),
        Node::Add([a, b]) => (OpKind::Add, vec![*a, *b]),
        Node::Mul([a, b]) => (OpKind::Mul, vec![*a, *b]),
        Node::ScaleCols([w, s]) => (OpKind::ScaleCols, vec![*w, *s]),
        Node::Concat(c) => {
            let (axis, rest) = c.split_first()?;
            (OpKind::Concat { axis: int(*axis)? }, rest.to_vec())
        }
        Node::Slice([s, l, x]) => (
            OpKind::Slice {
                start: int(*s)?,
                len: int(*l)?,
            },
            vec![*x],
        ),
        Node::Swiglu(c) => (OpKind::Swiglu, c.to_vec()),
        Node::AddRmsNorm(c) => {
            let (e, rest) = c.split_first()?;
            (OpKind::AddRmsNorm { eps: eps(*e)? }, rest.to_vec())
        }
        Node::StepEnd(c) => {
            let [e, next, rest @ ..] = &c[..] else { return None };
            let Some(Leaf::Next(next)) = leaf(*next) else {
                return None;
            };
            (
                OpKind::StepEnd {
                    eps: eps(*e)?,
                    next: next.norm(),
                    gate: true,
                },
                rest.to_vec(),
            )
        }
        Node::Get(_) | Node::Leaf(_) | Node::Opaque(..) => return None,
    })
}

/// Type an op e-node from its operand classes (None if they do not fit).
pub fn infer_node(eg: &EG, kind: &OpKind, ins: &[Id]) -> Option<Vec<Type>> {
    let tys: Vec<&Type> = ins.iter().map(|i| eg[*i].data.ty()).collect::<Option<_>>()?;
    let dtype = tys.first().map_or(DType::F32, |t| t.dtype);
    infer(kind, &tys, dtype).ok()
}

impl Analysis<Node> for Ctx {
    type Data = Data;

    fn make(eg: &mut EG, n: &Node, _id: Id) -> Data {
        eg.analysis.counter += 1;
        let mut d = Data {
            types: vec![],
            leaf: None,
            constant: false,
            merged: false,
            order: eg.analysis.counter,
        };
        match n {
            Node::Leaf(l) => {
                if let Leaf::Value(v) = l {
                    d.types = eg.analysis.value_types.get(v).cloned().into_iter().collect();
                    d.constant = eg.analysis.constants.contains(v);
                }
                d.leaf = Some(l.clone());
            }
            Node::Get([i, t]) => {
                let t = &eg[*t].data;
                if let Some(ty) = eg[*i].data.int().and_then(|i| t.types.get(i)) {
                    d.types = vec![ty.clone()];
                }
                d.constant = t.constant;
            }
            Node::Opaque(k, c) => {
                let op = &eg.analysis.opaque[k.0 as usize];
                d.types = op.types.clone();
                d.constant = !impure(&op.kind) && c.iter().all(|c| eg[*c].data.constant);
            }
            _ => {
                if let Some((kind, ins)) = ir_kind(eg, n) {
                    d.types = infer_node(eg, &kind, &ins).unwrap_or_default();
                    d.constant = !impure(&kind) && ins.iter().all(|c| eg[*c].data.constant);
                }
                d.merged = match n {
                    Node::Concat(_) => true,
                    Node::ScaleCols([w, _]) => eg[*w].data.merged,
                    _ => false,
                };
            }
        }
        d
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let (mut ca, mut cb) = (false, false);
        let mut or = |x: &mut bool, y: bool| {
            if y && !*x {
                *x = true;
                ca = true;
            } else if *x && !y {
                cb = true;
            }
        };
        or(&mut a.constant, b.constant);
        or(&mut a.merged, b.merged);
        if a.types.is_empty() && !b.types.is_empty() {
            a.types = b.types;
            ca = true;
        } else if b.types.is_empty() && !a.types.is_empty() {
            cb = true;
        }
        if a.leaf.is_none() && b.leaf.is_some() {
            a.leaf = b.leaf;
            ca = true;
        }
        // The order key only sorts; it never changes what a parent computes,
        // so it does not count as a change.
        a.order = a.order.min(b.order);
        DidMerge(ca, cb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_print_and_parse_back() {
        for l in [
            Leaf::Value(12),
            Leaf::Int(3),
            Leaf::eps(1e-6),
            Leaf::Rope { heads: 4, head_dim: 8 },
            Leaf::Attn {
                layer: 1,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
            },
            Leaf::Next(NextCode::Scale),
        ] {
            assert_eq!(l.to_string().parse::<Leaf>().unwrap(), l);
        }
        assert!("add".parse::<Leaf>().is_err());
        assert_eq!("op#7".parse::<OpaqueKey>().unwrap(), OpaqueKey(7));
    }
}
