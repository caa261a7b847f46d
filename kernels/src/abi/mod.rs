//! The launch contracts that cross from the compiler to the runtime beside
//! the Program: what a kernel's arguments are and how it is launched.
//! Nothing here depends on a code generator, so a runtime without one (a
//! built executable) uses them as they are.
//!
//! - [`cpu`]: the CPU kernel ABI (entry point type, [`KvSeq`], the extra
//!   arguments after the results);
//! - [`ptx`]: the PTX parameter and launch records, the KV sequence
//!   descriptor and the scratch size of `ouroc_codegen::ptx`.

pub mod cpu;
pub mod ptx;

pub use cpu::{AttentionPhase, KvSeq, RawKernel, extra_args};
