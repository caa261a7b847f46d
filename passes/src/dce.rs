//! Dead-code elimination.
//!
//! Removes ops whose results nothing uses (unused weights included),
//! carried values of a loop that nothing in the loop's output, exit signal
//! or attention reads, and loops that compute nothing used (only when their
//! body has no attention). Attention ops are always kept: they write the
//! KV-cache slot that later tokens read.
//!
//! Multi-result ops lose the results nothing uses where the IR has a
//! smaller form: a `step_end` whose next-step norm is unused drops it
//! (`next = "none"`), one whose exit signal is unused too becomes the plain
//! `rms_norm` (the gate dies with it), and an `add_rms_norm` whose norm is
//! unused becomes `add`.

use crate::manager::{Pass, PassError};
use crate::ssa::term_uses;
use ouroc_ir::graph::NextNorm;
use ouroc_ir::{Block, Graph, Op, OpKind, Terminator, ValueId};
use std::collections::HashSet;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn description(&self) -> &'static str {
        "remove unused ops, weights, results and carried values (attention is kept)"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(dce(g))
    }
}

/// The graph without dead code, canonically numbered.
pub fn dce(g: &Graph) -> Graph {
    let mut g = g.clone();
    let mut live: HashSet<ValueId> = term_uses(&g.body.term).into_iter().collect();
    prune(&mut g.body, &mut live);
    g.canonicalize()
}

/// Whether `b` (or a nested body) contains an attention op.
fn has_attention(b: &Block) -> bool {
    b.ops.iter().any(|op| match &op.kind {
        OpKind::Attention(_) => true,
        OpKind::Loop(l) => has_attention(&l.body),
        _ => false,
    })
}

/// Remove the dead ops of `b`, given the values `live` after it (the
/// terminator's uses must already be in it). On return `live` also holds
/// every value the kept ops read.
fn prune(b: &mut Block, live: &mut HashSet<ValueId>) {
    let mut kept = Vec::with_capacity(b.ops.len());
    for mut op in std::mem::take(&mut b.ops).into_iter().rev() {
        let used = op.results.iter().any(|r| live.contains(r));
        let keep = match &op.kind {
            OpKind::Attention(_) => true,
            OpKind::Loop(l) => used || has_attention(&l.body),
            _ => used,
        };
        if !keep {
            continue;
        }
        if let OpKind::Loop(_) = op.kind {
            prune_loop(&mut op, live);
        } else {
            shrink(&mut op, live);
            live.extend(op.inputs.iter().copied());
        }
        kept.push(op);
    }
    kept.reverse();
    b.ops = kept;
}

/// Prune a loop's body and its dead carried values; add what the loop reads
/// from outside (initial values of live carried values, free uses of the
/// body) to `live`.
fn prune_loop(op: &mut Op, live: &mut HashSet<ValueId>) {
    let OpKind::Loop(l) = &mut op.kind else {
        unreachable!("prune_loop on a loop op")
    };
    let Terminator::Yield { next, out, exit } = l.body.term.clone() else {
        unreachable!("verified: a loop body ends in yield")
    };
    let n = next.len();
    // Carried value i is live when something live in the body reads its
    // block argument; its next value is then live too. Grow to a fixed point.
    let mut carried = vec![false; n];
    let body_live = loop {
        let mut roots: HashSet<ValueId> = [out].into_iter().chain(exit).collect();
        roots.extend((0..n).filter(|&i| carried[i]).map(|i| next[i]));
        let mut trial = l.body.clone();
        prune(&mut trial, &mut roots);
        let grown: Vec<bool> = (0..n)
            .map(|i| carried[i] || roots.contains(&l.body.args[1 + i]))
            .collect();
        if grown == carried {
            break roots;
        }
        carried = grown;
    };
    let mut roots: HashSet<ValueId> = [out].into_iter().chain(exit).collect();
    roots.extend((0..n).filter(|&i| carried[i]).map(|i| next[i]));
    prune(&mut l.body, &mut roots);
    debug_assert_eq!(roots, body_live);
    // Drop the dead carried values (argument, initial value, next value).
    let step = l.body.args[0];
    let args: Vec<ValueId> = l.body.args[1..].to_vec();
    l.body.args = std::iter::once(step)
        .chain((0..n).filter(|&i| carried[i]).map(|i| args[i]))
        .collect();
    op.inputs = (0..n).filter(|&i| carried[i]).map(|i| op.inputs[i]).collect();
    l.body.term = Terminator::Yield {
        next: (0..n).filter(|&i| carried[i]).map(|i| next[i]).collect(),
        out,
        exit,
    };
    live.extend(op.inputs.iter().copied());
    // Values from outside the body that it reads (weights, RoPE tables).
    let inner = crate::ssa::defs(&l.body);
    live.extend(roots.into_iter().filter(|v| !inner.contains(v)));
}

/// Drop unused results of multi-result ops where a smaller form exists.
fn shrink(op: &mut Op, live: &HashSet<ValueId>) {
    match op.kind {
        OpKind::StepEnd {
            eps,
            mut next,
            mut gate,
        } => {
            // Results are [hn, lambda if gate, next norm if next]; operands
            // [h, norm_w, gate_w, gate_b if gate, next_w if next = norm].
            if next != NextNorm::None && !live.contains(op.results.last().expect("step_end has results")) {
                op.results.pop();
                if next == NextNorm::Norm {
                    op.inputs.pop();
                }
                next = NextNorm::None;
            }
            if gate && !live.contains(&op.results[1]) {
                // The exit signal is never read (policy-dce removed it): do not compute the gate.
                op.results.remove(1);
                op.inputs.drain(2..4);
                gate = false;
            }
            op.kind = if !gate && next == NextNorm::None {
                OpKind::RmsNorm { eps }
            } else {
                OpKind::StepEnd { eps, next, gate }
            };
        }
        OpKind::AddRmsNorm { .. } if !live.contains(&op.results[1]) => {
            op.kind = OpKind::Add;
            op.results.truncate(1);
            op.inputs.truncate(2);
        }
        _ => {}
    }
}
