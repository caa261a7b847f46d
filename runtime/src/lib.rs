//! ouroc-runtime: turns a forward pass into generated text.
//!
//! - [`tokenizer`]: `tokenizer.json` (byte-level BPE), special and stop ids;
//! - [`chat`]: the ChatML chat template;
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty, seed;
//! - [`generate`]: the generation loop over any [`generate::Forward`], with
//!   streaming, stop ids and per-token loop-depth statistics;
//! - [`speculate`]: self-speculative decoding from the loop (the first
//!   steps draft, the last steps verify several tokens in one call);
//! - [`interp`]: a `Forward` backed by the reference interpreter, with real
//!   early exit in decode.
//!
//! - [`cpu`]: the CPU device of the driver (`ouroc_driver`, which runs the
//!   loop, exit control and KV cache of every backend): Cranelift kernels
//!   (JIT or linked) and std::arch microkernels, split over threads
//!   ([`cpu::CpuOptions::threads`]); [`cpu::CpuForward`] is the driver on it;
//! - [`threads`]: the persistent worker pool the CPU backend launches on.
//! - [`deploy`]: the weights image and metadata of executables built by
//!   `ouroc build` (which link their kernels: build without feature `jit`).
//! - [`gpu`]: the GPU device of the driver: the PTX of `ouroc_codegen::ptx`
//!   on a [`gpu::Gpu`], the PTX emulator (always built) or CUDA through
//!   cudarc (feature `cuda`); per-kernel timing; [`gpu::GpuForward`] is the
//!   driver on it.

pub mod attention;
pub mod chat;
pub mod cpu;
pub mod deploy;
pub mod gemm;
pub mod generate;
pub mod gpu;
pub mod interp;
pub mod memory;
pub mod qlinear;
pub mod sampling;
pub mod speculate;
pub mod threads;
pub mod tokenizer;
pub mod weights_cache;

pub use generate::{Forward, GenStats, Step, StopReason, generate, generate_with};
pub use ouroc_driver::Trace;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
