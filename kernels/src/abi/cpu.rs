//! The CPU kernel ABI, shared by the code generator (`ouroc_codegen::cpu`,
//! which emits kernels with it) and the runtime (which calls them, JIT
//! compiled or linked ahead of time into an executable): the entry point
//! type, the KV-cache descriptor and the arguments after the results.
//! Nothing here depends on Cranelift, so a runtime without a compiler can
//! use it.
//!
//! ```text
//! extern "C" fn(args: *const *mut u8, strides: *const usize, tokens: usize)
//! ```
//!
//! `args[i]` / `strides[i]`: operand i then each result (base pointer, row
//! stride in elements), then [`extra_args`] more; see `ouroc_codegen::cpu`
//! for the full contract.

use crate::spec::{Family, KernelSpec};

/// The raw entry point of every CPU kernel.
pub type RawKernel = unsafe extern "C" fn(args: *const *mut u8, strides: *const usize, tokens: usize);

/// One sequence's KV-cache slot, as an `Attention` kernel reads it: `k`
/// and `v` point at `capacity` rows of `kv_heads * head_dim` elements of
/// the activation dtype (row p holds position p), of which the first
/// `past` are filled.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvSeq {
    pub k: *mut u8,
    pub v: *mut u8,
    /// Positions already in the slot; the first new token is at this
    /// absolute position.
    pub past: usize,
}

/// What an `Attention` launch runs (`strides` of its scratch argument): a
/// caller splitting a prompt's attention over threads first appends every
/// new token's K and V on one thread ([`AttentionPhase::Append`]), then
/// runs [`AttentionPhase::Attend`] on blocks of query tokens at once (each
/// with row pointers offset to its first token and `past` advanced by as
/// many positions), which only read the stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum AttentionPhase {
    /// Append the new tokens' K and V, then attend (one whole launch).
    Both = 0,
    /// Only append the new tokens' K (rotated) and V rows.
    Append = 1,
    /// Only attend, over rows already appended.
    Attend = 2,
}

/// Arguments a kernel takes after its operands and results:
///
/// - `Attention`: 2, the [`KvSeq`] array (`strides`: `seq`, the new tokens
///   per sequence) and the f32 score scratch (`strides`: the
///   [`AttentionPhase`] to run, as its `usize`);
/// - `Linear`: 2, the output rows computed, `row0 .. row1` as
///   `strides[n]` and `strides[n + 1]` (`args` ignored), so one kernel
///   serves every row chunk of a Linear split over threads (`0 .. n` for
///   the whole Linear);
/// - every other family: 0.
pub fn extra_args(spec: &KernelSpec) -> usize {
    match spec.family {
        Family::Attention(_) | Family::Linear(_) => 2,
        _ => 0,
    }
}
