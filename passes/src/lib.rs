//! ouroc-passes: optimisation passes over the loop IR.
//!
//! Every pass is a pure function from a verified graph to a verified graph
//! that computes the same outputs (checked numerically with the
//! interpreter in the tests). The [`manager`] runs an ordered, named
//! pipeline, verifies after each pass, records [`stats`] before and after,
//! and can stop after any pass to dump the IR.

pub mod cse;
pub mod dce;
pub mod egraph;
pub mod hoist;
pub mod manager;
pub mod memplan;
pub mod peel;
pub mod pipeline;
pub mod policy_dce;
pub mod reroll;
pub mod rotate;
pub mod ssa;
pub mod stats;

pub use manager::{Pass, PassError, PassManager, PassReport};
pub use pipeline::{default_pipeline, pass_list, pipeline, pipeline_with, rule_list};
pub use stats::{Stats, table};
