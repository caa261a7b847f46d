//! [`PtxDevice`]: the driver's device operations on a [`Gpu`]: the Program's
//! PTX module loaded and its kernels bound to their entries and parameters,
//! the arena and KV stores in device memory, rows moved (see the module
//! docs of [`crate::gpu`]).

use super::{DevPtr, FuncId, Gpu, GpuError, GpuOptions, KParam, KvRows, LaunchCfg, LaunchRecord, ModuleId};
use ouroc_driver::codec;
use ouroc_driver::{CallShape, Device, DeviceError, DriverError, KvArg, KvLayout, KvStore, ResidentWeights, Span};
use ouroc_kernels::abi::ptx::{self, KernelAbi, ParamDesc, ParamRole, ParamTy, PtxEntry, PtxModule};
use ouroc_kernels::spec::{AttentionSpec, Encoding, Family};
use ouroc_kernels::{ActValue, Kernel, Operand, Program};
use std::collections::HashMap;
use std::ops::Range;

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

pub(super) struct BoundEntry {
    pub(super) f: FuncId,
    pub(super) entry: PtxEntry,
}

/// A Program kernel bound to its entries and parameters.
pub struct Bound {
    name: String,
    pub(super) entries: Vec<BoundEntry>,
    params: Vec<(ParamTy, PArg)>,
}

/// Initial KV capacity in positions (`GpuOptions::kv_positions` 0).
const KV_CAP_DEFAULT: usize = 64;

const DESC_BYTES: usize = 24;

/// One KV store's K and V buffers (`kv_cap` positions each).
struct GpuStore {
    layout: KvLayout,
    k: DevPtr,
    v: DevPtr,
}

impl GpuStore {
    /// Bytes of one position of one head.
    fn head_row(&self) -> usize {
        self.layout.head_dim * self.layout.dtype.size_bytes()
    }
}

/// A Program's PTX on a [`Gpu`] (see the module docs).
pub struct PtxDevice<G: Gpu> {
    pub(super) gpu: G,
    module: PtxModule,
    opts: GpuOptions,
    /// Module ids: the Program's, the KV copy's.
    modules: Option<(ModuleId, FuncId)>,
    values: HashMap<u32, ActValue>,
    bytes_per_token: usize,
    /// ABIs not bound yet, in Program order.
    next_abi: usize,
    /// Resident weights by (id, encoding), as the driver keys them: a
    /// quantised weight is its encoded bytes as they are (the CPU's bytes).
    pub(super) weights: HashMap<(u32, Encoding), (DevPtr, usize)>,
    pub(super) argmax: Option<Bound>,
    pub(super) arena: DevPtr,
    arena_tokens: usize,
    tokens: usize,
    stores: Vec<Option<GpuStore>>,
    /// Positions per store.
    pub(super) cap: usize,
    /// Stores' descriptor slots in the call's descriptor array.
    desc_slot: HashMap<KvStore, usize>,
    descs: (DevPtr, usize),
    scratch: (DevPtr, usize),
    attention: Vec<AttentionSpec>,
    /// The argmax result (one i32).
    pub(super) ids_out: DevPtr,
    past: usize,
    pub(super) profile: Option<Vec<LaunchRecord>>,
}

fn dev_err(e: GpuError) -> DeviceError {
    match e {
        GpuError::NoDevice(m) => DeviceError::Unavailable(m),
        GpuError::Program(m) => DeviceError::Program(m),
        GpuError::Device(m) | GpuError::Input(m) => DeviceError::Failed(m),
    }
}

pub(super) fn gpu_err(e: DriverError) -> GpuError {
    match e {
        DriverError::Input(m) => GpuError::Input(m),
        DriverError::Program(m) | DriverError::Device(DeviceError::Program(m)) => GpuError::Program(m),
        DriverError::Device(DeviceError::Unavailable(m)) => GpuError::NoDevice(m),
        DriverError::Device(DeviceError::Failed(m)) => GpuError::Device(m),
    }
}

impl<G: Gpu> PtxDevice<G> {
    /// A device running `module` (the Program's PTX, as
    /// `ouroc_codegen::ptx::module` emits it or `ouroc build` stored it) on `gpu`.
    pub fn new(gpu: G, module: PtxModule, opts: GpuOptions) -> PtxDevice<G> {
        let cap = match opts.kv_positions {
            0 => KV_CAP_DEFAULT,
            n => n,
        }
        .min(opts.max_positions.max(1));
        PtxDevice {
            gpu,
            module,
            opts,
            modules: None,
            values: HashMap::new(),
            bytes_per_token: 0,
            next_abi: 0,
            weights: HashMap::new(),
            argmax: None,
            arena: 0,
            arena_tokens: 0,
            tokens: 0,
            stores: Vec::new(),
            cap,
            desc_slot: HashMap::new(),
            descs: (0, 0),
            scratch: (0, 0),
            attention: Vec::new(),
            ids_out: 0,
            past: 0,
            profile: None,
        }
    }

    pub fn gpu(&self) -> &G {
        &self.gpu
    }

    pub fn gpu_mut(&mut self) -> &mut G {
        &mut self.gpu
    }

    fn store(&self, s: KvStore) -> Result<&GpuStore, GpuError> {
        self.stores
            .get(s.0)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| GpuError::Device(format!("KV store {} is not allocated", s.0)))
    }

    pub(super) fn launch_one(
        &mut self,
        kernel: &str,
        entry: &str,
        f: FuncId,
        cfg: LaunchCfg,
        params: &[KParam],
        (tokens, seq): (usize, usize),
    ) -> Result<(), GpuError> {
        if self.profile.is_some() {
            let seconds = self.gpu.launch_timed(f, cfg, params)?;
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
            self.gpu.launch(f, cfg, params)
        }
    }

    /// Launch `ouroc_kv_copy`: `bytes` per head from `offset` of each
    /// head's block (head strides `head_bytes` = [src, dst]).
    fn kv_copy_launch(
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
            block: ptx::KV_COPY_BLOCK,
            shared_bytes: 0,
        };
        let f = self
            .modules
            .ok_or_else(|| GpuError::Program("no module loaded".into()))?
            .1;
        self.launch_one("kv_copy", ptx::KV_COPY_ENTRY, f, cfg, &params, (0, 0))
    }

    /// Grow every KV store to hold `need` positions (the stored rows move).
    fn grow_kv(&mut self, need: usize) -> Result<(), GpuError> {
        if need <= self.cap {
            return Ok(());
        }
        if need > self.opts.max_positions {
            return Err(GpuError::Input(format!(
                "{need} positions exceed the context of {}",
                self.opts.max_positions
            )));
        }
        let old = self.cap;
        let cap = need.next_power_of_two().min(self.opts.max_positions).max(need);
        for i in 0..self.stores.len() {
            let Some(s) = &self.stores[i] else { continue };
            let (k, v, heads, hr) = (s.k, s.v, s.layout.kv_heads, s.head_row());
            let bytes = (heads * cap * hr).max(16);
            let (nk, nv) = (self.gpu.alloc(bytes)?, self.gpu.alloc(bytes)?);
            self.kv_copy_launch([k, v], [nk, nv], heads, [old * hr, cap * hr], 0, old * hr)?;
            self.gpu.free(k)?;
            self.gpu.free(v)?;
            let s = self.stores[i].as_mut().expect("checked above");
            (s.k, s.v) = (nk, nv);
        }
        self.cap = cap;
        self.ensure_scratch()
    }

    fn ensure_scratch(&mut self) -> Result<(), GpuError> {
        let sb = self
            .attention
            .iter()
            .map(|a| ptx::attention_scratch_bytes(a, 1, self.cap) as usize)
            .max()
            .unwrap_or(0)
            .max(16);
        if sb > self.scratch.1 {
            if self.scratch.1 > 0 {
                self.gpu.free(self.scratch.0)?;
            }
            self.scratch = (self.gpu.alloc(sb)?, sb);
        }
        Ok(())
    }

    /// Grow the arena to hold `tokens` rows.
    fn ensure_arena(&mut self, tokens: usize) -> Result<(), GpuError> {
        if tokens <= self.arena_tokens {
            return Ok(());
        }
        let n = tokens.next_power_of_two().min(self.opts.max_positions.max(tokens));
        if self.arena_tokens > 0 {
            self.gpu.free(self.arena)?;
        }
        self.arena = self.gpu.alloc((self.bytes_per_token * n).max(16))?;
        self.arena_tokens = n;
        Ok(())
    }

    /// A store's K and V as position-major bytes of positions `rows`.
    fn kv_bytes(&mut self, store: KvStore, rows: Range<usize>) -> Result<KvRows, GpuError> {
        let s = self.store(store)?;
        let (k, v, heads, hr) = (s.k, s.v, s.layout.kv_heads, s.head_row());
        let cap = self.cap;
        if rows.end > cap {
            return Err(GpuError::Device(format!(
                "KV store {}: positions {rows:?} beyond {cap}",
                store.0
            )));
        }
        let mut out = [Vec::new(), Vec::new()];
        for (o, base) in out.iter_mut().zip([k, v]) {
            let mut all = vec![0u8; heads * cap * hr];
            self.gpu.download(base, &mut all)?;
            for p in rows.clone() {
                for h in 0..heads {
                    let at = (h * cap + p) * hr;
                    o.extend_from_slice(&all[at..at + hr]);
                }
            }
        }
        let [k, v] = out;
        Ok((k, v))
    }

    fn read_span(&mut self, at: Span) -> Result<Vec<f32>, GpuError> {
        let mut out = Vec::with_capacity(at.rows * at.len);
        if at.contiguous() {
            let mut buf = vec![0u8; at.rows * at.row_bytes()];
            self.gpu.download(self.arena + at.byte as u64, &mut buf)?;
            return Ok(codec::decode(&buf, at.dtype));
        }
        let mut buf = vec![0u8; at.row_bytes()];
        for t in 0..at.rows {
            self.gpu
                .download(self.arena + (at.byte + t * at.stride) as u64, &mut buf)?;
            out.extend(codec::decode(&buf, at.dtype));
        }
        Ok(out)
    }

    fn write_span(&mut self, at: Span, data: &[f32]) -> Result<(), GpuError> {
        let bytes = codec::encode(data, at.dtype);
        if at.contiguous() {
            return self.gpu.upload(self.arena + at.byte as u64, &bytes);
        }
        let rb = at.row_bytes();
        for t in 0..at.rows {
            self.gpu.upload(
                self.arena + (at.byte + t * at.stride) as u64,
                &bytes[t * rb..(t + 1) * rb],
            )?;
        }
        Ok(())
    }

    fn copy_span(&mut self, dst: Span, src: Span) -> Result<(), GpuError> {
        if dst.contiguous() && src.contiguous() {
            return self.gpu.copy(
                self.arena + dst.byte as u64,
                self.arena + src.byte as u64,
                src.rows * src.row_bytes(),
            );
        }
        for t in 0..src.rows {
            self.gpu.copy(
                self.arena + (dst.byte + t * dst.stride) as u64,
                self.arena + (src.byte + t * src.stride) as u64,
                src.row_bytes(),
            )?;
        }
        Ok(())
    }

    fn load_program(&mut self, program: &Program, weights: &ResidentWeights) -> Result<(), GpuError> {
        self.values = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        self.bytes_per_token = program.arena.bytes_per_token as usize;
        let n = program.kernels().count();
        if self.module.kernels.len() < n {
            return Err(GpuError::Program(format!(
                "the PTX module has {} kernels, the Program {n}",
                self.module.kernels.len()
            )));
        }
        let m = self.gpu.load_module(&self.module.text)?;
        let kvm = self.gpu.load_module(&self.module.runtime_text)?;
        let kv_copy = self.gpu.function(kvm, ptx::KV_COPY_ENTRY)?;
        self.modules = Some((m, kv_copy));
        for (id, enc) in ResidentWeights::required(program) {
            let bytes = weights
                .get(id, enc)
                .ok_or_else(|| GpuError::Program(format!("weight %{id} in {enc} is missing from the weights given")))?;
            // A quantised weight's size is fixed by its shape: the kernels
            // read every tile of it, so a short buffer must never reach them.
            if let (Encoding::Quant(q), Some(v)) = (enc, program.weights.iter().find(|w| w.id == id))
                && enc.bytes(&v.shape) != Some(bytes.len())
            {
                return Err(GpuError::Program(format!(
                    "weight %{id} in {q}: {} bytes for shape {:?}",
                    bytes.len(),
                    v.shape
                )));
            }
            let p = self.gpu.alloc(bytes.len().max(16))?;
            self.gpu.upload(p, bytes)?;
            self.weights.insert((id, enc), (p, bytes.len()));
        }
        self.argmax = match self.module.kernels.get(n) {
            Some(abi) if abi.entries.len() == 1 && abi.params.len() == 5 => Some(Bound {
                name: abi.name.clone(),
                entries: dev_entries(abi, m, &mut self.gpu)?,
                params: Vec::new(),
            }),
            Some(abi) => return Err(GpuError::Program(format!("unexpected ABI of {}", abi.name))),
            None => None,
        };
        self.attention = program
            .kernels()
            .filter_map(|k| match &k.spec.family {
                Family::Attention(a) => Some(a.clone()),
                _ => None,
            })
            .collect();
        self.ensure_scratch()?;
        self.descs = (self.gpu.alloc(DESC_BYTES * 8)?, 8);
        self.ids_out = self.gpu.alloc(16)?;
        Ok(())
    }

    fn begin(&mut self, shape: CallShape, kv: &[KvArg]) -> Result<(), GpuError> {
        self.ensure_arena(shape.tokens)?;
        self.tokens = shape.tokens;
        self.past = kv.first().map_or(0, |a| a.past);
        if kv.is_empty() {
            return Ok(());
        }
        if kv.len() > self.descs.1 {
            self.gpu.free(self.descs.0)?;
            let n = kv.len().next_power_of_two();
            self.descs = (self.gpu.alloc(n * DESC_BYTES)?, n);
        }
        self.desc_slot.clear();
        let mut d = Vec::with_capacity(kv.len() * DESC_BYTES);
        for (i, a) in kv.iter().enumerate() {
            let s = self.store(a.store)?;
            d.extend_from_slice(&s.k.to_le_bytes());
            d.extend_from_slice(&s.v.to_le_bytes());
            d.extend_from_slice(&(a.past as u32).to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            self.desc_slot.insert(a.store, i);
        }
        self.gpu.upload(self.descs.0, &d)
    }

    fn launch_bound(&mut self, b: &Bound, shape: CallShape, kv: &[KvArg]) -> Result<(), GpuError> {
        let CallShape { tokens, seq } = shape;
        let kv_addr = match kv.first() {
            Some(a) => {
                let slot = *self.desc_slot.get(&a.store).ok_or_else(|| {
                    GpuError::Device(format!("KV store {} was not announced for this call", a.store.0))
                })?;
                self.descs.0 + (slot * DESC_BYTES) as u64
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
                    PArg::Kv => kv_addr,
                    PArg::Seq => seq as u64,
                    PArg::KvCap => self.cap as u64,
                    PArg::Scratch => self.scratch.0,
                };
                match ty {
                    ParamTy::U64 => KParam::U64(v),
                    ParamTy::U32 => KParam::U32(v as u32),
                }
            })
            .collect();
        for e in b
            .entries
            .iter()
            .filter(|e| e.entry.when.holds(tokens as u32, seq as u32))
        {
            let l = e.entry.launch;
            let cfg = LaunchCfg {
                grid: l.grid(tokens as u32, seq as u32),
                block: l.block,
                shared_bytes: l.shared_bytes,
            };
            self.launch_one(&b.name, &e.entry.entry, e.f, cfg, &params, (tokens, seq))?;
        }
        Ok(())
    }
}

impl<G: Gpu> Device for PtxDevice<G> {
    type Bound = Bound;

    fn name(&self) -> String {
        self.gpu.name()
    }

    fn load(&mut self, program: &Program, weights: &ResidentWeights) -> Result<(), DeviceError> {
        self.load_program(program, weights).map_err(dev_err)
    }

    fn bind(&mut self, k: &Kernel) -> Result<Bound, DeviceError> {
        let abi = self
            .module
            .kernels
            .get(self.next_abi)
            .cloned()
            .ok_or_else(|| DeviceError::Program("the PTX module lacks a kernel".into()))?;
        self.next_abi += 1;
        let m = self
            .modules
            .ok_or_else(|| DeviceError::Program("no module loaded".into()))?
            .0;
        bind(k, &abi, m, &self.values, &self.weights, &mut self.gpu).map_err(dev_err)
    }

    fn begin_call(&mut self, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        self.begin(shape, kv).map_err(dev_err)
    }

    fn launch(&mut self, b: &Bound, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        self.launch_bound(b, shape, kv).map_err(dev_err)
    }

    fn read(&mut self, at: Span) -> Result<Vec<f32>, DeviceError> {
        self.read_span(at).map_err(dev_err)
    }

    fn write(&mut self, at: Span, data: &[f32]) -> Result<(), DeviceError> {
        self.write_span(at, data).map_err(dev_err)
    }

    fn copy(&mut self, dst: Span, src: Span) -> Result<(), DeviceError> {
        self.copy_span(dst, src).map_err(dev_err)
    }

    fn kv_alloc(&mut self, layout: KvLayout) -> Result<KvStore, DeviceError> {
        let bytes = (layout.kv_heads * self.cap * layout.head_dim * layout.dtype.size_bytes()).max(16);
        let k = self.gpu.alloc(bytes).map_err(dev_err)?;
        let v = self.gpu.alloc(bytes).map_err(dev_err)?;
        self.stores.push(Some(GpuStore { layout, k, v }));
        Ok(KvStore(self.stores.len() - 1))
    }

    fn kv_free(&mut self, store: KvStore) -> Result<(), DeviceError> {
        let s = self
            .stores
            .get_mut(store.0)
            .and_then(|s| s.take())
            .ok_or_else(|| DeviceError::Failed(format!("KV store {} is not allocated", store.0)))?;
        self.gpu.free(s.k).map_err(dev_err)?;
        self.gpu.free(s.v).map_err(dev_err)
    }

    fn kv_reserve(&mut self, store: KvStore, positions: usize) -> Result<(), DeviceError> {
        self.store(store).map_err(dev_err)?;
        self.grow_kv(positions).map_err(dev_err)
    }

    fn kv_copy(&mut self, dst: KvStore, src: KvStore, rows: Range<usize>) -> Result<(), DeviceError> {
        let (s, d) = (self.store(src).map_err(dev_err)?, self.store(dst).map_err(dev_err)?);
        let (sk, sv, heads, hr, dk, dv) = (s.k, s.v, s.layout.kv_heads, s.head_row(), d.k, d.v);
        let cap = self.cap;
        self.kv_copy_launch(
            [sk, sv],
            [dk, dv],
            heads,
            [cap * hr, cap * hr],
            rows.start * hr,
            rows.len() * hr,
        )
        .map_err(dev_err)
    }

    fn kv_read(&mut self, store: KvStore, rows: Range<usize>) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let d = self.store(store).map_err(dev_err)?.layout.dtype;
        let (k, v) = self.kv_bytes(store, rows).map_err(dev_err)?;
        Ok((codec::decode(&k, d), codec::decode(&v, d)))
    }

    fn kv_write(&mut self, store: KvStore, row0: usize, k: &[f32], v: &[f32]) -> Result<(), DeviceError> {
        let s = self.store(store).map_err(dev_err)?;
        let (kp, vp, heads, hr, d, e) = (
            s.k,
            s.v,
            s.layout.kv_heads,
            s.head_row(),
            s.layout.dtype,
            s.layout.row_elems(),
        );
        let cap = self.cap;
        let rows = k.len() / e.max(1);
        if row0 + rows > cap {
            return Err(DeviceError::Failed(format!("KV store {}: rows beyond {cap}", store.0)));
        }
        for (base, data) in [(kp, k), (vp, v)] {
            let bytes = codec::encode(data, d);
            for p in 0..rows {
                for h in 0..heads {
                    let at = ((h * cap + row0 + p) * hr) as u64;
                    let from = p * heads * hr + h * hr;
                    self.gpu.upload(base + at, &bytes[from..from + hr]).map_err(dev_err)?;
                }
            }
        }
        Ok(())
    }

    fn kv_reserved(&self, store: KvStore) -> usize {
        self.stores
            .get(store.0)
            .and_then(|s| s.as_ref())
            .map_or(0, |s| 2 * s.layout.kv_heads * self.cap * s.head_row())
    }
}

/// Resolve every entry of `abi` on the device.
fn dev_entries<G: Gpu>(abi: &KernelAbi, m: ModuleId, dev: &mut G) -> Result<Vec<BoundEntry>, GpuError> {
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
fn bind<G: Gpu>(
    k: &Kernel,
    abi: &KernelAbi,
    m: ModuleId,
    values: &HashMap<u32, ActValue>,
    weights: &HashMap<(u32, Encoding), (DevPtr, usize)>,
    dev: &mut G,
) -> Result<Bound, GpuError> {
    if abi.name != k.spec.name {
        return Err(GpuError::Program(format!(
            "the PTX module's kernel {} is not the Program's {}",
            abi.name, k.spec.name
        )));
    }
    let dtypes = ouroc_kernels::spec::operand_dtypes(&k.spec);
    let encodings = ouroc_kernels::spec::operand_encodings(&k.spec);
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
            Some(Operand::Weight(w)) => weights
                .get(&(*w, encodings[i]))
                .map(|e| PArg::U64(e.0))
                .ok_or_else(|| GpuError::Program(format!("kernel {name} reads weight %{w}, which is not loaded"))),
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
    Ok(Bound {
        name: name.clone(),
        entries: dev_entries(abi, m, dev)?,
        params,
    })
}
