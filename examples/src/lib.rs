//! Extending ouroc from outside its `passes` crate (docs/extending.md): a
//! research experiment written the way a user of the library writes one.
//!
//! - [`split_silu`]: a new pass, `split-silu`, that rewrites every
//!   `silu(x)` as `mul(x, sigmoid(x))` (the same function). Run before the
//!   e-graph, it hides the `mul(silu(g), u)` shape the built-in `swiglu`
//!   rule fuses, so the loop body launches more kernels per token.
//! - [`silu_rule`]: a new e-graph rule, `silu-from-sigmoid`, that
//!   recognises `mul(x, sigmoid(x))` as `silu(x)`; with it the e-graph finds
//!   the `swiglu` fusion again.
//! - [`pipeline`]: the default pipeline with either or both added;
//! - [`experiment`]: compile a checkpoint with a pipeline and run it on the
//!   CPU engine beside the reference interpreter.
//!
//! The `extend-pipeline` binary compiles a checkpoint with each pipeline,
//! runs every result on the CPU engine and prints what each changed; the
//! tests in `tests/extend.rs` check the numbers against the imported graph
//! in the interpreter and run the binary.

pub mod experiment;
pub mod silu_rule;
pub mod split_silu;

use ouroc_passes::egraph::EGraphRewrite;
use ouroc_passes::{PassError, PassManager};

/// The default pipeline (`keep_exit_trace` as in [`ouroc_passes::pipeline`]),
/// with the `split-silu` pass just before `egraph` if `split`, and the
/// `silu-from-sigmoid` rule in the e-graph if `rule`.
pub fn pipeline(keep_exit_trace: bool, split: bool, rule: bool) -> Result<PassManager, PassError> {
    let mut pm = ouroc_passes::pipeline(keep_exit_trace);
    if split {
        pm.insert_before("egraph", Box::new(split_silu::SplitSilu))?;
    }
    if rule {
        pm.replace("egraph", Box::new(egraph_pass(rule)))?;
    }
    Ok(pm)
}

/// The e-graph pass, with the `silu-from-sigmoid` rules if `rule`.
pub fn egraph_pass(rule: bool) -> EGraphRewrite {
    let pass = EGraphRewrite::default();
    if !rule {
        return pass;
    }
    pass.with_rule(silu_rule::silu_from_sigmoid())
        .with_rule(silu_rule::silu_from_sigmoid_commuted())
}
