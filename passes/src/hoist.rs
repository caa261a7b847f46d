//! Loop-invariant code motion.
//!
//! A body op whose operands are all defined outside the loop body computes
//! the same value at every step: it moves before the loop (in body order,
//! so the moved ops stay in SSA order). That covers weight transforms
//! (`scale_cols`, `concat` of weights), RoPE tables an importer put inside
//! the loop, and weights declared in the body. Attention never moves: its
//! KV-cache slot depends on the step. Ops that read the step index or a
//! carried value are not invariant by the rule itself.

use crate::manager::{Pass, PassError};
use crate::ssa::is_pure;
use ouroc_ir::{Graph, OpKind, ValueId};
use std::collections::HashSet;

pub struct Hoist;

impl Pass for Hoist {
    fn name(&self) -> &'static str {
        "hoist"
    }

    fn description(&self) -> &'static str {
        "move loop-invariant work (weight transforms, RoPE tables) before the loop"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(hoist(g))
    }
}

pub fn hoist(g: &Graph) -> Graph {
    let mut g = g.clone();
    let mut top = Vec::with_capacity(g.body.ops.len());
    for mut op in std::mem::take(&mut g.body.ops) {
        if let OpKind::Loop(l) = &mut op.kind {
            // Values defined in the body so far by ops that stay in it.
            let mut inner: HashSet<ValueId> = l.body.args.iter().copied().collect();
            let mut stay = Vec::with_capacity(l.body.ops.len());
            for bop in std::mem::take(&mut l.body.ops) {
                let invariant = is_pure(&bop.kind) && bop.inputs.iter().all(|i| !inner.contains(i));
                if invariant {
                    top.push(bop);
                } else {
                    inner.extend(bop.results.iter().copied());
                    stay.push(bop);
                }
            }
            l.body.ops = stay;
        }
        top.push(op);
    }
    g.body.ops = top;
    g.canonicalize()
}
