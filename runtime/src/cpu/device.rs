//! [`CpuDevice`]: the driver's device operations on the host: the arena,
//! rows read, written and copied, KV stores as byte buffers.

use super::CpuOptions;
use super::launch::Launch;
use super::source::KernelSource;
use crate::threads::{Pool, resolve_threads};
use ouroc_driver::codec;
use ouroc_driver::{CallShape, Device, DeviceError, KvArg, KvLayout, KvStore, ResidentWeights, Span};
use ouroc_kernels::spec::Encoding;
use ouroc_kernels::{ActValue, Kernel, Program};
use std::collections::HashMap;
use std::ops::Range;

/// One KV store: K and V rows in host memory.
pub(super) struct CpuStore {
    pub(super) k: Vec<u8>,
    pub(super) v: Vec<u8>,
    pub(super) layout: KvLayout,
}

impl CpuStore {
    /// Positions the buffers hold.
    pub(super) fn rows(&self) -> usize {
        self.k.len() / self.layout.row_bytes().max(1)
    }
}

/// The CPU device: kernels, threads, the arena and the KV stores.
pub struct CpuDevice {
    pub(super) values: HashMap<u32, ActValue>,
    /// Encoded weights by (id, dtype), pointing into the driver's weights.
    pub(super) weights: HashMap<(u32, Encoding), *const u8>,
    pub(super) microkernels: bool,
    /// The arena, as u64 cells (8-byte aligned); grown per call.
    pub(super) arena: Vec<u64>,
    pub(super) bytes_per_token: usize,
    pub(super) stores: Vec<Option<CpuStore>>,
    pub(super) scratch: Vec<f32>,
    /// Copies of `x` for split in-place linears.
    pub(super) x_copy: Vec<u64>,
    /// The quantised activations of a quantised Linear's launch.
    pub(super) xq: crate::qlinear::QuantRows,
    /// Launches split over the threads by tokens (prompts).
    pub token_split_launches: usize,
    /// Launches on a subset of a call's rows (`Device::launch_rows`).
    pub row_launches: usize,
    /// Bound kernels run by the microkernels / split over threads by rows.
    pub(super) microkernel_kernels: usize,
    pub(super) split_kernels: usize,
    pub(super) pool: Pool,
    // Dropped last: the launches' function pointers live in it.
    pub(super) kernels: Box<dyn KernelSource>,
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
            xq: Default::default(),
            token_split_launches: 0,
            row_launches: 0,
            microkernel_kernels: 0,
            split_kernels: 0,
            pool: Pool::new(resolve_threads(opts.threads)?)?,
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
}

/// The most sequences one call holds.
pub const MAX_BATCH: usize = 1024;

impl Device for CpuDevice {
    type Bound = Launch;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.pool.threads())
    }

    /// Each attention launch takes one `KvSeq` per sequence (the kernels
    /// and the microkernel loop over them); the bound keeps one call's
    /// descriptor array and arena reasonable.
    fn max_batch(&self) -> usize {
        MAX_BATCH
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
        self.microkernel_kernels += l.on_microkernel() as usize;
        self.split_kernels += l.row_split() as usize;
        Ok(l)
    }

    fn begin_call(&mut self, shape: CallShape, _: &[KvArg]) -> Result<(), DeviceError> {
        let cells = self
            .bytes_per_token
            .checked_mul(shape.tokens)
            .ok_or_else(|| DeviceError::Failed(format!("the arena of {} tokens overflows", shape.tokens)))?
            .div_ceil(8);
        grow_zeroed(&mut self.arena, cells, "the activation arena")
    }

    fn launch(&mut self, l: &Launch, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        self.run_launch(l, shape, kv, 0..shape.tokens)
    }

    fn launch_rows(&mut self, l: &Launch, shape: CallShape, rows: Range<usize>) -> Result<(), DeviceError> {
        self.row_launches += 1;
        self.run_launch(l, shape, &[], rows)
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
        let need = positions
            .checked_mul(s.layout.row_bytes())
            .ok_or_else(|| DeviceError::Failed(format!("a KV store of {positions} positions overflows")))?;
        if s.k.len() < need {
            let cap = need.max(s.k.len().saturating_mul(2));
            grow_zeroed(&mut s.k, cap, "the KV cache")?;
            grow_zeroed(&mut s.v, cap, "the KV cache")?;
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

/// Grows `v` to `len` zeroed elements, or returns an error naming `what` and the bytes when the
/// allocator refuses (a `resize` would abort the process instead).
fn grow_zeroed<T: Copy + Default>(v: &mut Vec<T>, len: usize, what: &str) -> Result<(), DeviceError> {
    if v.len() >= len {
        return Ok(());
    }
    v.try_reserve_exact(len - v.len()).map_err(|_| {
        DeviceError::Failed(format!(
            "cannot allocate {} bytes for {what}: not enough memory",
            len.saturating_mul(std::mem::size_of::<T>())
        ))
    })?;
    v.resize(len, T::default());
    Ok(())
}
