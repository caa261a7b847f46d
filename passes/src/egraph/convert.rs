//! IR region <-> e-graph.
//!
//! [`build`] adds a block's ops to a fresh e-graph: values from outside the
//! block (its arguments, weights, RoPE tables, other outer values) become
//! `%N` leaves, known ops become their e-nodes, other ops opaque nodes, and
//! multi-result ops a tuple node with one `get` per result. It also keeps
//! the e-node each op became: the input graph is the extraction's starting
//! point.
//!
//! [`emit`] turns an extraction back into ops: one op per chosen node
//! reachable from the roots, operands first (a depth-first post-order from
//! the roots, so ops come out in dependency order), a tuple class as one
//! multi-result op and its `get`s as that op's results. With `hoist`, ops
//! computed from constants only (weight transforms) go to a prelude, to be
//! placed before the loop.

use super::extract::Problem;
use super::lang::{Ctx, EG, Leaf, NextCode, Node, OpaqueKey, OpaqueOp, impure, infer_node, ir_kind};
use egg::{Id, Language};
use ouroc_ir::{Graph, Op, OpKind, Type, ValueId};
use std::collections::{HashMap, HashSet};

/// A block in an e-graph.
pub struct Built {
    pub eg: EG,
    /// Classes of the region's results, in the order asked for.
    pub roots: Vec<Id>,
    /// The e-nodes of the input ops (including projections and leaves).
    pub originals: Vec<Node>,
}

/// Add `ops` (a block's ops; everything they read that they do not define
/// is a leaf) to a new e-graph. `constants`: outside values computed from
/// weights only. `roots`: the values the region must produce.
pub fn build(g: &Graph, ops: &[Op], roots: &[ValueId], constants: &HashSet<ValueId>) -> Result<Built, String> {
    let mut b = Builder {
        g,
        eg: EG::new(Ctx::default()),
        defined: HashMap::new(),
        constants,
        originals: Vec::new(),
    };
    for op in ops {
        b.op(op)?;
    }
    let roots = roots.iter().map(|&v| b.value(v)).collect();
    let mut eg = b.eg;
    eg.rebuild();
    Ok(Built {
        eg,
        roots,
        originals: b.originals,
    })
}

struct Builder<'a> {
    g: &'a Graph,
    eg: EG,
    defined: HashMap<ValueId, Id>,
    constants: &'a HashSet<ValueId>,
    originals: Vec<Node>,
}

impl Builder<'_> {
    fn add(&mut self, n: Node) -> Id {
        self.originals.push(n.clone());
        self.eg.add(n)
    }

    fn leaf(&mut self, l: Leaf) -> Id {
        self.add(Node::Leaf(l))
    }

    /// The class of a value: defined in the region, or an outside leaf.
    fn value(&mut self, v: ValueId) -> Id {
        if let Some(&id) = self.defined.get(&v) {
            return id;
        }
        let ctx = &mut self.eg.analysis;
        ctx.value_types.insert(v.0, self.g.ty(v).clone());
        if self.constants.contains(&v) {
            ctx.constants.insert(v.0);
        }
        self.leaf(Leaf::Value(v.0))
    }

    fn op(&mut self, op: &Op) -> Result<(), String> {
        let ins: Vec<Id> = op.inputs.iter().map(|&v| self.value(v)).collect();
        let arity = |n: usize| -> Result<(), String> {
            if ins.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "{} {} has {} operands, expected {n}",
                    op.result(),
                    op.kind.name(),
                    ins.len()
                ))
            }
        };
        let with = |first: Vec<Id>| -> Box<[Id]> { first.into_iter().chain(ins.iter().copied()).collect() };
        let node = match &op.kind {
            OpKind::RmsNorm { eps } => {
                arity(2)?;
                Node::RmsNorm([self.leaf(Leaf::eps(*eps)), ins[0], ins[1]])
            }
            OpKind::RmsScale { eps } => {
                arity(1)?;
                Node::RmsScale([self.leaf(Leaf::eps(*eps)), ins[0]])
            }
            OpKind::Linear => Node::Linear(ins.clone().into()),
            OpKind::Rope { heads, head_dim } => {
                arity(3)?;
                let a = self.leaf(Leaf::Rope {
                    heads: *heads,
                    head_dim: *head_dim,
                });
                Node::Rope([a, ins[0], ins[1], ins[2]])
            }
            OpKind::Attention(a) => Node::Attention(with(vec![self.leaf(Leaf::attn(a))])),
            OpKind::Silu => {
                arity(1)?;
                Node::Silu([ins[0]])
            }
            OpKind::Sigmoid => {
                arity(1)?;
                Node::Sigmoid([ins[0]])
            }
            OpKind::Add => {
                arity(2)?;
                Node::Add([ins[0], ins[1]])
            }
            OpKind::Mul => {
                arity(2)?;
                Node::Mul([ins[0], ins[1]])
            }
            OpKind::ScaleCols => {
                arity(2)?;
                Node::ScaleCols([ins[0], ins[1]])
            }
            OpKind::Concat { axis } => Node::Concat(with(vec![self.leaf(Leaf::Int(*axis))])),
            OpKind::Slice { start, len } => {
                arity(1)?;
                Node::Slice([self.leaf(Leaf::Int(*start)), self.leaf(Leaf::Int(*len)), ins[0]])
            }
            OpKind::Swiglu => Node::Swiglu(ins.clone().into()),
            OpKind::AddRmsNorm { eps } => Node::AddRmsNorm(with(vec![self.leaf(Leaf::eps(*eps))])),
            OpKind::StepEnd { eps, next, gate: true } => {
                let e = self.leaf(Leaf::eps(*eps));
                let n = self.leaf(Leaf::Next(NextCode::of(*next)));
                Node::StepEnd(with(vec![e, n]))
            }
            OpKind::Weight { .. }
            | OpKind::Embedding
            | OpKind::RopeCos(_)
            | OpKind::RopeSin(_)
            | OpKind::ExitSelect { .. }
            | OpKind::StepEnd { gate: false, .. }
            | OpKind::Loop(_) => {
                if matches!(op.kind, OpKind::Loop(_)) {
                    return Err("a loop inside the region is not supported".into());
                }
                let ctx = &mut self.eg.analysis;
                let key = OpaqueKey(ctx.opaque.len() as u32);
                ctx.opaque.push(OpaqueOp {
                    kind: op.kind.clone(),
                    types: op.results.iter().map(|r| self.g.ty(*r).clone()).collect(),
                });
                Node::Opaque(key, ins.clone().into())
            }
        };
        let tuple = matches!(node, Node::AddRmsNorm(_) | Node::StepEnd(_)) || op.results.len() > 1;
        let id = self.add(node);
        if tuple {
            for (i, &r) in op.results.iter().enumerate() {
                let idx = self.leaf(Leaf::Int(i));
                let get = self.add(Node::Get([idx, id]));
                self.defined.insert(r, get);
            }
        } else {
            self.defined.insert(op.result(), id);
        }
        Ok(())
    }
}

/// Ops made from an extraction.
pub struct Emitted {
    /// The region's ops, in dependency order.
    pub ops: Vec<Op>,
    /// Hoisted constant ops (with `hoist`), in dependency order.
    pub prelude: Vec<Op>,
    /// The value of each root.
    pub roots: Vec<ValueId>,
}

/// Make ops for the classes `choice` reaches from `p.roots`. New values
/// are appended to `types`.
pub fn emit(eg: &EG, p: &Problem, choice: &[usize], order: &[usize], hoist: bool, types: &mut Vec<Type>) -> Emitted {
    let mut vals: Vec<Vec<ValueId>> = vec![vec![]; p.ids.len()];
    let mut outside: HashSet<ValueId> = HashSet::new();
    let (mut ops, mut prelude) = (vec![], vec![]);
    let class = |id: Id| p.index[&eg.find(id)];
    for &c in order {
        let node = &eg[p.ids[c]].nodes[choice[c]];
        let (kind, ins) = match node {
            Node::Leaf(Leaf::Value(v)) => {
                vals[c] = vec![ValueId(*v)];
                outside.insert(ValueId(*v));
                continue;
            }
            Node::Leaf(_) => continue,
            Node::Get([i, t]) => {
                let i = eg[*i].data.int().expect("a projection index");
                vals[c] = vec![vals[class(*t)][i]];
                continue;
            }
            Node::Opaque(k, ch) => (eg.analysis.opaque[k.0 as usize].kind.clone(), ch.to_vec()),
            n => ir_kind(eg, n).expect("extracted nodes type"),
        };
        let inputs: Vec<ValueId> = ins.iter().map(|&i| vals[class(i)][0]).collect();
        let result_types = match node {
            Node::Opaque(k, _) => eg.analysis.opaque[k.0 as usize].types.clone(),
            _ => infer_node(eg, &kind, &ins).expect("extracted nodes type"),
        };
        let results: Vec<ValueId> = result_types
            .into_iter()
            .map(|t| {
                types.push(t);
                ValueId(types.len() as u32 - 1)
            })
            .collect();
        let constant = !impure(&kind) && ins.iter().all(|&i| eg[i].data.constant);
        let to_prelude = hoist && constant && inputs.iter().all(|v| outside.contains(v));
        if to_prelude {
            outside.extend(results.iter().copied());
        }
        vals[c] = results.clone();
        let op = Op { results, kind, inputs };
        if to_prelude { prelude.push(op) } else { ops.push(op) }
    }
    let roots = p.roots.iter().map(|&r| vals[r][0]).collect();
    Emitted { ops, prelude, roots }
}

/// The extraction problem of an e-graph: every class, its nodes priced by
/// `cost` (None: not extractable).
pub fn problem(eg: &EG, roots: &[Id], cost: impl Fn(&Node) -> Option<u64>) -> Problem {
    let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    ids.sort();
    let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let cands = ids
        .iter()
        .map(|&id| {
            eg[id]
                .nodes
                .iter()
                .map(|n| {
                    let cost = cost(n)?;
                    let mut children: Vec<usize> = Vec::new();
                    for ch in n.children() {
                        let c = index[&eg.find(*ch)];
                        if !children.contains(&c) {
                            children.push(c);
                        }
                    }
                    Some(super::extract::Cand { children, cost })
                })
                .collect()
        })
        .collect();
    let roots = roots.iter().map(|r| index[&eg.find(*r)]).collect();
    Problem {
        ids,
        index,
        cands,
        roots,
    }
}

/// Each class's node from the input graph (`usize::MAX` where none).
pub fn initial_choice(eg: &EG, p: &Problem, originals: &[Node]) -> Vec<usize> {
    let mut choice = vec![usize::MAX; p.ids.len()];
    for n in originals {
        let canon = n.clone().map_children(|c| eg.find(c));
        let Some(id) = eg.lookup(canon.clone()) else { continue };
        let c = p.index[&id];
        if choice[c] == usize::MAX
            && let Some(k) = eg[id].nodes.iter().position(|m| *m == canon)
        {
            choice[c] = k;
        }
    }
    choice
}
