//! A decoded [`Module`] and its launches: the sm_80 launch limits,
//! parameters marshalled into the `.param` bytes, and the grid run CTA by
//! CTA on the scheduler.

use crate::exec::Ctx;
use crate::ir::Inst;
use crate::sched::Cta;
use crate::{EmuError, MAX_SHARED, MAX_STATIC_SHARED, Memory};

/// A kernel parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    U32(u32),
    S32(i32),
    F32(f32),
    U64(u64),
    /// A device address from [`Memory`].
    Ptr(u64),
    /// Raw bytes for `.param .align N .b8 name[SIZE]`.
    Bytes(Vec<u8>),
}

/// A declared `.param` of an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub ty_name: &'static str,
    pub size: usize,
    pub offset: usize,
    pub array: bool,
}

/// Grid and block shape and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes (what `.extern .shared` arrays get).
    pub shared_bytes: u32,
}

/// Counters of one launch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchStats {
    pub ctas: u64,
    pub warps: u64,
    /// Warp-instructions issued (one per lockstep step of a warp).
    pub warp_instructions: u64,
    /// Thread-instructions executed (lanes not predicated off).
    pub thread_instructions: u64,
    /// Barrier completions.
    pub barriers: u64,
}

/// One `.entry`.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub name: String,
    pub params: Vec<ParamDecl>,
    pub param_bytes: usize,
    pub insts: Vec<Inst>,
    pub reg_bits: Vec<u32>,
    pub npreds: usize,
    pub static_shared: usize,
    pub dyn_shared_offset: usize,
    pub reqntid: Option<[u32; 3]>,
    pub maxntid: Option<[u32; 3]>,
}

/// A parsed PTX module.
#[derive(Debug, Clone)]
pub struct Module {
    pub version: Option<String>,
    pub target: Vec<String>,
    pub address_size: Option<u32>,
    kernels: Vec<Kernel>,
    const_data: Vec<u8>,
    step_limit: u64,
}

impl Module {
    pub(crate) fn new(
        version: Option<String>,
        target: Vec<String>,
        address_size: Option<u32>,
        kernels: Vec<Kernel>,
        const_data: Vec<u8>,
    ) -> Module {
        Module {
            version,
            target,
            address_size,
            kernels,
            const_data,
            step_limit: 1 << 32,
        }
    }

    /// Parses and decodes PTX text.
    pub fn parse(text: &str) -> Result<Module, EmuError> {
        crate::lower::lower_module(crate::parse::parse_syntax(text)?)
    }

    /// Names of the entries, in order.
    pub fn entries(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// The declared parameters of `entry`.
    pub fn params(&self, entry: &str) -> Option<&[ParamDecl]> {
        self.kernels
            .iter()
            .find(|k| k.name == entry)
            .map(|k| k.params.as_slice())
    }

    /// Static shared memory of `entry` in bytes.
    pub fn static_shared_bytes(&self, entry: &str) -> Option<usize> {
        self.kernels.iter().find(|k| k.name == entry).map(|k| k.static_shared)
    }

    /// Caps the warp-instructions one launch may issue (default 2^32).
    pub fn set_step_limit(&mut self, limit: u64) {
        self.step_limit = limit;
    }

    /// Runs `entry` over the whole grid.
    pub fn launch(
        &self,
        entry: &str,
        dims: LaunchDims,
        params: &[Param],
        mem: &mut Memory,
    ) -> Result<LaunchStats, EmuError> {
        let k = self
            .kernels
            .iter()
            .find(|k| k.name == entry)
            .ok_or_else(|| EmuError::Launch {
                kernel: entry.to_string(),
                msg: format!("no such entry (entries: {:?})", self.entries()),
            })?;
        let err = |msg: String| EmuError::Launch {
            kernel: k.name.clone(),
            msg,
        };
        let (bx, by, bz) = dims.block;
        let (gx, gy, gz) = dims.grid;
        if bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 {
            return Err(err(format!("empty grid {:?} or block {:?}", dims.grid, dims.block)));
        }
        if bx > 1024 || by > 1024 || bz > 64 || u64::from(bx) * u64::from(by) * u64::from(bz) > 1024 {
            return Err(err(format!(
                "block {:?} exceeds the sm_80 limits (1024 threads, z <= 64)",
                dims.block
            )));
        }
        if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
            return Err(err(format!("grid {:?} exceeds the sm_80 limits", dims.grid)));
        }
        if let Some(r) = k.reqntid
            && r != [bx, by, bz]
        {
            return Err(err(format!(".reqntid {r:?} but the block is {:?}", dims.block)));
        }
        if let Some(m) = k.maxntid
            && u64::from(bx) * u64::from(by) * u64::from(bz) > m.iter().map(|&d| u64::from(d)).product::<u64>()
        {
            return Err(err(format!(".maxntid {m:?} but the block is {:?}", dims.block)));
        }
        if k.static_shared > MAX_STATIC_SHARED {
            return Err(err(format!(
                "{} bytes of static shared memory exceed 48 KiB",
                k.static_shared
            )));
        }
        let total_shared = k.static_shared.max(k.dyn_shared_offset) + dims.shared_bytes as usize;
        if total_shared > MAX_SHARED {
            return Err(err(format!(
                "{total_shared} bytes of shared memory exceed the sm_80 limit of {MAX_SHARED}"
            )));
        }
        if params.len() != k.params.len() {
            return Err(err(format!(
                "{} parameters given, {} declared",
                params.len(),
                k.params.len()
            )));
        }
        let mut pbytes = vec![0u8; k.param_bytes];
        for (p, d) in params.iter().zip(&k.params) {
            let bytes: Vec<u8> = match p {
                Param::U32(v) => v.to_le_bytes().to_vec(),
                Param::S32(v) => v.to_le_bytes().to_vec(),
                Param::F32(v) => v.to_le_bytes().to_vec(),
                Param::U64(v) | Param::Ptr(v) => v.to_le_bytes().to_vec(),
                Param::Bytes(b) => b.clone(),
            };
            let float_ok = match p {
                Param::F32(_) => matches!(d.ty_name, "f32" | "b32"),
                Param::U32(_) | Param::S32(_) | Param::U64(_) | Param::Ptr(_) => !d.ty_name.starts_with('f'),
                Param::Bytes(_) => true,
            };
            if bytes.len() != d.size || !float_ok {
                return Err(err(format!(
                    "parameter `{}` is .{} ({} bytes) but {p:?} was given",
                    d.name, d.ty_name, d.size
                )));
            }
            pbytes[d.offset..d.offset + d.size].copy_from_slice(&bytes);
        }
        let nwarps = (bx * by * bz).div_ceil(32);
        let mut stats = LaunchStats::default();
        for z in 0..gz {
            for y in 0..gy {
                for x in 0..gx {
                    let ctx = Ctx {
                        k,
                        dims,
                        params: &pbytes,
                        consts: &self.const_data,
                        ctaid: [x, y, z],
                        nwarps,
                    };
                    let mut cta = Cta::new(&ctx, mem, &mut stats, self.step_limit);
                    cta.run()?;
                    stats.ctas += 1;
                    stats.warps += u64::from(nwarps);
                }
            }
        }
        Ok(stats)
    }
}
