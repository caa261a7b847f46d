//! Lowering: a verified graph (optimised or not) to a [`Program`].
//!
//! - one kernel per op that launches work per token (the rule of
//!   `ouroc_passes::Stats`): every op but weights, views and constants;
//! - constants (weights and what is computed from weights only: folded norm
//!   weights, merged projections) become the weight table, with a recipe
//!   for each load-time transform;
//! - a `slice` of an activation is a view: its users read a column window
//!   of the sliced value's buffer;
//! - the activation arena is `ouroc_passes::memplan::plan` at batch = seq = 1
//!   (see [`crate::program::Arena`] for why it scales to any token count);
//! - the one `loop` of the top block becomes the [`LoopSpec`]; the top
//!   block's kernels before and after it, `before` and `after`.
//!
//! What it refuses, with the op named: an unrolled graph (`exit_select`:
//! run the `reroll` pass first), more than one loop or a nested loop,
//! activation-valued weights operands, weight transforms other than
//! `scale_cols`/`concat`/`slice`, concat or scale_cols of activations, ops
//! reading the loop step index, activations not shaped `[batch, seq, ..]`.

use crate::program::{
    ActRef, ActValue, Arena, Carried, Kernel, KvSlot, LoopSpec, Operand, Program, Recipe, WeightEntry,
};
use crate::spec::{
    AttentionSpec, ElementwiseSpec, Expr, Family, GatherSpec, KernelSpec, LinearSpec, NormWeight, RopeSpec,
    RopeTableSpec, RowReduceSpec, Trig,
};
use ouroc_ir::graph::NextNorm;
use ouroc_ir::{Block, Dim, Graph, Op, OpKind, Terminator, ValueId};
use ouroc_passes::memplan::{self, ALIGN};
use ouroc_passes::ssa::constants;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowerError {
    #[error("the graph does not verify: {0}")]
    Invalid(String),
    #[error("cannot lower {value} ({op}): {msg}")]
    Unsupported {
        value: ValueId,
        op: &'static str,
        msg: String,
    },
    #[error("cannot lower the graph: {0}")]
    Graph(String),
}

/// Lower a graph to a program.
pub fn lower(g: &Graph) -> Result<Program, LowerError> {
    ouroc_ir::verify(g).map_err(|e| LowerError::Invalid(e.to_string()))?;
    let mut cx = Cx::new(g)?;

    let (mut before, mut after, mut looped) = (Vec::new(), Vec::new(), None);
    let mut scope = None;
    for op in &g.body.ops {
        match &op.kind {
            OpKind::Loop(l) => {
                if looped.is_some() {
                    return Err(unsupported(
                        op,
                        "a second loop in the top block (one loop is supported)",
                    ));
                }
                let args = &l.body.args;
                let Terminator::Yield { next, out, exit } = &l.body.term else {
                    return Err(LowerError::Invalid("a loop body does not end in yield".into()));
                };
                let mut carried = Vec::new();
                for ((&arg, &init), &nx) in args[1..].iter().zip(&op.inputs).zip(next) {
                    carried.push(Carried {
                        arg: arg.0,
                        init: cx.act(init, op)?,
                        next: cx.act(nx, op)?,
                    });
                }
                cx.step_index = Some(args[0]);
                let body = cx.block(&l.body, &mut None)?;
                cx.step_index = None;
                looped = Some(LoopSpec {
                    steps: l.steps,
                    policy: l.policy.to_string(),
                    step_index: args[0].0,
                    carried,
                    body,
                    out: cx.act(*out, op)?,
                    exit: exit.map(|e| cx.act(e, op)).transpose()?,
                    result: op.result().0,
                });
            }
            _ => {
                if let Some(k) = cx.kernel(op, &mut scope)? {
                    if looped.is_some() { &mut after } else { &mut before }.push(k);
                }
            }
        }
    }

    let outputs = g
        .outputs()
        .iter()
        .map(|&v| {
            cx.act_ref(v)
                .ok_or_else(|| LowerError::Graph(format!("output {v} is not an activation")))
        })
        .collect::<Result<_, _>>()?;

    // Resident weights: those a kernel reads.
    let read: HashSet<u32> = before
        .iter()
        .chain(looped.iter().flat_map(|l: &LoopSpec| l.body.iter()))
        .chain(&after)
        .flat_map(|k| &k.inputs)
        .filter_map(|o| match o {
            Operand::Weight(w) => Some(*w),
            Operand::Act(_) => None,
        })
        .collect();
    for w in &mut cx.weights {
        w.resident = read.contains(&w.id);
    }

    let kv = cx.kv_slots(looped.as_ref().map_or(1, |l| l.steps));
    let p = Program {
        name: g.name.clone(),
        inputs: g.inputs().iter().map(|v| v.0).collect(),
        outputs,
        weights: cx.weights,
        arena: Arena {
            bytes_per_token: cx.arena_bytes,
            align: ALIGN,
            values: cx.values.into_values().collect(),
        },
        kv,
        before,
        loop_: looped,
        after,
    };
    p.check().map_err(LowerError::Graph)?;
    Ok(p)
}

fn unsupported(op: &Op, msg: &str) -> LowerError {
    LowerError::Unsupported {
        value: op.result(),
        op: op.kind.name(),
        msg: msg.to_string(),
    }
}

struct Cx<'g> {
    g: &'g Graph,
    consts: HashSet<ValueId>,
    weights: Vec<WeightEntry>,
    views: HashMap<ValueId, ActRef>,
    values: BTreeMap<u32, ActValue>,
    arena_bytes: u64,
    step_index: Option<ValueId>,
    names: HashMap<String, usize>,
    /// The role (unscoped name) of the kernel that computed each result.
    roles: HashMap<ValueId, String>,
    /// (step-independent) attention layers: (layer, kv_heads, head_dim, dtype, in a loop).
    attention: Vec<(usize, usize, usize, ouroc_ir::DType, bool)>,
}

impl<'g> Cx<'g> {
    fn new(g: &'g Graph) -> Result<Cx<'g>, LowerError> {
        let consts = constants(g);
        let mut weights = Vec::new();
        let mut views: HashMap<ValueId, ActRef> = HashMap::new();
        let mut loops = 0;
        for op in g.walk() {
            match &op.kind {
                OpKind::ExitSelect { .. } => {
                    return Err(unsupported(
                        op,
                        "an unrolled graph's exit policy; run the `reroll` pass first to recover the loop",
                    ));
                }
                OpKind::Loop(l) => {
                    loops += 1;
                    if l.body.ops.iter().any(|o| matches!(o.kind, OpKind::Loop(_))) {
                        return Err(unsupported(op, "a loop nested in a loop body"));
                    }
                }
                _ => {}
            }
            if consts.contains(&op.result()) {
                weights.push(weight_entry(g, op)?);
            } else if let OpKind::Slice { start, len } = op.kind {
                let src = op.inputs[0];
                let base = match views.get(&src) {
                    Some(r) => *r,
                    None => ActRef::whole(src.0, width(g, src, op)?),
                };
                views.insert(
                    op.result(),
                    ActRef {
                        value: base.value,
                        col: base.col + start,
                        len,
                    },
                );
            }
        }
        if loops > 1 {
            return Err(LowerError::Graph(format!("{loops} loops; one loop is supported")));
        }

        let plan = memplan::plan(g, 1, 1);
        let defs: HashMap<ValueId, &Op> = g
            .walk()
            .into_iter()
            .flat_map(|op| op.results.iter().map(move |&r| (r, op)))
            .collect();
        let mut values = BTreeMap::new();
        for (&v, &offset) in &plan.offsets {
            if views.contains_key(&v) {
                continue;
            }
            let w = match defs.get(&v) {
                Some(op) => width(g, v, op)?,
                None => width_of_arg(g, v)?,
            };
            values.insert(
                v.0,
                ActValue {
                    id: v.0,
                    dtype: g.ty(v).dtype,
                    width: w,
                    offset,
                },
            );
        }
        // In-place reuse must keep the row layout (row t of the result is row t
        // of the operand). At seq = 1 the 64-byte alignment can hide a
        // difference (`mul(slice(x[6]), y[4])` put in x's buffer), which would
        // not scale: such a value, and the values reusing it in turn, get a
        // region of their own at the end of the arena.
        let mut arena_bytes = plan.arena_bytes;
        for b in &plan.buffers {
            let mut prev: Option<(usize, ouroc_ir::DType)> = None;
            let mut offset = b.offset;
            for v in &b.values {
                let Some(a) = values.get_mut(&v.0) else { continue };
                let layout = (a.width, a.dtype);
                if prev.is_some_and(|p| p != layout) {
                    offset = arena_bytes;
                    arena_bytes += (a.width * a.dtype.size_bytes()).div_ceil(ALIGN as usize) as u64 * ALIGN;
                }
                a.offset = offset;
                prev = Some(layout);
            }
        }
        Ok(Cx {
            g,
            consts,
            weights,
            views,
            values,
            arena_bytes,
            step_index: None,
            names: HashMap::new(),
            roles: HashMap::new(),
            attention: Vec::new(),
        })
    }

    /// An activation operand (whole value or view), if `v` is one.
    fn act_ref(&self, v: ValueId) -> Option<ActRef> {
        self.views
            .get(&v)
            .copied()
            .or_else(|| self.values.get(&v.0).map(|a| ActRef::whole(v.0, a.width)))
    }

    fn act(&self, v: ValueId, user: &Op) -> Result<ActRef, LowerError> {
        if Some(v) == self.step_index {
            return Err(unsupported(
                user,
                "reads the loop step index (only attention's KV slot may depend on it)",
            ));
        }
        if self.consts.contains(&v) {
            return Err(unsupported(
                user,
                &format!("operand {v} is a weight where an activation is expected"),
            ));
        }
        self.act_ref(v)
            .ok_or_else(|| unsupported(user, &format!("operand {v} has no buffer in the memory plan")))
    }

    fn weight(&self, v: ValueId, user: &Op) -> Result<u32, LowerError> {
        if !self.consts.contains(&v) {
            return Err(unsupported(
                user,
                &format!("operand {v} is an activation where a weight is expected"),
            ));
        }
        Ok(v.0)
    }

    fn entry(&self, id: u32) -> &WeightEntry {
        self.weights
            .iter()
            .find(|w| w.id == id)
            .expect("constants are in the table")
    }

    /// The checkpoint tensors a weight is made from (the scale of a
    /// `scale_cols` excluded: it is the folded norm, not the matrix).
    fn leaves(&self, id: u32) -> Vec<String> {
        match &self.entry(id).recipe {
            Recipe::Checkpoint { tensor } => vec![tensor.clone()],
            Recipe::ScaleCols { w, .. } => self.leaves(*w),
            Recipe::Concat { parts, .. } => parts.iter().flat_map(|p| self.leaves(*p)).collect(),
            Recipe::Slice { of, .. } => self.leaves(*of),
        }
    }

    /// Lower a block's ops (a loop body); `scope` is the layer the previous
    /// op belonged to.
    fn block(&mut self, b: &Block, scope: &mut Option<usize>) -> Result<Vec<Kernel>, LowerError> {
        let mut ks = Vec::new();
        for op in &b.ops {
            if let Some(k) = self.kernel(op, scope)? {
                ks.push(k);
            }
        }
        Ok(ks)
    }

    /// The kernel of one op, or None for weights, constants and views.
    fn kernel(&mut self, op: &Op, scope: &mut Option<usize>) -> Result<Option<Kernel>, LowerError> {
        if self.consts.contains(&op.result()) || matches!(op.kind, OpKind::Slice { .. } | OpKind::Weight { .. }) {
            return Ok(None);
        }
        let g = self.g;
        let act_dtype = g.ty(op.result()).dtype;
        let ins = &op.inputs;
        let a = |i: usize| self.act(ins[i], op);
        let w = |i: usize| self.weight(ins[i], op);
        let elementwise = |ops: Vec<ActRef>, expr: Expr| {
            let width = ops[0].len;
            (
                Family::Elementwise(ElementwiseSpec {
                    width,
                    inputs: ops.len(),
                    expr,
                }),
                ops.into_iter().map(Operand::Act).collect::<Vec<_>>(),
            )
        };
        let row = |add: bool, norm: NormWeight, gate: bool, next: Option<NormWeight>, eps: f64, width: usize| {
            Family::RowReduce(RowReduceSpec {
                width,
                eps,
                add,
                norm,
                gate,
                next,
            })
        };
        let (family, inputs, base): (Family, Vec<Operand>, String) = match &op.kind {
            OpKind::Embedding => {
                let table = w(0)?;
                let e = self.entry(table);
                let fam = Family::Gather(GatherSpec {
                    rows: e.shape[0],
                    width: e.shape[1],
                    table: e.dtype,
                });
                (fam, vec![Operand::Weight(table), Operand::Act(a(1)?)], "embed".into())
            }
            OpKind::RopeCos(t) | OpKind::RopeSin(t) => {
                let (func, base) = match op.kind {
                    OpKind::RopeCos(_) => (Trig::Cos, "rope_cos"),
                    _ => (Trig::Sin, "rope_sin"),
                };
                let fam = Family::RopeTable(RopeTableSpec {
                    func,
                    head_dim: t.head_dim,
                    theta: t.theta,
                });
                (fam, vec![Operand::Act(a(0)?)], base.into())
            }
            OpKind::Linear => {
                let (x, wt) = (a(0)?, w(1)?);
                let e = self.entry(wt);
                let fam = Family::Linear(LinearSpec {
                    n: e.shape[0],
                    k: e.shape[1],
                    weight: e.dtype,
                    bias: ins.len() == 3,
                    quant: None,
                });
                let mut operands = vec![Operand::Act(x), Operand::Weight(wt)];
                if ins.len() == 3 {
                    operands.push(Operand::Weight(w(2)?));
                }
                (fam, operands, linear_name(&self.leaves(wt)))
            }
            OpKind::RmsNorm { eps } => {
                let (x, wt) = (a(0)?, w(1)?);
                let base = self.leaves(wt).first().map_or("rms_norm".to_string(), |t| short(t).1);
                let fam = row(false, NormWeight::Weighted, false, None, *eps, x.len);
                (fam, vec![Operand::Act(x), Operand::Weight(wt)], base)
            }
            OpKind::RmsScale { eps } => {
                let x = a(0)?;
                let fam = row(false, NormWeight::Unweighted, false, None, *eps, x.len);
                (fam, vec![Operand::Act(x)], "rms_scale".into())
            }
            OpKind::AddRmsNorm { eps } => {
                let (h, x) = (a(0)?, a(1)?);
                let mut operands = vec![Operand::Act(h), Operand::Act(x)];
                let norm = if ins.len() == 3 {
                    operands.push(Operand::Weight(w(2)?));
                    NormWeight::Weighted
                } else {
                    NormWeight::Unweighted
                };
                (row(true, norm, false, None, *eps, h.len), operands, "add_norm".into())
            }
            OpKind::StepEnd { eps, next, gate } => {
                let h = a(0)?;
                let mut operands = vec![Operand::Act(h), Operand::Weight(w(1)?)];
                if *gate {
                    operands.extend([Operand::Weight(w(2)?), Operand::Weight(w(3)?)]);
                }
                let next = match next {
                    NextNorm::None => None,
                    NextNorm::Scale => Some(NormWeight::Unweighted),
                    NextNorm::Norm => {
                        operands.push(Operand::Weight(w(ins.len() - 1)?));
                        Some(NormWeight::Weighted)
                    }
                };
                let fam = row(false, NormWeight::Weighted, *gate, next, *eps, h.len);
                (fam, operands, "step_end".into())
            }
            OpKind::Rope { heads, head_dim } => {
                let fam = Family::Rope(RopeSpec {
                    heads: *heads,
                    head_dim: *head_dim,
                });
                let operands = (0..3).map(|i| a(i).map(Operand::Act)).collect::<Result<_, _>>()?;
                // Named after what it rotates: `rope_q`, `rope_k`.
                let base = self.roles.get(&ins[0]).map_or("rope".into(), |r| format!("rope_{r}"));
                (fam, operands, base)
            }
            OpKind::Attention(at) => {
                let rope = ins.len() == 5;
                let fam = Family::Attention(AttentionSpec {
                    layer: at.layer,
                    heads: at.heads,
                    kv_heads: at.kv_heads,
                    head_dim: at.head_dim,
                    rope,
                });
                let operands = (0..ins.len())
                    .map(|i| a(i).map(Operand::Act))
                    .collect::<Result<_, _>>()?;
                (fam, operands, "attn".into())
            }
            OpKind::Silu => {
                let (f, o) = elementwise(vec![a(0)?], Expr::silu(Expr::input(0)));
                (f, o, "silu".into())
            }
            OpKind::Sigmoid => {
                let (f, o) = elementwise(vec![a(0)?], Expr::sigmoid(Expr::input(0)));
                (f, o, "sigmoid".into())
            }
            OpKind::Add => {
                let (f, o) = elementwise(vec![a(0)?, a(1)?], Expr::input(0) + Expr::input(1));
                (f, o, "add".into())
            }
            OpKind::Mul => {
                let (f, o) = elementwise(vec![a(0)?, a(1)?], Expr::input(0) * Expr::input(1));
                (f, o, "mul".into())
            }
            OpKind::Swiglu => {
                let ops = match ins.len() {
                    2 => vec![a(0)?, a(1)?],
                    _ => {
                        // One operand: gate and up are the two halves of each row.
                        let gu = a(0)?;
                        let half = gu.len / 2;
                        let at = |col| ActRef {
                            value: gu.value,
                            col,
                            len: half,
                        };
                        vec![at(gu.col), at(gu.col + half)]
                    }
                };
                let (f, o) = elementwise(ops, Expr::silu(Expr::input(0)) * Expr::input(1));
                (f, o, "swiglu".into())
            }
            OpKind::Concat { .. } | OpKind::ScaleCols => {
                return Err(unsupported(
                    op,
                    "of activations (only weight transforms, computed once at load, are supported)",
                ));
            }
            OpKind::ExitSelect { .. } | OpKind::Loop(_) => {
                return Err(unsupported(op, "not allowed here"));
            }
            OpKind::Slice { .. } | OpKind::Weight { .. } => unreachable!("handled above"),
        };

        if let OpKind::Attention(at) = &op.kind {
            let in_loop = self.step_index.is_some();
            self.attention
                .push((at.layer, at.kv_heads, at.head_dim, act_dtype, in_loop));
        }
        // Scope: the layer of the op's first weight (attention: its layer);
        // ops without weights stay in the previous op's layer.
        let explicit = match &op.kind {
            OpKind::Attention(at) => Some(Some(at.layer)),
            _ => inputs.iter().find_map(|o| match o {
                Operand::Weight(id) => Some(self.leaves(*id).first().and_then(|t| short(t).0)),
                Operand::Act(_) => None,
            }),
        };
        if let Some(s) = explicit {
            *scope = s;
        }
        for &r in &op.results {
            self.roles.insert(r, base.clone());
        }
        let full = match scope {
            Some(l) => format!("l{l}.{base}"),
            None => base,
        };
        let count = self.names.entry(full.clone()).or_insert(0);
        *count += 1;
        let name = if *count == 1 { full } else { format!("{full}{count}") };

        let outputs: Vec<u32> = op.results.iter().map(|r| r.0).collect();
        for (&r, want) in op.results.iter().zip(family.result_widths()) {
            let have = self.values.get(&r.0).map(|v| v.width);
            if have != Some(want) {
                return Err(unsupported(
                    op,
                    &format!("result {r} has width {have:?}, the kernel writes {want}"),
                ));
            }
        }
        Ok(Some(Kernel {
            spec: KernelSpec {
                name,
                act: act_dtype,
                family,
            },
            inputs,
            outputs,
        }))
    }

    fn kv_slots(&self, steps: usize) -> Vec<KvSlot> {
        let mut slots = Vec::new();
        for &(layer, kv_heads, head_dim, dtype, in_loop) in &self.attention {
            for step in 0..if in_loop { steps } else { 1 } {
                slots.push(KvSlot {
                    step,
                    layer,
                    kv_heads,
                    head_dim,
                    dtype,
                });
            }
        }
        slots.sort_by_key(|s| (s.step, s.layer));
        slots
    }
}

/// Row length of activation `v` (defined by `op`): the product of the dims
/// after `[batch, seq]`.
fn width(g: &Graph, v: ValueId, op: &Op) -> Result<usize, LowerError> {
    per_token_width(g, v).map_err(|msg| unsupported(op, &msg))
}

fn width_of_arg(g: &Graph, v: ValueId) -> Result<usize, LowerError> {
    per_token_width(g, v).map_err(|msg| LowerError::Graph(format!("{v}: {msg}")))
}

fn per_token_width(g: &Graph, v: ValueId) -> Result<usize, String> {
    let ty = g.ty(v);
    let ok = ty.shape.len() >= 2 && ty.shape[0] == Dim::sym("batch") && ty.shape[1] == Dim::sym("seq");
    let rest: Option<usize> = ty.shape.iter().skip(2).map(Dim::fixed).product();
    match rest {
        Some(w) if ok => Ok(w),
        _ => Err(format!(
            "activation {v} has type {ty}; activations must be [batch, seq, fixed dims..]"
        )),
    }
}

/// The table entry of a constant op (a weight or a load-time transform).
fn weight_entry(g: &Graph, op: &Op) -> Result<WeightEntry, LowerError> {
    let ty = g.ty(op.result());
    let shape = ty
        .fixed_dims()
        .ok_or_else(|| unsupported(op, &format!("a weight of type {ty} has symbolic dims")))?;
    if op.results.len() != 1 {
        return Err(unsupported(op, "computed from weights only, with several results"));
    }
    let ids = |i: usize| op.inputs[i].0;
    let recipe = match &op.kind {
        OpKind::Weight { name } => Recipe::Checkpoint { tensor: name.clone() },
        OpKind::ScaleCols => Recipe::ScaleCols { w: ids(0), s: ids(1) },
        OpKind::Concat { axis } => Recipe::Concat {
            axis: *axis,
            parts: op.inputs.iter().map(|v| v.0).collect(),
        },
        OpKind::Slice { start, len } => Recipe::Slice {
            of: ids(0),
            start: *start,
            len: *len,
        },
        _ => {
            return Err(unsupported(
                op,
                "computed from weights only, but not a load-time transform ouroc-kernels knows \
                 (scale_cols, concat, slice)",
            ));
        }
    };
    Ok(WeightEntry {
        id: op.result().0,
        dtype: ty.dtype,
        shape,
        recipe,
        resident: false,
    })
}

/// (layer, short role) of a checkpoint tensor:
/// `model.layers.0.self_attn.q_proj.weight` -> (Some(0), "q").
fn short(tensor: &str) -> (Option<usize>, String) {
    let mut s = tensor.strip_prefix("model.").unwrap_or(tensor);
    s = s
        .strip_suffix(".weight")
        .or_else(|| s.strip_suffix(".bias"))
        .unwrap_or(s);
    let mut layer = None;
    if let Some((n, rest)) = s.strip_prefix("layers.").and_then(|r| r.split_once('.'))
        && let Ok(n) = n.parse()
    {
        layer = Some(n);
        s = rest;
    }
    for p in ["self_attn.", "mlp."] {
        s = s.strip_prefix(p).unwrap_or(s);
    }
    (layer, s.strip_suffix("_proj").unwrap_or(s).replace('.', "_"))
}

/// A linear's role from its weight's tensors: `q`, `qkv` (merged q/k/v),
/// `gate_up`, `lm_head` (also when tied to the embedding), `exit_gate`.
fn linear_name(leaves: &[String]) -> String {
    let parts: Vec<String> = leaves
        .iter()
        .map(|t| match short(t).1.as_str() {
            "embed_tokens" | "lm_head" => "lm_head".to_string(),
            "early_exit_gate" => "exit_gate".to_string(),
            s => s.to_string(),
        })
        .collect();
    if parts.is_empty() {
        "linear".into()
    } else if parts.iter().all(|p| p.len() == 1) {
        parts.concat()
    } else {
        parts.join("_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_of_checkpoint_tensors() {
        assert_eq!(short("model.layers.12.self_attn.q_proj.weight"), (Some(12), "q".into()));
        assert_eq!(short("model.layers.0.mlp.down_proj.weight"), (Some(0), "down".into()));
        assert_eq!(
            short("model.layers.3.input_layernorm_2.weight"),
            (Some(3), "input_layernorm_2".into())
        );
        assert_eq!(short("model.norm.weight"), (None, "norm".into()));
        assert_eq!(short("lm_head.weight"), (None, "lm_head".into()));
        let t = |s: &[&str]| linear_name(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            t(&[
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight"
            ]),
            "qkv"
        );
        assert_eq!(
            t(&[
                "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight"
            ]),
            "gate_up"
        );
        assert_eq!(t(&["model.embed_tokens.weight"]), "lm_head");
        assert_eq!(t(&["model.early_exit_gate.weight"]), "exit_gate");
    }
}
