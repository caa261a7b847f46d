//! Fusion across the loop boundary by loop rotation.
//!
//! When the body's first use of a carried value `c` is its input norm
//! `n = rms_norm(c, w)` (or `rms_scale(c)` once the weight is folded), the
//! loop carries `n` as well:
//!
//! - a new carried value with initial value `norm(init)`, computed before
//!   the loop;
//! - `n` in the body becomes the new block argument;
//! - the norm of the yielded next value `y` is computed at the end of the
//!   step, where it can fuse with the step's own end: if `y` is result 0 of
//!   a `step_end {next = "none"}` with the same eps, that op is upgraded to
//!   `next = "scale"` (for `rms_scale`) or `"norm"` (taking `w` as its
//!   `next_w` operand) and its result 2 is yielded, so the final norm, the
//!   exit gate and the next step's input norm are one op; otherwise (the
//!   imported graph: `rms_norm` + `linear` + `sigmoid`) a separate norm op
//!   is placed right after `y`'s definition.
//!
//! Cost: the initial norm runs once per token before the loop, and the last
//! step computes a next-step norm nobody reads. With the `step_end` upgrade
//! R separate norms become 1 (kernels per token fall by R - 1); on the
//! imported form the count rises by one (the norm moves next to the step
//! end, for a later fusion), so by default the pass rotates only where the
//! upgrade applies; [`Rotate::always`] rotates the imported form too.

use crate::manager::{Pass, PassError};
use crate::ssa::{defs, fresh, substitute};
use ouroc_ir::graph::NextNorm;
use ouroc_ir::{Graph, Op, OpKind, Terminator, ValueId};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, Default)]
pub struct Rotate {
    /// Rotate wherever the pattern applies, also where the next-step norm
    /// stays a separate op (one more kernel per token). Off (the default):
    /// only where it fuses into a `step_end`.
    pub always: bool,
}

impl Rotate {
    /// Rotate only where the norm fuses into a `step_end` (never adds a
    /// kernel): the pipeline's choice.
    pub fn new() -> Rotate {
        Rotate { always: false }
    }

    /// Rotate wherever the pattern applies (the imported form too).
    pub fn always() -> Rotate {
        Rotate { always: true }
    }
}

impl Pass for Rotate {
    fn name(&self) -> &'static str {
        "rotate"
    }

    fn description(&self) -> &'static str {
        "carry the next step's input norm across the loop boundary (fused into step_end when possible)"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(rotate(g, !self.always))
    }
}

/// The norm of a carried value that rotation moves: its kind and weight.
#[derive(Clone)]
struct Norm {
    kind: OpKind,
    weight: Option<ValueId>,
}

impl Norm {
    fn inputs(&self, x: ValueId) -> Vec<ValueId> {
        std::iter::once(x).chain(self.weight).collect()
    }
}

pub fn rotate(g: &Graph, fused_only: bool) -> Graph {
    let mut g = g.clone();
    let loops = crate::ssa::loop_indices(&g).len();
    for j in 0..loops {
        // Indices move as initial norms are inserted before loops.
        let li = crate::ssa::loop_indices(&g)[j];
        let carried = match &g.body.ops[li].kind {
            OpKind::Loop(l) => l.body.args.len() - 1,
            _ => unreachable!(),
        };
        let mut li = li;
        for i in 0..carried {
            if rotate_one(&mut g, li, i, fused_only) {
                li += 1;
            }
        }
    }
    g.canonicalize()
}

/// Rotate carried value `i` of the loop at top-level index `li`. Returns
/// whether it did (then the loop moved one op down, after its initial norm).
fn rotate_one(g: &mut Graph, li: usize, i: usize, fused_only: bool) -> bool {
    let mut loop_op = g.body.ops[li].clone();
    let OpKind::Loop(l) = &mut loop_op.kind else {
        unreachable!()
    };
    let body = &mut l.body;
    let inner = defs(body);
    let arg = body.args[1 + i];
    // The first use of the carried value must be its norm, with a weight
    // from outside the loop.
    let Some(k) = body.ops.iter().position(|op| op.inputs.contains(&arg)) else {
        return false;
    };
    let nop = &body.ops[k];
    let norm = match nop.kind {
        OpKind::RmsNorm { .. } if nop.inputs[0] == arg && !inner.contains(&nop.inputs[1]) => Norm {
            kind: nop.kind.clone(),
            weight: Some(nop.inputs[1]),
        },
        OpKind::RmsScale { .. } if nop.inputs[0] == arg => Norm {
            kind: nop.kind.clone(),
            weight: None,
        },
        _ => return false,
    };
    let n = nop.result();
    let eps = match norm.kind {
        OpKind::RmsNorm { eps } | OpKind::RmsScale { eps } => eps,
        _ => unreachable!(),
    };
    let Terminator::Yield { next, .. } = &body.term else {
        unreachable!("verified: a loop body ends in yield")
    };
    let y = next[i];
    // Where y comes from: a step_end that can take the norm, or another op.
    let def = body.ops.iter().position(|op| op.results.contains(&y));
    let fusable = def.filter(|&d| {
        let op = &body.ops[d];
        matches!(op.kind, OpKind::StepEnd { eps: e, next: NextNorm::None, .. } if e == eps) && op.results[0] == y
    });
    if fused_only && fusable.is_none() {
        return false;
    }
    let ty = g.ty(n).clone();
    let new_arg = fresh(g, ty.clone());
    let init = fresh(g, ty.clone());
    let OpKind::Loop(l) = &mut loop_op.kind else {
        unreachable!()
    };
    let body = &mut l.body;
    // The body: n is the new argument.
    body.ops.remove(k);
    body.args.push(new_arg);
    substitute(body, &HashMap::from([(n, new_arg)]));
    let (def, fusable) = (
        def.map(|d| if d > k { d - 1 } else { d }),
        fusable.map(|d| if d > k { d - 1 } else { d }),
    );
    // The end of the step: the norm of the next value.
    let next_norm = if let Some(d) = fusable {
        let op = &mut body.ops[d];
        let r2 = fresh(g, ty.clone());
        let gate = matches!(op.kind, OpKind::StepEnd { gate: true, .. });
        op.kind = OpKind::StepEnd {
            gate,
            eps,
            next: if norm.weight.is_some() {
                NextNorm::Norm
            } else {
                NextNorm::Scale
            },
        };
        op.inputs.extend(norm.weight);
        op.results.push(r2);
        r2
    } else {
        let Terminator::Yield { next, .. } = &body.term else {
            unreachable!()
        };
        // Read y after the substitution: it may have been n itself.
        let y = next[i];
        let r = fresh(g, ty.clone());
        let at = if y == new_arg { 0 } else { def.map_or(0, |d| d + 1) };
        body.ops.insert(
            at,
            Op {
                results: vec![r],
                kind: norm.kind.clone(),
                inputs: norm.inputs(y),
            },
        );
        r
    };
    if let Terminator::Yield { next, .. } = &mut body.term {
        next.push(next_norm);
    }
    // Before the loop: the norm of the initial value.
    loop_op.inputs.push(init);
    let init_op = Op {
        results: vec![init],
        kind: norm.kind.clone(),
        inputs: norm.inputs(loop_op.inputs[i]),
    };
    g.body.ops[li] = loop_op;
    g.body.ops.insert(li, init_op);
    true
}
