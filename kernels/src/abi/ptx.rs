//! The PTX launch contract of `ouroc_codegen::ptx`: per kernel its
//! parameters (what each carries) and entries (when each runs, its grid,
//! block and shared memory), the KV sequence descriptor the attention
//! entries read, and the attention scratch size. Plain data (serde), so a
//! built executable carries it beside the PTX text; the full contract
//! (memory layouts, entry order per family) is in `ouroc_codegen::ptx`'s
//! module docs.

use crate::spec::AttentionSpec;
use serde::{Deserialize, Serialize};

/// One grid dimension as a function of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    Fixed(u32),
    /// `ceil(tokens / per)`.
    Tokens {
        per: u32,
    },
    /// `ceil(seq / per)` (new tokens per sequence).
    Seq {
        per: u32,
    },
    /// The number of sequences, `tokens / seq`.
    Batch,
}

impl Dim {
    pub fn eval(self, tokens: u32, seq: u32) -> u32 {
        match self {
            Dim::Fixed(n) => n,
            Dim::Tokens { per } => tokens.div_ceil(per),
            Dim::Seq { per } => seq.div_ceil(per),
            Dim::Batch => tokens / seq.max(1),
        }
    }
}

/// How to launch one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub grid: [Dim; 3],
    /// Threads per block (1-D), also the entry's `.maxntid`.
    pub block: u32,
    /// Dynamic shared memory (`ouroc_smem`) in bytes.
    pub shared_bytes: u32,
}

impl Launch {
    /// The grid of a call of `tokens` rows, `seq` new tokens per sequence.
    pub fn grid(&self, tokens: u32, seq: u32) -> [u32; 3] {
        self.grid.map(|d| d.eval(tokens, seq))
    }
}

/// When an entry runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    Always,
    TokensBelow(u32),
    TokensAtLeast(u32),
    /// One new token per sequence.
    Decode,
    /// More than one new token per sequence.
    Prefill,
}

impl When {
    pub fn holds(self, tokens: u32, seq: u32) -> bool {
        match self {
            When::Always => true,
            When::TokensBelow(n) => tokens < n,
            When::TokensAtLeast(n) => tokens >= n,
            When::Decode => seq == 1,
            When::Prefill => seq > 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxEntry {
    /// The `.entry` name.
    pub entry: String,
    pub when: When,
    pub launch: Launch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamTy {
    U64,
    U32,
}

/// What a parameter carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// Base address of operand i.
    Operand(usize),
    /// Base address of result i.
    Result(usize),
    /// Row stride (elements) of operand i.
    OperandStride(usize),
    /// Row stride (elements) of result i.
    ResultStride(usize),
    Tokens,
    /// Attention: the [`KvSeqDesc`] array.
    Kv,
    /// Attention: new tokens per sequence.
    Seq,
    /// Attention: positions per K / V store.
    KvCap,
    /// Attention: the f32 scratch ([`attention_scratch_bytes`]).
    Scratch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamDesc {
    pub name: String,
    pub ty: ParamTy,
    pub role: ParamRole,
}

/// What a runtime needs to launch a kernel: its parameters and entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelAbi {
    /// The kernel's name in the Program (`l0.qkv`), or `argmax`.
    pub name: String,
    pub params: Vec<ParamDesc>,
    /// In launch order; each runs when its `when` holds.
    pub entries: Vec<PtxEntry>,
}

/// Every kernel of a Program in one module, with what a runtime needs
/// to launch them: what `ouroc_codegen::ptx::module` produces and what
/// `ouroc build` stores in an executable for GPU targets (so the app needs
/// neither the emitter nor the emulator).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PtxModule {
    pub text: String,
    /// Per Program kernel (in `Program::kernels` order), then `argmax`.
    pub kernels: Vec<KernelAbi>,
    /// The runtime's own kernels, a module of their own: the KV copy
    /// ([`KV_COPY_ENTRY`]).
    pub runtime_text: String,
}

/// The runtime's KV copy entry (in [`PtxModule::runtime_text`]): for each of
/// `grid.x` heads and for K (`ctaid.y` 0) and V (1), `words` 32-bit words
/// from `src + head * src_head + offset` to `dst + head * dst_head +
/// offset`. Parameters in order: `src_k, src_v, dst_k, dst_v` (u64
/// addresses), `src_head, dst_head, offset` (u64 bytes), `words` (u32).
/// Launch: grid `[heads, 2, 1]`, block [`KV_COPY_BLOCK`], no shared memory.
pub const KV_COPY_ENTRY: &str = "ouroc_kv_copy";

/// Threads per block of [`KV_COPY_ENTRY`].
pub const KV_COPY_BLOCK: u32 = 256;

/// One sequence's KV stores as the attention entries read them (the `kv`
/// parameter points at an array of these, one per sequence; 24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSeqDesc {
    /// Global address of the K store (`kv_heads * kv_cap * head_dim` elements of act).
    pub k: u64,
    /// Global address of the V store, same layout.
    pub v: u64,
    /// Positions already stored; the first new token's absolute position.
    pub past: u32,
    pub pad: u32,
}

/// The number of KV-length splits of the decode attention entries: enough CTAs
/// (`splits x heads x batch`) to fill an A100 at batch 1.
pub fn decode_splits(a: &AttentionSpec) -> u32 {
    (128 / a.heads.max(1) as u32).clamp(1, 32)
}

/// Floats of scratch per (sequence, head).
fn scratch_floats(a: &AttentionSpec, kv_cap: u32) -> u32 {
    kv_cap + decode_splits(a) * (2 + a.head_dim as u32)
}

/// Bytes of the `scratch` parameter for a call with `batch` sequences.
pub fn attention_scratch_bytes(a: &AttentionSpec, batch: usize, kv_cap: usize) -> u64 {
    (batch * a.heads) as u64 * scratch_floats(a, kv_cap as u32) as u64 * 4
}
