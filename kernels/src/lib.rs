//! ouroc-kernels: lowering of an (optimised) graph to target-independent
//! kernel specs and the [`Program`] that strings them together.
//!
//! - [`spec`]: [`KernelSpec`]: what one kernel computes (family, sizes,
//!   dtypes, fused parts) and its exact numerics;
//! - [`program`]: [`Program`]: kernels before / in / after the loop, loop and
//!   exit control, activation arena, weight table with load-time recipes,
//!   KV-cache slots; serde data with a readable `Display`;
//! - [`mod@lower`]: [`lower()`]: `Graph` -> `Program`, one kernel per launching op;
//! - [`exec`]: the reference kernels: what each family computes, in plain
//!   loops and f32 (the meaning the backends' emitters are checked against);
//! - [`quant`]: the quantised weight formats of a Linear (layout and the
//!   exact arithmetic of its product);
//! - [`abi`]: the launch contracts beside the Program (the CPU kernel ABI,
//!   the KV sequence descriptor).
//!
//! The Program is run by `ouroc_driver` (the one driver of every backend);
//! its reference device runs it on [`exec`]'s kernels.
//!
//! # The Program contract (what a backend and its runtime implement)
//!
//! 1. **Kernels.** One emitter per [`spec::Family`] (gather, rope_table,
//!    linear, row_reduce, rope, attention, elementwise), honouring the
//!    operand order, result order and rounding points documented on each
//!    family. Every activation operand is `tokens` rows (tokens = batch x
//!    seq, known only at run time; decode has one per sequence); an operand
//!    may be a column window `%v[a..b]` of a wider buffer (row stride = that
//!    buffer's width). A result may share its buffer with an operand of the
//!    same row layout (in-place): kernels must be correct when output row t
//!    is input row t.
//! 2. **Weights**, once at load: walk [`Program::weights`] in order; a
//!    checkpoint tensor is converted to the entry's dtype, a recipe
//!    (`scale_cols`, `concat`, `slice`) is computed from earlier entries
//!    and rounded to its dtype. Only `resident` entries are read by kernels.
//! 3. **Arena**, per call of T new tokens: `arena.bytes_per_token * T`
//!    bytes; value `v` starts at byte `v.offset * T`, row t at
//!    `+ t * v.width * size(v.dtype)`. Write the inputs (token ids, then
//!    positions `past + s`, i32) first.
//! 4. **Order**: the `before` kernels; the loop (carried values set from
//!    their inits, the body once per step with KV slot (step, layer), the
//!    policy applied per token at the end of each step, then the carried
//!    values copied from their nexts, see [`program::LoopSpec`]); the
//!    `after` kernels; the `outputs` are the logits.
//! 5. **KV cache**: one slot per [`program::KvSlot`] (loop step, layer),
//!    per sequence, persisting across calls; attention appends its new K/V
//!    rows. A runtime that stops a token's loop early in decode fills the
//!    skipped steps' slots with the exit step's K/V rows.
//!
//! `ouroc_driver` implements exactly this once for every device; a
//! backend's logits must match its reference device (and so the IR
//! interpreter) within the project's tolerance.

pub mod abi;
pub mod exec;
pub mod lower;
pub mod program;
pub mod quant;
pub mod spec;

pub use lower::{LowerError, lower};
pub use program::{ActRef, ActValue, Arena, Carried, Kernel, KvSlot, LoopSpec, Operand, Program, Recipe, WeightEntry};
pub use spec::{Expr, Family, KernelSpec, NormWeight};
