//! Common-subexpression elimination.
//!
//! Two ops of the same kind with the same attributes, the same operands and
//! the same result types compute the same values: the later one is removed
//! and its uses read the earlier one's results. Weights merge when they name
//! the same tensor with the same type. Attention (it writes a KV-cache
//! slot) and loops are never merged. Scoping is by block: a loop body sees
//! the ops of the blocks around it that come before the loop (so a body op
//! equal to an outer one reuses it), but what the body defines stays in it.

use crate::manager::{Pass, PassError};
use crate::ssa::{is_pure, substitute_term};
use ouroc_ir::print::attrs;
use ouroc_ir::{Block, Graph, OpKind, ValueId};
use std::collections::HashMap;

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn description(&self) -> &'static str {
        "merge ops with the same kind, attributes and operands (never attention)"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(cse(g))
    }
}

pub fn cse(g: &Graph) -> Graph {
    let mut g = g.clone();
    let mut body = g.body.clone();
    block(&g, &mut body, &mut HashMap::new(), &mut HashMap::new());
    g.body = body;
    g.canonicalize()
}

/// What identifies an op's computation: name, attributes (with a weight's
/// tensor name), operands and result types.
fn key(g: &Graph, kind: &OpKind, inputs: &[ValueId], results: &[ValueId]) -> String {
    let mut k = kind.name().to_string();
    if let OpKind::Weight { name } = kind {
        k.push_str(&format!(" {name:?}"));
    }
    for (a, v) in attrs(kind) {
        k.push_str(&format!(" {a}={v}"));
    }
    k.push_str(" (");
    for i in inputs {
        k.push_str(&format!("{i},"));
    }
    k.push_str(") :");
    for r in results {
        k.push_str(&format!(" {}", g.ty(*r)));
    }
    k
}

/// `table`: keys of the ops visible here -> their results. `subst`: removed
/// results -> the results that replace them.
fn block(g: &Graph, b: &mut Block, table: &mut HashMap<String, Vec<ValueId>>, subst: &mut HashMap<ValueId, ValueId>) {
    let mut kept = Vec::with_capacity(b.ops.len());
    for mut op in std::mem::take(&mut b.ops) {
        for i in &mut op.inputs {
            if let Some(&to) = subst.get(i) {
                *i = to;
            }
        }
        if let OpKind::Loop(l) = &mut op.kind {
            // The body sees a copy of the table: its entries stay inside.
            let mut inner = table.clone();
            block(g, &mut l.body, &mut inner, subst);
            kept.push(op);
            continue;
        }
        if is_pure(&op.kind) && !matches!(op.kind, OpKind::ExitSelect { .. }) {
            let k = key(g, &op.kind, &op.inputs, &op.results);
            if let Some(prev) = table.get(&k) {
                for (r, p) in op.results.iter().zip(prev) {
                    subst.insert(*r, *p);
                }
                continue;
            }
            table.insert(k, op.results.clone());
        }
        kept.push(op);
    }
    b.ops = kept;
    substitute_term(&mut b.term, subst);
}
