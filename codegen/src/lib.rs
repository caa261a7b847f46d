//! ouroc-codegen: backends (Cranelift CPU, PTX for sm_80, MLIR export).
//!
//! Not written yet (see the CPU, PTX and MLIR issues); it exports nothing.
