//! The pass `split-silu`: every `silu(x)` becomes `mul(x, sigmoid(x))`,
//! in the top block and in loop bodies.
//!
//! A pass is a pure function from a verified graph to a verified graph
//! computing the same outputs ([`ouroc_passes::Pass`]); the pass manager
//! verifies what it returns. New values get fresh ids at the end of
//! `types`; `canonicalize` renumbers them in textual order.

use ouroc_ir::{Block, Graph, Op, OpKind, ValueId};
use ouroc_passes::{Pass, PassError};

pub struct SplitSilu;

pub const NAME: &str = "split-silu";

impl Pass for SplitSilu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "rewrite silu(x) as mul(x, sigmoid(x)) (an example pass from outside the passes crate)"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        let mut out = g.clone();
        let mut body = std::mem::replace(
            &mut out.body,
            Block {
                args: vec![],
                ops: vec![],
                term: ouroc_ir::Terminator::Return(vec![]),
            },
        );
        split(&mut body, &mut out.types);
        out.body = body;
        Ok(out.canonicalize())
    }
}

/// How many ops of `g` satisfy `is`, loop bodies included.
pub fn count(g: &Graph, is: fn(&OpKind) -> bool) -> usize {
    g.walk().iter().filter(|op| is(&op.kind)).count()
}

fn split(b: &mut Block, types: &mut Vec<ouroc_ir::Type>) {
    let mut ops = Vec::with_capacity(b.ops.len());
    for mut op in std::mem::take(&mut b.ops) {
        match &mut op.kind {
            OpKind::Loop(l) => split(&mut l.body, types),
            OpKind::Silu => {
                let x = op.inputs[0];
                let ty = types[op.result().index()].clone();
                let s = ValueId(types.len() as u32);
                types.push(ty);
                ops.push(Op {
                    results: vec![s],
                    kind: OpKind::Sigmoid,
                    inputs: vec![x],
                });
                // The product keeps the silu's result id, so its users are unchanged.
                op = Op {
                    results: op.results,
                    kind: OpKind::Mul,
                    inputs: vec![x, s],
                };
            }
            _ => {}
        }
        ops.push(op);
    }
    b.ops = ops;
}
