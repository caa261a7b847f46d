//! ouroc-passes: optimisation passes over the loop IR.
//!
//! Every pass is a pure function from a verified graph to a verified graph
//! that computes the same outputs (checked numerically with the
//! interpreter in the tests). The [`manager`] runs an ordered, named
//! pipeline, verifies after each pass, records [`stats`] before and after,
//! and can stop after any pass to dump the IR.

pub mod manager;
pub mod reroll;
pub mod stats;

pub use manager::{Pass, PassError, PassManager, PassReport};
pub use stats::{Stats, table};
