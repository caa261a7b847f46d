//! [`CudaDevice`]: an NVIDIA GPU through cudarc's driver API (cargo
//! feature `cuda`).
//!
//! libcuda is loaded at run time (cudarc's `dynamic-loading`), so a binary
//! built with the feature starts on any machine; [`CudaDevice::new`] first
//! checks that the library can be loaded (cudarc's `CudaContext::new`
//! panics when it cannot) and returns [`GpuError::NoDevice`] with "no CUDA
//! driver found (libcuda.so could not be loaded)", or "no CUDA device
//! found" when the driver sees no GPU.
//!
//! Memory is raw device memory (`cuMemAlloc`, zeroed with `cuMemsetD8`),
//! addressed by 64-bit device pointers so the runner can pass offsets into
//! buffers (column windows, rows, KV descriptors). Everything runs on the
//! context's legacy default stream: launches are asynchronous, and the
//! synchronous copies (`cuMemcpyHtoD`, `cuMemcpyDtoH`) are ordered with
//! them. The module is the runner's PTX text, JIT-compiled by the driver
//! for the device (sm_80 PTX runs on every GPU of compute capability 8.0
//! or newer). A launch with more than 48 KiB of dynamic shared memory
//! first raises the function's `MAX_DYNAMIC_SHARED_SIZE_BYTES`.
//! [`Gpu::launch_timed`](super::Gpu::launch_timed) measures with a pair of CUDA events.

use super::{DevPtr, FuncId, Gpu, GpuError, KParam, LaunchCfg, ModuleId};
use cudarc::driver::sys::{CUevent_flags, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError, result};
use cudarc::nvrtc::Ptx;
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::Arc;

/// The message of a machine without the CUDA driver library.
pub const NO_DRIVER: &str = "no CUDA driver found (libcuda.so could not be loaded)";

/// An NVIDIA GPU.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<Arc<CudaModule>>,
    /// Per function: the function and the dynamic shared memory its
    /// attribute allows so far.
    funcs: Vec<(CudaFunction, u32)>,
    allocs: HashSet<DevPtr>,
    /// Start and end events of `launch_timed`.
    events: Option<(CudaEvent, CudaEvent)>,
    name: String,
}

fn drv(what: &str) -> impl Fn(DriverError) -> GpuError + '_ {
    move |e| GpuError::Device(format!("{what}: {e}"))
}

/// Whether libcuda can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library (cudarc's check).
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaDevice {
    /// Device 0.
    pub fn new() -> Result<CudaDevice, GpuError> {
        CudaDevice::with_ordinal(0)
    }

    /// Device `ordinal`; [`GpuError::NoDevice`] without a driver or GPU.
    pub fn with_ordinal(ordinal: usize) -> Result<CudaDevice, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDevice(NO_DRIVER.into()));
        }
        let count = CudaContext::device_count()
            .map_err(|e| GpuError::NoDevice(format!("no CUDA device found (the driver says: {e})")))?;
        if count <= 0 {
            return Err(GpuError::NoDevice(
                "no CUDA device found (the driver sees no GPU)".into(),
            ));
        }
        if ordinal >= count as usize {
            return Err(GpuError::NoDevice(format!(
                "no CUDA device {ordinal}: the driver sees {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("creating the CUDA context"))?;
        let (major, minor) = ctx.compute_capability().map_err(drv("compute capability"))?;
        if major < 8 {
            return Err(GpuError::NoDevice(format!(
                "CUDA device {ordinal} has compute capability {major}.{minor}; the PTX targets sm_80 (8.0 or newer)"
            )));
        }
        let name = format!(
            "{} (sm_{major}{minor}, {} MiB)",
            ctx.name().map_err(drv("device name"))?,
            ctx.total_mem().map_err(drv("device memory"))? >> 20
        );
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Vec::new(),
            funcs: Vec::new(),
            allocs: HashSet::new(),
            events: None,
            name,
        })
    }

    /// The cudarc context (for timing and tools around the runner).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(drv("binding the context"))
    }

    fn check(&self, ptr: DevPtr, bytes: usize, what: &str) -> Result<(), GpuError> {
        if bytes > 0 && ptr == 0 {
            return Err(GpuError::Device(format!("{what} at a null device address")));
        }
        Ok(())
    }

    /// The raw launch.
    fn raw_launch(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<(), GpuError> {
        self.bind()?;
        let (func, allowed) = self
            .funcs
            .get_mut(f.0)
            .ok_or_else(|| GpuError::Device(format!("no function {}", f.0)))?;
        if cfg.shared_bytes > 48 * 1024 && cfg.shared_bytes > *allowed {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_bytes as i32,
            )
            .map_err(drv("raising the dynamic shared memory limit"))?;
            *allowed = cfg.shared_bytes;
        }
        // One 8-byte cell per parameter; a .u32 parameter reads the low
        // four bytes of its cell (little endian).
        let mut cells: Vec<u64> = params
            .iter()
            .map(|p| match *p {
                KParam::U32(v) => v as u64,
                KParam::U64(v) => v,
            })
            .collect();
        let mut args: Vec<*mut c_void> = cells.iter_mut().map(|c| c as *mut u64 as *mut c_void).collect();
        // SAFETY: the function belongs to a loaded module of this context;
        // `args` points at one value per declared parameter, of at least its
        // size, alive until cuLaunchKernel has copied them (it returns after).
        unsafe {
            result::launch_kernel(
                func.cu_function(),
                (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
                (cfg.block, 1, 1),
                cfg.shared_bytes,
                self.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(drv("kernel launch"))
    }
}

impl Gpu for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, GpuError> {
        self.bind()?;
        let bytes = bytes.max(1);
        // SAFETY: a fresh allocation of this context, zeroed before use.
        let p = unsafe { result::malloc_sync(bytes) }.map_err(drv("cuMemAlloc"))?;
        // SAFETY: `p` holds `bytes` bytes.
        unsafe { result::memset_d8_sync(p, 0, bytes) }.map_err(drv("cuMemsetD8"))?;
        self.allocs.insert(p);
        Ok(p)
    }

    fn free(&mut self, ptr: DevPtr) -> Result<(), GpuError> {
        if !self.allocs.remove(&ptr) {
            return Err(GpuError::Device(format!(
                "free of {ptr:#x}, which is not a live allocation"
            )));
        }
        self.bind()?;
        // SAFETY: a live allocation of this device (checked above), freed once.
        unsafe { result::free_sync(ptr) }.map_err(drv("cuMemFree"))
    }

    fn upload(&mut self, dst: DevPtr, data: &[u8]) -> Result<(), GpuError> {
        self.check(dst, data.len(), "upload")?;
        self.bind()?;
        // SAFETY: the runner only copies into its own allocations, in bounds.
        unsafe { result::memcpy_htod_sync(dst, data) }.map_err(drv("cuMemcpyHtoD"))
    }

    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), GpuError> {
        self.check(src, out.len(), "download")?;
        self.bind()?;
        // SAFETY: as upload; synchronous, so `out` is filled on return.
        unsafe { result::memcpy_dtoh_sync(out, src) }.map_err(drv("cuMemcpyDtoH (or an earlier launch)"))
    }

    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.check(dst, bytes, "copy")?;
        self.check(src, bytes, "copy")?;
        self.bind()?;
        // SAFETY: both ranges lie in allocations of this device; ordered on
        // the stream with the launches.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv("cuMemcpyDtoD"))
    }

    fn load_module(&mut self, ptx: &str) -> Result<ModuleId, GpuError> {
        if ptx.contains('\0') {
            return Err(GpuError::Device("PTX text contains a NUL byte".into()));
        }
        let m = self
            .ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(drv("loading the PTX module (driver JIT)"))?;
        self.modules.push(m);
        Ok(ModuleId(self.modules.len() - 1))
    }

    fn function(&mut self, module: ModuleId, entry: &str) -> Result<FuncId, GpuError> {
        let m = self
            .modules
            .get(module.0)
            .ok_or_else(|| GpuError::Device(format!("no module {}", module.0)))?;
        if entry.contains('\0') {
            return Err(GpuError::Device(format!("bad entry name {entry:?}")));
        }
        let f = m
            .load_function(entry)
            .map_err(|e| GpuError::Device(format!("entry `{entry}`: {e}")))?;
        self.funcs.push((f, 48 * 1024));
        Ok(FuncId(self.funcs.len() - 1))
    }

    fn launch(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<(), GpuError> {
        self.raw_launch(f, cfg, params)
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    fn launch_timed(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<f64, GpuError> {
        if self.events.is_none() {
            let ev = |ctx: &Arc<CudaContext>| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
            self.events = Some((
                ev(&self.ctx).map_err(drv("cuEventCreate"))?,
                ev(&self.ctx).map_err(drv("cuEventCreate"))?,
            ));
        }
        let stream = self.stream.clone();
        {
            let (start, _) = self.events.as_ref().expect("created above");
            start.record(&stream).map_err(drv("cuEventRecord"))?;
        }
        self.raw_launch(f, cfg, params)?;
        let (start, end) = self.events.as_ref().expect("created above");
        end.record(&stream).map_err(drv("cuEventRecord"))?;
        let ms = start.elapsed_ms(end).map_err(drv("kernel (timed)"))?;
        Ok(f64::from(ms) / 1e3)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        let _ = self.stream.synchronize();
        for p in self.allocs.drain() {
            // SAFETY: live allocations of this device, each freed once.
            let _ = unsafe { result::free_sync(p) };
        }
    }
}
