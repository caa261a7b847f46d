//! ouroc-codegen: backends (Cranelift CPU, PTX for sm_80, MLIR export).
//!
//! - [`cpu`]: Cranelift emitters, one per kernel family of
//!   [`ouroc_kernels::spec::Family`], shape-specialised, JIT-compiled for the
//!   host by [`cpu::Jit`] and printable as CLIF by [`cpu::clif_text`].
//!
//! The PTX and MLIR backends are not written yet.

pub mod cpu;
