//! The CPU device of the driver (`ouroc_driver`): a lowered [`Program`]
//! run on the CPU kernels of `ouroc_codegen::cpu`, taken from a
//! [`KernelSource`]: the Cranelift JIT (feature `jit`, [`CpuForward::new`])
//! or the machine code linked into an executable by `ouroc build`
//! ([`LinkedKernels`]), and on the std::arch microkernels of [`crate::gemm`]
//! for `Linear`. The loop, exit control, KV bookkeeping and weight encoding
//! are the driver's; this file binds kernels to arena offsets and weight
//! pointers, launches them over threads, and keeps the arena and the KV
//! stores in host memory.
//!
//! - **kernels**: each distinct kernel taken once from the source (by code
//!   key); every launch pre-bound to its operands (arena offsets per token,
//!   column windows, row strides, weight pointers);
//! - **arena**, per call of T tokens: `bytes_per_token * T` bytes, value v
//!   at `offset * T` (a buffer kept across calls, grown when needed);
//! - **KV stores**: a K and a V byte buffer each, rows of
//!   `kv_heads * head_dim` activation-dtype elements, grown by doubling; an
//!   attention kernel gets a [`KvSeq`] per sequence and an f32 score scratch.
//!
//! # Threads
//!
//! [`CpuOptions::threads`] threads run the kernels (the calling thread and
//! `threads - 1` workers of a persistent [`Pool`], parked between calls).
//! A `Linear` of `n >= 8` output rows is split into at most `threads`
//! chunks of consecutive rows, each a multiple of 4 rows but the last, and
//! each chunk is launched as one task of a pool job (the threads claim the
//! tasks, the caller included, so a thread the OS has not scheduled delays
//! nothing): the Linear's one kernel with the chunk's output rows `row0 ..
//! row1` as its row-range arguments (`ouroc_kernels::abi::extra_args`; the
//! whole Linear passes `0 .. n`), so no kernel depends on the thread
//! count. When the result buffer overlaps the input `x` (in place),
//! the `x` rows are first copied to a scratch so no chunk reads a row
//! another chunk has written. Each output element is computed by exactly
//! one thread with the same instructions as the unsplit kernel (the row
//! blocking of 4 does not change a row's arithmetic), so results are bit
//! for bit the same for every thread count. Every other family but
//! Attention computes each token from that token's rows only, so on a
//! prompt of at least 8 tokens it is split by tokens instead: one task
//! per thread, each the same kernel on a consecutive block of at least 4
//! tokens (row pointers offset, token count reduced), again bit for bit
//! the result of one launch. Attention over a prompt of one sequence
//! (at least 8 tokens) appends every token's K and V on the calling
//! thread (`AttentionPhase::Append`), then attends blocks of its tokens of
//! about equal work (token t reads `past + t + 1` positions; four blocks
//! per thread) as tasks (`AttentionPhase::Attend`, each with its own score
//! scratch): each token's arithmetic is that of the whole launch, so bit
//! for bit the same; decode attention runs on the calling thread. With
//! `threads == 1` nothing is split and no worker exists.
//!
//! Where [`crate::attention`] has a vector variant (AVX-512) and
//! [`CpuOptions::microkernels`] is on, an attention launch runs its
//! kernel only to append K and V, and the microkernel attends (prompt
//! blocks over the threads as above; a decode token on the calling
//! thread); elsewhere the Cranelift kernel does both.
//!
//! Only the last position of a prompt is read unless a caller asks for
//! every position, so the kernels after the loop (final norm, `lm_head`)
//! run on that row alone (`Device::launch_rows`).
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`CpuOptions`], [`CpuForward`] (the driver on the device) |
//! | `device.rs` | [`CpuDevice`]: the driver's device operations (arena, rows, KV stores) |
//! | `launch.rs` | binding a kernel to its arguments, launching it over the threads |
//! | `source.rs` | where kernels come from: the JIT or [`LinkedKernels`] |

mod device;
mod launch;
mod source;

pub use device::CpuDevice;
pub use launch::Launch;
pub use source::{KernelSource, LinkedKernels};

use crate::generate::Forward;
#[cfg(feature = "jit")]
use ouroc_codegen::cpu::Jit;
use ouroc_driver::codec;
use ouroc_driver::{Driver, DriverOptions};
pub use ouroc_driver::{KvMode, ResidentWeights, Step, Trace};
use ouroc_ir::DType;
#[cfg(feature = "jit")]
use ouroc_ir::WeightSource;
use ouroc_kernels::Program;
use std::ops::{Deref, DerefMut};

/// How a [`CpuForward`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuOptions {
    /// The context length (prompt + generated positions) accepted.
    pub max_positions: usize,
    /// In decode, skip the loop steps after a token's exit.
    pub early_exit: bool,
    /// Threads the kernels run on, the calling thread included; 0 = all
    /// cores (`std::thread::available_parallelism`).
    pub threads: usize,
    /// KV-cache sharing in decode.
    pub kv: KvMode,
    /// Run `Linear` launches on the std::arch microkernels of
    /// [`crate::gemm`] (AVX-512 BF16 / AVX-512F / AVX2+FMA, chosen once by
    /// CPU features) when this CPU has one for the dtypes, and attention's
    /// attend phase on [`crate::attention`] (AVX-512); false: always the
    /// Cranelift kernels.
    pub microkernels: bool,
}

impl CpuOptions {
    /// `max_positions` positions, no early exit, all cores, `KvMode::Full`.
    pub fn new(max_positions: usize) -> CpuOptions {
        CpuOptions {
            max_positions,
            early_exit: false,
            threads: 0,
            kv: KvMode::Full,
            microkernels: true,
        }
    }
}

/// A model compiled to CPU machine code, run by the driver through its KV
/// cache: the driver on a [`CpuDevice`] (its methods through `Deref`).
pub struct CpuForward(Driver<CpuDevice>);

impl Deref for CpuForward {
    type Target = Driver<CpuDevice>;

    fn deref(&self) -> &Driver<CpuDevice> {
        &self.0
    }
}

impl DerefMut for CpuForward {
    fn deref_mut(&mut self) -> &mut Driver<CpuDevice> {
        &mut self.0
    }
}

impl CpuForward {
    /// Check `program`, load its weights from `weights`, JIT-compile its
    /// kernels (feature `jit`). `max_positions`: the context length
    /// (prompt and generated) accepted. `early_exit`: in decode, skip the
    /// steps after a token's exit. Runs on all cores with [`KvMode::Full`] (see
    /// [`CpuForward::with_options`]).
    #[cfg(feature = "jit")]
    pub fn new(
        program: Program,
        weights: &dyn WeightSource,
        max_positions: usize,
        early_exit: bool,
    ) -> Result<CpuForward, String> {
        let opts = CpuOptions {
            early_exit,
            ..CpuOptions::new(max_positions)
        };
        CpuForward::with_options(program, weights, &opts)
    }

    /// As [`CpuForward::new`], with the threads and KV mode of `opts`.
    #[cfg(feature = "jit")]
    pub fn with_options(program: Program, weights: &dyn WeightSource, opts: &CpuOptions) -> Result<CpuForward, String> {
        ouroc_driver::check_program(&program)?;
        let weights = ResidentWeights::encode(&program, weights, true)?;
        let jit = Jit::new().map_err(|e| e.to_string())?;
        CpuForward::from_parts(program, weights, opts, Box::new(jit))
    }

    /// A model from its parts: `program`, its weights already encoded
    /// ([`ResidentWeights::encode`], or read from a weights file written by
    /// `ouroc build`) and the source of its kernels (which the device keeps
    /// alive).
    pub fn from_parts(
        program: Program,
        weights: ResidentWeights,
        opts: &CpuOptions,
        kernels: Box<dyn KernelSource>,
    ) -> Result<CpuForward, String> {
        let dev = CpuDevice::new(opts, kernels)?;
        let dopts = DriverOptions {
            max_positions: opts.max_positions,
            early_exit: opts.early_exit,
            kv: opts.kv,
        };
        Ok(CpuForward(
            Driver::new(program, weights, dev, dopts).map_err(|e| e.to_string())?,
        ))
    }

    /// The driver itself (a server's engine owns it and batches sequences
    /// through it).
    pub fn into_driver(self) -> Driver<CpuDevice> {
        self.0
    }

    /// Run `ids` after the cache: the last position's logits, its exit
    /// depth and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.0.run(ids).map_err(|e| e.to_string())
    }

    /// [`CpuForward::run`], also returning every position's logits, each
    /// step's outputs and lambdas, and the exit steps.
    pub fn run_traced(&mut self, ids: &[u32]) -> Result<(Step, Trace), String> {
        self.0.run_traced(ids).map_err(|e| e.to_string())
    }

    /// Forget the KV cache (under `last` / `mean` the next call is
    /// prefill again, with one store per (step, layer)).
    pub fn reset(&mut self) {
        // Host memory: allocating and freeing stores cannot fail.
        let _ = self.0.reset();
    }

    /// Threads the kernels run on (the calling thread included).
    pub fn threads(&self) -> usize {
        self.device().threads()
    }

    /// Program kernels run by the std::arch microkernels of [`crate::gemm`].
    pub fn microkernel_kernels(&self) -> usize {
        self.device().microkernel_kernels()
    }

    /// Kernels split over threads (Linear launches of more than one chunk).
    pub fn split_kernels(&self) -> usize {
        self.device().split_kernels()
    }

    /// Launches split over the threads by tokens (prompts).
    pub fn token_split_launches(&self) -> usize {
        self.device().token_split_launches
    }

    /// Launches run on a subset of a call's rows: the kernels after the
    /// loop on each sequence's last row when only it is read.
    pub fn row_launches(&self) -> usize {
        self.device().row_launches
    }

    /// The K and V rows (`past_len()` rows of `kv_heads * head_dim`
    /// elements of the activation dtype, row p = position p, bf16 as its 16
    /// bits) that step `step`'s attention of layer `layer` reads for past
    /// positions: its own slot, or the layer's shared store once decode
    /// shares one (`last` / `mean`). None if there is no such slot.
    pub fn kv_rows(&mut self, step: usize, layer: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        let (k, v) = self.0.kv_rows(step, layer).ok().flatten()?;
        let d = self.kv_dtype();
        Some((codec::encode(&k, d), codec::encode(&v, d)))
    }

    /// Replace the rows [`CpuForward::kv_rows`] returns (for experiments on
    /// the cache: tests replace slots to check the sharing modes against
    /// `full`).
    pub fn set_kv_rows(&mut self, step: usize, layer: usize, k: &[u8], v: &[u8]) -> Result<(), String> {
        let d = self.kv_dtype();
        self.0
            .set_kv_rows(step, layer, &codec::decode(k, d), &codec::decode(v, d))
            .map_err(|e| e.to_string())
    }

    fn kv_dtype(&self) -> DType {
        self.0.program().kv.first().map_or(DType::F32, |s| s.dtype)
    }
}

impl Forward for CpuForward {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.run(ids)
    }

    fn loop_steps(&self) -> usize {
        self.0.loop_steps()
    }

    fn speculative(&mut self) -> Option<&mut dyn ouroc_driver::Speculate> {
        Some(&mut self.0)
    }
}
