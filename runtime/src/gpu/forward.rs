//! [`GpuForward`]: the driver on a [`PtxDevice`], with what only a GPU
//! offers: the next token chosen on the device, per-launch timing.

#[cfg(feature = "emu")]
use super::EmuDevice;
use super::device::gpu_err;
use super::{Gpu, GpuError, GpuOptions, KParam, KvRows, LaunchCfg, LaunchRecord, PtxDevice};
use crate::generate::Forward;
use ouroc_driver::codec;
use ouroc_driver::{Driver, DriverOptions, ResidentWeights, Step, Trace};
use ouroc_ir::DType;
#[cfg(feature = "ptx")]
use ouroc_ir::WeightSource;
use ouroc_kernels::Program;
use ouroc_kernels::abi::ptx::PtxModule;
use std::ops::{Deref, DerefMut};

/// A model run on a [`Gpu`]: the driver on a [`PtxDevice`] (its methods
/// through `Deref`).
pub struct GpuForward<G: Gpu>(Driver<PtxDevice<G>>);

impl<G: Gpu> Deref for GpuForward<G> {
    type Target = Driver<PtxDevice<G>>;

    fn deref(&self) -> &Driver<PtxDevice<G>> {
        &self.0
    }
}

impl<G: Gpu> DerefMut for GpuForward<G> {
    fn deref_mut(&mut self) -> &mut Driver<PtxDevice<G>> {
        &mut self.0
    }
}

impl<G: Gpu> GpuForward<G> {
    /// Check `program`, emit and load its PTX on `gpu`, upload its weights
    /// from `weights`.
    #[cfg(feature = "ptx")]
    pub fn new(program: Program, weights: &dyn WeightSource, gpu: G, opts: GpuOptions) -> Result<Self, GpuError> {
        ouroc_driver::check_program(&program).map_err(GpuError::Program)?;
        let encoded = ResidentWeights::encode(&program, weights, true).map_err(GpuError::Program)?;
        GpuForward::from_encoded(program, encoded, gpu, opts)
    }

    /// As [`GpuForward::new`], from weights already encoded in the dtypes
    /// the kernels read (the CPU backend's and `ouroc build`'s encoding:
    /// the same bytes), e.g. a memory-mapped weights file.
    #[cfg(feature = "ptx")]
    pub fn from_encoded(
        program: Program,
        weights: ResidentWeights,
        gpu: G,
        opts: GpuOptions,
    ) -> Result<Self, GpuError> {
        ouroc_driver::check_program(&program).map_err(GpuError::Program)?;
        let module = ouroc_codegen::ptx::module(&program).map_err(|e| GpuError::Program(e.to_string()))?;
        GpuForward::with_module(program, weights, module, gpu, opts)
    }

    /// As [`GpuForward::from_encoded`], with the Program's PTX module given
    /// (as `ouroc build` stores it in an executable).
    pub fn with_module(
        program: Program,
        weights: ResidentWeights,
        module: PtxModule,
        gpu: G,
        opts: GpuOptions,
    ) -> Result<Self, GpuError> {
        if opts.max_positions == 0 {
            return Err(GpuError::Input("max_positions must be at least 1".into()));
        }
        let dopts = DriverOptions {
            max_positions: opts.max_positions,
            early_exit: opts.early_exit,
            kv: opts.kv,
        };
        let dev = PtxDevice::new(gpu, module, opts);
        Ok(GpuForward(Driver::new(program, weights, dev, dopts).map_err(gpu_err)?))
    }

    /// The GPU.
    pub fn device(&self) -> &G {
        self.0.device().gpu()
    }

    pub fn device_mut(&mut self) -> &mut G {
        self.0.device_mut().gpu_mut()
    }

    /// Forget the KV cache (its stores stay allocated).
    pub fn reset(&mut self) {
        // Resetting a `full` cache only rewinds it; a shared one is reopened.
        let _ = self.0.reset();
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        self.0.device().weights.values().map(|w| w.1).sum()
    }

    /// Positions each KV store holds now.
    pub fn kv_capacity(&self) -> usize {
        self.0.device().cap
    }

    /// The K and V rows of slot (step, layer) for positions `0..past_len()`,
    /// position-major (row p = position p, heads in order, activation dtype
    /// bytes). None if there is no such slot.
    pub fn kv_rows(&mut self, step: usize, layer: usize) -> Result<Option<KvRows>, GpuError> {
        let Some((k, v)) = self.0.kv_rows(step, layer).map_err(gpu_err)? else {
            return Ok(None);
        };
        let d = self.0.program().kv.first().map_or(DType::F32, |s| s.dtype);
        Ok(Some((codec::encode(&k, d), codec::encode(&v, d))))
    }

    /// Record the run time of every launch from now on (each launch is
    /// then timed on its own: see [`Gpu::launch_timed`]); off by default.
    pub fn set_profiling(&mut self, on: bool) {
        self.0.device_mut().profile = on.then(Vec::new);
    }

    /// The launches recorded since the last call, emptied.
    pub fn take_profile(&mut self) -> Vec<LaunchRecord> {
        self.0
            .device_mut()
            .profile
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Run `ids` after the cache: the last position's logits, its exit
    /// depth and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, GpuError> {
        self.0.run(ids).map_err(gpu_err)
    }

    /// [`GpuForward::run`], also returning every position's logits, each
    /// step's outputs and lambdas and the exit steps.
    pub fn run_traced(&mut self, ids: &[u32]) -> Result<(Step, Trace), GpuError> {
        self.0.run_traced(ids).map_err(gpu_err)
    }

    /// Run `ids` after the cache and choose the next token greedily on the
    /// device: nothing but the token id (and, for `threshold`, the lambda
    /// rows) is copied back. Returns (token, exit depth, loop steps run).
    pub fn forward_greedy(&mut self, ids: &[u32]) -> Result<(u32, usize, usize), GpuError> {
        let c = self.0.run_quiet(ids).map_err(gpu_err)?;
        let token = self.greedy_next()?;
        Ok((token, c.exit_steps.last().map_or(1, |s| s + 1), c.steps_run))
    }

    /// The greedy next token after the last call: the `argmax` kernel on
    /// the device over the last position's logits (the first maximum; NaN
    /// never wins), one i32 copied back.
    pub fn greedy_next(&mut self) -> Result<u32, GpuError> {
        let row = self
            .0
            .last_logits_span()
            .ok_or_else(|| GpuError::Input("no call has run yet".into()))?;
        let width = row.stride / row.dtype.size_bytes();
        let dev = self.0.device_mut();
        let Some(b) = dev.argmax.take() else {
            return Err(GpuError::Program("the module has no argmax kernel".into()));
        };
        let params = vec![
            KParam::U64(dev.arena + row.byte as u64),
            KParam::U64(dev.ids_out),
            KParam::U32(width as u32),
            KParam::U32(1),
            KParam::U32(1),
        ];
        let e = &b.entries[0];
        let cfg = LaunchCfg {
            grid: e.entry.launch.grid(1, 1),
            block: e.entry.launch.block,
            shared_bytes: e.entry.launch.shared_bytes,
        };
        let r = dev.launch_one("argmax", &e.entry.entry, e.f, cfg, &params, (1, 1));
        dev.argmax = Some(b);
        r?;
        let mut id = [0u8; 4];
        dev.gpu.download(dev.ids_out, &mut id)?;
        Ok(i32::from_le_bytes(id) as u32)
    }
}

#[cfg(feature = "emu")]
impl GpuForward<EmuDevice> {
    /// On the PTX emulator.
    pub fn emulated(program: Program, weights: &dyn WeightSource, opts: GpuOptions) -> Result<Self, GpuError> {
        GpuForward::new(program, weights, EmuDevice::new(), opts)
    }
}

impl<G: Gpu> Forward for GpuForward<G> {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.run(ids).map_err(|e| e.to_string())
    }

    fn loop_steps(&self) -> usize {
        self.0.loop_steps()
    }

    fn speculative(&mut self) -> Option<&mut dyn ouroc_driver::Speculate> {
        Some(&mut self.0)
    }
}
