//! A [`Forward`] that executes a lowered [`Program`] with the CPU kernels
//! of `ouroc_codegen::cpu`, taken from a [`KernelSource`]: the Cranelift
//! JIT (feature `jit`, [`CpuForward::new`]) or the machine code linked into
//! an executable by `ouroc build` ([`LinkedKernels`]). Weights come
//! encoded ([`ResidentWeights`]): from a checkpoint at construction, or
//! encoded at build time and memory-mapped.
//!
//! It follows the Program contract (`ouroc_kernels`, and its reference
//! executor `ouroc_kernels::exec`) for one sequence per call:
//!
//! - **weights**, once at construction: the weight table walked in order
//!   (checkpoint tensors converted to the entry's dtype, recipes computed
//!   in f32 and rounded to the entry's dtype), then each resident weight
//!   encoded in the dtype its kernels read it in
//!   (`ouroc_codegen::cpu::operand_dtypes`: f32, or bf16 as its 16 bits);
//! - **kernels**: each distinct kernel taken once from the source (by
//!   code key); every launch pre-bound to its operands (arena
//!   offsets per token, column windows, row strides, weight pointers);
//! - **arena**, per call of T tokens: `bytes_per_token * T` bytes, value v
//!   at `offset * T` (a buffer kept across calls, grown when needed);
//! - **KV cache**: one store per (loop step, layer) slot, each a K and a V
//!   byte buffer of rows of `kv_heads * head_dim` activation-dtype elements,
//!   grown before each call to hold `past + seq` rows; an attention kernel
//!   gets a one-element [`KvSeq`] array and an f32 score scratch, and the
//!   slot's `past` is advanced by `seq` after it ran (decode may share
//!   stores across steps, see [`KvMode`] below);
//! - **loop**: carried values set from their inits, the body per step,
//!   the exit policy per token at the end of each step (as the reference:
//!   `ExitPolicy::decided_exit` for `last` / `step:K` / `threshold`, the
//!   f32 `p_r * out_r` accumulation for `weighted`), then the carried
//!   values set from their nexts (a parallel copy);
//! - **early exit** (option `early_exit`): in decode (one new token), once
//!   the token's exit is decided the later steps do not run; under
//!   [`KvMode::Full`] the KV rows the exit step appended are copied to the
//!   slots of every later step (so later tokens see a full cache), as
//!   `ExecOptions::exit_skips`.
//!
//! Batch is 1 (the [`Forward`] trait runs one sequence).
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
//! prompt of at least 16 tokens it is split by tokens instead: one task
//! per thread, each the same kernel on a consecutive block of at least 8
//! tokens (row pointers offset, token count reduced), again bit for bit
//! the result of one launch. Attention runs on the calling thread. With
//! `threads == 1` nothing is split and no worker
//! exists. [`CpuForward::launches`] counts the Program's kernels run (a
//! split launch counts once).
//!
//! # KV-cache sharing ([`KvMode`], spec §6)
//!
//! A call of one token is *decode* (the same test as early exit); a call of
//! several tokens is *prefill*. For the loop's attention layers:
//!
//! - `full` (the default): one store per (step, layer) at all times; step
//!   r's attention of layer i reads and appends to store (r, i).
//! - `last` and `mean`: prefill fills all R stores as `full` does (prefill
//!   needs them). At the first decode call (after `new` or `reset`), the R
//!   stores of each layer are collapsed into one *shared* store per layer
//!   and the per-step stores are freed:
//!   - `last`: the shared store is step R-1's store, unchanged;
//!   - `mean`: element j of row p of the shared K (and V) store is
//!     `round((K_0[p][j] + K_1[p][j] + ... + K_{R-1}[p][j]) / R)`: the
//!     stored activation-dtype values widened to f32, summed in f32 in step
//!     order, divided by R as f32, rounded to the activation dtype.
//!
//!   From then on, until [`CpuForward::reset`], every call (of one token or
//!   more) runs against the shared stores: step r's attention of layer i
//!   writes the K/V of the new positions `past .. past + seq` into the
//!   shared store of layer i (over the rows an earlier step of the same
//!   call wrote there) and attends over positions `0 ..= past + t`, so a
//!   step sees the shared rows for the past positions and its own K/V for
//!   the new ones. When the call's last step has run (step R-1, or the exit
//!   step e of an early-exiting decode token), the new rows become:
//!   - `last`: the K/V of the last step that ran for the token (step R-1,
//!     or e);
//!   - `mean`: the mean over the steps that ran (0 ..= e, or all R), with
//!     the arithmetic above (f32 sum in step order, divided by the number
//!     of steps run, rounded).
//!
//!   Decode then appends one K and one V row per layer per token instead
//!   of R: KV memory grows at 1/R of `full`'s ([`CpuForward::kv_bytes`]).
//!   Early exit has no later-step slots to fill under `last` / `mean`.
//!
//! Attention outside the loop (none in Ouro) always has its own store.

use crate::gemm;
use crate::generate::{Forward, Step};
use crate::threads::{Pool, resolve_threads};
#[cfg(feature = "jit")]
use ouroc_codegen::cpu::Jit;
use ouroc_ir::{DType, ExitPolicy, WeightSource};
use ouroc_kernels::abi::{KvSeq, RawKernel, extra_args};
use ouroc_kernels::spec::{Family, LinearSpec, operand_dtypes};
use ouroc_kernels::{ActRef, ActValue, Kernel, KernelSpec, LoopSpec, Operand, Program};
use std::collections::HashMap;
use std::fmt;

/// How decode shares the KV cache across loop steps (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvMode {
    /// One cache per (loop step, layer), in prefill and decode.
    #[default]
    Full,
    /// Decode: one cache per layer, step R-1's after prefill; each token's
    /// rows hold the K/V of the last step it ran.
    Last,
    /// Decode: one cache per layer, the mean over steps of the R caches
    /// after prefill; each token's rows hold the mean over the steps it ran.
    Mean,
}

impl KvMode {
    /// Every mode, in the order `--kv` lists them.
    pub const ALL: [KvMode; 3] = [KvMode::Full, KvMode::Last, KvMode::Mean];

    /// The name `--kv` takes: `full`, `last`, `mean`.
    pub fn name(self) -> &'static str {
        match self {
            KvMode::Full => "full",
            KvMode::Last => "last",
            KvMode::Mean => "mean",
        }
    }

    /// Parse a name (`full`, `last`, `mean`).
    pub fn parse(s: &str) -> Result<KvMode, String> {
        KvMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = KvMode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown KV mode `{s}`; valid modes: {}", names.join(", "))
        })
    }
}

impl fmt::Display for KvMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvMode {
    type Err = String;

    fn from_str(s: &str) -> Result<KvMode, String> {
        KvMode::parse(s)
    }
}

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
    /// CPU features) when this CPU has one for the dtypes; false: always the
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

/// Where one kernel argument lives.
#[derive(Clone, Copy, Debug)]
enum Arg {
    /// An activation: byte `offset * tokens + col_bytes` of the arena, row
    /// stride `stride` elements of `elem` bytes.
    Act {
        offset: usize,
        col_bytes: usize,
        stride: usize,
        elem: usize,
    },
    /// A weight (read only), kept alive by `CpuForward::weights`.
    Weight(*const u8),
}

impl Arg {
    /// Bytes from one token's row to the next (0 for a weight).
    fn row_bytes(&self) -> usize {
        match *self {
            Arg::Act { stride, elem, .. } => stride * elem,
            Arg::Weight(_) => 0,
        }
    }
}

/// A `Linear` split over its output rows (see the module docs).
struct Split {
    /// Per chunk, in task order: its output rows `row0 .. row1`.
    chunks: Vec<(usize, usize)>,
    /// Bytes of one activation element.
    act_elem: usize,
    /// The result overlaps `x`: copy `x`'s rows (this many bytes) first.
    copy_x: Option<usize>,
}

/// A `Linear` launch run by [`crate::gemm::linear`] instead of its kernel.
#[derive(Clone, Copy)]
struct Gemm {
    n: usize,
    k: usize,
    act: DType,
    weight: DType,
    bias: bool,
    /// Row chunks start at multiples of this (the microkernel's row tile).
    tile: usize,
}

/// One pre-bound kernel launch.
struct Launch {
    f: RawKernel,
    gemm: Option<Gemm>,
    /// Operands then results.
    args: Vec<Arg>,
    /// `Attention`: its layer.
    attention: Option<usize>,
    /// `Linear`: its output rows `n` (the row-range arguments `0 .. n`).
    rows: Option<usize>,
    split: Option<Split>,
    /// Families computed token by token (all but Attention and Linear):
    /// each argument's row bytes, to split a prompt by tokens.
    token_rows: Option<Vec<usize>>,
}

/// Where a [`CpuForward`] gets the machine code of a kernel.
pub trait KernelSource {
    /// The entry point of the kernel of `spec` (the ABI of
    /// `ouroc_kernels::abi`), valid as long as the source lives.
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String>;
}

/// Kernels compiled on demand by the Cranelift JIT.
#[cfg(feature = "jit")]
impl KernelSource for Jit {
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String> {
        let id = self.compile(spec).map_err(|e| e.to_string())?;
        Ok(self.kernel(id).raw())
    }
}

/// Kernels linked into the executable ahead of time, by code key
/// (`KernelSpec::code_key`).
pub struct LinkedKernels {
    by_key: HashMap<String, RawKernel>,
}

impl LinkedKernels {
    /// A table of kernels by code key.
    ///
    /// # Safety
    /// Each function is the kernel of its code key, compiled by
    /// `ouroc_codegen::cpu` for an ISA the running CPU has, and lives as
    /// long as the program (it is linked in).
    pub unsafe fn new(table: impl IntoIterator<Item = (String, RawKernel)>) -> LinkedKernels {
        LinkedKernels {
            by_key: table.into_iter().collect(),
        }
    }

    /// Kernels in the table.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl KernelSource for LinkedKernels {
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String> {
        let key = spec.code_key();
        self.by_key
            .get(&key)
            .copied()
            .ok_or_else(|| format!("kernel {} ({key}) is not linked into this executable", spec.name))
    }
}

/// The resident weights of a Program, each encoded in every dtype a kernel
/// reads it in (`operand_dtypes`: f32, or bf16 as its 16 bits): what the
/// kernels point at. Owned, or borrowed from memory that outlives them (a
/// memory-mapped weights file).
pub struct ResidentWeights {
    /// (weight id, dtype) -> bytes.
    entries: HashMap<(u32, DType), (*const u8, usize)>,
    /// Keeps the bytes alive.
    _owner: Box<dyn std::any::Any>,
}

impl ResidentWeights {
    /// Materialise `program`'s resident weights from `src` (recipes
    /// applied, rounded to their dtypes) and encode them.
    pub fn encode(program: &Program, src: &dyn WeightSource) -> Result<ResidentWeights, String> {
        let resident = materialise(program, src)?;
        let mut owned: Vec<((u32, DType), Vec<u8>)> = Vec::new();
        for (w, d) in ResidentWeights::required(program) {
            let data = resident
                .get(&w)
                .ok_or_else(|| format!("a kernel reads weight %{w}, which is not resident"))?;
            owned.push(((w, d), encode(data, d).map_err(|e| format!("weight %{w}: {e}"))?));
        }
        let entries = owned.iter().map(|(k, v)| (*k, (v.as_ptr(), v.len()))).collect();
        Ok(ResidentWeights {
            entries,
            _owner: Box::new(owned),
        })
    }

    /// The (weight id, dtype) pairs `program`'s kernels read, sorted.
    pub fn required(program: &Program) -> Vec<(u32, DType)> {
        let mut need: Vec<(u32, DType)> = program
            .kernels()
            .flat_map(|k| k.inputs.iter().zip(operand_dtypes(&k.spec)))
            .filter_map(|(op, d)| match op {
                Operand::Weight(w) => Some((*w, d)),
                Operand::Act(_) => None,
            })
            .collect();
        need.sort();
        need.dedup();
        need
    }

    /// Weights encoded elsewhere: `entries` point into memory `owner` keeps
    /// alive.
    ///
    /// # Safety
    /// Every slice stays valid and unmodified while `owner` lives (kernels
    /// read it without copying).
    pub unsafe fn borrowed(entries: Vec<((u32, DType), &[u8])>, owner: Box<dyn std::any::Any>) -> ResidentWeights {
        ResidentWeights {
            entries: entries.into_iter().map(|(k, v)| (k, (v.as_ptr(), v.len()))).collect(),
            _owner: owner,
        }
    }

    /// Every entry, sorted by (weight id, dtype).
    pub fn entries(&self) -> Vec<((u32, DType), &[u8])> {
        let mut v: Vec<((u32, DType), &[u8])> = self
            .entries
            .iter()
            // SAFETY: valid while self lives (see the constructors).
            .map(|(k, &(p, n))| (*k, unsafe { std::slice::from_raw_parts(p, n) }))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    /// Bytes over every entry.
    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.1).sum()
    }
}

/// One KV store: K and V rows of one (step, layer) slot, or of a layer's
/// shared cache in decode.
struct KvStore {
    k: Vec<u8>,
    v: Vec<u8>,
    /// Positions stored.
    len: usize,
    row_bytes: usize,
    dtype: DType,
}

impl KvStore {
    fn new(row_bytes: usize, dtype: DType) -> KvStore {
        KvStore {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            row_bytes,
            dtype,
        }
    }

    fn reserve_rows(&mut self, rows: usize) {
        let need = rows * self.row_bytes;
        if self.k.len() < need {
            let cap = need.max(self.k.len() * 2);
            self.k.resize(cap, 0);
            self.v.resize(cap, 0);
        }
    }

    /// Elements per row.
    fn row_elems(&self) -> usize {
        self.row_bytes / self.dtype.size_bytes()
    }

    /// Element `i` (counted from row 0) of `k` (or `v`) as f32.
    fn get(&self, v: bool, i: usize) -> f32 {
        let (buf, d) = (if v { &self.v } else { &self.k }, self.dtype);
        assert!((i + 1) * d.size_bytes() <= buf.len());
        // SAFETY: inside the buffer (checked above).
        unsafe { load(buf.as_ptr().add(i * d.size_bytes()), d) }
    }

    fn set(&mut self, v: bool, i: usize, x: f32) {
        let d = self.dtype;
        let buf = if v { &mut self.v } else { &mut self.k };
        assert!((i + 1) * d.size_bytes() <= buf.len());
        // SAFETY: inside the buffer (checked above).
        unsafe { store(buf.as_mut_ptr().add(i * d.size_bytes()), d, x) }
    }
}

/// The KV cache of the single sequence (see the module docs).
struct KvCache {
    mode: KvMode,
    /// Loop steps (1 without a loop).
    steps: usize,
    /// Per-step stores by (step, layer); attention outside the loop uses
    /// step 0. The loop layers' are removed while `shared` is in use.
    slots: HashMap<(usize, usize), KvStore>,
    /// `last` / `mean` after the first decode call: one store per loop layer.
    shared: Option<HashMap<usize, KvStore>>,
    /// The loop's attention layers: (layer, row bytes, dtype).
    loop_layers: Vec<(usize, usize, DType)>,
    /// `mean`, shared: per loop layer, the f32 sums of the current call's
    /// new K then V rows over the steps run so far.
    acc: HashMap<usize, Vec<f32>>,
}

impl KvCache {
    /// The store step `step`'s attention of `layer` uses (`in_loop`: a
    /// loop-body kernel).
    fn store_mut(&mut self, in_loop: bool, step: usize, layer: usize) -> &mut KvStore {
        match &mut self.shared {
            Some(sh) if in_loop => sh.get_mut(&layer).expect("a shared store per loop layer"),
            _ => self.slots.get_mut(&(step, layer)).expect("a slot per (step, layer)"),
        }
    }

    fn store(&self, step: usize, layer: usize) -> Option<&KvStore> {
        if step >= self.steps {
            return None;
        }
        match &self.shared {
            Some(sh) if sh.contains_key(&layer) => sh.get(&layer),
            _ => self.slots.get(&(step, layer)),
        }
    }

    fn stores(&self) -> impl Iterator<Item = &KvStore> {
        self.slots.values().chain(self.shared.iter().flat_map(|s| s.values()))
    }

    /// Collapse the loop layers' R stores into one each (`last` / `mean`).
    fn collapse(&mut self) {
        let mut shared = HashMap::new();
        for &(layer, row_bytes, dtype) in &self.loop_layers {
            let stores: Vec<KvStore> = (0..self.steps)
                .map(|s| self.slots.remove(&(s, layer)).expect("a slot per (step, layer)"))
                .collect();
            let store = match self.mode {
                KvMode::Mean => {
                    let len = stores[0].len;
                    let mut m = KvStore::new(row_bytes, dtype);
                    m.reserve_rows(len + 1);
                    m.len = len;
                    let r = self.steps as f32;
                    for v in [false, true] {
                        for i in 0..len * m.row_elems() {
                            let sum = stores.iter().fold(0.0f32, |a, s| a + s.get(v, i));
                            m.set(v, i, sum / r);
                        }
                    }
                    m
                }
                _ => stores.into_iter().last().expect("at least one step"),
            };
            shared.insert(layer, store);
        }
        self.shared = Some(shared);
    }

    /// The loop's stores back to one per (step, layer), all empty.
    fn reset(&mut self) {
        self.shared = None;
        self.acc.clear();
        for &(layer, row_bytes, dtype) in &self.loop_layers {
            for s in 0..self.steps {
                self.slots
                    .entry((s, layer))
                    .or_insert_with(|| KvStore::new(row_bytes, dtype));
            }
        }
        for s in self.slots.values_mut() {
            s.len = 0;
        }
    }

    /// `mean`, shared: add the `seq` new rows step's attention of `layer`
    /// just wrote to the layer's sums.
    fn accumulate(&mut self, layer: usize, seq: usize) {
        let store = &self.shared.as_ref().expect("shared")[&layer];
        let (e, first) = (store.row_elems(), store.len * store.row_elems());
        let acc = self.acc.entry(layer).or_insert_with(|| vec![0.0; 2 * seq * e]);
        for (h, v) in [false, true].into_iter().enumerate() {
            for j in 0..seq * e {
                acc[h * seq * e + j] += store.get(v, first + j);
            }
        }
    }

    /// Shared: after the call's last step, keep its new rows (the last
    /// step's as written, or the mean over `steps_run` steps) and advance.
    fn finish_shared(&mut self, seq: usize, steps_run: usize) {
        let mean = self.mode == KvMode::Mean;
        let mut acc = std::mem::take(&mut self.acc);
        let sh = self.shared.as_mut().expect("shared");
        for (&layer, store) in sh.iter_mut() {
            if mean {
                let sums = acc.remove(&layer).expect("every loop layer ran at least once");
                let (e, first) = (store.row_elems(), store.len * store.row_elems());
                for (h, v) in [false, true].into_iter().enumerate() {
                    for j in 0..seq * e {
                        store.set(v, first + j, sums[h * seq * e + j] / steps_run as f32);
                    }
                }
            }
            store.len += seq;
        }
    }
}

/// What one call computed at every position (the research interface,
/// `ouroc logits --backend cpu`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The first output (the logits) of every position, row after row.
    pub logits: Vec<f32>,
    /// Per loop step run: the step's output (`LoopSpec::out`) of every
    /// position, row after row.
    pub step_outputs: Vec<Vec<f32>>,
    /// Per loop step run: the exit gate's lambda of every position; empty
    /// when the program does not compute the gate (`last`, `step:K`).
    pub lambdas: Vec<Vec<f32>>,
    /// The exit step the policy chose per position (0-based).
    pub exit_steps: Vec<usize>,
}

/// A model compiled to CPU machine code, run through its KV cache.
pub struct CpuForward {
    program: Program,
    values: HashMap<u32, ActValue>,
    policy: Option<ExitPolicy>,
    early_exit: bool,
    max_positions: usize,
    /// Encoded resident weights by (id, dtype); launches point into them.
    #[allow(dead_code)]
    weights: ResidentWeights,
    before: Vec<Launch>,
    body: Vec<Launch>,
    after: Vec<Launch>,
    /// Largest gather table (token ids must be below it).
    vocab: Option<usize>,
    /// The arena, as u64 cells (8-byte aligned); grown per call.
    arena: Vec<u64>,
    kv: KvCache,
    scratch: Vec<f32>,
    /// Copies of `x` for split in-place linears.
    x_copy: Vec<u64>,
    past: usize,
    /// Kernel launches so far (all calls): one per Program kernel run,
    /// whatever the threads.
    pub launches: usize,
    /// Of those, launches split over the threads by tokens (prompts).
    pub token_split_launches: usize,
    pool: Pool,
    /// Filled by the loop during [`CpuForward::run_traced`].
    trace: Option<Trace>,
    // Dropped last: the launches' function pointers live in it.
    _kernels: Box<dyn KernelSource>,
}

/// f32 value of the element at `p` of dtype `d`.
///
/// # Safety
/// `p` is valid for `d.size_bytes()` bytes.
unsafe fn load(p: *const u8, d: DType) -> f32 {
    unsafe {
        match d {
            DType::F32 => f32::from_le_bytes(*(p as *const [u8; 4])),
            DType::BF16 => f32::from_bits((u16::from_le_bytes(*(p as *const [u8; 2])) as u32) << 16),
            // No kernel reads or writes f16 activations (Jit::compile rejects them).
            DType::F16 => unreachable!("f16 activation"),
            DType::I32 => i32::from_le_bytes(*(p as *const [u8; 4])) as f32,
        }
    }
}

/// Store `x` (rounded to `d`) at `p`.
///
/// # Safety
/// `p` is valid for `d.size_bytes()` bytes.
unsafe fn store(p: *mut u8, d: DType, x: f32) {
    let bytes = encode_one(x, d);
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
}

fn encode_one(x: f32, d: DType) -> Vec<u8> {
    match d {
        DType::F32 => x.to_le_bytes().to_vec(),
        DType::BF16 => (((d.round(x)).to_bits() >> 16) as u16).to_le_bytes().to_vec(),
        DType::F16 => unreachable!("f16 activation"),
        DType::I32 => (x as i32).to_le_bytes().to_vec(),
    }
}

fn encode(v: &[f32], d: DType) -> Result<Vec<u8>, String> {
    match d {
        DType::F32 => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => Ok(v
            .iter()
            .flat_map(|&x| (((d.round(x)).to_bits() >> 16) as u16).to_le_bytes())
            .collect()),
        d => Err(format!("weights of dtype {d} are not supported by the CPU backend")),
    }
}

/// The resident weights after their recipes, rounded to their dtypes (the
/// Program's one definition, shared with the reference executor).
fn materialise(p: &Program, src: &dyn WeightSource) -> Result<HashMap<u32, Vec<f32>>, String> {
    p.materialise_weights(src, true)
        .map_err(|(id, msg)| format!("weight %{id}: {msg}"))
}

/// The row split of a Linear on `threads` threads (None: one chunk).
fn split_linear(k: &Kernel, l: &LinearSpec, values: &HashMap<u32, ActValue>, threads: usize) -> Option<Split> {
    let parts = row_chunks(l.n, threads);
    if parts.len() < 2 {
        return None;
    }
    let act_elem = k.spec.act.size_bytes();
    let y = &values[&k.outputs[0]];
    let copy_x = match &k.inputs[0] {
        Operand::Act(r) if overlap(&values[&r.value], y) => Some(l.k * act_elem),
        _ => None,
    };
    Some(Split {
        chunks: parts.into_iter().map(|(row0, rows)| (row0, row0 + rows)).collect(),
        act_elem,
        copy_x,
    })
}

/// The chunks (first row, rows) a Linear of `n` rows is split into on
/// `threads` threads: none (one chunk) under 8 rows or on one thread.
fn row_chunks(n: usize, threads: usize) -> Vec<(usize, usize)> {
    if threads <= 1 || n < 8 {
        return vec![(0, n)];
    }
    let size = n.div_ceil(threads).next_multiple_of(4);
    (0..n.div_ceil(size))
        .map(|c| (c * size, size.min(n - c * size)))
        .collect()
}

/// Fewest tokens a task of a token-split launch gets: below that the
/// fork/join of the pool costs more than the kernel saves.
const MIN_TOKENS_PER_TASK: usize = 8;

/// Chunks of tokens a per-token kernel (`Launch::token_rows`) is split
/// into on `threads` threads: one in decode and for short prompts.
fn token_chunks(tokens: usize, threads: usize) -> usize {
    threads.min(tokens / MIN_TOKENS_PER_TASK).max(1)
}

/// Whether the per-token byte ranges of two arena values overlap.
fn overlap(a: &ActValue, b: &ActValue) -> bool {
    let range = |v: &ActValue| (v.offset as usize, v.offset as usize + v.width * v.dtype.size_bytes());
    let ((a0, a1), (b0, b1)) = (range(a), range(b));
    a0 < b1 && b0 < a1
}

impl CpuForward {
    /// Check `program`, load its weights from `weights`, JIT-compile its
    /// kernels (feature `jit`). `max_positions`: the context length (prompt + generated)
    /// accepted. `early_exit`: in decode, skip the steps after a token's
    /// exit. Runs on all cores with [`KvMode::Full`] (see
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
        CpuForward::check(&program)?;
        let weights = ResidentWeights::encode(&program, weights)?;
        let jit = Jit::new().map_err(|e| e.to_string())?;
        CpuForward::from_parts(program, weights, opts, Box::new(jit))
    }

    /// The checks on a Program before anything is loaded.
    fn check(program: &Program) -> Result<(), String> {
        program.check()?;
        if program.inputs.len() != 2 {
            return Err(format!(
                "a language-model program takes (ids, positions); this one has {} inputs",
                program.inputs.len()
            ));
        }
        if program.outputs.is_empty() {
            return Err("the program returns nothing".into());
        }
        Ok(())
    }

    /// A model from its parts: `program`, its weights already encoded
    /// ([`ResidentWeights::encode`], or read from a weights file written by
    /// `ouroc build`) and the source of its kernels (which the CpuForward
    /// keeps alive).
    pub fn from_parts(
        program: Program,
        weights: ResidentWeights,
        opts: &CpuOptions,
        mut kernels: Box<dyn KernelSource>,
    ) -> Result<CpuForward, String> {
        CpuForward::check(&program)?;
        let values: HashMap<u32, ActValue> = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        for &i in &program.inputs {
            match values.get(&i) {
                Some(v) if v.dtype == DType::I32 && v.width == 1 => {}
                _ => return Err(format!("input %{i} must be an i32 [1] per token in the arena")),
            }
        }
        let policy = program
            .loop_
            .as_ref()
            .map(|l| ExitPolicy::parse(&l.policy))
            .transpose()?;
        if let Some(l) = &program.loop_ {
            for c in &l.carried {
                if values[&c.init.value].dtype != values[&c.arg].dtype
                    || values[&c.next.value].dtype != values[&c.arg].dtype
                {
                    return Err(format!("carried %{}: init, next and arg differ in dtype", c.arg));
                }
            }
        }
        let pool = Pool::new(resolve_threads(opts.threads))?;
        let threads = pool.threads();
        let enc = &weights.entries;
        let mut bind = |ks: &[Kernel]| -> Result<Vec<Launch>, String> {
            ks.iter()
                .map(|k| {
                    let gemm = match &k.spec.family {
                        Family::Linear(l) if opts.microkernels && gemm::microkernel(k.spec.act, l.weight) => {
                            Some(Gemm {
                                n: l.n,
                                k: l.k,
                                act: k.spec.act,
                                weight: l.weight,
                                bias: l.bias,
                                tile: gemm::Variant::best().tile(k.spec.act, l.weight).0,
                            })
                        }
                        _ => None,
                    };
                    let (split, rows) = match &k.spec.family {
                        Family::Linear(l) if gemm.is_none() => (split_linear(k, l, &values, threads), Some(l.n)),
                        Family::Linear(l) => (None, Some(l.n)),
                        _ => (None, None),
                    };
                    let f = kernels.raw_kernel(&k.spec)?;
                    let dtypes = operand_dtypes(&k.spec);
                    let mut args = Vec::new();
                    for (op, d) in k.inputs.iter().zip(&dtypes) {
                        args.push(match op {
                            Operand::Act(r) => {
                                let v = &values[&r.value];
                                if v.dtype != *d {
                                    return Err(format!(
                                        "kernel {} reads %{} of dtype {} as {d}",
                                        k.spec.name, r.value, v.dtype
                                    ));
                                }
                                Arg::Act {
                                    offset: v.offset as usize,
                                    col_bytes: r.col * v.dtype.size_bytes(),
                                    stride: v.width,
                                    elem: v.dtype.size_bytes(),
                                }
                            }
                            Operand::Weight(w) => Arg::Weight(
                                enc.get(&(*w, *d))
                                    .ok_or_else(|| {
                                        format!("kernel {} reads weight %{w} as {d}, which is not loaded", k.spec.name)
                                    })?
                                    .0,
                            ),
                        });
                    }
                    for o in &k.outputs {
                        let v = &values[o];
                        if v.dtype != k.spec.act {
                            return Err(format!(
                                "kernel {} writes %{o} of dtype {} as {}",
                                k.spec.name, v.dtype, k.spec.act
                            ));
                        }
                        args.push(Arg::Act {
                            offset: v.offset as usize,
                            col_bytes: 0,
                            stride: v.width,
                            elem: v.dtype.size_bytes(),
                        });
                    }
                    let attention = match &k.spec.family {
                        Family::Attention(a) => Some(a.layer),
                        _ => None,
                    };
                    debug_assert_eq!(
                        extra_args(&k.spec),
                        if attention.is_some() || rows.is_some() { 2 } else { 0 }
                    );
                    let token_rows = match &k.spec.family {
                        Family::Attention(_) | Family::Linear(_) => None,
                        _ => Some(args.iter().map(Arg::row_bytes).collect()),
                    };
                    Ok(Launch {
                        f,
                        gemm,
                        args,
                        attention,
                        rows,
                        split,
                        token_rows,
                    })
                })
                .collect()
        };
        let before = bind(&program.before)?;
        let body = match &program.loop_ {
            Some(l) => bind(&l.body)?,
            None => Vec::new(),
        };
        let after = bind(&program.after)?;
        let vocab = program
            .kernels()
            .filter_map(|k| match &k.spec.family {
                Family::Gather(g) => Some(g.rows),
                _ => None,
            })
            .min();
        // KV stores: one per (step, layer) attention slot, in the act dtype.
        let steps = program.loop_.as_ref().map_or(1, |l| l.steps);
        let mut kv = KvCache {
            mode: opts.kv,
            steps,
            slots: HashMap::new(),
            shared: None,
            loop_layers: Vec::new(),
            acc: HashMap::new(),
        };
        let attn = |ks: &[Kernel]| -> Vec<(usize, usize, DType)> {
            ks.iter()
                .filter_map(|k| match &k.spec.family {
                    Family::Attention(a) => {
                        Some((a.layer, a.kv_heads * a.head_dim * k.spec.act.size_bytes(), k.spec.act))
                    }
                    _ => None,
                })
                .collect()
        };
        for (layer, rb, d) in attn(&program.before).into_iter().chain(attn(&program.after)) {
            kv.slots.insert((0, layer), KvStore::new(rb, d));
        }
        if let Some(l) = &program.loop_ {
            kv.loop_layers = attn(&l.body);
        }
        kv.reset();
        Ok(CpuForward {
            values,
            policy,
            early_exit: opts.early_exit,
            max_positions: opts.max_positions,
            weights,
            before,
            body,
            after,
            vocab,
            arena: Vec::new(),
            kv,
            scratch: Vec::new(),
            x_copy: Vec::new(),
            past: 0,
            launches: 0,
            token_split_launches: 0,
            trace: None,
            pool,
            program,
            _kernels: kernels,
        })
    }

    /// Positions in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forget the KV cache (under `last` / `mean` the next call is
    /// prefill again, with one store per (step, layer)).
    pub fn reset(&mut self) {
        self.kv.reset();
        self.past = 0;
    }

    /// Threads the kernels run on (the calling thread included).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The KV-cache sharing mode.
    pub fn kv_mode(&self) -> KvMode {
        self.kv.mode
    }

    /// Bytes of KV cache in use: the K and V rows of the positions stored,
    /// over every store.
    pub fn kv_bytes(&self) -> usize {
        self.kv.stores().map(|s| 2 * s.len * s.row_bytes).sum()
    }

    /// Bytes of KV cache allocated (stores grow by doubling).
    pub fn kv_reserved_bytes(&self) -> usize {
        self.kv.stores().map(|s| s.k.len() + s.v.len()).sum()
    }

    /// The K and V rows (`past_len()` rows of `kv_heads * head_dim`
    /// elements of the activation dtype, row p = position p, bf16 as its 16
    /// bits) that step `step`'s attention of layer `layer` reads for past
    /// positions: its own slot, or the layer's shared store once decode
    /// shares one (`last` / `mean`). None if there is no such slot.
    pub fn kv_rows(&self, step: usize, layer: usize) -> Option<(&[u8], &[u8])> {
        let s = self.kv.store(step, layer)?;
        let n = s.len * s.row_bytes;
        Some((&s.k[..n], &s.v[..n]))
    }

    /// As [`CpuForward::kv_rows`], writable: for experiments on the cache
    /// (tests replace slots to check the sharing modes against `full`).
    pub fn kv_rows_mut(&mut self, step: usize, layer: usize) -> Option<(&mut [u8], &mut [u8])> {
        self.kv.store(step, layer)?;
        let in_loop = self.kv.loop_layers.iter().any(|l| l.0 == layer);
        let s = self.kv.store_mut(in_loop, step, layer);
        let n = s.len * s.row_bytes;
        Some((&mut s.k[..n], &mut s.v[..n]))
    }

    /// Program kernels run by the std::arch microkernels of [`crate::gemm`].
    pub fn microkernel_kernels(&self) -> usize {
        [&self.before, &self.body, &self.after]
            .iter()
            .flat_map(|l| l.iter())
            .filter(|l| l.gemm.is_some())
            .count()
    }

    /// Kernels split over threads (Linear launches of more than one chunk).
    pub fn split_kernels(&self) -> usize {
        [&self.before, &self.body, &self.after]
            .iter()
            .flat_map(|l| l.iter())
            .filter(|l| l.split.as_ref().is_some_and(|s| s.chunks.len() > 1))
            .count()
    }

    fn base(&mut self) -> *mut u8 {
        self.arena.as_mut_ptr() as *mut u8
    }

    /// Pointer to row `t` of an activation reference.
    fn row_ptr(&mut self, r: &ActRef, tokens: usize, t: usize) -> (*mut u8, DType) {
        let v = &self.values[&r.value];
        let (d, off) = (
            v.dtype,
            v.offset as usize * tokens + (t * v.width + r.col) * v.dtype.size_bytes(),
        );
        // SAFETY: the arena holds bytes_per_token * tokens bytes; the
        // Program check guarantees the reference lies inside its value.
        (unsafe { self.base().add(off) }, d)
    }

    /// Row `t` of `r` as f32.
    fn read_row(&mut self, r: &ActRef, tokens: usize, t: usize) -> Vec<f32> {
        let (p, d) = self.row_ptr(r, tokens, t);
        (0..r.len)
            // SAFETY: inside the arena (see row_ptr).
            .map(|j| unsafe { load(p.add(j * d.size_bytes()), d) })
            .collect()
    }

    fn write_row(&mut self, value: u32, tokens: usize, t: usize, row: &[f32]) {
        let width = self.values[&value].width;
        let (p, d) = self.row_ptr(&ActRef::whole(value, width), tokens, t);
        for (j, &x) in row.iter().enumerate() {
            // SAFETY: inside the arena (see row_ptr).
            unsafe { store(p.add(j * d.size_bytes()), d, x) }
        }
    }

    /// The raw bytes of every row of `r`.
    fn read_bytes(&mut self, r: &ActRef, tokens: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for t in 0..tokens {
            let (p, d) = self.row_ptr(r, tokens, t);
            // SAFETY: inside the arena (see row_ptr).
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, r.len * d.size_bytes()) });
        }
        out
    }

    fn write_bytes(&mut self, value: u32, tokens: usize, data: &[u8]) {
        let width = self.values[&value].width;
        let row_bytes = width * self.values[&value].dtype.size_bytes();
        for t in 0..tokens {
            let (p, _) = self.row_ptr(&ActRef::whole(value, width), tokens, t);
            // SAFETY: inside the arena; `data` is a separate buffer.
            unsafe { std::ptr::copy_nonoverlapping(data[t * row_bytes..].as_ptr(), p, row_bytes) }
        }
    }

    /// Run one pre-bound launch (which = 0 before, 1 body, 2 after).
    fn launch(&mut self, which: usize, i: usize, step: usize, tokens: usize, seq: usize) {
        let base = self.arena.as_mut_ptr() as *mut u8;
        let list = match which {
            0 => &self.before,
            1 => &self.body,
            _ => &self.after,
        };
        let l = &list[i];
        let mut args: Vec<*mut u8> = Vec::with_capacity(l.args.len() + 2);
        let mut strides: Vec<usize> = Vec::with_capacity(l.args.len() + 2);
        for a in &l.args {
            match *a {
                Arg::Act {
                    offset,
                    col_bytes,
                    stride,
                    ..
                } => {
                    // SAFETY: inside the arena sized for `tokens`.
                    args.push(unsafe { base.add(offset * tokens + col_bytes) });
                    strides.push(stride);
                }
                Arg::Weight(p) => {
                    args.push(p as *mut u8);
                    strides.push(0);
                }
            }
        }
        let f = l.f;
        self.launches += 1;
        if let Some(g) = l.gemm {
            let res = 2 + g.bias as usize;
            let p = gemm::LinearArgs {
                tokens,
                n: g.n,
                k: g.k,
                act: g.act,
                weight: g.weight,
                x: args[0],
                x_stride: strides[0],
                w: args[1],
                bias: if g.bias { args[2] } else { std::ptr::null() },
                y: args[res],
                y_stride: strides[res],
            };
            // Equal row chunks, one per thread, cut at the microkernel's row
            // tile; an in-place launch (y over x) runs whole on this thread.
            let parts = if p.aliased() { 1 } else { self.pool.threads() };
            let rows = g.n.div_ceil(parts).next_multiple_of(g.tile.max(1));
            let chunks = g.n.div_ceil(rows);
            self.pool.run(chunks, &|c| {
                let range = c * rows..((c + 1) * rows).min(g.n);
                // SAFETY: the pointers are the launch's arena rows for
                // `tokens` tokens and its encoded weights (the same the
                // kernel would get); chunks write disjoint result columns.
                unsafe { gemm::linear(&p, range) }
            });
            return;
        }
        if let Some(sp) = &l.split {
            if let Some(row) = sp.copy_x {
                // In place: the chunks read x from a private copy.
                let need = (tokens * row).div_ceil(8);
                if self.x_copy.len() < need {
                    self.x_copy.resize(need, 0);
                }
                let dst = self.x_copy.as_mut_ptr() as *mut u8;
                let act_elem = sp.act_elem;
                for t in 0..tokens {
                    // SAFETY: row t of x (stride strides[0] elements) lies
                    // in the arena; the copy holds tokens * row bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(args[0].add(t * strides[0] * act_elem), dst.add(t * row), row)
                    };
                }
                args[0] = dst;
                strides[0] = row / act_elem;
            }
            // Every chunk: the same arguments, its own row range.
            args.extend([std::ptr::null_mut(); 2]);
            let na = strides.len() + 2;
            let mut chunk_strides: Vec<usize> = Vec::with_capacity(na * sp.chunks.len());
            for &(row0, row1) in &sp.chunks {
                chunk_strides.extend_from_slice(&strides);
                chunk_strides.extend([row0, row1]);
            }
            let args = args.iter().map(|&p| p as usize).collect::<Vec<usize>>();
            self.pool.run(sp.chunks.len(), &|c| {
                let a = args.as_ptr() as *const *mut u8;
                // SAFETY: the kernel ABI as for the whole kernel (below);
                // each chunk writes only its own rows of the result.
                unsafe { f(a, chunk_strides[c * na..].as_ptr(), tokens) }
            });
            return;
        }
        if let Some(n) = l.rows {
            // The whole Linear: rows 0 .. n.
            args.extend([std::ptr::null_mut(); 2]);
            strides.extend([0, n]);
        }
        if let Some(row_bytes) = &l.token_rows {
            let chunks = token_chunks(tokens, self.pool.threads());
            if chunks > 1 {
                // Each token is computed from that token's rows alone:
                // chunks of tokens are independent launches of the same
                // kernel on row-offset pointers.
                let per = tokens.div_ceil(chunks);
                self.token_split_launches += 1;
                let args = args.iter().map(|&p| p as usize).collect::<Vec<usize>>();
                self.pool.run(tokens.div_ceil(per), &|c| {
                    let t0 = c * per;
                    let a: Vec<*mut u8> = args
                        .iter()
                        .zip(row_bytes)
                        .map(|(&p, &rb)| (p + t0 * rb) as *mut u8)
                        .collect();
                    // SAFETY: as for the whole launch below, on tokens
                    // t0 .. t0 + n of every activation; chunks write
                    // disjoint token rows.
                    unsafe { f(a.as_ptr(), strides.as_ptr(), per.min(tokens - t0)) };
                });
                return;
            }
        }
        let layer = l.attention;
        let mut seqs = [KvSeq {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            past: 0,
        }];
        let in_loop = which == 1;
        if let Some(layer) = layer {
            let slot = self.kv.store_mut(in_loop, step, layer);
            slot.reserve_rows(slot.len + seq);
            seqs[0] = KvSeq {
                k: slot.k.as_mut_ptr(),
                v: slot.v.as_mut_ptr(),
                past: slot.len,
            };
            let need = slot.len + seq;
            if self.scratch.len() < need {
                self.scratch.resize(need.next_power_of_two(), 0.0);
            }
            args.push(seqs.as_mut_ptr() as *mut u8);
            strides.push(seq);
            args.push(self.scratch.as_mut_ptr() as *mut u8);
            strides.push(0);
        }
        // SAFETY: the arguments follow the kernel ABI of ouroc_codegen::cpu:
        // one pointer per operand and result (arena rows for `tokens`
        // tokens, weights encoded in their operand dtype), then for
        // attention the KvSeq array (capacity >= past + seq) and a scratch
        // of at least past + seq f32.
        unsafe { f(args.as_ptr(), strides.as_ptr(), tokens) };
        if let Some(layer) = layer {
            if in_loop && self.kv.shared.is_some() {
                // Shared: the rows stay until the call's last step ran.
                if self.kv.mode == KvMode::Mean {
                    self.kv.accumulate(layer, seq);
                }
            } else {
                self.kv.store_mut(in_loop, step, layer).len += seq;
            }
        }
    }

    /// After stopping at step `last`, append step `last`'s K/V rows of the
    /// `seq` new positions to the slots of every later step.
    fn fill_skipped_slots(&mut self, l_steps: usize, last: usize, seq: usize) {
        let layers: Vec<usize> = self.body.iter().filter_map(|l| l.attention).collect();
        for layer in layers {
            let src = &self.kv.slots[&(last, layer)];
            let rb = src.row_bytes;
            let (k, v) = (
                src.k[(src.len - seq) * rb..src.len * rb].to_vec(),
                src.v[(src.len - seq) * rb..src.len * rb].to_vec(),
            );
            for s in last + 1..l_steps {
                let dst = self.kv.slots.get_mut(&(s, layer)).expect("slot");
                dst.reserve_rows(dst.len + seq);
                dst.k[dst.len * rb..(dst.len + seq) * rb].copy_from_slice(&k);
                dst.v[dst.len * rb..(dst.len + seq) * rb].copy_from_slice(&v);
                dst.len += seq;
            }
        }
    }

    /// [`CpuForward::run`], also returning every position's logits, each
    /// step's outputs and lambdas, and the exit steps.
    pub fn run_traced(&mut self, ids: &[u32]) -> Result<(Step, Trace), String> {
        self.trace = Some(Trace::default());
        let step = self.run(ids);
        let mut trace = self.trace.take().expect("set above");
        let step = step?;
        let out = self.program.outputs[0];
        for t in 0..ids.len() {
            let row = self.read_row(&out, ids.len(), t);
            trace.logits.extend(row);
        }
        if self.program.loop_.is_none() {
            trace.exit_steps = vec![0; ids.len()];
        }
        Ok((step, trace))
    }

    /// Run `ids` after the cache: the last position's row of the program's
    /// first output (the logits), its exit depth and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, String> {
        let seq = ids.len();
        if seq == 0 {
            return Err("no tokens given".into());
        }
        if self.past + seq > self.max_positions {
            return Err(format!(
                "{} positions exceed the context of {}",
                self.past + seq,
                self.max_positions
            ));
        }
        if let Some(vocab) = self.vocab
            && let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab)
        {
            return Err(format!("token id {bad} is out of the vocabulary (0..{vocab})"));
        }
        let tokens = seq;
        let bytes = self.program.arena.bytes_per_token as usize * tokens;
        let cells = bytes.div_ceil(8);
        if self.arena.len() < cells {
            self.arena.resize(cells, 0);
        }
        let (ids_v, pos_v) = (self.program.inputs[0], self.program.inputs[1]);
        for (t, &id) in ids.iter().enumerate() {
            let (p, _) = self.row_ptr(&ActRef::whole(ids_v, 1), tokens, t);
            // SAFETY: an i32 [1] row inside the arena.
            unsafe { std::ptr::copy_nonoverlapping((id as i32).to_le_bytes().as_ptr(), p, 4) };
            let (p, _) = self.row_ptr(&ActRef::whole(pos_v, 1), tokens, t);
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(((self.past + t) as i32).to_le_bytes().as_ptr(), p, 4) };
        }
        if seq == 1 && self.kv.mode != KvMode::Full && self.kv.shared.is_none() {
            // The first decode call: one shared store per loop layer.
            self.kv.collapse();
        }
        for i in 0..self.before.len() {
            self.launch(0, i, 0, tokens, seq);
        }
        let mut depth = 1;
        let mut steps_run = 1;
        if let Some(l) = self.program.loop_.take() {
            let (d, s) = self.run_loop(&l, tokens, seq);
            self.program.loop_ = Some(l);
            depth = d;
            steps_run = s;
        }
        for i in 0..self.after.len() {
            self.launch(2, i, 0, tokens, seq);
        }
        let out = self.program.outputs[0];
        let logits = self.read_row(&out, tokens, tokens - 1);
        self.past += seq;
        Ok(Step {
            logits,
            depth,
            steps_run,
        })
    }

    /// The loop; returns the last token's exit depth and the steps run.
    fn run_loop(&mut self, l: &LoopSpec, tokens: usize, seq: usize) -> (usize, usize) {
        let policy = self.policy.expect("parsed with the loop");
        let inits: Vec<Vec<u8>> = l.carried.iter().map(|c| self.read_bytes(&c.init, tokens)).collect();
        for (c, data) in l.carried.iter().zip(&inits) {
            self.write_bytes(c.arg, tokens, data);
        }
        let width = l.out.len;
        let mut lambdas: Vec<Vec<f32>> = vec![Vec::new(); tokens];
        let mut decided: Vec<Option<usize>> = vec![None; tokens];
        let weighted = matches!(policy, ExitPolicy::Weighted);
        let mut acc = if weighted {
            vec![0.0f32; tokens * width]
        } else {
            Vec::new()
        };
        let mut survive = vec![1.0f32; tokens];
        let mut steps_run = 0;
        for r in 0..l.steps {
            for i in 0..self.body.len() {
                self.launch(1, i, r, tokens, seq);
            }
            steps_run = r + 1;
            for (t, ls) in lambdas.iter_mut().enumerate() {
                let lam = match &l.exit {
                    Some(e) => self.read_row(e, tokens, t)[0],
                    None => 0.0,
                };
                ls.push(lam);
            }
            if self.trace.is_some() {
                let rows: Vec<f32> = (0..tokens).flat_map(|t| self.read_row(&l.out, tokens, t)).collect();
                let lams: Vec<f32> = lambdas.iter().map(|ls| ls[r]).collect();
                let trace = self.trace.as_mut().expect("checked");
                trace.step_outputs.push(rows);
                if l.exit.is_some() {
                    trace.lambdas.push(lams);
                }
            }
            if weighted {
                for t in 0..tokens {
                    let lam = lambdas[t][r];
                    let pr = if r + 1 < l.steps {
                        let pr = lam * survive[t];
                        survive[t] *= 1.0 - lam;
                        pr
                    } else {
                        survive[t]
                    };
                    let row = self.read_row(&l.out, tokens, t);
                    for (a, x) in acc[t * width..(t + 1) * width].iter_mut().zip(&row) {
                        *a += pr * x;
                    }
                }
            } else {
                for t in 0..tokens {
                    if decided[t].is_some() {
                        continue;
                    }
                    if let Some(s) = policy.decided_exit(&lambdas[t], l.steps) {
                        debug_assert_eq!(s, r, "policy {policy} decided step {s} only at step {r}");
                        let row = self.read_row(&l.out, tokens, t);
                        self.write_row(l.result, tokens, t, &row);
                        decided[t] = Some(s);
                    }
                }
            }
            if r + 1 == l.steps {
                break;
            }
            let all_decided = lambdas.iter().all(|ls| policy.decided_exit(ls, l.steps).is_some());
            if self.early_exit && seq == 1 && all_decided {
                if self.kv.shared.is_none() {
                    self.fill_skipped_slots(l.steps, r, seq);
                }
                break;
            }
            let nexts: Vec<Vec<u8>> = l.carried.iter().map(|c| self.read_bytes(&c.next, tokens)).collect();
            for (c, data) in l.carried.iter().zip(&nexts) {
                self.write_bytes(c.arg, tokens, data);
            }
        }
        if self.kv.shared.is_some() {
            self.kv.finish_shared(seq, steps_run);
        }
        if weighted {
            for t in 0..tokens {
                let row = acc[t * width..(t + 1) * width].to_vec();
                self.write_row(l.result, tokens, t, &row);
            }
        }
        let exits: Vec<usize> = (0..tokens)
            .map(|t| decided[t].unwrap_or_else(|| policy.exit_step(&lambdas[t])))
            .collect();
        if let Some(trace) = &mut self.trace {
            trace.exit_steps = exits.clone();
        }
        (exits[tokens - 1] + 1, steps_run)
    }
}

impl Forward for CpuForward {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.run(ids)
    }

    fn loop_steps(&self) -> usize {
        self.program.loop_.as_ref().map_or(1, |l| l.steps)
    }
}
