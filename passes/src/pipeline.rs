//! The default optimisation pipeline, in order. Each pass's place is
//! chosen by what it needs:
//! 1. `reroll` first: an unrolled import becomes a loop, so everything
//!    after sees one loop body (no-op on a rolled graph);
//! 2. `egraph`: algebraic rewrites and fusion in the loop body (norm
//!    weights folded, q/k/v and gate/up merged, swiglu, add+norm,
//!    rope+attention, step_end);
//! 3. `hoist`: the weight transforms the rewrites created move out of the loop;
//! 4. `rotate`: carries the next step's input norm so `step_end` fuses it
//!    (must precede `policy-dce`, which simplifies `step_end` under `last`);
//! 5. `policy-dce`, `peel`: remove what the fixed exit policy never uses;
//! 6. `cse`, `dce`: clean up (`dce` is the last pass: `--after dce` is the
//!    optimised graph).
//!
//! Memory planning is an analysis of the result, not a pass:
//! [`crate::memplan::plan`], which lowering calls.

use crate::cse::Cse;
use crate::dce::Dce;
use crate::egraph::EGraphRewrite;
use crate::hoist::Hoist;
use crate::manager::PassManager;
use crate::peel::Peel;
use crate::policy_dce::PolicyDce;
use crate::reroll::Reroll;
use crate::rotate::Rotate;

pub fn default_pipeline() -> PassManager {
    pipeline(false)
}

/// The default pipeline; with `keep_exit_trace`, without `policy-dce`, so
/// the loop keeps every step and its exit gate whatever the policy (what
/// the research interface traces: `ouroc logits --out` writes each step's
/// state and gate under every policy).
pub fn pipeline(keep_exit_trace: bool) -> PassManager {
    let mut passes: Vec<Box<dyn crate::Pass>> = vec![
        Box::new(Reroll),
        Box::new(EGraphRewrite),
        Box::new(Hoist),
        Box::new(Rotate::new()),
    ];
    if !keep_exit_trace {
        passes.push(Box::new(PolicyDce));
    }
    passes.extend([
        Box::new(Peel::new()) as Box<dyn crate::Pass>,
        Box::new(Cse),
        Box::new(Dce),
    ]);
    PassManager::new(passes)
}

#[cfg(test)]
mod tests {
    /// Every pass of the pipeline transforms the graph; memory planning, an
    /// analysis, is not one of them.
    #[test]
    fn the_pipeline_ends_at_dce() {
        assert_eq!(
            super::default_pipeline().names(),
            [
                "reroll",
                "egraph",
                "hoist",
                "rotate",
                "policy-dce",
                "peel",
                "cse",
                "dce"
            ]
        );
    }
}
