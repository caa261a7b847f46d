//! Small helpers for editing SSA blocks, shared by the loop passes, CSE,
//! DCE and memory planning: fresh values, use rewriting, use counts, the
//! values a block defines, and which values are load-time constants.

use ouroc_ir::{Block, Graph, OpKind, Terminator, Type, ValueId};
use std::collections::{HashMap, HashSet};

/// A new value of type `ty`.
pub fn fresh(g: &mut Graph, ty: Type) -> ValueId {
    g.types.push(ty);
    ValueId((g.types.len() - 1) as u32)
}

/// Every value a terminator reads.
pub fn term_uses(t: &Terminator) -> Vec<ValueId> {
    match t {
        Terminator::Return(vs) => vs.clone(),
        Terminator::Yield { next, out, exit } => next.iter().copied().chain([*out]).chain(*exit).collect(),
    }
}

/// Rewrite every use of a key of `map` in `b` (op inputs, nested bodies and
/// terminators) to its value. Definitions are left alone.
pub fn substitute(b: &mut Block, map: &HashMap<ValueId, ValueId>) {
    if map.is_empty() {
        return;
    }
    let m = |v: &mut ValueId| {
        if let Some(&to) = map.get(v) {
            *v = to;
        }
    };
    for op in &mut b.ops {
        op.inputs.iter_mut().for_each(m);
        if let OpKind::Loop(l) = &mut op.kind {
            substitute(&mut l.body, map);
        }
    }
    substitute_term(&mut b.term, map);
}

/// Rewrite the uses of a terminator.
pub fn substitute_term(t: &mut Terminator, map: &HashMap<ValueId, ValueId>) {
    let m = |v: &mut ValueId| {
        if let Some(&to) = map.get(v) {
            *v = to;
        }
    };
    match t {
        Terminator::Return(vs) => vs.iter_mut().for_each(m),
        Terminator::Yield { next, out, exit } => {
            next.iter_mut().for_each(m);
            m(out);
            exit.iter_mut().for_each(m);
        }
    }
}

/// Number of uses of each value in `b`, nested bodies and terminators included.
pub fn use_counts(b: &Block) -> HashMap<ValueId, usize> {
    fn visit(b: &Block, n: &mut HashMap<ValueId, usize>) {
        for op in &b.ops {
            for &i in &op.inputs {
                *n.entry(i).or_default() += 1;
            }
            if let OpKind::Loop(l) = &op.kind {
                visit(&l.body, n);
            }
        }
        for v in term_uses(&b.term) {
            *n.entry(v).or_default() += 1;
        }
    }
    let mut n = HashMap::new();
    visit(b, &mut n);
    n
}

/// The values defined in `b`: its arguments and every op result, nested
/// bodies included.
pub fn defs(b: &Block) -> HashSet<ValueId> {
    fn visit(b: &Block, d: &mut HashSet<ValueId>) {
        d.extend(b.args.iter().copied());
        for op in &b.ops {
            d.extend(op.results.iter().copied());
            if let OpKind::Loop(l) = &op.kind {
                visit(&l.body, d);
            }
        }
    }
    let mut d = HashSet::new();
    visit(b, &mut d);
    d
}

/// Whether an op of this kind may be removed, merged or moved when its
/// results are computed elsewhere: everything but attention (it writes its
/// KV-cache slot) and loops (they contain attention).
pub fn is_pure(kind: &OpKind) -> bool {
    !matches!(kind, OpKind::Attention(_) | OpKind::Loop(_))
}

/// Values computed from weights only (weights, folded and merged weights):
/// done once at load, never per token. The same rule as `Stats`: RoPE
/// tables and attention depend on positions and are never constants.
pub fn constants(g: &Graph) -> HashSet<ValueId> {
    fn visit(b: &Block, c: &mut HashSet<ValueId>) {
        for op in &b.ops {
            match &op.kind {
                OpKind::Weight { .. } => {
                    c.insert(op.result());
                }
                OpKind::Loop(l) => visit(&l.body, c),
                OpKind::RopeCos(_) | OpKind::RopeSin(_) | OpKind::Attention(_) | OpKind::ExitSelect { .. } => {}
                _ => {
                    if op.inputs.iter().all(|i| c.contains(i)) {
                        c.extend(op.results.iter().copied());
                    }
                }
            }
        }
    }
    let mut c = HashSet::new();
    visit(&g.body, &mut c);
    c
}

/// Indices of the loop ops of the top block.
pub fn loop_indices(g: &Graph) -> Vec<usize> {
    g.body
        .ops
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op.kind, OpKind::Loop(_)))
        .map(|(i, _)| i)
        .collect()
}
