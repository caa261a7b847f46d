//! Remove the work a fixed exit policy never uses.
//!
//! - `last` and `step:K` never read the exit signal: the body yields none,
//!   so the exit gate (and, through DCE, its weights) dies.
//! - `step:K` never uses the steps after K: the loop is truncated to K + 1
//!   steps and its policy becomes `last` (the same choice on K + 1 steps).
//!   The KV slots of the removed steps are then never written, which is
//!   fine: no other step reads them.
//! - then DCE removes carried values and ops nothing uses any more.
//!
//! Threshold and weighted policies read every step's exit signal and are
//! left alone.

use crate::dce::dce;
use crate::manager::{Pass, PassError};
use ouroc_ir::{ExitPolicy, Graph, OpKind, Terminator};

pub struct PolicyDce;

impl Pass for PolicyDce {
    fn name(&self) -> &'static str {
        "policy-dce"
    }

    fn description(&self) -> &'static str {
        "drop the exit gate under last/step:K, truncate the loop after step K, then DCE"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        Ok(policy_dce(g))
    }
}

pub fn policy_dce(g: &Graph) -> Graph {
    let mut g = g.clone();
    for op in &mut g.body.ops {
        let OpKind::Loop(l) = &mut op.kind else { continue };
        let fixed = match l.policy {
            ExitPolicy::Last => true,
            ExitPolicy::Step(k) => {
                l.steps = l.steps.min(k + 1);
                l.policy = ExitPolicy::Last;
                true
            }
            ExitPolicy::Threshold { .. } | ExitPolicy::Weighted => false,
        };
        if fixed && let Terminator::Yield { exit, .. } = &mut l.body.term {
            *exit = None;
        }
    }
    dce(&g)
}
