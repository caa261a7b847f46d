//! Ahead-of-time kernels: the same emitters as the [`super::Jit`], written
//! by `cranelift-object` to a relocatable object file for an explicit x86-64
//! ISA level, for the system linker to link into an executable
//! (`ouroc build`).
//!
//! The object defines:
//!
//! - one local function per distinct kernel (code key), with the kernel ABI
//!   of [`super`];
//! - a global read-only table `<table>`: a `u64` count `n`, then `n`
//!   function addresses, kernel `i` being [`KernelObject::keys`]`[i]`;
//! - every data blob added with [`ObjectWriter::add_data`] (global,
//!   read-only, under its symbol name);
//!
//! and imports the helpers `ouroc_expf`, `ouroc_cosf` and `ouroc_sinf`
//! (`extern "C" fn(f32) -> f32`, which the executable's runtime defines as
//! `f32::exp`, `f32::cos`, `f32::sin`), plus `fmaf` where the ISA has no
//! FMA (a libcall, from libm). Code is position independent (PIE
//! executables).

use super::{CodegenError, Env, build};
use cranelift_codegen::Context;
use cranelift_codegen::ir::{AbiParam, Signature, UserFuncName, types};
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::FunctionBuilderContext;
use cranelift_module::{DataDescription, DataId, FuncId, Linkage, Module, default_libcall_names};
use cranelift_object::{ObjectBuilder, ObjectModule};
use ouroc_kernels::KernelSpec;
use std::collections::HashMap;

/// The CPU levels `--cpu-features` accepts.
pub const CPU_LEVELS: [&str; 4] = ["native", "x86-64-v2", "x86-64-v3", "x86-64-v4"];

/// Cranelift x86 flags of each level (cumulative, as the psABI levels;
/// Cranelift has no flag for the levels' other features, such as MOVBE or
/// AVX-512 BW/CD, which its code never uses).
const V2: [&str; 6] = [
    "has_sse3",
    "has_ssse3",
    "has_cmpxchg16b",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
];
const V3: [&str; 6] = ["has_avx", "has_avx2", "has_fma", "has_bmi1", "has_bmi2", "has_lzcnt"];
const V4: [&str; 3] = ["has_avx512f", "has_avx512dq", "has_avx512vl"];

/// Every Cranelift x86 feature flag (set explicitly to true or false).
const ALL_X86: [&str; 19] = [
    "has_sse3",
    "has_ssse3",
    "has_cmpxchg16b",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
    "has_avx",
    "has_avx2",
    "has_fma",
    "has_bmi1",
    "has_bmi2",
    "has_lzcnt",
    "has_avx512f",
    "has_avx512dq",
    "has_avx512vl",
    "has_avx512bitalg",
    "has_avx512vbmi",
    "has_avx512vnni",
    "has_avx_vnni",
];

/// The ISA of a level: `native` is the build host's (its features
/// detected by `cranelift-native`); the `x86-64-vN` levels are x86-64 Linux
/// with exactly the level's features. Optimising for speed, PIC.
pub fn target_isa(level: &str) -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    let set = |f: &mut dyn Configurable, k: &str, v: &str| {
        f.set(k, v)
            .map_err(|e| CodegenError::Cranelift(format!("setting {k}={v}: {e}")))
    };
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "is_pic", "true")?;
    let flags = settings::Flags::new(flags);
    let bad = |e: String| CodegenError::UnsupportedHost(e);
    let isa = match level {
        "native" => cranelift_native::builder()
            .map_err(|e| bad(e.to_string()))?
            .finish(flags)
            .map_err(|e| bad(e.to_string()))?,
        "x86-64-v2" | "x86-64-v3" | "x86-64-v4" => {
            let triple: target_lexicon::Triple = "x86_64-unknown-linux-gnu".parse().expect("a known triple");
            let mut b = isa::lookup(triple).map_err(|e| bad(e.to_string()))?;
            let on: Vec<&str> = match level {
                "x86-64-v2" => V2.to_vec(),
                "x86-64-v3" => [&V2[..], &V3[..]].concat(),
                _ => [&V2[..], &V3[..], &V4[..]].concat(),
            };
            for f in ALL_X86 {
                set(&mut b, f, if on.contains(&f) { "true" } else { "false" })?;
            }
            b.finish(flags).map_err(|e| bad(e.to_string()))?
        }
        other => {
            return Err(CodegenError::Cranelift(format!(
                "unknown CPU level `{other}`; valid levels: {}",
                CPU_LEVELS.join(", ")
            )));
        }
    };
    Ok(isa)
}

/// The CPU features (Cranelift flag names without `has_`, e.g. `avx2`,
/// `sse41`) an ISA's code may use: what the machine running it must have.
pub fn isa_features(isa: &dyn isa::TargetIsa) -> Vec<String> {
    isa.isa_flags()
        .iter()
        .filter(|f| f.as_bool() == Some(true))
        .filter_map(|f| f.name.strip_prefix("has_").map(String::from))
        .collect()
}

/// What [`ObjectWriter::finish`] returns.
pub struct KernelObject {
    /// The object file (ELF on Linux).
    pub bytes: Vec<u8>,
    /// The code key of each kernel, in table order.
    pub keys: Vec<String>,
    /// The features the code needs ([`isa_features`]).
    pub features: Vec<String>,
    /// The target triple.
    pub triple: String,
}

/// Kernels and data blobs being written to one object file.
pub struct ObjectWriter {
    module: ObjectModule,
    ctx: Context,
    fctx: FunctionBuilderContext,
    helpers: [FuncId; 3],
    by_key: HashMap<String, usize>,
    funcs: Vec<FuncId>,
    keys: Vec<String>,
    features: Vec<String>,
    triple: String,
}

fn cl(e: impl std::fmt::Display) -> CodegenError {
    CodegenError::Cranelift(e.to_string())
}

impl ObjectWriter {
    /// An empty object for the ISA of `level` ([`target_isa`]).
    pub fn new(level: &str) -> Result<ObjectWriter, CodegenError> {
        let isa = target_isa(level)?;
        let features = isa_features(isa.as_ref());
        let triple = isa.triple().to_string();
        let builder = ObjectBuilder::new(isa, "ouroc_kernels", default_libcall_names()).map_err(cl)?;
        let mut module = ObjectModule::new(builder);
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(types::F32));
        sig.returns.push(AbiParam::new(types::F32));
        let mut helpers = Vec::new();
        for name in super::jit::HELPER_NAMES {
            helpers.push(module.declare_function(name, Linkage::Import, &sig).map_err(cl)?);
        }
        Ok(ObjectWriter {
            ctx: module.make_context(),
            module,
            fctx: FunctionBuilderContext::new(),
            helpers: helpers.try_into().expect("three helpers"),
            by_key: HashMap::new(),
            funcs: Vec::new(),
            keys: Vec::new(),
            features,
            triple,
        })
    }

    /// Compile the kernel of `spec` unless one of its code key is already
    /// in; returns its table index.
    pub fn add_kernel(&mut self, spec: &KernelSpec) -> Result<usize, CodegenError> {
        let key = spec.code_key();
        if let Some(&i) = self.by_key.get(&key) {
            return Ok(i);
        }
        let isa = self.module.isa();
        let env = Env {
            ptr: isa.pointer_type(),
            frontend: isa.frontend_config(),
            helpers: self.helpers.map(|f| f.as_u32()),
        };
        let mut sig = Signature::new(env.frontend.default_call_conv);
        super::kernel_params(&mut sig, env.ptr);
        let index = self.funcs.len();
        let id = self
            .module
            .declare_function(&format!("ouroc_kernel_{index}"), Linkage::Local, &sig)
            .map_err(cl)?;
        self.ctx.clear();
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        build(spec, &mut self.ctx.func, &mut self.fctx, &env)?;
        self.module
            .define_function(id, &mut self.ctx)
            .map_err(|e| CodegenError::Cranelift(format!("{}: {e:?}", spec.name)))?;
        self.funcs.push(id);
        self.keys.push(key.clone());
        self.by_key.insert(key, index);
        Ok(index)
    }

    /// Kernels added so far.
    pub fn kernels(&self) -> usize {
        self.funcs.len()
    }

    /// The code keys of the kernels added so far (table order), the CPU
    /// features the code needs and the target triple.
    pub fn table(&self) -> (Vec<String>, Vec<String>, String) {
        (self.keys.clone(), self.features.clone(), self.triple.clone())
    }

    /// A global read-only data symbol `symbol` holding `bytes`, aligned to
    /// `align` bytes.
    pub fn add_data(&mut self, symbol: &str, bytes: Vec<u8>, align: u64) -> Result<(), CodegenError> {
        let id: DataId = self
            .module
            .declare_data(symbol, Linkage::Export, false, false)
            .map_err(cl)?;
        let mut d = DataDescription::new();
        d.define(bytes.into_boxed_slice());
        d.set_align(align);
        self.module.define_data(id, &d).map_err(cl)
    }

    /// Write the kernel table as global `table` and emit the object.
    pub fn finish(mut self, table: &str) -> Result<KernelObject, CodegenError> {
        let ptr = self.module.isa().pointer_bytes() as usize;
        let id = self
            .module
            .declare_data(table, Linkage::Export, false, false)
            .map_err(cl)?;
        let mut d = DataDescription::new();
        let mut bytes = vec![0u8; 8 + ptr * self.funcs.len()];
        bytes[..8].copy_from_slice(&(self.funcs.len() as u64).to_le_bytes());
        d.define(bytes.into_boxed_slice());
        d.set_align(8);
        for (i, &f) in self.funcs.iter().enumerate() {
            let r = self.module.declare_func_in_data(f, &mut d);
            d.write_function_addr((8 + i * ptr) as u32, r);
        }
        self.module.define_data(id, &d).map_err(cl)?;
        let bytes = self.module.finish().emit().map_err(cl)?;
        Ok(KernelObject {
            bytes,
            keys: self.keys,
            features: self.features,
            triple: self.triple,
        })
    }
}
