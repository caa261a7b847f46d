//! Per-token cost statistics of a graph, as a decode step sees it
//! (batch = 1, seq = 1, every loop step run): what the passes are meant to
//! reduce.
//!
//! - a *kernel* is an op that would launch work per token: everything but
//!   weights, views (`slice`) and constants (ops computed only from
//!   weights, such as folded or merged weights: done once at load);
//! - *weight bytes* are the bytes of weights (and constants) each kernel
//!   reads: a linear reads its whole matrix, an embedding one row;
//! - *activation bytes* are the bytes of non-constant operands read and
//!   results written by kernels (the KV cache reads of attention, which
//!   grow with the context, are not included);
//! - a loop body counts `steps` times.

use ouroc_ir::{Block, Graph, OpKind, Type, ValueId};
use std::collections::HashSet;
use std::fmt::Write;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ops outside any loop (weights included).
    pub ops_outside: usize,
    /// Ops in loop bodies (counted once, not per step).
    pub ops_in_loop: usize,
    pub kernels_per_token: usize,
    pub weight_bytes_per_token: u64,
    pub activation_bytes_per_token: u64,
}

impl Stats {
    pub fn of(g: &Graph) -> Stats {
        let mut s = Stats::default();
        let mut constants = HashSet::new();
        visit(g, &g.body, 1, &mut constants, &mut s, false);
        s
    }
}

/// Bytes of a value per token: batch = 1, seq = 1 (the memory plan's rule).
pub fn bytes(t: &Type) -> u64 {
    crate::memplan::value_bytes(t, 1, 1)
}

fn visit(g: &Graph, b: &Block, times: u64, constants: &mut HashSet<ValueId>, s: &mut Stats, in_loop: bool) {
    for op in &b.ops {
        if in_loop {
            s.ops_in_loop += 1;
        } else {
            s.ops_outside += 1;
        }
        match &op.kind {
            OpKind::Weight { .. } => {
                constants.insert(op.result());
                continue;
            }
            OpKind::Loop(l) => {
                visit(g, &l.body, times * l.steps as u64, constants, s, true);
                continue;
            }
            _ => {}
        }
        let position_dependent = matches!(op.kind, OpKind::RopeCos(_) | OpKind::RopeSin(_) | OpKind::Attention(_));
        if !position_dependent && op.inputs.iter().all(|i| constants.contains(i)) {
            // Computed from weights only: once at load, not per token.
            constants.extend(op.results.iter().copied());
            continue;
        }
        if let OpKind::Slice { .. } = op.kind {
            continue; // a view
        }
        s.kernels_per_token += times as usize;
        for (pos, i) in op.inputs.iter().enumerate() {
            let t = g.ty(*i);
            if constants.contains(i) {
                let read = match op.kind {
                    // One row of the table per token.
                    OpKind::Embedding if pos == 0 => bytes(t) / t.shape[0].fixed().unwrap_or(1).max(1) as u64,
                    _ => bytes(t),
                };
                s.weight_bytes_per_token += read * times;
            } else {
                s.activation_bytes_per_token += bytes(t) * times;
            }
        }
        for r in &op.results {
            s.activation_bytes_per_token += bytes(g.ty(*r)) * times;
        }
    }
}

/// The before/after table of a pipeline run: one row for the imported
/// graph, then one per pass.
pub fn table(reports: &[crate::PassReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:>7} {:>8} {:>14} {:>18} {:>16}",
        "pass", "ops", "in loop", "kernels/token", "weight bytes/tok", "act bytes/tok"
    );
    let row = |out: &mut String, name: &str, s: &Stats| {
        let _ = writeln!(
            out,
            "{:<18} {:>7} {:>8} {:>14} {:>18} {:>16}",
            name,
            s.ops_outside + s.ops_in_loop,
            s.ops_in_loop,
            s.kernels_per_token,
            s.weight_bytes_per_token,
            s.activation_bytes_per_token
        );
    };
    if let Some(first) = reports.first() {
        row(&mut out, "(imported)", &first.before);
    }
    for r in reports {
        row(&mut out, r.name, &r.after);
    }
    out
}
