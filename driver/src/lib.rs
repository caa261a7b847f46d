//! ouroc-driver: the one executor of a [`Program`](ouroc_kernels::Program),
//! shared by every backend. The loop and every exit policy, early exit in
//! decode, the KV slots per (step, layer) with their sharing modes, the fill
//! of skipped steps' slots, the weighted accumulation, weight
//! materialisation and encoding, arena placement and the trace are written
//! here once. A backend is a [`Device`]: a small table of operations (bind
//! a kernel, launch it, move rows, keep KV stores) behind which the Program
//! runs unchanged.
//!
//! | file | holds |
//! |---|---|
//! | `driver.rs` | [`Driver`]: a call (inputs, arena, KV stores), the kernels in order, the loop with its exit policy, early exit, the trace |
//! | `device.rs` | [`Device`]: the operations a backend implements; [`Span`], [`KvStore`], [`KvArg`] |
//! | `batch.rs` | [`Sequence`]: continuous, cross-depth batching: sequences joining and leaving, one loop step of every in-flight token per tick |
//! | `speculate.rs` | [`Speculate`]: drafts of a token's first steps, verification of the last steps of several, rollback |
//! | `kv.rs` | KV bookkeeping: stores per (step, layer) and sequence, [`KvMode`] sharing, skipped-slot fill |
//! | `weights.rs` | [`ResidentWeights`]: the weight table materialised and encoded as kernels read it |
//! | `codec.rs` | dtype encode/decode, the one place |
//! | `check.rs` | what a Program must satisfy to run |
//! | `trace.rs` | [`Trace`]: per-position logits, per-step states and gates |
//! | `host.rs` | the reference device ([`host::HostDevice`], [`host::Executor`]) |
//!
//! Devices elsewhere: `ouroc_runtime::cpu` (Cranelift kernels and std::arch
//! microkernels, threads) and `ouroc_runtime::gpu` (the PTX of
//! `ouroc_codegen::ptx` on the PTX emulator or CUDA).
//!
//! # The contract, per call of T = sequences x seq new tokens
//!
//! 1. **Weights**, once: the Program's weight table walked in order
//!    (recipes computed in f32, rounded to each entry's dtype), each
//!    resident weight encoded in every dtype a kernel reads it in.
//! 2. **Arena**: `bytes_per_token * T` bytes; value v at `offset * T`, row t
//!    `t * width * size` further ([`Driver::span`] is the only place that
//!    computes it). Inputs: token ids, then positions `past + s` (i32).
//! 3. **Kernels** in order: `before`; the loop; `after`. Attention launches
//!    get one [`KvArg`] per sequence: a store and its filled positions.
//! 4. **Loop**: carried values set from their inits (a parallel copy); per
//!    step r the body with KV slot (r, layer), then per token the policy:
//!    `last`, `step:K`, `threshold:Q[:bf16]` copy the `out` row of the step
//!    `ExitPolicy::decided_exit` returns into `result` when it is decided;
//!    `weighted` accumulates `p_r * out_r` in f32 and writes the rounded sum
//!    after the last step; then the carried values get their nexts.
//! 5. **Early exit** (option): in decode (seq = 1), once every token's exit
//!    is decided the later steps do not run; under [`KvMode::Full`] the exit
//!    step's new K/V rows are copied into the slots of every later step, so
//!    later tokens see a full cache.
//!
//! # KV cache
//!
//! One store per (loop step, layer) per sequence (attention outside the
//! loop: step 0). A call of one token is decode, of several prefill.
//! Under [`KvMode::Last`] and [`KvMode::Mean`] prefill fills the R stores
//! as `full`; at the first decode call the R stores of each loop layer
//! become one shared store (`last`: step R-1's; `mean`: element-wise
//! `round((K_0 + ... + K_{R-1}) / R)`, summed in f32 in step order). From
//! then on every step of a call writes its new rows at `past..past + seq`
//! of the shared store (over the rows an earlier step of the same call
//! wrote) and attends over `0..=past + t`; after the call's last step the
//! new rows are the last run step's (`last`) or the mean over the steps run
//! (`mean`, same arithmetic), and `past` advances. Decode then appends one
//! K and V row per layer per token instead of R.
//!
//! # Several sequences, several new tokens (design notes)
//!
//! A call already holds several sequences of `seq` new tokens each, each
//! with its own stores and the same `past` (the reference device runs any
//! batch; the CPU and GPU devices declare `max_batch` 1 until their
//! attention kernels take one [`KvArg`] per sequence, which both ABIs
//! already have room for: the CPU `KvSeq` array and the PTX descriptor
//! array). Next steps, all inside the driver:
//! - **Batched decode** of sequences at different lengths: `past` moves
//!   from the driver into each sequence (the [`KvArg`] already carries it
//!   per sequence, positions are written per sequence); sequences join and
//!   leave between calls by opening and closing their stores.
//! - **Verification of drafted tokens**: a call of `seq = d + 1` tokens
//!   against an existing cache is a prefill continuation (it runs today);
//!   rollback of rejected tokens is lowering a store's filled positions
//!   (`past`) by the rejected count, a change in `kv.rs` only, since rows
//!   past `past` are overwritten by the next call.
//! - **Cross-depth batching** needs rows at different loop steps in one
//!   body launch: the exit control then becomes per row, which the policy
//!   loop already is (it decides per token).

mod batch;
mod check;
pub mod codec;
mod device;
mod driver;
pub mod host;
mod kv;
mod speculate;
mod trace;
mod weights;

pub use batch::{Exited, Sequence};
pub use device::{CallShape, Device, DeviceError, KvArg, KvLayout, KvStore, Span};
pub use driver::{CallOutput, Driver, DriverError, DriverOptions, KvValues, LoopState, Step, Want};
pub use kv::KvMode;
pub use speculate::{Draft, Speculate, Verified};
pub use trace::Trace;
pub use weights::ResidentWeights;

/// Check that `program` can run on the driver (beyond its structure);
/// returns its exit policy.
pub fn check_program(program: &ouroc_kernels::Program) -> Result<Option<ouroc_ir::ExitPolicy>, String> {
    check::runnable(program)
}
