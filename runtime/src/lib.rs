//! ouroc-runtime: executes a `Program` (KV cache, exit control, sampling).
//!
//! Not written yet (see the Cranelift CPU backend issue); it exports nothing.
