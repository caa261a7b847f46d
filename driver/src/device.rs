//! The table of device operations the driver runs a Program through (as
//! ggml's backend interface: the graph runs unchanged behind it). A device
//! binds kernels, launches them, keeps an arena and KV stores, and moves
//! rows; it knows nothing of the loop, the exit policy or KV sharing.

use crate::weights::ResidentWeights;
use ouroc_ir::DType;
use ouroc_kernels::{Kernel, Program};
use std::ops::Range;

/// A KV store of a device: K and V rows of one (step, layer) slot of one
/// sequence, or a layer's store shared by every step (`KvMode::Last|Mean`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvStore(pub usize);

/// What a KV store holds per position: `kv_heads * head_dim` elements of
/// `dtype`, for K and for V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Elements of one position's K (or V) row.
    pub fn row_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of one position's K (or V) row.
    pub fn row_bytes(&self) -> usize {
        self.row_elems() * self.dtype.size_bytes()
    }
}

/// One sequence's KV store as an attention launch sees it: the rows of
/// positions `0..past` are filled, the launch writes its new rows at
/// `past..past + seq` and attends over `0..=past + t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvArg {
    pub store: KvStore,
    pub past: usize,
}

/// The shape of a call: `tokens` = sequences x `seq` new tokens each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallShape {
    pub tokens: usize,
    pub seq: usize,
}

/// Rows of an activation in the arena: `rows` rows of `len` elements of
/// `dtype`, the first at byte `byte`, each `stride` bytes after the last.
/// The driver computes it from the Program's plan; a device only follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub byte: usize,
    pub stride: usize,
    pub rows: usize,
    pub len: usize,
    pub dtype: DType,
}

impl Span {
    /// Bytes of one row's elements.
    pub fn row_bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }

    /// Whether the rows are back to back (one block of memory).
    pub fn contiguous(&self) -> bool {
        self.stride == self.row_bytes() || self.rows <= 1
    }
}

/// A device failure, or a Program it cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// No usable device (no driver, no GPU).
    #[error("{0}")]
    Unavailable(String),
    /// The Program (or a kernel of it) cannot run on this device.
    #[error("program: {0}")]
    Program(String),
    /// The device or its driver failed (an allocation, a copy, a launch).
    #[error("device: {0}")]
    Failed(String),
}

/// What the driver needs from a device. Calls come in this order: `load`
/// once, `bind` once per Program kernel, then per call `begin_call`, the
/// launches and row moves in program order. Rows and KV positions are f32
/// at this interface; a device stores them in their dtype (rounded) unless
/// [`Device::rounds`] is false.
pub trait Device {
    /// A Program kernel bound to its code and operands.
    type Bound;

    /// A description (`cpu (2 threads, avx512bf16)`, `ptx-emu`, a GPU's name).
    fn name(&self) -> String;

    /// Whether activations, KV rows and weights are rounded to their dtypes
    /// (false only for the reference device in f32 mode).
    fn rounds(&self) -> bool {
        true
    }

    /// The most sequences one call may hold.
    fn max_batch(&self) -> usize {
        1
    }

    /// Take the Program and its weights (point at them or upload them); the
    /// weights outlive the device.
    fn load(&mut self, program: &Program, weights: &ResidentWeights) -> Result<(), DeviceError>;

    /// Bind kernel `k` of the loaded Program.
    fn bind(&mut self, k: &Kernel) -> Result<Self::Bound, DeviceError>;

    /// Start a call: an arena for `shape.tokens` tokens (contents undefined)
    /// and the KV stores the call's attention launches will use, with their
    /// filled positions (constant during the call).
    fn begin_call(&mut self, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError>;

    /// Launch a bound kernel; `kv` holds one store per sequence for
    /// attention, nothing for the other families.
    fn launch(&mut self, k: &Self::Bound, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError>;

    /// Launch a bound kernel of a per-token family (any but attention) on
    /// rows `rows` of the call's `shape.tokens` only; the other rows of its
    /// results are left undefined. The driver uses it for the kernels after
    /// the loop when only each sequence's last position is read (the
    /// `lm_head` of a prompt's earlier positions is never looked at). The
    /// default launches on every row: the same values, more work.
    fn launch_rows(&mut self, k: &Self::Bound, shape: CallShape, rows: Range<usize>) -> Result<(), DeviceError> {
        let _ = rows;
        self.launch(k, shape, &[])
    }

    /// The rows of `at`, row after row, as f32.
    fn read(&mut self, at: Span) -> Result<Vec<f32>, DeviceError>;

    /// Write `data` (`rows * len` values) into the rows of `at`.
    fn write(&mut self, at: Span, data: &[f32]) -> Result<(), DeviceError>;

    /// Copy rows between two spans of the same shape and dtype (they do not
    /// overlap unless equal).
    fn copy(&mut self, dst: Span, src: Span) -> Result<(), DeviceError>;

    /// A new, empty KV store.
    fn kv_alloc(&mut self, layout: KvLayout) -> Result<KvStore, DeviceError>;

    /// Release a store.
    fn kv_free(&mut self, store: KvStore) -> Result<(), DeviceError>;

    /// Make `store` hold at least `positions` positions (filled ones kept).
    fn kv_reserve(&mut self, store: KvStore, positions: usize) -> Result<(), DeviceError>;

    /// Copy positions `rows` of `src` into the same positions of `dst`.
    fn kv_copy(&mut self, dst: KvStore, src: KvStore, rows: Range<usize>) -> Result<(), DeviceError>;

    /// Positions `rows` of a store: (K, V), position-major, as f32.
    fn kv_read(&mut self, store: KvStore, rows: Range<usize>) -> Result<crate::driver::KvValues, DeviceError>;

    /// Write K and V rows (position-major) at positions `row0..`.
    fn kv_write(&mut self, store: KvStore, row0: usize, k: &[f32], v: &[f32]) -> Result<(), DeviceError>;

    /// Bytes a store has allocated (K and V).
    fn kv_reserved(&self, store: KvStore) -> usize;
}
