//! ouroc-kernels: lowering of fused groups to target-independent kernel
//! specs and the `Program` that strings them together.
//!
//! Not written yet (see the Cranelift CPU backend issue); it exports nothing.
