//! [`EmuDevice`]: the PTX emulator of `ouroc_ptx_emu` as a
//! [`Gpu`], so the whole GPU path (module text, launch records, buffer
//! plan, KV layout, loop and exit control) runs and is tested on any
//! machine.
//!
//! Memory is the emulator's [`Memory`]: every allocation a separate,
//! bounds-checked buffer, so an out-of-bounds access of a kernel is an
//! error naming the kernel, thread and address instead of silent
//! corruption. `Memory` never releases a buffer; [`Gpu::free`] keeps the
//! freed buffer for the next allocation of the same size (zeroed again).

use super::{DevPtr, FuncId, Gpu, GpuError, KParam, LaunchCfg, ModuleId};
use ouroc_ptx_emu::{LaunchDims, LaunchStats, Memory, Module, Param};
use std::collections::HashMap;

/// The PTX emulator as a device.
#[derive(Default)]
pub struct EmuDevice {
    mem: Memory,
    modules: Vec<Module>,
    /// (module, entry name) per function.
    funcs: Vec<(usize, String)>,
    /// Freed buffers by size, reused by `alloc`.
    free: HashMap<usize, Vec<DevPtr>>,
    /// Sizes of the live buffers.
    sizes: HashMap<DevPtr, usize>,
    /// Counters summed over every launch.
    pub stats: LaunchStats,
    /// Launches so far.
    pub launches: u64,
}

impl EmuDevice {
    pub fn new() -> EmuDevice {
        EmuDevice::default()
    }

    /// The emulated global memory (for tests that inspect buffers).
    pub fn memory(&self) -> &Memory {
        &self.mem
    }
}

fn emu(e: impl std::fmt::Display) -> GpuError {
    GpuError::Device(e.to_string())
}

impl Gpu for EmuDevice {
    fn name(&self) -> String {
        "ptx-emu (the ouroc PTX emulator)".into()
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, GpuError> {
        let p = match self.free.get_mut(&bytes).and_then(Vec::pop) {
            Some(p) => {
                self.mem.write_bytes(p, &vec![0; bytes]).map_err(emu)?;
                p
            }
            None => self.mem.alloc(bytes),
        };
        self.sizes.insert(p, bytes);
        Ok(p)
    }

    fn free(&mut self, ptr: DevPtr) -> Result<(), GpuError> {
        let bytes = self
            .sizes
            .remove(&ptr)
            .ok_or_else(|| GpuError::Device(format!("free of {ptr:#x}, which is not a live allocation")))?;
        self.free.entry(bytes).or_default().push(ptr);
        Ok(())
    }

    fn upload(&mut self, dst: DevPtr, data: &[u8]) -> Result<(), GpuError> {
        self.mem.write_bytes(dst, data).map_err(emu)
    }

    fn download(&mut self, src: DevPtr, out: &mut [u8]) -> Result<(), GpuError> {
        let b = self.mem.read_bytes(src, out.len()).map_err(emu)?;
        out.copy_from_slice(&b);
        Ok(())
    }

    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        let b = self.mem.read_bytes(src, bytes).map_err(emu)?;
        self.mem.write_bytes(dst, &b).map_err(emu)
    }

    fn load_module(&mut self, ptx: &str) -> Result<ModuleId, GpuError> {
        let m = Module::parse(ptx).map_err(emu)?;
        self.modules.push(m);
        Ok(ModuleId(self.modules.len() - 1))
    }

    fn function(&mut self, module: ModuleId, entry: &str) -> Result<FuncId, GpuError> {
        let m = self
            .modules
            .get(module.0)
            .ok_or_else(|| GpuError::Device(format!("no module {}", module.0)))?;
        if m.params(entry).is_none() {
            return Err(GpuError::Device(format!("the module has no entry `{entry}`")));
        }
        self.funcs.push((module.0, entry.to_string()));
        Ok(FuncId(self.funcs.len() - 1))
    }

    fn launch(&mut self, f: FuncId, cfg: LaunchCfg, params: &[KParam]) -> Result<(), GpuError> {
        let (m, entry) = self
            .funcs
            .get(f.0)
            .ok_or_else(|| GpuError::Device(format!("no function {}", f.0)))?;
        let params: Vec<Param> = params
            .iter()
            .map(|p| match *p {
                KParam::U32(v) => Param::U32(v),
                KParam::U64(v) => Param::U64(v),
            })
            .collect();
        let dims = LaunchDims {
            grid: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block: (cfg.block, 1, 1),
            shared_bytes: cfg.shared_bytes,
        };
        let s = self.modules[*m]
            .launch(entry, dims, &params, &mut self.mem)
            .map_err(emu)?;
        self.launches += 1;
        self.stats.ctas += s.ctas;
        self.stats.warps += s.warps;
        self.stats.warp_instructions += s.warp_instructions;
        self.stats.thread_instructions += s.thread_instructions;
        self.stats.barriers += s.barriers;
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        Ok(())
    }
}
