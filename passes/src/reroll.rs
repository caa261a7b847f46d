//! Re-rolling ("merging repeated layer applications"): recover the `loop`
//! from an unrolled graph, the form a tracer produces: R explicit copies of
//! the step (the layer stack, the final norm and the exit gate) in the top
//! block, attention of step r, layer i on KV layer `r*L + i`, and an
//! `exit_select(out_0.., lambda_0..) {policy}` choosing among the steps.
//!
//! How the steps are found and matched:
//! 1. The `exit_select` gives R, the step outputs `out_r` and exit signals
//!    `lambda_r`. Step r >= 1 reads `out_{r-1}`; its ops are those in the
//!    backward cone of `out_r`, `lambda_r` that depend on `out_{r-1}`;
//!    every other value it reads (weights, RoPE tables) is an outer operand.
//! 2. Step 0's input (the loop's initial value) is not named anywhere: it is
//!    found by matching step 1 onto step 0 (below); where step 1 reads
//!    `out_0`, step 0 reads the initial value. With R = 1 there is nothing
//!    to match against: the initial value is the value of the step output's
//!    type whose dependent cone is largest (the most work inside the loop;
//!    for an Ouro graph, the embedding).
//! 3. Matching a step against a template step is a walk backwards from the
//!    pair (out, lambda): each template op is paired with the op defining
//!    the corresponding value, which must have the same kind and attributes
//!    (attention: the same heads, layer checked separately), the same number
//!    of operands and results; internal operands pair up (a bijection),
//!    the template's input pairs with the step's input, and outer operands
//!    must be the same value (or weights of the same name and type). The
//!    steps are compared as dataflow graphs: the textual order of
//!    independent ops inside a step may differ.
//! 4. Step 0 with its input replaced by the carried block argument becomes
//!    the loop body (its attention layers must be 0..L); every step r >= 1 is
//!    matched against it, and its attention of body layer i must use layer
//!    `r*L + i`. The steps must be disjoint, and no value computed inside a
//!    step other than the outputs and exit signals consumed by the next step
//!    and the `exit_select` may be used elsewhere.
//!
//! The loop (`steps = R`, the `exit_select`'s policy, `yield next(out_0)
//! out(out_0) exit(lambda_0)`) replaces the `exit_select`; the steps'
//! ops, and weights only they read, are removed. A graph without an
//! `exit_select` is returned unchanged; a malformed unrolled graph is an
//! error naming the first op found to differ.

use crate::manager::{Pass, PassError};
use ouroc_ir::{Block, DType, Graph, Loop, Op, OpKind, Terminator, Type, ValueId};
use std::collections::{HashMap, HashSet};

/// The re-rolling pass; see the module documentation.
pub struct Reroll;

const NAME: &str = "reroll";

impl Pass for Reroll {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "recover the loop from an unrolled graph (R copies of the layer stack and an exit_select)"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        let out = reroll(g).map_err(|msg| PassError::Failed { pass: NAME, msg })?;
        ouroc_ir::verify(&out).map_err(|err| PassError::Broken { pass: NAME, err })?;
        Ok(out)
    }
}

/// Re-roll `g`: the graph with its `exit_select` and the R steps feeding it
/// replaced by one `loop`, canonically numbered. Unchanged without an
/// `exit_select`; an error naming the op when the steps do not match.
pub fn reroll(g: &Graph) -> Result<Graph, String> {
    let sels: Vec<usize> = (g.body.ops.iter().enumerate())
        .filter(|(_, op)| matches!(op.kind, OpKind::ExitSelect { .. }))
        .map(|(i, _)| i)
        .collect();
    match sels.as_slice() {
        [] => Ok(g.clone()),
        [e] => Unrolled::new(g).roll(*e).map_err(|m| format!("cannot re-roll: {m}")),
        [_, second, ..] => Err(format!(
            "cannot re-roll: the graph has {} exit_select ops; re-rolling handles one (the second is {})",
            sels.len(),
            show(&g.body.ops[*second])
        )),
    }
}

/// One step as a template to match others against: its ops in block order,
/// the op index each came from (for messages), its input and its outputs.
struct Segment {
    ops: Vec<Op>,
    origin: Vec<usize>,
    input: ValueId,
    out: ValueId,
    lam: ValueId,
    step: usize,
}

/// Result of matching a step against a template.
struct Matched {
    /// Per template op, the top-block index of the op paired with it.
    ops: Vec<usize>,
    /// The step's input (what it reads where the template reads its input).
    input: ValueId,
    /// (template op, operand) positions that read the input.
    input_uses: Vec<(usize, usize)>,
}

/// A bijection between a template's values and a step's values.
#[derive(Default)]
struct Pairs {
    fwd: HashMap<ValueId, ValueId>,
    back: HashMap<ValueId, ValueId>,
}

impl Pairs {
    /// Pair template value `tv` (of step `tstep`) with the step's `sv`;
    /// `input` is the step's input, which no template-internal value may stand for.
    fn bind(
        &mut self,
        u: &Unrolled,
        tstep: usize,
        tv: ValueId,
        sv: ValueId,
        input: Option<ValueId>,
    ) -> Result<(), String> {
        if Some(sv) == input {
            return Err(format!(
                "it is {} (the step's input) where step {tstep} has {} (computed inside the step)",
                u.describe(sv),
                u.describe(tv)
            ));
        }
        match (self.fwd.get(&tv), self.back.get(&sv)) {
            (Some(&s0), _) if s0 != sv => Err(format!(
                "step {tstep}'s {} would stand for both {} and {}",
                u.describe(tv),
                u.describe(s0),
                u.describe(sv)
            )),
            (_, Some(&t0)) if t0 != tv => Err(format!(
                "{} would stand for both {} and {} of step {tstep}",
                u.describe(sv),
                u.describe(t0),
                u.describe(tv)
            )),
            _ => {
                self.fwd.insert(tv, sv);
                self.back.insert(sv, tv);
                Ok(())
            }
        }
    }
}

struct Unrolled<'g> {
    g: &'g Graph,
    /// Top-block value -> (op index, result index).
    def: HashMap<ValueId, (usize, usize)>,
}

impl<'g> Unrolled<'g> {
    fn new(g: &'g Graph) -> Self {
        let mut def = HashMap::new();
        for (i, op) in g.body.ops.iter().enumerate() {
            for (k, &r) in op.results.iter().enumerate() {
                def.insert(r, (i, k));
            }
        }
        Unrolled { g, def }
    }

    fn ops(&self) -> &'g [Op] {
        &self.g.body.ops
    }

    /// `%v (what defines it)`, for messages.
    fn describe(&self, v: ValueId) -> String {
        match self.def.get(&v) {
            None if self.g.inputs().contains(&v) => format!("{v} (a graph input)"),
            None => format!("{v}"),
            Some(&(i, _)) => match &self.ops()[i].kind {
                OpKind::Weight { name } => format!("{v} (weight \"{name}\")"),
                k => format!("{v} ({})", k.name()),
            },
        }
    }

    /// Two outer operands are the same tensor: the same value, or weights of
    /// the same name and type (a tracer may repeat a weight per use).
    fn same_outer(&self, a: ValueId, b: ValueId) -> bool {
        if a == b {
            return true;
        }
        let weight = |v: ValueId| match self.def.get(&v).map(|&(i, _)| &self.ops()[i].kind) {
            Some(OpKind::Weight { name }) => Some(name),
            _ => None,
        };
        matches!((weight(a), weight(b)), (Some(x), Some(y)) if x == y && self.g.ty(a) == self.g.ty(b))
    }

    /// Op indices (ascending) of the backward cone of `roots` that depend on
    /// `input`; the values these ops read that are not theirs and not
    /// `input` are outer operands.
    fn dependent_cone(&self, roots: &[ValueId], input: ValueId) -> Result<Vec<usize>, String> {
        let start = self.def.get(&input).map_or(0, |&(i, _)| i + 1);
        let mut dep: HashSet<ValueId> = HashSet::from([input]);
        for op in &self.ops()[start..] {
            if op.inputs.iter().any(|v| dep.contains(v)) {
                dep.extend(op.results.iter().copied());
            }
        }
        for &r in roots {
            if !dep.contains(&r) || r == input {
                return Err(format!(
                    "{} does not depend on {}: the exit_select's operands are not the steps of one loop",
                    self.describe(r),
                    self.describe(input)
                ));
            }
        }
        let mut seen = HashSet::new();
        let mut stack: Vec<ValueId> = roots.to_vec();
        while let Some(v) = stack.pop() {
            if v == input || !dep.contains(&v) {
                continue;
            }
            let (i, _) = self.def[&v];
            if seen.insert(i) {
                stack.extend(self.ops()[i].inputs.iter().copied());
            }
        }
        let mut ops: Vec<usize> = seen.into_iter().collect();
        ops.sort_unstable();
        Ok(ops)
    }

    /// Match the step computing (`out`, `lam`) from `input` (unknown for
    /// step 0 before the loop is found) against the template `t`.
    fn match_step(
        &self,
        t: &Segment,
        step: usize,
        out: ValueId,
        lam: ValueId,
        input: Option<ValueId>,
    ) -> Result<Matched, String> {
        let internal: HashMap<ValueId, usize> = (t.ops.iter().enumerate())
            .flat_map(|(i, op)| op.results.iter().map(move |&r| (r, i)))
            .collect();
        let mut pairs = Pairs::default();
        let mut input = input;
        let mut input_uses = Vec::new();
        let mut paired = vec![usize::MAX; t.ops.len()];
        let differ = |ti: usize, si: Option<usize>, detail: String| -> String {
            let theirs = match si {
                Some(si) => format!("step {step}'s `{}` corresponds to ", show(&self.ops()[si])),
                None => String::new(),
            };
            format!(
                "steps {} and {} differ: {theirs}step {}'s `{}`, but {detail}",
                t.step.min(step),
                t.step.max(step),
                t.step,
                show(&self.ops()[t.origin[ti]])
            )
        };
        for (what, tv, sv) in [("output", t.out, out), ("exit signal", t.lam, lam)] {
            pairs
                .bind(self, t.step, tv, sv, input)
                .map_err(|d| format!("the {what}s of steps {} and {step} do not correspond: {d}", t.step))?;
        }
        for ti in (0..t.ops.len()).rev() {
            let top = &t.ops[ti];
            let Some((k, sv)) = (top.results.iter().enumerate()).find_map(|(k, r)| pairs.fwd.get(r).map(|&s| (k, s)))
            else {
                return Err(differ(
                    ti,
                    None,
                    format!("step {step} has no op corresponding to it (its results are never paired)"),
                ));
            };
            let Some(&(si, sk)) = self.def.get(&sv) else {
                return Err(differ(
                    ti,
                    None,
                    format!("step {step} has {} in its place", self.describe(sv)),
                ));
            };
            let sop = &self.ops()[si];
            let fail = |detail: String| differ(ti, Some(si), detail);
            if sk != k {
                return Err(fail(format!(
                    "the value used is result {sk} of one and result {k} of the other"
                )));
            }
            if !same_kind(&top.kind, &sop.kind) || top.results.len() != sop.results.len() {
                return Err(fail("the ops are not the same (kind or attributes)".into()));
            }
            if top.inputs.len() != sop.inputs.len() {
                return Err(fail(format!(
                    "they have {} and {} operands",
                    sop.inputs.len(),
                    top.inputs.len()
                )));
            }
            for (&tr, &sr) in top.results.iter().zip(&sop.results) {
                pairs
                    .bind(self, t.step, tr, sr, input)
                    .map_err(|d| fail(format!("its result: {d}")))?;
            }
            for (oi, (&tv, &sv)) in top.inputs.iter().zip(&sop.inputs).enumerate() {
                let nth = oi + 1;
                if tv == t.input {
                    match input {
                        Some(x) if x != sv => {
                            return Err(fail(format!(
                                "its operand {nth} is {} where step {} reads its input (step {step}'s input is {})",
                                self.describe(sv),
                                t.step,
                                self.describe(x)
                            )));
                        }
                        _ => input = Some(sv),
                    }
                    input_uses.push((ti, oi));
                } else if internal.contains_key(&tv) {
                    pairs
                        .bind(self, t.step, tv, sv, input)
                        .map_err(|d| fail(format!("its operand {nth}: {d}")))?;
                } else if !self.same_outer(tv, sv) {
                    return Err(fail(format!(
                        "its operand {nth} is {} where step {} has {}",
                        self.describe(sv),
                        t.step,
                        self.describe(tv)
                    )));
                }
            }
            paired[ti] = si;
        }
        let input = input.ok_or_else(|| format!("step {} never reads its input", t.step))?;
        Ok(Matched {
            ops: paired,
            input,
            input_uses,
        })
    }

    /// Step 0's input for a one-step graph: the value of the output's type
    /// whose dependent cone is largest (earliest on ties).
    fn single_step_input(&self, out: ValueId, lam: ValueId) -> Result<ValueId, String> {
        let mut cone = HashSet::new();
        let mut stack = vec![out];
        while let Some(v) = stack.pop() {
            if cone.insert(v)
                && let Some(&(i, _)) = self.def.get(&v)
            {
                stack.extend(self.ops()[i].inputs.iter().copied());
            }
        }
        let order = |v: &ValueId| self.def.get(v).map_or(0, |&(i, _)| i + 1);
        let mut candidates: Vec<ValueId> = (cone.into_iter())
            .filter(|&v| v != out && self.g.ty(v) == self.g.ty(out))
            .collect();
        candidates.sort_by_key(|v| (order(v), *v));
        let mut best: Option<(usize, ValueId)> = None;
        for c in candidates {
            if let Ok(ops) = self.dependent_cone(&[out, lam], c)
                && best.is_none_or(|(n, _)| ops.len() > n)
            {
                best = Some((ops.len(), c));
            }
        }
        best.map(|(_, v)| v).ok_or_else(|| {
            format!(
                "cannot find the loop's initial value: no value of {}'s type {} feeds it",
                out,
                self.g.ty(out)
            )
        })
    }

    fn roll(&self, e: usize) -> Result<Graph, String> {
        let g = self.g;
        let sel = &self.ops()[e];
        let OpKind::ExitSelect { policy } = sel.kind else {
            unreachable!("roll is called on the exit_select")
        };
        let steps = sel.inputs.len() / 2;
        let (outs, lams) = sel.inputs.split_at(steps);
        let fresh = |types: &mut Vec<Type>, t: Type| {
            types.push(t);
            ValueId((types.len() - 1) as u32)
        };
        let mut types = g.types.clone();
        let step_arg = fresh(&mut types, Type::scalar(DType::I32));

        // Step 0: its ops and its input, by matching step 1 onto it (R >= 2).
        let (init, seg0, carried, body): (ValueId, Vec<usize>, ValueId, Vec<(usize, Op)>) = if steps >= 2 {
            let ops1 = self.dependent_cone(&[outs[1], lams[1]], outs[0])?;
            let t1 = Segment {
                ops: ops1.iter().map(|&i| self.ops()[i].clone()).collect(),
                origin: ops1,
                input: outs[0],
                out: outs[1],
                lam: lams[1],
                step: 1,
            };
            let m = self.match_step(&t1, 0, outs[0], lams[0], None)?;
            let carried = fresh(&mut types, g.ty(m.input).clone());
            let mut body: Vec<(usize, Op)> = m.ops.iter().map(|&i| (i, self.ops()[i].clone())).collect();
            for &(ti, oi) in &m.input_uses {
                body[ti].1.inputs[oi] = carried;
            }
            body.sort_by_key(|(i, _)| *i);
            let mut seg0 = m.ops.clone();
            seg0.sort_unstable();
            (m.input, seg0, carried, body)
        } else {
            let init = self.single_step_input(outs[0], lams[0])?;
            let seg0 = self.dependent_cone(&[outs[0], lams[0]], init)?;
            let carried = fresh(&mut types, g.ty(init).clone());
            let body = (seg0.iter())
                .map(|&i| {
                    let mut op = self.ops()[i].clone();
                    op.inputs.iter_mut().filter(|v| **v == init).for_each(|v| *v = carried);
                    (i, op)
                })
                .collect();
            (init, seg0, carried, body)
        };
        if g.ty(init) != g.ty(outs[0]) {
            return Err(format!(
                "the loop's initial value {} has type {} but step 0's output {} has {}",
                self.describe(init),
                g.ty(init),
                outs[0],
                g.ty(outs[0])
            ));
        }
        let mut layers = Vec::new();
        for (i, op) in &body {
            match &op.kind {
                OpKind::Loop(_) | OpKind::ExitSelect { .. } => {
                    return Err(format!(
                        "step 0 contains `{}`: a loop step cannot hold a loop or an exit_select",
                        show(&self.ops()[*i])
                    ));
                }
                OpKind::Attention(a) => layers.push((*i, a.layer)),
                _ => {}
            }
        }
        let l = layers.len();
        if let Some(&(i, layer)) = layers.iter().find(|(_, layer)| *layer >= l) {
            return Err(format!(
                "step 0's `{}` uses KV layer {layer}, but step 0 has {l} attention ops: its layers must be 0..{l} \
                 (layer i of step r uses r*L + i)",
                show(&self.ops()[i])
            ));
        }

        // Every later step must match the body, with attention layers r*L + i.
        let template = Segment {
            origin: body.iter().map(|(i, _)| *i).collect(),
            ops: body.iter().map(|(_, op)| op.clone()).collect(),
            input: carried,
            out: outs[0],
            lam: lams[0],
            step: 0,
        };
        let mut owner: HashMap<usize, usize> = seg0.iter().map(|&i| (i, 0)).collect();
        for r in 1..steps {
            let m = self.match_step(&template, r, outs[r], lams[r], Some(outs[r - 1]))?;
            for (ti, &si) in m.ops.iter().enumerate() {
                if let (OpKind::Attention(a), OpKind::Attention(b)) = (&template.ops[ti].kind, &self.ops()[si].kind)
                    && b.layer != r * l + a.layer
                {
                    return Err(format!(
                        "step {r}'s `{}` uses KV layer {}, but it is layer {} of the step, so it \
                         must use {r}*{l} + {} = {}",
                        show(&self.ops()[si]),
                        b.layer,
                        a.layer,
                        a.layer,
                        r * l + a.layer
                    ));
                }
                if let Some(prev) = owner.insert(si, r) {
                    return Err(format!(
                        "`{}` belongs to both step {prev} and step {r}",
                        show(&self.ops()[si])
                    ));
                }
            }
        }
        if let Some(&(i, _)) = self.def.get(&init)
            && let Some(r) = owner.get(&i)
        {
            return Err(format!(
                "the loop's initial value {} is computed inside step {r}",
                self.describe(init)
            ));
        }

        // What is removed must not be read by anything that stays.
        let mut removed: HashMap<ValueId, usize> = HashMap::new();
        for (&i, &r) in &owner {
            removed.extend(self.ops()[i].results.iter().map(|&v| (v, r)));
        }
        let body_values: HashSet<ValueId> = body.iter().flat_map(|(_, op)| op.results.iter().copied()).collect();
        for (_, op) in &body {
            for &v in &op.inputs {
                if let Some(r) = removed.get(&v)
                    && !body_values.contains(&v)
                {
                    return Err(format!(
                        "step 0 reads {}, which is computed in step {r}",
                        self.describe(v)
                    ));
                }
            }
        }
        let mut read_by_removed: HashSet<ValueId> = sel.inputs.iter().copied().collect();
        let mut top = Vec::with_capacity(self.ops().len());
        for (i, op) in self.ops().iter().enumerate() {
            if i == e {
                top.push(Op {
                    results: sel.results.clone(),
                    kind: OpKind::Loop(Box::new(Loop {
                        steps,
                        policy,
                        body: Block {
                            args: vec![step_arg, carried],
                            ops: body.iter().map(|(_, op)| op.clone()).collect(),
                            term: Terminator::Yield {
                                next: vec![outs[0]],
                                out: outs[0],
                                exit: Some(lams[0]),
                            },
                        },
                    })),
                    inputs: vec![init],
                });
                continue;
            }
            if owner.contains_key(&i) {
                read_by_removed.extend(op.inputs.iter().copied());
                continue;
            }
            if let Some((v, r)) = op.inputs.iter().find_map(|v| removed.get(v).map(|r| (v, r))) {
                return Err(format!(
                    "`{}` reads {v}, computed inside step {r}, which the loop would hide",
                    show(op)
                ));
            }
            top.push(op.clone());
        }
        let Terminator::Return(rets) = &g.body.term else {
            return Err("the top block does not end in return".into());
        };
        if let Some((v, r)) = rets.iter().find_map(|v| removed.get(v).map(|r| (v, r))) {
            return Err(format!(
                "the graph returns {v}, computed inside step {r}, which the loop would hide"
            ));
        }
        // Weights that only the removed steps read (a tracer's per-use copies) go too.
        let mut used: HashSet<ValueId> = rets.iter().copied().collect();
        for op in &top {
            used.extend(op.inputs.iter().copied());
            if let OpKind::Loop(lp) = &op.kind {
                used.extend(lp.body.ops.iter().flat_map(|o| o.inputs.iter().copied()));
            }
        }
        top.retain(|op| {
            !(matches!(op.kind, OpKind::Weight { .. })
                && read_by_removed.contains(&op.result())
                && !used.contains(&op.result()))
        });
        let out = Graph {
            name: g.name.clone(),
            types,
            body: Block {
                args: g.body.args.clone(),
                ops: top,
                term: g.body.term.clone(),
            },
        };
        Ok(out.canonicalize())
    }
}

/// Same op kind and attributes; attention layers are checked separately.
fn same_kind(a: &OpKind, b: &OpKind) -> bool {
    match (a, b) {
        (OpKind::Attention(x), OpKind::Attention(y)) => {
            (x.heads, x.kv_heads, x.head_dim) == (y.heads, y.kv_heads, y.head_dim)
        }
        (OpKind::Loop(_), _) | (_, OpKind::Loop(_)) => false,
        _ => a == b,
    }
}

/// One op as a line of the text form, without its type: `%5 = linear(%3, %4)`.
fn show(op: &Op) -> String {
    let results: Vec<String> = op.results.iter().map(|v| v.to_string()).collect();
    let mut s = format!("{} = {}", results.join(", "), op.kind.name());
    if let OpKind::Weight { name } = &op.kind {
        s.push_str(&format!(" \"{name}\""));
    } else {
        let inputs: Vec<String> = op.inputs.iter().map(|v| v.to_string()).collect();
        s.push_str(&format!("({})", inputs.join(", ")));
    }
    let attrs = match &op.kind {
        OpKind::Loop(_) => vec![],
        k => ouroc_ir::print::attrs(k),
    };
    if !attrs.is_empty() {
        let a: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        s.push_str(&format!(" {{{}}}", a.join(", ")));
    }
    s
}
