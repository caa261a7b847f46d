//! ouroc-codegen: backends (Cranelift CPU, PTX for sm_80, MLIR export).
//!
//! - [`cpu`]: Cranelift emitters, one per kernel family of
//!   [`ouroc_kernels::spec::Family`], shape-specialised, JIT-compiled for the
//!   host by [`cpu::Jit`], written to object files for `ouroc build` by
//!   [`cpu::object`] and printable as CLIF by [`cpu::clif_text`] (feature
//!   `cranelift`, on by default; the kernel ABI itself is
//!   `ouroc_kernels::abi`).
//!
//! - [`ptx`]: PTX text for sm_80 (A100), one emitter per family, with the
//!   launch configuration of each entry ([`ptx::KernelAbi`]);
//!
//! - `mlir` (feature `mlir`): the graph IR as an MLIR module (func, scf,
//!   linalg, tensor, arith, math) built through melior and verified by MLIR.

#[cfg(feature = "cranelift")]
pub mod cpu;
#[cfg(feature = "mlir")]
pub mod mlir;
pub mod ptx;
