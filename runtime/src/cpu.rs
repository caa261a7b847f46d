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
//! prompt of at least 16 tokens it is split by tokens instead: one task
//! per thread, each the same kernel on a consecutive block of at least 8
//! tokens (row pointers offset, token count reduced), again bit for bit
//! the result of one launch. Attention runs on the calling thread. With
//! `threads == 1` nothing is split and no worker exists.

use crate::gemm;
use crate::generate::Forward;
use crate::threads::{Pool, resolve_threads};
#[cfg(feature = "jit")]
use ouroc_codegen::cpu::Jit;
use ouroc_driver::codec;
use ouroc_driver::{CallShape, Device, DeviceError, Driver, DriverOptions, KvArg, KvLayout, KvStore, Span};
pub use ouroc_driver::{KvMode, ResidentWeights, Step, Trace};
use ouroc_ir::DType;
#[cfg(feature = "jit")]
use ouroc_ir::WeightSource;
use ouroc_kernels::abi::{KvSeq, RawKernel, extra_args};
use ouroc_kernels::spec::{Family, LinearSpec, operand_dtypes};
use ouroc_kernels::{ActValue, Kernel, KernelSpec, Operand, Program};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut, Range};

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
    /// A weight (read only), kept alive by the driver's weights.
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

/// One pre-bound kernel launch (the CPU device's bound kernel).
pub struct Launch {
    f: RawKernel,
    gemm: Option<Gemm>,
    /// Operands then results.
    args: Vec<Arg>,
    /// An `Attention` (takes the KV arguments).
    attention: bool,
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

/// One KV store: K and V rows in host memory.
struct CpuStore {
    k: Vec<u8>,
    v: Vec<u8>,
    layout: KvLayout,
}

impl CpuStore {
    /// Positions the buffers hold.
    fn rows(&self) -> usize {
        self.k.len() / self.layout.row_bytes().max(1)
    }
}

/// The CPU device: kernels, threads, the arena and the KV stores.
pub struct CpuDevice {
    values: HashMap<u32, ActValue>,
    /// Encoded weights by (id, dtype), pointing into the driver's weights.
    weights: HashMap<(u32, DType), *const u8>,
    microkernels: bool,
    /// The arena, as u64 cells (8-byte aligned); grown per call.
    arena: Vec<u64>,
    bytes_per_token: usize,
    stores: Vec<Option<CpuStore>>,
    scratch: Vec<f32>,
    /// Copies of `x` for split in-place linears.
    x_copy: Vec<u64>,
    /// Launches split over the threads by tokens (prompts).
    pub token_split_launches: usize,
    /// Bound kernels run by the microkernels / split over threads by rows.
    microkernel_kernels: usize,
    split_kernels: usize,
    pool: Pool,
    // Dropped last: the launches' function pointers live in it.
    kernels: Box<dyn KernelSource>,
}

impl CpuDevice {
    /// A device on `opts.threads` threads taking its kernels from `kernels`.
    pub fn new(opts: &CpuOptions, kernels: Box<dyn KernelSource>) -> Result<CpuDevice, String> {
        Ok(CpuDevice {
            values: HashMap::new(),
            weights: HashMap::new(),
            microkernels: opts.microkernels,
            arena: Vec::new(),
            bytes_per_token: 0,
            stores: Vec::new(),
            scratch: Vec::new(),
            x_copy: Vec::new(),
            token_split_launches: 0,
            microkernel_kernels: 0,
            split_kernels: 0,
            pool: Pool::new(resolve_threads(opts.threads))?,
            kernels,
        })
    }

    /// Threads the kernels run on (the calling thread included).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Program kernels run by the std::arch microkernels of [`crate::gemm`].
    pub fn microkernel_kernels(&self) -> usize {
        self.microkernel_kernels
    }

    /// Kernels split over threads (Linear launches of more than one chunk).
    pub fn split_kernels(&self) -> usize {
        self.split_kernels
    }

    fn store(&mut self, s: KvStore) -> Result<&mut CpuStore, DeviceError> {
        self.stores
            .get_mut(s.0)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| DeviceError::Failed(format!("KV store {} is not allocated", s.0)))
    }

    /// The bytes of `at` in the arena, checked against its size.
    fn check_span(&self, at: &Span) -> Result<(), DeviceError> {
        let end = at.byte + at.rows.saturating_sub(1) * at.stride + at.row_bytes();
        if at.rows > 0 && end > self.arena.len() * 8 {
            return Err(DeviceError::Failed(format!(
                "rows {}..{end} lie outside the arena of {} bytes",
                at.byte,
                self.arena.len() * 8
            )));
        }
        Ok(())
    }

    fn arena_bytes(&mut self) -> &mut [u8] {
        let n = self.arena.len() * 8;
        // SAFETY: the u64 cells viewed as their bytes.
        unsafe { std::slice::from_raw_parts_mut(self.arena.as_mut_ptr() as *mut u8, n) }
    }

    fn bind_kernel(&mut self, k: &Kernel) -> Result<Launch, DeviceError> {
        let threads = self.pool.threads();
        let values = &self.values;
        let gemm = match &k.spec.family {
            Family::Linear(l) if self.microkernels && gemm::microkernel(k.spec.act, l.weight) => Some(Gemm {
                n: l.n,
                k: l.k,
                act: k.spec.act,
                weight: l.weight,
                bias: l.bias,
                tile: gemm::Variant::best().tile(k.spec.act, l.weight).0,
            }),
            _ => None,
        };
        let (split, rows) = match &k.spec.family {
            Family::Linear(l) if gemm.is_none() => (split_linear(k, l, values, threads), Some(l.n)),
            Family::Linear(l) => (None, Some(l.n)),
            _ => (None, None),
        };
        let f = self.kernels.raw_kernel(&k.spec).map_err(DeviceError::Program)?;
        let dtypes = operand_dtypes(&k.spec);
        let mut args = Vec::new();
        for (op, d) in k.inputs.iter().zip(&dtypes) {
            args.push(match op {
                Operand::Act(r) => {
                    let v = &values[&r.value];
                    if v.dtype != *d {
                        return Err(DeviceError::Program(format!(
                            "kernel {} reads %{} of dtype {} as {d}",
                            k.spec.name, r.value, v.dtype
                        )));
                    }
                    Arg::Act {
                        offset: v.offset as usize,
                        col_bytes: r.col * v.dtype.size_bytes(),
                        stride: v.width,
                        elem: v.dtype.size_bytes(),
                    }
                }
                Operand::Weight(w) => Arg::Weight(*self.weights.get(&(*w, *d)).ok_or_else(|| {
                    DeviceError::Program(format!(
                        "kernel {} reads weight %{w} as {d}, which is not loaded",
                        k.spec.name
                    ))
                })?),
            });
        }
        for o in &k.outputs {
            let v = &values[o];
            if v.dtype != k.spec.act {
                return Err(DeviceError::Program(format!(
                    "kernel {} writes %{o} of dtype {} as {}",
                    k.spec.name, v.dtype, k.spec.act
                )));
            }
            args.push(Arg::Act {
                offset: v.offset as usize,
                col_bytes: 0,
                stride: v.width,
                elem: v.dtype.size_bytes(),
            });
        }
        let attention = matches!(&k.spec.family, Family::Attention(_));
        debug_assert_eq!(extra_args(&k.spec), if attention || rows.is_some() { 2 } else { 0 });
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
    }
    /// Run one pre-bound launch.
    fn run_launch(&mut self, l: &Launch, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        let (tokens, seq) = (shape.tokens, shape.seq);
        let base = self.arena.as_mut_ptr() as *mut u8;
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
            return Ok(());
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
            return Ok(());
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
                return Ok(());
            }
        }
        let mut seqs: Vec<KvSeq> = Vec::new();
        if l.attention {
            let mut need = 0;
            for a in kv {
                let s = self
                    .stores
                    .get_mut(a.store.0)
                    .and_then(|s| s.as_mut())
                    .ok_or_else(|| DeviceError::Failed(format!("KV store {} is not allocated", a.store.0)))?;
                if s.rows() < a.past + seq {
                    return Err(DeviceError::Failed(format!(
                        "KV store {} holds {} positions, the launch needs {}",
                        a.store.0,
                        s.rows(),
                        a.past + seq
                    )));
                }
                seqs.push(KvSeq {
                    k: s.k.as_mut_ptr(),
                    v: s.v.as_mut_ptr(),
                    past: a.past,
                });
                need = need.max(a.past + seq);
            }
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
        Ok(())
    }
}

impl Device for CpuDevice {
    type Bound = Launch;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.pool.threads())
    }

    fn load(&mut self, program: &Program, weights: &ResidentWeights) -> Result<(), DeviceError> {
        self.values = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        self.bytes_per_token = program.arena.bytes_per_token as usize;
        self.weights = weights
            .entries()
            .into_iter()
            .map(|(key, bytes)| (key, bytes.as_ptr()))
            .collect();
        Ok(())
    }

    fn bind(&mut self, k: &Kernel) -> Result<Launch, DeviceError> {
        let l = self.bind_kernel(k)?;
        self.microkernel_kernels += l.gemm.is_some() as usize;
        self.split_kernels += l.split.as_ref().is_some_and(|s| s.chunks.len() > 1) as usize;
        Ok(l)
    }

    fn begin_call(&mut self, shape: CallShape, _: &[KvArg]) -> Result<(), DeviceError> {
        let cells = (self.bytes_per_token * shape.tokens).div_ceil(8);
        if self.arena.len() < cells {
            self.arena.resize(cells, 0);
        }
        Ok(())
    }

    fn launch(&mut self, l: &Launch, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        self.run_launch(l, shape, kv)
    }

    fn read(&mut self, at: Span) -> Result<Vec<f32>, DeviceError> {
        self.check_span(&at)?;
        let size = at.dtype.size_bytes();
        let bytes = self.arena_bytes();
        let mut out = Vec::with_capacity(at.rows * at.len);
        for t in 0..at.rows {
            let row = &bytes[at.byte + t * at.stride..][..at.len * size];
            out.extend(row.chunks_exact(size).map(|c| codec::get(c, at.dtype)));
        }
        Ok(out)
    }

    fn write(&mut self, at: Span, data: &[f32]) -> Result<(), DeviceError> {
        self.check_span(&at)?;
        let size = at.dtype.size_bytes();
        let bytes = self.arena_bytes();
        for t in 0..at.rows {
            let row = &mut bytes[at.byte + t * at.stride..][..at.len * size];
            for (c, &x) in row.chunks_exact_mut(size).zip(&data[t * at.len..(t + 1) * at.len]) {
                codec::put(c, at.dtype, x);
            }
        }
        Ok(())
    }

    fn copy(&mut self, dst: Span, src: Span) -> Result<(), DeviceError> {
        self.check_span(&dst)?;
        self.check_span(&src)?;
        let n = src.row_bytes();
        let bytes = self.arena_bytes();
        for t in 0..src.rows {
            bytes.copy_within(
                src.byte + t * src.stride..src.byte + t * src.stride + n,
                dst.byte + t * dst.stride,
            );
        }
        Ok(())
    }

    fn kv_alloc(&mut self, layout: KvLayout) -> Result<KvStore, DeviceError> {
        self.stores.push(Some(CpuStore {
            k: Vec::new(),
            v: Vec::new(),
            layout,
        }));
        Ok(KvStore(self.stores.len() - 1))
    }

    fn kv_free(&mut self, store: KvStore) -> Result<(), DeviceError> {
        self.store(store)?;
        self.stores[store.0] = None;
        Ok(())
    }

    fn kv_reserve(&mut self, store: KvStore, positions: usize) -> Result<(), DeviceError> {
        let s = self.store(store)?;
        let need = positions * s.layout.row_bytes();
        if s.k.len() < need {
            let cap = need.max(s.k.len() * 2);
            s.k.resize(cap, 0);
            s.v.resize(cap, 0);
        }
        Ok(())
    }

    fn kv_copy(&mut self, dst: KvStore, src: KvStore, rows: Range<usize>) -> Result<(), DeviceError> {
        let rb = self.store(src)?.layout.row_bytes();
        let r = rows.start * rb..rows.end * rb;
        let s = self.store(src)?;
        let (k, v) = (s.k[r.clone()].to_vec(), s.v[r.clone()].to_vec());
        let d = self.store(dst)?;
        if d.k.len() < r.end {
            return Err(DeviceError::Failed(format!(
                "KV store {}: positions {rows:?} not reserved",
                dst.0
            )));
        }
        d.k[r.clone()].copy_from_slice(&k);
        d.v[r].copy_from_slice(&v);
        Ok(())
    }

    fn kv_read(&mut self, store: KvStore, rows: Range<usize>) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let s = self.store(store)?;
        let (rb, d) = (s.layout.row_bytes(), s.layout.dtype);
        let r = rows.start * rb..rows.end * rb;
        if s.k.len() < r.end {
            return Err(DeviceError::Failed(format!(
                "KV store {}: positions {rows:?} not reserved",
                store.0
            )));
        }
        Ok((codec::decode(&s.k[r.clone()], d), codec::decode(&s.v[r], d)))
    }

    fn kv_write(&mut self, store: KvStore, row0: usize, k: &[f32], v: &[f32]) -> Result<(), DeviceError> {
        let s = self.store(store)?;
        let d = s.layout.dtype;
        let at = row0 * s.layout.row_bytes();
        let (kb, vb) = (codec::encode(k, d), codec::encode(v, d));
        if s.k.len() < at + kb.len() {
            return Err(DeviceError::Failed(format!(
                "KV store {}: rows from {row0} not reserved",
                store.0
            )));
        }
        s.k[at..at + kb.len()].copy_from_slice(&kb);
        s.v[at..at + vb.len()].copy_from_slice(&vb);
        Ok(())
    }

    fn kv_reserved(&self, store: KvStore) -> usize {
        self.stores
            .get(store.0)
            .and_then(|s| s.as_ref())
            .map_or(0, |s| s.k.len() + s.v.len())
    }
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
}
