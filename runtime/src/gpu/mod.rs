//! The GPU device of the driver (`ouroc_driver`): a lowered [`Program`]
//! run as the PTX of `ouroc_codegen::ptx::module` on a [`Gpu`]. The loop,
//! exit control, KV bookkeeping and weight encoding are the driver's; this
//! file binds kernels to their PTX entries and parameters, keeps the arena
//! and KV stores in device memory and moves rows.
//!
//! # GPUs
//!
//! [`Gpu`] is what the device needs from a GPU: zeroed global memory at
//! 64-bit device addresses (`alloc`, `free`), host <-> device and device
//! -> device copies, loading a PTX module, resolving an entry, and
//! launching it with a grid, a 1-D block, dynamic shared memory and the
//! parameter values. Two implementations:
//!
//! - [`EmuDevice`] (always built): the PTX emulator
//!   (`ouroc_ptx_emu`), with bounds-checked buffers and SIMT
//!   semantics; slow, for tests and `ouroc logits --backend ptx-emu`.
//! - `CudaDevice` (cargo feature `cuda`, module `cuda`): an NVIDIA GPU
//!   through cudarc's driver API, libcuda loaded at run time.
//!   `CudaDevice::new` returns [`GpuError::NoDevice`] ("no CUDA driver
//!   found (libcuda.so could not be loaded)") on a machine without the
//!   driver, never a panic.
//!
//! # [`PtxDevice`]
//!
//! - **module**: the Program's PTX module (one entry set per distinct
//!   kernel code, plus `argmax`) and `ouroc_kv_copy`
//!   (`PtxModule::runtime_text`) loaded once; every Program kernel is bound to
//!   its entries (`PtxEntry{entry, when, launch}`) and its parameters
//!   (`KernelAbi::params`: operand and result addresses, row strides,
//!   `tokens`, and for attention `kv`, `seq`, `kv_cap`, `scratch`).
//! - **weights**: each encoded weight uploaded once.
//! - **arena**: one device buffer of `bytes_per_token * T` bytes for calls
//!   of up to T tokens, grown by doubling.
//! - **KV stores**: a K and a V buffer of `kv_heads * kv_cap * head_dim`
//!   activation elements each, head-major as the attention kernels read
//!   them (element (h, p, d) at `(h * kv_cap + p) * head_dim + d`). Every
//!   store has the same `kv_cap`, starting at `GpuOptions::kv_positions`
//!   (64 by default) and doubling when a call needs more (up to
//!   `max_positions`); growing copies every stored row on the device. At
//!   the start of a call one [`ptx::KvSeqDesc`] per store in use (K and V
//!   addresses, `past`) is uploaded; an attention launch gets the address
//!   of its store's descriptor. A shared f32 scratch serves every attention
//!   launch (launches are ordered).
//! - **launches**: each entry whose `When` holds for (T, seq) with the grid
//!   `Launch::grid(T, seq)`, block `launch.block`, dynamic shared memory
//!   `launch.shared_bytes`.
//! - **rows**: the lambda rows are the only thing the driver reads back per
//!   step (nothing for `last` / `step:K`); copies of rows stay on the
//!   device; skipped steps' KV slots are filled by `ouroc_kv_copy`.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Gpu`] and its types, [`GpuOptions`] |
//! | `device.rs` | [`PtxDevice`]: the driver's device operations on a GPU, kernel binding |
//! | `forward.rs` | [`GpuForward`]: the driver on it, greedy argmax on the device |
//! | `emu.rs`, `cuda.rs` | the GPUs |
//!
//! [`GpuForward`] is the driver on a `PtxDevice`; [`GpuForward::greedy_next`]
//! runs the `argmax` kernel on the device and copies back one token id.
//!
//! ## A fully device-side exit control (not done here)
//!
//! The per-step lambda read is a device -> host copy that waits for the
//! step's kernels, so the host cannot queue step r+1 before step r ends.
//! Removing it needs: (1) a small policy kernel at the end of each step
//! that reads the lambdas, updates per-token device state (cumulative
//! probability or survival in the policy's arithmetic, the decided step),
//! copies the `out` row of a token deciding now into `result` (and for
//! `weighted` accumulates `p_r * out_r` in an f32 device buffer), and
//! writes a device flag "every token decided"; (2) the later steps made
//! conditional on that flag without the host: either every kernel of the
//! body gets the flag and returns at once when it is set (launches still
//! cost their launch latency), or the loop is captured as a CUDA graph
//! with conditional nodes (`cuGraphConditionalHandleCreate`, CUDA 12.3+,
//! an IF node around each step's body); (3) the skipped-slot fill as a
//! kernel predicated on the same flag. The host would then read back only
//! the sampled token (the `argmax` kernel already runs on the device).

#[cfg(feature = "emu")]
mod emu;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "emu")]
pub use emu::EmuDevice;

mod device;
mod forward;

pub use device::{Bound, PtxDevice};
pub use forward::GpuForward;
pub use ouroc_driver::{ResidentWeights, Step, Trace};

use std::time::Instant;

/// A device address.
pub type DevPtr = u64;

/// A loaded module of a [`Device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleId(pub usize);

/// A resolved entry of a loaded module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncId(pub usize);

/// A kernel parameter value (`.param .u32` / `.param .u64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KParam {
    U32(u32),
    U64(u64),
}

/// Grid, block (1-D) and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: u32,
    pub shared_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// No usable device (no driver, no GPU).
    #[error("{0}")]
    NoDevice(String),
    /// The device or its driver failed (an allocation, a copy, a module
    /// load, a launch; the emulator's faults).
    #[error("device: {0}")]
    Device(String),
    /// The Program cannot run on this backend.
    #[error("program: {0}")]
    Program(String),
    /// A bad call (empty, out of the vocabulary, beyond the context).
    #[error("{0}")]
    Input(String),
}

/// What the PTX device needs from a GPU (see the module docs).
pub trait Gpu {
    /// A description (`NVIDIA A100-SXM4-80GB (sm_80)`, `ptx-emu`).
    fn name(&self) -> String;
    /// `bytes` of zeroed global memory, at least 256-byte aligned.
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, GpuError>;
    /// Release an allocation of `alloc`.
    fn free(&mut self, ptr: DevPtr) -> Result<(), GpuError>;
    /// Host -> device; ordered after every launch issued before.
    fn upload(&mut self, dst: DevPtr, data: &[u8]) -> Result<(), GpuError>;
    /// Device -> host; waits for every launch issued before.
    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), GpuError>;
    /// Device -> device (non-overlapping), ordered with the launches.
    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError>;
    /// Load a PTX module (the driver JIT-compiles it for the device).
    fn load_module(&mut self, ptx: &str) -> Result<ModuleId, GpuError>;
    /// Resolve the `.entry` named `entry` of a loaded module.
    fn function(&mut self, module: ModuleId, entry: &str) -> Result<FuncId, GpuError>;
    /// Launch (asynchronously where the device can).
    fn launch(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<(), GpuError>;
    /// Wait for every launch and copy issued so far.
    fn synchronize(&mut self) -> Result<(), GpuError>;
    /// Launch and return the kernel's run time in seconds. The default
    /// synchronises before and after and measures the wall clock (launch
    /// latency included); CUDA overrides it with events.
    fn launch_timed(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<f64, GpuError> {
        self.synchronize()?;
        let t = Instant::now();
        self.launch(f, cfg, params)?;
        self.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// How a [`GpuForward`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// The context length (prompt + generated positions) accepted.
    pub max_positions: usize,
    /// In decode, skip the loop steps after a token's exit.
    pub early_exit: bool,
    /// Positions each KV store holds at first (0: 64; at most
    /// `max_positions`); the stores double when a call needs more.
    pub kv_positions: usize,
    /// KV-cache sharing in decode.
    pub kv: ouroc_driver::KvMode,
}

impl GpuOptions {
    /// `max_positions` positions, no early exit, the default KV capacity.
    pub fn new(max_positions: usize) -> GpuOptions {
        GpuOptions {
            max_positions,
            early_exit: false,
            kv_positions: 0,
            kv: ouroc_driver::KvMode::Full,
        }
    }
}

/// One timed launch (see [`GpuForward::set_profiling`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchRecord {
    /// The Program kernel (`l0.qkv`), `argmax` or `kv_copy`.
    pub kernel: String,
    /// The `.entry` launched.
    pub entry: String,
    /// Rows of the call, new tokens per sequence, positions before the call.
    pub tokens: u32,
    pub seq: u32,
    pub past: u32,
    pub seconds: f64,
}

/// The K and V rows of a KV slot (see [`GpuForward::kv_rows`]).
pub type KvRows = (Vec<u8>, Vec<u8>);
