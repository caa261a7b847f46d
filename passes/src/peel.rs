//! Peeling the last step of a loop.
//!
//! What the IR can express: a loop returns only the output its policy
//! selects, not its final carried values or every step's output. So the
//! valid case is a loop whose policy picks the last step (`last`, or
//! `step:K` with K = steps - 1) and whose carried values at the start of
//! the last step can be recomputed from the loop's result `h`: each yielded
//! next value is the step output itself, a value from outside the loop, or
//! a norm of the output (`rms_norm(out, w)`, `rms_scale(out)`, result 2 of
//! a `step_end` whose result 0 is the output). Then the loop runs R - 1
//! steps (policy `last`), the last step's carried values are recomputed
//! from `h` and a copy of the body computes the last step after the loop;
//! its next values and its exit signal are dead and DCE removes them.
//!
//! KV slots: attention outside a loop uses slot (0, layer), so the peeled
//! copy's attention ops use layer ids shifted by (R - 1) * L (L = the
//! body's layer count), the unrolled numbering `r * L + i`: the peeled
//! graph's KV cache keys differ from the rolled graph's (R - 1, i), which
//! is fine since a graph's cache is its own.
//!
//! Profit: on the rolled Ouro graph, peeling removes the last step's exit
//! gate when the policy is `last` and the exit is still yielded (before
//! `policy-dce`). After `rotate`, the last step's next-input norm is dead
//! in the copy but has to be recomputed from `h` for the copy's input
//! (the loop cannot hand out its final carried norm), so nothing is won.
//! By default the pass peels only when the per-token kernel count falls;
//! [`Peel::forced`] always peels when it is valid.

use crate::dce::dce;
use crate::manager::{Pass, PassError};
use crate::ssa::{defs, fresh, substitute, use_counts};
use crate::stats::Stats;
use ouroc_ir::graph::NextNorm;
use ouroc_ir::{Block, ExitPolicy, Graph, Op, OpKind, Terminator, ValueId};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default)]
pub struct Peel {
    /// Peel whenever it is valid, even if it saves nothing.
    pub force: bool,
}

impl Peel {
    /// Peel only where it lowers the kernels per token (the default).
    pub fn new() -> Peel {
        Peel { force: false }
    }

    /// Peel wherever it is valid.
    pub fn forced() -> Peel {
        Peel { force: true }
    }
}

impl Pass for Peel {
    fn name(&self) -> &'static str {
        "peel"
    }

    fn description(&self) -> &'static str {
        "peel the last loop step when the policy picks it and that removes work"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(run_peel(g, self.force))
    }
}

/// Peel every loop where valid (and, unless `force`, profitable).
pub fn run_peel(g: &Graph, force: bool) -> Graph {
    let mut g = g.canonicalize();
    let loops = crate::ssa::loop_indices(&g).len();
    for j in 0..loops {
        let li = crate::ssa::loop_indices(&g)[j];
        let Some(peeled) = peel_last(&g, li) else { continue };
        let peeled = dce(&peeled);
        if force || Stats::of(&peeled).kernels_per_token < Stats::of(&dce(&g)).kernels_per_token {
            g = peeled;
        }
    }
    g
}

/// How the peeled step gets a carried value from the loop's result.
enum Recipe {
    /// The loop's result itself.
    Result,
    /// A value from outside the loop.
    Outer(ValueId),
    /// A norm of the loop's result: kind and weight.
    Norm(OpKind, Option<ValueId>),
}

/// The loop at top-level index `li` with its last step peeled, or None
/// where that is not expressible (see the module docs). Not yet DCE'd.
pub fn peel_last(g: &Graph, li: usize) -> Option<Graph> {
    let op = &g.body.ops[li];
    let OpKind::Loop(l) = &op.kind else { return None };
    let last = match l.policy {
        ExitPolicy::Last => true,
        ExitPolicy::Step(k) => k + 1 == l.steps,
        _ => false,
    };
    if !last || l.steps < 2 {
        return None;
    }
    let body = &l.body;
    // The peeled copy has no step index (the IR has no constants).
    if use_counts(body).contains_key(&body.args[0]) {
        return None;
    }
    let Terminator::Yield { next, out, .. } = &body.term else {
        return None;
    };
    let inner = defs(body);
    let def_of = |v: ValueId| body.ops.iter().find(|o| o.results.contains(&v));
    let mut recipes = Vec::with_capacity(next.len());
    for &y in next {
        let r = if y == *out {
            Recipe::Result
        } else if !inner.contains(&y) {
            Recipe::Outer(y)
        } else {
            let d = def_of(y)?;
            match d.kind {
                OpKind::RmsNorm { .. } if d.inputs[0] == *out && !inner.contains(&d.inputs[1]) => {
                    Recipe::Norm(d.kind.clone(), Some(d.inputs[1]))
                }
                OpKind::RmsScale { .. } if d.inputs[0] == *out => Recipe::Norm(d.kind.clone(), None),
                OpKind::StepEnd { eps, next, .. }
                    if next != NextNorm::None && d.results.last() == Some(&y) && d.results[0] == *out =>
                {
                    match next {
                        NextNorm::Norm => Recipe::Norm(OpKind::RmsNorm { eps }, d.inputs.last().copied()),
                        NextNorm::Scale => Recipe::Norm(OpKind::RmsScale { eps }, None),
                        NextNorm::None => return None,
                    }
                }
                _ => return None,
            }
        };
        recipes.push(r);
    }

    let mut g = g.clone();
    let res = op.result();
    let steps = l.steps;
    // Attention layer ids of the copy: shifted past every slot the loop uses.
    let body_layers = attention_layers(body);
    let per_step = body_layers.iter().max().map_or(0, |m| m + 1);
    // (The body's own layers are below the offset, so checking every layer is enough.)
    let others: Vec<usize> = g
        .walk()
        .into_iter()
        .filter_map(|o| match &o.kind {
            OpKind::Attention(a) => Some(a.layer),
            _ => None,
        })
        .collect();
    let mut offset = (steps - 1) * per_step;
    if body_layers.iter().any(|l| others.contains(&(l + offset))) {
        offset = others.iter().max().map_or(0, |m| m + 1);
    }

    // After the loop: the carried values of the last step, then the copy.
    let mut after = Vec::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for (i, r) in recipes.into_iter().enumerate() {
        let arg = body.args[1 + i];
        let v = match r {
            Recipe::Result => res,
            Recipe::Outer(v) => v,
            Recipe::Norm(kind, w) => {
                let ty = g.ty(arg).clone();
                let v = fresh(&mut g, ty);
                after.push(Op {
                    results: vec![v],
                    kind,
                    inputs: std::iter::once(res).chain(w).collect(),
                });
                v
            }
        };
        map.insert(arg, v);
    }
    for bop in &body.ops {
        let results: Vec<ValueId> = bop
            .results
            .iter()
            .map(|r| {
                let ty = g.ty(*r).clone();
                fresh(&mut g, ty)
            })
            .collect();
        for (a, b) in bop.results.iter().zip(&results) {
            map.insert(*a, *b);
        }
        let kind = match &bop.kind {
            OpKind::Attention(a) => OpKind::Attention(ouroc_ir::Attention {
                layer: a.layer + offset,
                ..*a
            }),
            k => k.clone(),
        };
        after.push(Op {
            results,
            kind,
            inputs: bop.inputs.iter().map(|i| *map.get(i).unwrap_or(i)).collect(),
        });
    }
    let peeled_out = *map.get(out).unwrap_or(out);

    // The loop: one step fewer, policy last.
    let OpKind::Loop(l) = &mut g.body.ops[li].kind else {
        unreachable!()
    };
    l.steps -= 1;
    l.policy = ExitPolicy::Last;
    // What read the loop's result now reads the peeled step's output.
    let mut rest = Block {
        args: vec![],
        ops: g.body.ops.split_off(li + 1),
        term: g.body.term.clone(),
    };
    substitute(&mut rest, &HashMap::from([(res, peeled_out)]));
    g.body.ops.extend(after);
    g.body.ops.extend(rest.ops);
    g.body.term = rest.term;
    Some(g)
}

fn attention_layers(b: &Block) -> Vec<usize> {
    b.ops
        .iter()
        .filter_map(|o| match &o.kind {
            OpKind::Attention(a) => Some(a.layer),
            _ => None,
        })
        .collect()
}
