//! ouroc-passes: optimisation passes over the loop IR.
//!
//! Not written yet (see the loop-aware optimisation issue): the pass
//! manager, e-graph rewrites with a cost model, fusion, loop passes,
//! re-rolling, CSE/DCE and memory planning. The crate exists so the
//! workspace has its final shape; it exports nothing.
