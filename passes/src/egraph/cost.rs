//! The cost model: what one generated token pays for an e-node, in the
//! spirit of Tensat's `optimize.rs` (a per-node cost from the operand and
//! result shapes, summed over the extracted graph).
//!
//! Per token means a decode step: batch = seq = 1, every loop step run. A
//! kernel pays one launch plus the bytes it moves: the weights it reads
//! (a linear its whole matrix, an embedding one row), the activations it
//! reads and the results it writes. Ops in a loop body pay once per step
//! (`trip`). Weight transforms (ops computed from weights only: folded norm
//! weights, concatenated projections) are done once at load and cost about
//! nothing; views (`slice`) move nothing. The KV-cache reads of attention,
//! which grow with the context and are the same for every equivalent form,
//! are left out, as in [`crate::Stats`].

use super::lang::{EG, Node, impure, infer_node, ir_kind};
use egg::Id;
use ouroc_ir::{OpKind, Type};

/// Price of one byte moved (read or written) per token: the unit of cost.
pub const BYTE_COST: u64 = 1;

/// Price of one kernel launch, in bytes moved ([`BYTE_COST`] units).
///
/// A launch (on the GPU: launch latency plus the tail of the previous
/// kernel, ~3-5 us; on the CPU: a parallel-for dispatch and its barrier,
/// ~1-2 us) costs about as much time as moving 16-64 KiB through a CPU's
/// memory system (~20-40 GB/s per socket share) and far more on an HBM GPU.
/// LAUNCH_COST : BYTE_COST = 32768 : 1 makes a launch worth eight
/// hidden-size activations of Ouro-1.4B (2048 x bf16 = 4 KiB each) but
/// far less than one projection's weights (2048 x 2048 x bf16 = 8 MiB), so
/// weight traffic dominates where it differs and launches decide between
/// forms that move about the same bytes.
pub const LAUNCH_COST: u64 = 32 * 1024;

/// Price of an op that launches nothing and moves nothing per token (a
/// view, a load-time weight transform): a tie-breaker that prefers fewer
/// ops when everything else is equal.
pub const OP_COST: u64 = 1;

pub use crate::stats::bytes;

/// Cost of one e-node per token, not counting its operands' own costs;
/// None when the node cannot be extracted (it does not type, or it
/// projects a result its tuple does not have). `trip` is how many times
/// per token the region runs (the loop's steps for a body).
pub fn node_cost(eg: &EG, n: &Node, trip: u64) -> Option<u64> {
    let owned: (OpKind, Vec<Id>, Vec<Type>);
    let (kind, ins, results): (&OpKind, &[Id], &[Type]) = match n {
        Node::Leaf(_) => return Some(0),
        Node::Get([i, t]) => {
            let i = eg[*i].data.int()?;
            return (i < eg[*t].data.types.len()).then_some(0);
        }
        Node::Opaque(k, c) => {
            let op = &eg.analysis.opaque[k.0 as usize];
            (&op.kind, c, &op.types)
        }
        _ => {
            let (kind, ins) = ir_kind(eg, n)?;
            let results = infer_node(eg, &kind, &ins)?;
            owned = (kind, ins, results);
            (&owned.0, &owned.1, &owned.2)
        }
    };
    let constant = !impure(kind) && ins.iter().all(|i| eg[*i].data.constant);
    if constant || matches!(kind, OpKind::Slice { .. }) {
        return Some(OP_COST);
    }
    let mut moved = 0;
    for (pos, i) in ins.iter().enumerate() {
        let t = eg[*i].data.ty()?;
        moved += match kind {
            // One row of the table per token.
            OpKind::Embedding if pos == 0 => bytes(t) / t.shape[0].fixed().unwrap_or(1).max(1) as u64,
            _ => bytes(t),
        };
    }
    moved += results.iter().map(bytes).sum::<u64>();
    Some(trip * (LAUNCH_COST + BYTE_COST * moved) + OP_COST)
}
