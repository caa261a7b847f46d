//! Running a lowered [`Program`] on a GPU: the PTX of
//! [`ouroc_codegen::ptx::module`] launched on a [`Device`].
//!
//! # Devices
//!
//! [`Device`] is what the runner needs from a GPU: zeroed global memory at
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
//! # [`GpuForward`]
//!
//! A [`Forward`] (one sequence, batch 1) that follows the Program contract
//! (`ouroc_kernels`, reference `ouroc_kernels::exec`) exactly as
//! `CpuForward` does, with the kernels' ABI of `ouroc_codegen::ptx`:
//!
//! - **module**: `ptx::module(&program)` (one entry set per distinct
//!   kernel code, plus `argmax`) and a small copy kernel of this module
//!   (`ouroc_kv_copy`, see below) loaded once; every Program kernel is
//!   bound to its entries (`PtxEntry{entry, when, launch}`) and its
//!   parameters (`KernelAbi::params`: operand and result addresses, row
//!   strides, `tokens`, and for attention `kv`, `seq`, `kv_cap`,
//!   `scratch`).
//! - **weights**: the weight table walked once
//!   ([`Program::materialise_weights`]), each resident weight encoded in
//!   every dtype a kernel reads it in (`ptx::operand_dtypes`: f32, or bf16
//!   as its 16 bits) and uploaded once.
//! - **arena**: one device buffer of `bytes_per_token * T` bytes for calls
//!   of up to T tokens (value v at `offset * T`), grown by doubling; the
//!   token ids and positions are uploaded into it at the start of a call.
//! - **KV cache**: per (loop step, layer) slot a K and a V store of
//!   `kv_heads * kv_cap * head_dim` activation elements, head-major as the
//!   attention kernels read them (element (h, p, d) at
//!   `(h * kv_cap + p) * head_dim + d`). `kv_cap` starts at `GpuOptions::kv_positions`
//!   (64 by default) and doubles when a call needs more (up to `max_positions`); growing
//!   copies the stored rows of every head into the new stores on the
//!   device. One array of [`ptx::KvSeqDesc`] (one per slot: K and V
//!   addresses, `past`) is uploaded per call; an attention launch of step
//!   r, layer i gets the address of slot (r, i)'s descriptor. A shared f32
//!   scratch (`ptx::attention_scratch_bytes` for the largest attention)
//!   serves every decode attention launch (launches are ordered).
//! - **launches**: each entry whose `When` holds for (T, seq) with the grid
//!   `Launch::grid(T, seq)`, block `launch.block`, dynamic shared memory
//!   `launch.shared_bytes` (a device raises the function's dynamic shared
//!   memory limit when it is above 48 KiB).
//! - **loop and exit control**: carried values set from their inits
//!   (device copies; a parallel copy through a staging buffer when
//!   several are carried), the body per step with the step's KV slots,
//!   then per token the exit policy: the lambda row (`LoopSpec::exit`, one
//!   element per token) is the only thing read back per step (nothing is
//!   read for `last` / `step:K`, whose decision depends on the step index
//!   alone); a token whose exit is decided at step r gets its `out` row
//!   copied to `result` on the device. `weighted` reads the `out` rows
//!   back each step and accumulates `p_r * out_r` in f32 on the host (as
//!   the reference), uploading the rounded sum after the last step.
//! - **early exit** (`GpuOptions::early_exit`): in decode (one new token),
//!   once the token's exit is decided the later steps are not launched;
//!   the K/V rows the exit step appended are copied on the device (one
//!   `ouroc_kv_copy` launch per layer and skipped step) into the slots of
//!   every later step, as `CpuForward` and `ExecOptions::exit_skips` do.
//! - **logits**: only the last position's row of the first output is
//!   copied back by [`Forward::forward`]; [`GpuForward::run_traced`] copies
//!   every position's logits, every step's `out` rows (the hidden states
//!   h_r), the lambdas and the exit steps, for `ouroc logits`;
//!   [`GpuForward::greedy_next`] / [`GpuForward::forward_greedy`] run the
//!   `argmax` kernel on the device and copy back one token id.
//!
//! Only `KvMode::Full` (one cache per (step, layer)) is implemented here.
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
//! kernel predicated on the same flag (the `ouroc_kv_copy` launches with
//! the step as a device-side value). The host would then read back only
//! the sampled token (the `argmax` kernel already runs on the device).

mod emu;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use emu::EmuDevice;

use crate::cpu::ResidentWeights;
use crate::generate::{Forward, Step};
use ouroc_codegen::ptx::{self, KernelAbi, ParamDesc, ParamRole, ParamTy, PtxEntry};
use ouroc_ir::{DType, ExitPolicy, WeightSource};
use ouroc_kernels::spec::Family;
use ouroc_kernels::{ActRef, ActValue, Kernel, LoopSpec, Operand, Program};
use std::collections::HashMap;
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

/// What the GPU runner needs from a device (see the module docs).
pub trait Device {
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
}

impl GpuOptions {
    /// `max_positions` positions, no early exit, the default KV capacity.
    pub fn new(max_positions: usize) -> GpuOptions {
        GpuOptions {
            max_positions,
            early_exit: false,
            kv_positions: 0,
        }
    }
}

/// What one call computed at every position, for `ouroc logits` (see
/// [`GpuForward::run_traced`]; the fields of `cpu::Trace`, plus sizes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The first output (the logits) of every position, row after row.
    pub logits: Vec<f32>,
    /// Per loop step run: the step's output (`LoopSpec::out`, Ouro's
    /// normalised state h_r) of every position, row after row.
    pub step_outputs: Vec<Vec<f32>>,
    /// Per loop step run: the exit gate's lambda of every position; empty
    /// when the Program does not compute the gate (the policies `last` and
    /// `step:K` never read it, and the pipeline drops it).
    pub lambdas: Vec<Vec<f32>>,
    /// The exit step the policy chose per position (0-based; 0 without a loop).
    pub exit_steps: Vec<usize>,
    /// Elements per row of `logits` (the vocabulary).
    pub vocab: usize,
    /// Elements per row of `step_outputs` (the hidden size).
    pub hidden_size: usize,
    /// Loop steps run (fewer than the loop's only with early exit in decode).
    pub steps_run: usize,
}

/// The K and V rows of a KV slot (see [`GpuForward::kv_rows`]).
pub type KvRows = (Vec<u8>, Vec<u8>);

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

/// A small kernel of the runner itself: copies, for each of `grid.x`
/// heads and for K (`ctaid.y` 0) and V (1), `words` 32-bit words from
/// `src + head * src_head + offset` to `dst + head * dst_head + offset`.
/// Used to fill the KV slots of skipped steps and to move the stores when
/// `kv_cap` grows.
const KV_COPY_PTX: &str = r#"
.version 8.0
.target sm_80
.address_size 64

.visible .entry ouroc_kv_copy(
	.param .u64 src_k,
	.param .u64 src_v,
	.param .u64 dst_k,
	.param .u64 dst_v,
	.param .u64 src_head,
	.param .u64 dst_head,
	.param .u64 offset,
	.param .u32 words
)
.maxntid 256, 1, 1
{
	.reg .pred %p<3>;
	.reg .b32 %r<8>;
	.reg .b64 %rd<16>;
	ld.param.u32 %r1, [words];
	mov.u32 %r2, %ctaid.y;
	setp.eq.u32 %p1, %r2, 0;
	ld.param.u64 %rd1, [src_k];
	ld.param.u64 %rd2, [src_v];
	selp.b64 %rd1, %rd1, %rd2, %p1;
	ld.param.u64 %rd3, [dst_k];
	ld.param.u64 %rd4, [dst_v];
	selp.b64 %rd3, %rd3, %rd4, %p1;
	cvta.to.global.u64 %rd1, %rd1;
	cvta.to.global.u64 %rd3, %rd3;
	mov.u32 %r3, %ctaid.x;
	cvt.u64.u32 %rd5, %r3;
	ld.param.u64 %rd6, [src_head];
	ld.param.u64 %rd7, [dst_head];
	ld.param.u64 %rd8, [offset];
	mul.lo.u64 %rd9, %rd5, %rd6;
	add.s64 %rd9, %rd9, %rd8;
	add.s64 %rd1, %rd1, %rd9;
	mul.lo.u64 %rd10, %rd5, %rd7;
	add.s64 %rd10, %rd10, %rd8;
	add.s64 %rd3, %rd3, %rd10;
	mov.u32 %r4, %tid.x;
COPY:
	setp.ge.u32 %p2, %r4, %r1;
	@%p2 bra DONE;
	mul.wide.u32 %rd11, %r4, 4;
	add.s64 %rd12, %rd1, %rd11;
	ld.global.b32 %r5, [%rd12];
	add.s64 %rd13, %rd3, %rd11;
	st.global.b32 [%rd13], %r5;
	add.u32 %r4, %r4, 256;
	bra COPY;
DONE:
	ret;
}
"#;

const KV_COPY_BLOCK: u32 = 256;

/// Initial KV capacity in positions (`GpuOptions::kv_positions` 0).
const KV_CAP_DEFAULT: usize = 64;

/// Where a parameter's value comes from.
#[derive(Clone, Copy, Debug)]
enum PArg {
    /// Byte `offset * tokens + col_bytes` of the arena.
    Act {
        offset: u64,
        col_bytes: u64,
    },
    /// A fixed value (weight address, row stride).
    U64(u64),
    U32(u32),
    Tokens,
    /// The step's slot descriptor of attention layer `layer`.
    Kv,
    Seq,
    KvCap,
    Scratch,
}

struct BoundEntry {
    f: FuncId,
    entry: PtxEntry,
}

/// A Program kernel bound to its entries and parameters.
struct Bound {
    name: String,
    entries: Vec<BoundEntry>,
    params: Vec<(ParamTy, PArg)>,
    /// Attention: its layer.
    layer: Option<usize>,
}

/// One (step, layer) slot's K and V stores.
struct Slot {
    kv_heads: usize,
    /// Bytes of one position of one head (`head_dim * size(act)`).
    head_row: usize,
    k: DevPtr,
    v: DevPtr,
}

/// The KV cache on the device.
struct KvCache {
    slots: Vec<Slot>,
    index: HashMap<(usize, usize), usize>,
    /// Positions per store.
    cap: usize,
    /// One `KvSeqDesc` (24 bytes) per slot.
    descs: DevPtr,
    /// The attention scratch and its size.
    scratch: DevPtr,
    scratch_bytes: usize,
}

const DESC_BYTES: usize = 24;

/// A model run on a [`Device`] (see the module docs).
pub struct GpuForward<D: Device> {
    dev: D,
    program: Program,
    values: HashMap<u32, ActValue>,
    policy: Option<ExitPolicy>,
    opts: GpuOptions,
    /// Encoded resident weights by (id, dtype).
    weights: HashMap<(u32, DType), (DevPtr, usize)>,
    before: Vec<Bound>,
    body: Vec<Bound>,
    after: Vec<Bound>,
    argmax: Option<Bound>,
    kv_copy: FuncId,
    /// Smallest gather table (token ids must be below it).
    vocab: Option<usize>,
    arena: DevPtr,
    /// Tokens the arena holds.
    arena_tokens: usize,
    /// Staging for parallel carried copies, and its size.
    staging: Option<(DevPtr, usize)>,
    /// The argmax result (one i32).
    ids_out: DevPtr,
    kv: KvCache,
    /// The attention kernels (for the scratch size).
    attention: Vec<ouroc_kernels::spec::AttentionSpec>,
    past: usize,
    /// Tokens of the last call (rows of the logits still in the arena).
    last_tokens: usize,
    /// Program kernels launched so far (every entry of a kernel counts once).
    pub launches: usize,
    profile: Option<Vec<LaunchRecord>>,
}

fn encode(v: &[f32], d: DType) -> Result<Vec<u8>, GpuError> {
    match d {
        DType::F32 => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => Ok(v
            .iter()
            .flat_map(|&x| ((d.round(x).to_bits() >> 16) as u16).to_le_bytes())
            .collect()),
        d => Err(GpuError::Program(format!(
            "weights of dtype {d} are not supported by the GPU backend"
        ))),
    }
}

fn decode(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        DType::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// Byte range of a value's rows within one token's share of the plan.
fn extent(v: &ActValue) -> (u64, u64) {
    (v.offset, v.offset + (v.width * v.dtype.size_bytes()) as u64)
}

impl<D: Device> GpuForward<D> {
    /// Check `program`, emit and load its PTX on `dev`, upload its weights
    /// from `weights`.
    pub fn new(program: Program, weights: &dyn WeightSource, dev: D, opts: GpuOptions) -> Result<Self, GpuError> {
        program.check().map_err(GpuError::Program)?;
        let encoded = ResidentWeights::encode(&program, weights).map_err(GpuError::Program)?;
        GpuForward::from_encoded(program, &encoded, dev, opts)
    }

    /// As [`GpuForward::new`], from weights already encoded in the dtypes
    /// the kernels read (the CPU backend's and `ouroc build`'s encoding:
    /// the same bytes), e.g. a memory-mapped weights file.
    pub fn from_encoded(
        program: Program,
        weights: &ResidentWeights,
        mut dev: D,
        opts: GpuOptions,
    ) -> Result<Self, GpuError> {
        program.check().map_err(GpuError::Program)?;
        if program.inputs.len() != 2 {
            return Err(GpuError::Program(format!(
                "a language-model program takes (ids, positions); this one has {} inputs",
                program.inputs.len()
            )));
        }
        if program.outputs.is_empty() {
            return Err(GpuError::Program("the program returns nothing".into()));
        }
        if opts.max_positions == 0 {
            return Err(GpuError::Input("max_positions must be at least 1".into()));
        }
        let values: HashMap<u32, ActValue> = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        for &i in &program.inputs {
            match values.get(&i) {
                Some(v) if v.dtype == DType::I32 && v.width == 1 => {}
                _ => {
                    return Err(GpuError::Program(format!(
                        "input %{i} must be an i32 [1] per token in the arena"
                    )));
                }
            }
        }
        let policy = program
            .loop_
            .as_ref()
            .map(|l| ExitPolicy::parse(&l.policy))
            .transpose()
            .map_err(GpuError::Program)?;
        if let Some(l) = &program.loop_ {
            for c in &l.carried {
                if values[&c.init.value].dtype != values[&c.arg].dtype
                    || values[&c.next.value].dtype != values[&c.arg].dtype
                {
                    return Err(GpuError::Program(format!(
                        "carried %{}: init, next and arg differ in dtype",
                        c.arg
                    )));
                }
            }
            let (o, r) = (&values[&l.out.value], &values[&l.result]);
            if o.dtype != r.dtype {
                return Err(GpuError::Program("the loop's out and result differ in dtype".into()));
            }
        }
        let module = ptx::module(&program).map_err(|e| GpuError::Program(e.to_string()))?;
        let m = dev.load_module(&module.text)?;
        let kvm = dev.load_module(KV_COPY_PTX)?;
        let kv_copy = dev.function(kvm, "ouroc_kv_copy")?;

        // Weights: each resident weight in every dtype a kernel reads it in.
        let have: HashMap<(u32, DType), &[u8]> = weights.entries().into_iter().collect();
        let mut enc: HashMap<(u32, DType), (DevPtr, usize)> = HashMap::new();
        for key in ResidentWeights::required(&program) {
            let bytes = have.get(&key).ok_or_else(|| {
                GpuError::Program(format!(
                    "weight %{} in {} is missing from the weights given",
                    key.0, key.1
                ))
            })?;
            let p = dev.alloc(bytes.len().max(16))?;
            dev.upload(p, bytes)?;
            enc.insert(key, (p, bytes.len()));
        }

        let mut abis = module.kernels.iter();
        let mut bind_list = |ks: &[Kernel], dev: &mut D| -> Result<Vec<Bound>, GpuError> {
            ks.iter()
                .map(|k| {
                    let abi = abis
                        .next()
                        .ok_or_else(|| GpuError::Program("the PTX module lacks a kernel".into()))?;
                    bind(k, abi, m, &values, &enc, dev)
                })
                .collect()
        };
        let before = bind_list(&program.before, &mut dev)?;
        let body = match &program.loop_ {
            Some(l) => bind_list(&l.body, &mut dev)?,
            None => Vec::new(),
        };
        let after = bind_list(&program.after, &mut dev)?;
        let argmax = match abis.next() {
            Some(abi) if abi.entries.len() == 1 && abi.params.len() == 5 => Some(Bound {
                name: abi.name.clone(),
                entries: dev_entries(abi, m, &mut dev)?,
                params: Vec::new(),
                layer: None,
            }),
            Some(abi) => return Err(GpuError::Program(format!("unexpected ABI of {}", abi.name))),
            None => None,
        };
        let vocab = program
            .kernels()
            .filter_map(|k| match &k.spec.family {
                Family::Gather(g) => Some(g.rows),
                _ => None,
            })
            .min();

        // KV slots: (0, layer) outside the loop, (step, layer) in it.
        let steps = program.loop_.as_ref().map_or(1, |l| l.steps);
        let mut slot_keys = Vec::new();
        let mut attention = Vec::new();
        let mut add = |ks: &[Kernel], steps: usize, keys: &mut Vec<(usize, usize, usize, usize)>| {
            for k in ks {
                if let Family::Attention(a) = &k.spec.family {
                    attention.push(a.clone());
                    for s in 0..steps {
                        keys.push((s, a.layer, a.kv_heads, a.head_dim * k.spec.act.size_bytes()));
                    }
                }
            }
        };
        add(&program.before, 1, &mut slot_keys);
        add(&program.after, 1, &mut slot_keys);
        if let Some(l) = &program.loop_ {
            add(&l.body, steps, &mut slot_keys);
        }
        let cap = match opts.kv_positions {
            0 => KV_CAP_DEFAULT,
            n => n,
        }
        .min(opts.max_positions);
        let mut slots = Vec::new();
        let mut index = HashMap::new();
        for (step, layer, kv_heads, head_row) in slot_keys {
            if index.contains_key(&(step, layer)) {
                return Err(GpuError::Program(format!(
                    "two attention kernels use the KV slot of step {step}, layer {layer}"
                )));
            }
            let bytes = kv_heads * cap * head_row;
            let (k, v) = (dev.alloc(bytes.max(16))?, dev.alloc(bytes.max(16))?);
            index.insert((step, layer), slots.len());
            slots.push(Slot {
                kv_heads,
                head_row,
                k,
                v,
            });
        }
        let descs = dev.alloc((slots.len() * DESC_BYTES).max(DESC_BYTES))?;
        let scratch_bytes = attention
            .iter()
            .map(|a| ptx::attention_scratch_bytes(a, 1, cap) as usize)
            .max()
            .unwrap_or(0)
            .max(16);
        let scratch = dev.alloc(scratch_bytes)?;
        let ids_out = dev.alloc(16)?;
        Ok(GpuForward {
            dev,
            values,
            policy,
            opts,
            weights: enc,
            before,
            body,
            after,
            argmax,
            kv_copy,
            vocab,
            arena: 0,
            arena_tokens: 0,
            staging: None,
            ids_out,
            kv: KvCache {
                slots,
                index,
                cap,
                descs,
                scratch,
                scratch_bytes,
            },
            attention,
            past: 0,
            last_tokens: 0,
            launches: 0,
            profile: None,
            program,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The Program being run.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Positions in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forget the KV cache (its stores stay allocated).
    pub fn reset(&mut self) {
        self.past = 0;
        self.last_tokens = 0;
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.weights.values().map(|w| w.1).sum()
    }

    /// Bytes of KV cache allocated (every store holds `kv_cap` positions).
    pub fn kv_reserved_bytes(&self) -> usize {
        self.kv
            .slots
            .iter()
            .map(|s| 2 * s.kv_heads * self.kv.cap * s.head_row)
            .sum()
    }

    /// Positions each KV store holds now.
    pub fn kv_capacity(&self) -> usize {
        self.kv.cap
    }

    /// The K and V rows of slot (step, layer) for positions `0..past_len()`,
    /// position-major like `CpuForward::kv_rows` (row p = position p, heads
    /// in order, activation dtype bytes). None if there is no such slot.
    pub fn kv_rows(&mut self, step: usize, layer: usize) -> Result<Option<KvRows>, GpuError> {
        let Some(&i) = self.kv.index.get(&(step, layer)) else {
            return Ok(None);
        };
        let (k, v, heads, hr) = {
            let s = &self.kv.slots[i];
            (s.k, s.v, s.kv_heads, s.head_row)
        };
        let cap = self.kv.cap;
        let mut out = [Vec::new(), Vec::new()];
        for (o, base) in out.iter_mut().zip([k, v]) {
            let mut all = vec![0u8; heads * cap * hr];
            self.dev.download(base, &mut all)?;
            for p in 0..self.past {
                for h in 0..heads {
                    let at = (h * cap + p) * hr;
                    o.extend_from_slice(&all[at..at + hr]);
                }
            }
        }
        let [k, v] = out;
        Ok(Some((k, v)))
    }

    /// Record the run time of every launch from now on (each launch is
    /// then timed on its own: see [`Device::launch_timed`]); off by default.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    /// The launches recorded since the last call, emptied.
    pub fn take_profile(&mut self) -> Vec<LaunchRecord> {
        self.profile.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Run `ids` after the cache: the last position's logits, its exit
    /// depth and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, GpuError> {
        let c = self.call(ids, false)?;
        let out = self.program.outputs[0];
        let logits = self.read_rows(&out, c.tokens, c.tokens - 1, 1)?;
        Ok(Step {
            logits,
            depth: c.exit_step.last().map_or(1, |s| s + 1),
            steps_run: c.steps_run,
        })
    }

    /// [`GpuForward::run`], also returning every position's logits, each
    /// step's outputs and lambdas and the exit steps (what `ouroc logits`
    /// prints and writes; its decode mode is one call per token).
    pub fn run_traced(&mut self, ids: &[u32]) -> Result<(Step, Trace), GpuError> {
        let c = self.call(ids, true)?;
        let out = self.program.outputs[0];
        let logits = self.read_rows(&out, c.tokens, 0, c.tokens)?;
        let step = Step {
            logits: logits[(c.tokens - 1) * out.len..].to_vec(),
            depth: c.exit_step.last().map_or(1, |s| s + 1),
            steps_run: c.steps_run,
        };
        let trace = Trace {
            logits,
            step_outputs: c.hidden,
            lambdas: c.lambdas.unwrap_or_default(),
            exit_steps: c.exit_step,
            vocab: out.len,
            hidden_size: self.program.loop_.as_ref().map_or(0, |l| l.out.len),
            steps_run: c.steps_run,
        };
        Ok((step, trace))
    }

    /// Run `ids` after the cache and choose the next token greedily on the
    /// device: nothing but the token id (and, for `threshold`, the lambda
    /// rows) is copied back. Returns (token, exit depth, loop steps run).
    pub fn forward_greedy(&mut self, ids: &[u32]) -> Result<(u32, usize, usize), GpuError> {
        let c = self.call(ids, false)?;
        let token = self.greedy_next()?;
        Ok((token, c.exit_step.last().map_or(1, |s| s + 1), c.steps_run))
    }

    /// The greedy next token after the last call: the `argmax` kernel on
    /// the device over the last position's logits (the first maximum; NaN
    /// never wins), one i32 copied back.
    pub fn greedy_next(&mut self) -> Result<u32, GpuError> {
        if self.last_tokens == 0 {
            return Err(GpuError::Input("no call has run yet".into()));
        }
        let t = self.last_tokens;
        let out = self.program.outputs[0];
        let v = &self.values[&out.value];
        let size = v.dtype.size_bytes() as u64;
        let row = self.arena + v.offset * t as u64 + ((t - 1) * v.width + out.col) as u64 * size;
        let Some(b) = &self.argmax else {
            return Err(GpuError::Program("the module has no argmax kernel".into()));
        };
        let params = vec![
            KParam::U64(row),
            KParam::U64(self.ids_out),
            KParam::U32(v.width as u32),
            KParam::U32(1),
            KParam::U32(1),
        ];
        let (f, launch, entry) = (
            b.entries[0].f,
            b.entries[0].entry.launch,
            b.entries[0].entry.entry.clone(),
        );
        let cfg = LaunchCfg {
            grid: launch.grid(1, 1),
            block: launch.block,
            shared_bytes: launch.shared_bytes,
        };
        self.launch_one("argmax", &entry, f, cfg, &params, (1, 1))?;
        let mut id = [0u8; 4];
        self.dev.download(self.ids_out, &mut id)?;
        Ok(i32::from_le_bytes(id) as u32)
    }

    fn launch_one(
        &mut self,
        kernel: &str,
        entry: &str,
        f: FuncId,
        cfg: LaunchCfg,
        params: &[KParam],
        (tokens, seq): (usize, usize),
    ) -> Result<(), GpuError> {
        if self.profile.is_some() {
            let seconds = self.dev.launch_timed(f, cfg, params)?;
            let past = self.past as u32;
            if let Some(p) = self.profile.as_mut() {
                p.push(LaunchRecord {
                    kernel: kernel.to_string(),
                    entry: entry.to_string(),
                    tokens: tokens as u32,
                    seq: seq as u32,
                    past,
                    seconds,
                });
            }
            Ok(())
        } else {
            self.dev.launch(f, cfg, params)
        }
    }

    /// Launch Program kernel `i` of list `which` (0 before, 1 body, 2 after)
    /// at loop step `step`.
    fn launch(&mut self, which: usize, i: usize, step: usize, tokens: usize, seq: usize) -> Result<(), GpuError> {
        let list = match which {
            0 => &self.before,
            1 => &self.body,
            _ => &self.after,
        };
        let b = &list[i];
        let kv = match b.layer {
            Some(layer) => {
                let s = if which == 1 { step } else { 0 };
                let idx = self.kv.index[&(s, layer)];
                self.kv.descs + (idx * DESC_BYTES) as u64
            }
            None => 0,
        };
        let params: Vec<KParam> = b
            .params
            .iter()
            .map(|&(ty, a)| {
                let v: u64 = match a {
                    PArg::Act { offset, col_bytes } => self.arena + offset * tokens as u64 + col_bytes,
                    PArg::U64(v) => v,
                    PArg::U32(v) => v as u64,
                    PArg::Tokens => tokens as u64,
                    PArg::Kv => kv,
                    PArg::Seq => seq as u64,
                    PArg::KvCap => self.kv.cap as u64,
                    PArg::Scratch => self.kv.scratch,
                };
                match ty {
                    ParamTy::U64 => KParam::U64(v),
                    ParamTy::U32 => KParam::U32(v as u32),
                }
            })
            .collect();
        let launches: Vec<(FuncId, LaunchCfg, String)> = b
            .entries
            .iter()
            .filter(|e| e.entry.when.holds(tokens as u32, seq as u32))
            .map(|e| {
                let l = e.entry.launch;
                (
                    e.f,
                    LaunchCfg {
                        grid: l.grid(tokens as u32, seq as u32),
                        block: l.block,
                        shared_bytes: l.shared_bytes,
                    },
                    e.entry.entry.clone(),
                )
            })
            .collect();
        let name = b.name.clone();
        for (f, cfg, entry) in launches {
            self.launch_one(&name, &entry, f, cfg, &params, (tokens, seq))?;
        }
        self.launches += 1;
        Ok(())
    }

    /// Grow the arena to hold `tokens` rows.
    fn ensure_arena(&mut self, tokens: usize) -> Result<(), GpuError> {
        if tokens <= self.arena_tokens {
            return Ok(());
        }
        let n = tokens.next_power_of_two().min(self.opts.max_positions.max(tokens));
        if self.arena_tokens > 0 {
            self.dev.free(self.arena)?;
        }
        let bytes = (self.program.arena.bytes_per_token as usize * n).max(16);
        self.arena = self.dev.alloc(bytes)?;
        self.arena_tokens = n;
        Ok(())
    }

    /// Grow every KV store to hold `need` positions (the stored rows move).
    fn ensure_kv(&mut self, need: usize) -> Result<(), GpuError> {
        if need <= self.kv.cap || self.kv.slots.is_empty() {
            return Ok(());
        }
        let old = self.kv.cap;
        let cap = need.next_power_of_two().min(self.opts.max_positions).max(need);
        for i in 0..self.kv.slots.len() {
            let (k, v, heads, hr) = {
                let s = &self.kv.slots[i];
                (s.k, s.v, s.kv_heads, s.head_row)
            };
            let bytes = heads * cap * hr;
            let (nk, nv) = (self.dev.alloc(bytes)?, self.dev.alloc(bytes)?);
            if self.past > 0 {
                self.kv_copy([k, v], [nk, nv], heads, [old * hr, cap * hr], 0, self.past * hr)?;
            }
            self.dev.free(k)?;
            self.dev.free(v)?;
            let s = &mut self.kv.slots[i];
            (s.k, s.v) = (nk, nv);
        }
        self.kv.cap = cap;
        let sb = self
            .attention
            .iter()
            .map(|a| ptx::attention_scratch_bytes(a, 1, cap) as usize)
            .max()
            .unwrap_or(0)
            .max(16);
        if sb > self.kv.scratch_bytes {
            self.dev.free(self.kv.scratch)?;
            self.kv.scratch = self.dev.alloc(sb)?;
            self.kv.scratch_bytes = sb;
        }
        Ok(())
    }

    /// Launch `ouroc_kv_copy`: `bytes` per head from `offset` of each
    /// head's block (head strides `head_bytes` = [src, dst]).
    fn kv_copy(
        &mut self,
        src: [DevPtr; 2],
        dst: [DevPtr; 2],
        heads: usize,
        head_bytes: [usize; 2],
        offset: usize,
        bytes: usize,
    ) -> Result<(), GpuError> {
        debug_assert!(bytes.is_multiple_of(4) && offset.is_multiple_of(4));
        let params = [
            KParam::U64(src[0]),
            KParam::U64(src[1]),
            KParam::U64(dst[0]),
            KParam::U64(dst[1]),
            KParam::U64(head_bytes[0] as u64),
            KParam::U64(head_bytes[1] as u64),
            KParam::U64(offset as u64),
            KParam::U32((bytes / 4) as u32),
        ];
        let cfg = LaunchCfg {
            grid: [heads as u32, 2, 1],
            block: KV_COPY_BLOCK,
            shared_bytes: 0,
        };
        let f = self.kv_copy;
        self.launch_one("kv_copy", "ouroc_kv_copy", f, cfg, &params, (0, 0))
    }

    /// Address of row `t` of `r` in a call of `tokens` tokens.
    fn row_addr(&self, r: &ActRef, tokens: usize, t: usize) -> DevPtr {
        let v = &self.values[&r.value];
        self.arena + v.offset * tokens as u64 + ((t * v.width + r.col) * v.dtype.size_bytes()) as u64
    }

    /// Rows `t0 .. t0 + n` of `r`, as f32.
    fn read_rows(&mut self, r: &ActRef, tokens: usize, t0: usize, n: usize) -> Result<Vec<f32>, GpuError> {
        let v = &self.values[&r.value];
        let (d, width) = (v.dtype, v.width);
        let size = d.size_bytes();
        let mut buf = vec![0u8; n * width * size];
        let start = self.row_addr(&ActRef::whole(r.value, width), tokens, t0);
        self.dev.download(start, &mut buf)?;
        let all = decode(&buf, d);
        if r.col == 0 && r.len == width {
            return Ok(all);
        }
        Ok(all
            .chunks(width)
            .flat_map(|row| row[r.col..r.col + r.len].iter().copied())
            .collect())
    }

    /// Copy rows `t0 .. t0 + n` of `src` into the same rows of the whole
    /// value `dst` (of width `src.len`).
    fn copy_rows(&mut self, dst: u32, src: &ActRef, tokens: usize, t0: usize, n: usize) -> Result<(), GpuError> {
        let (sv, dv) = (&self.values[&src.value], &self.values[&dst]);
        let size = sv.dtype.size_bytes();
        let whole = src.col == 0 && src.len == sv.width && dv.width == src.len;
        let d = ActRef::whole(dst, dv.width);
        if whole {
            let (s, t) = (self.row_addr(src, tokens, t0), self.row_addr(&d, tokens, t0));
            if s != t {
                self.dev.copy(t, s, n * src.len * size)?;
            }
            return Ok(());
        }
        for t in t0..t0 + n {
            let (s, a) = (self.row_addr(src, tokens, t), self.row_addr(&d, tokens, t));
            self.dev.copy(a, s, src.len * size)?;
        }
        Ok(())
    }

    /// Every carried arg gets its init (`init`) or next: a parallel copy.
    fn set_carried(&mut self, l: &LoopSpec, init: bool, tokens: usize) -> Result<(), GpuError> {
        let pairs: Vec<(u32, ActRef)> = l
            .carried
            .iter()
            .map(|c| (c.arg, if init { c.init } else { c.next }))
            .collect();
        // A source that overlaps another carried arg (or its own other than
        // as the very same rows, where the copy is skipped) could be
        // overwritten before it is read: then stage every source first.
        // Extents are per token; a call's byte ranges are T times them.
        let clash = pairs.iter().enumerate().any(|(i, (_, src))| {
            let (a0, a1) = extent(&self.values[&src.value]);
            pairs.iter().enumerate().any(|(j, (arg, _))| {
                let (b0, b1) = extent(&self.values[arg]);
                a0 < b1 && b0 < a1 && !(i == j && (a0, a1) == (b0, b1))
            })
        });
        if !clash {
            for (arg, src) in &pairs {
                self.copy_rows(*arg, src, tokens, 0, tokens)?;
            }
            return Ok(());
        }
        let sizes: Vec<usize> = pairs
            .iter()
            .map(|(arg, _)| {
                let v = &self.values[arg];
                tokens * v.width * v.dtype.size_bytes()
            })
            .collect();
        let total: usize = sizes.iter().sum();
        if self.staging.is_none_or(|(_, n)| n < total) {
            if let Some((p, _)) = self.staging {
                self.dev.free(p)?;
            }
            self.staging = Some((self.dev.alloc(total)?, total));
        }
        let base = self.staging.expect("allocated above").0;
        let mut at = 0;
        for ((_, src), &n) in pairs.iter().zip(&sizes) {
            let row = n / tokens;
            if src.col == 0 && src.len == self.values[&src.value].width {
                let s = self.row_addr(src, tokens, 0);
                self.dev.copy(base + at as u64, s, n)?;
            } else {
                for t in 0..tokens {
                    let s = self.row_addr(src, tokens, t);
                    self.dev.copy(base + (at + t * row) as u64, s, row)?;
                }
            }
            at += n;
        }
        let mut at = 0;
        for ((arg, _), &n) in pairs.iter().zip(&sizes) {
            let dst = self.row_addr(&ActRef::whole(*arg, self.values[arg].width), tokens, 0);
            self.dev.copy(dst, base + at as u64, n)?;
            at += n;
        }
        Ok(())
    }

    /// One call: inputs, before, loop, after. `trace`: also read back the
    /// loop's `out` rows each step.
    fn call(&mut self, ids: &[u32], trace: bool) -> Result<CallOut, GpuError> {
        let seq = ids.len();
        if seq == 0 {
            return Err(GpuError::Input("no tokens given".into()));
        }
        if self.past + seq > self.opts.max_positions {
            return Err(GpuError::Input(format!(
                "{} positions exceed the context of {}",
                self.past + seq,
                self.opts.max_positions
            )));
        }
        if let Some(vocab) = self.vocab
            && let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab)
        {
            return Err(GpuError::Input(format!(
                "token id {bad} is out of the vocabulary (0..{vocab})"
            )));
        }
        let tokens = seq;
        self.ensure_arena(tokens)?;
        self.ensure_kv(self.past + seq)?;
        let (ids_v, pos_v) = (self.program.inputs[0], self.program.inputs[1]);
        let id_bytes: Vec<u8> = ids.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
        let pos_bytes: Vec<u8> = (0..seq).flat_map(|s| ((self.past + s) as i32).to_le_bytes()).collect();
        let a = self.row_addr(&ActRef::whole(ids_v, 1), tokens, 0);
        self.dev.upload(a, &id_bytes)?;
        let a = self.row_addr(&ActRef::whole(pos_v, 1), tokens, 0);
        self.dev.upload(a, &pos_bytes)?;
        if !self.kv.slots.is_empty() {
            let mut d = Vec::with_capacity(self.kv.slots.len() * DESC_BYTES);
            for s in &self.kv.slots {
                d.extend_from_slice(&s.k.to_le_bytes());
                d.extend_from_slice(&s.v.to_le_bytes());
                d.extend_from_slice(&(self.past as u32).to_le_bytes());
                d.extend_from_slice(&0u32.to_le_bytes());
            }
            self.dev.upload(self.kv.descs, &d)?;
        }
        for i in 0..self.before.len() {
            self.launch(0, i, 0, tokens, seq)?;
        }
        let mut out = CallOut {
            tokens,
            hidden: Vec::new(),
            lambdas: None,
            exit_step: vec![0; tokens],
            steps_run: 1,
        };
        if let Some(l) = self.program.loop_.take() {
            let r = self.run_loop(&l, tokens, seq, trace, &mut out);
            self.program.loop_ = Some(l);
            r?;
        }
        for i in 0..self.after.len() {
            self.launch(2, i, 0, tokens, seq)?;
        }
        self.past += seq;
        self.last_tokens = tokens;
        Ok(out)
    }

    fn run_loop(
        &mut self,
        l: &LoopSpec,
        tokens: usize,
        seq: usize,
        trace: bool,
        out: &mut CallOut,
    ) -> Result<(), GpuError> {
        let policy = self.policy.expect("parsed with the loop");
        self.set_carried(l, true, tokens)?;
        let width = l.out.len;
        let weighted = matches!(policy, ExitPolicy::Weighted);
        let mut lambdas: Vec<Vec<f32>> = vec![Vec::new(); tokens];
        let mut decided: Vec<Option<usize>> = vec![None; tokens];
        let mut acc = if weighted {
            vec![0.0f32; tokens * width]
        } else {
            Vec::new()
        };
        let mut survive = vec![1.0f32; tokens];
        let mut lambda_trace = l.exit.map(|_| Vec::new());
        for r in 0..l.steps {
            for i in 0..self.body.len() {
                self.launch(1, i, r, tokens, seq)?;
            }
            out.steps_run = r + 1;
            let lam = match &l.exit {
                Some(e) => self.read_rows(e, tokens, 0, tokens)?,
                None => vec![0.0; tokens],
            };
            if let Some(t) = lambda_trace.as_mut() {
                t.push(lam.clone());
            }
            for (ls, &x) in lambdas.iter_mut().zip(&lam) {
                ls.push(x);
            }
            let rows = if trace || weighted {
                Some(self.read_rows(&l.out, tokens, 0, tokens)?)
            } else {
                None
            };
            if weighted {
                let rows = rows.as_ref().expect("read above");
                for t in 0..tokens {
                    let pr = if r + 1 < l.steps {
                        let pr = lam[t] * survive[t];
                        survive[t] *= 1.0 - lam[t];
                        pr
                    } else {
                        survive[t]
                    };
                    for (a, x) in acc[t * width..(t + 1) * width]
                        .iter_mut()
                        .zip(&rows[t * width..(t + 1) * width])
                    {
                        *a += pr * x;
                    }
                }
            } else {
                // Tokens deciding at this step; consecutive ones copied at once.
                let mut now = Vec::new();
                for t in 0..tokens {
                    if decided[t].is_none()
                        && let Some(s) = policy.decided_exit(&lambdas[t], l.steps)
                    {
                        if s != r {
                            return Err(GpuError::Program(format!(
                                "policy {policy} decided step {s} only at step {r}"
                            )));
                        }
                        decided[t] = Some(s);
                        now.push(t);
                    }
                }
                let mut i = 0;
                while i < now.len() {
                    let mut j = i + 1;
                    while j < now.len() && now[j] == now[j - 1] + 1 {
                        j += 1;
                    }
                    self.copy_rows(l.result, &l.out, tokens, now[i], j - i)?;
                    i = j;
                }
            }
            if let Some(rows) = rows
                && trace
            {
                out.hidden.push(rows);
            }
            if r + 1 == l.steps {
                break;
            }
            let all_decided = lambdas.iter().all(|ls| policy.decided_exit(ls, l.steps).is_some());
            if self.opts.early_exit && seq == 1 && all_decided {
                self.fill_skipped_slots(l.steps, r, seq)?;
                break;
            }
            self.set_carried(l, false, tokens)?;
        }
        if weighted {
            let rv = &self.values[&l.result];
            let data: Vec<f32> = acc.iter().map(|&x| rv.dtype.round(x)).collect();
            let bytes = encode(&data, rv.dtype)?;
            let a = self.row_addr(&ActRef::whole(l.result, rv.width), tokens, 0);
            self.dev.upload(a, &bytes)?;
        }
        out.exit_step = lambdas
            .iter()
            .zip(&decided)
            .map(|(ls, d)| d.unwrap_or_else(|| policy.exit_step(ls)))
            .collect();
        out.lambdas = lambda_trace;
        Ok(())
    }

    /// After stopping at step `last`, copy step `last`'s K/V rows of the
    /// `seq` new positions into the slots of every later step.
    fn fill_skipped_slots(&mut self, steps: usize, last: usize, seq: usize) -> Result<(), GpuError> {
        let layers: Vec<usize> = self.body.iter().filter_map(|b| b.layer).collect();
        let cap = self.kv.cap;
        for layer in layers {
            let src = self.kv.index[&(last, layer)];
            let (sk, sv, heads, hr) = {
                let s = &self.kv.slots[src];
                (s.k, s.v, s.kv_heads, s.head_row)
            };
            for step in last + 1..steps {
                let dst = self.kv.index[&(step, layer)];
                let (dk, dv) = (self.kv.slots[dst].k, self.kv.slots[dst].v);
                self.kv_copy(
                    [sk, sv],
                    [dk, dv],
                    heads,
                    [cap * hr, cap * hr],
                    self.past * hr,
                    seq * hr,
                )?;
            }
        }
        Ok(())
    }
}

impl GpuForward<EmuDevice> {
    /// On the PTX emulator.
    pub fn emulated(program: Program, weights: &dyn WeightSource, opts: GpuOptions) -> Result<Self, GpuError> {
        GpuForward::new(program, weights, EmuDevice::new(), opts)
    }
}

struct CallOut {
    tokens: usize,
    hidden: Vec<Vec<f32>>,
    lambdas: Option<Vec<Vec<f32>>>,
    exit_step: Vec<usize>,
    steps_run: usize,
}

/// Resolve every entry of `abi` on the device.
fn dev_entries<D: Device>(abi: &KernelAbi, m: ModuleId, dev: &mut D) -> Result<Vec<BoundEntry>, GpuError> {
    abi.entries
        .iter()
        .map(|e| {
            Ok(BoundEntry {
                f: dev.function(m, &e.entry)?,
                entry: e.clone(),
            })
        })
        .collect()
}

/// Bind Program kernel `k` to its ABI: entries resolved, each parameter's source.
fn bind<D: Device>(
    k: &Kernel,
    abi: &KernelAbi,
    m: ModuleId,
    values: &HashMap<u32, ActValue>,
    weights: &HashMap<(u32, DType), (DevPtr, usize)>,
    dev: &mut D,
) -> Result<Bound, GpuError> {
    if abi.name != k.spec.name {
        return Err(GpuError::Program(format!(
            "the PTX module's kernel {} is not the Program's {}",
            abi.name, k.spec.name
        )));
    }
    let dtypes = ptx::operand_dtypes(&k.spec);
    let name = &k.spec.name;
    for (op, d) in k.inputs.iter().zip(&dtypes) {
        if let Operand::Act(r) = op
            && values[&r.value].dtype != *d
        {
            return Err(GpuError::Program(format!(
                "kernel {name} reads %{} of dtype {} as {d}",
                r.value, values[&r.value].dtype
            )));
        }
    }
    for o in &k.outputs {
        if values[o].dtype != k.spec.act {
            return Err(GpuError::Program(format!(
                "kernel {name} writes %{o} of dtype {} as {}",
                values[o].dtype, k.spec.act
            )));
        }
    }
    let operand = |i: usize| -> Result<PArg, GpuError> {
        match k.inputs.get(i) {
            Some(Operand::Act(r)) => {
                let v = &values[&r.value];
                Ok(PArg::Act {
                    offset: v.offset,
                    col_bytes: (r.col * v.dtype.size_bytes()) as u64,
                })
            }
            Some(Operand::Weight(w)) => Ok(PArg::U64(weights[&(*w, dtypes[i])].0)),
            None => Err(GpuError::Program(format!("kernel {name}: no operand {i}"))),
        }
    };
    let operand_stride = |i: usize| -> Result<PArg, GpuError> {
        match k.inputs.get(i) {
            Some(Operand::Act(r)) => Ok(PArg::U32(values[&r.value].width as u32)),
            _ => Err(GpuError::Program(format!("kernel {name}: operand {i} has no stride"))),
        }
    };
    let result = |i: usize| -> Result<&ActValue, GpuError> {
        k.outputs
            .get(i)
            .map(|o| &values[o])
            .ok_or_else(|| GpuError::Program(format!("kernel {name}: no result {i}")))
    };
    let params = abi
        .params
        .iter()
        .map(|p: &ParamDesc| {
            let a = match p.role {
                ParamRole::Operand(i) => operand(i)?,
                ParamRole::Result(i) => PArg::Act {
                    offset: result(i)?.offset,
                    col_bytes: 0,
                },
                ParamRole::OperandStride(i) => operand_stride(i)?,
                ParamRole::ResultStride(i) => PArg::U32(result(i)?.width as u32),
                ParamRole::Tokens => PArg::Tokens,
                ParamRole::Kv => PArg::Kv,
                ParamRole::Seq => PArg::Seq,
                ParamRole::KvCap => PArg::KvCap,
                ParamRole::Scratch => PArg::Scratch,
            };
            Ok((p.ty, a))
        })
        .collect::<Result<Vec<_>, GpuError>>()?;
    let layer = match &k.spec.family {
        Family::Attention(a) => Some(a.layer),
        _ => None,
    };
    Ok(Bound {
        name: name.clone(),
        entries: dev_entries(abi, m, dev)?,
        params,
        layer,
    })
}

impl<D: Device> Forward for GpuForward<D> {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.run(ids).map_err(|e| e.to_string())
    }

    fn loop_steps(&self) -> usize {
        self.program.loop_.as_ref().map_or(1, |l| l.steps)
    }
}
