//! ouroc-runtime: turns a forward pass into generated text.
//!
//! - [`tokenizer`]: `tokenizer.json` (byte-level BPE), special and stop ids;
//! - [`chat`]: the ChatML chat template;
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty, seed;
//! - [`generate`]: the generation loop over any [`generate::Forward`], with
//!   streaming, stop ids and per-token loop-depth statistics;
//! - [`interp`]: a `Forward` backed by the reference interpreter, with real
//!   early exit in decode.
//!
//! - [`cpu`]: a `Forward` that executes a lowered `Program` with the
//!   Cranelift JIT-compiled kernels: Linear kernels split over threads
//!   ([`cpu::CpuOptions::threads`]), one KV slot per (loop step, layer) or
//!   decode-time sharing ([`cpu::KvMode`]: full, last, mean), real early
//!   exit in decode;
//! - [`threads`]: the persistent worker pool the CPU backend launches on.
//! - [`deploy`]: the weights image and metadata of executables built by
//!   `ouroc build` (which link their kernels: build without feature `jit`).
//! - [`gpu`]: a `Forward` that runs a lowered `Program` as the PTX of
//!   `ouroc_codegen::ptx` on a [`gpu::Device`]: the PTX emulator (always
//!   built) or CUDA through cudarc (feature `cuda`); per-position traces
//!   for `ouroc logits`, per-kernel timing.

pub mod chat;
pub mod cpu;
pub mod deploy;
pub mod gemm;
pub mod generate;
pub mod gpu;
pub mod interp;
pub mod sampling;
pub mod threads;
pub mod tokenizer;

pub use generate::{Forward, GenStats, Step, StopReason, generate};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
