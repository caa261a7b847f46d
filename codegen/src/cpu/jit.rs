//! The JIT harness: one Cranelift [`JITModule`] for the host ISA, kernels
//! compiled into it on demand (one function per [`KernelSpec::code_key`]),
//! callable as [`KernelFn`] while the [`Jit`] lives.

use super::{CodegenError, Env, RawKernel, build};
use cranelift_codegen::Context;
use cranelift_codegen::ir::{AbiParam, Signature, UserFuncName, types};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};
use ouroc_kernels::KernelSpec;
use std::collections::HashMap;
use std::marker::PhantomData;

/// `expf` for generated code (Cranelift has no `exp`): the same `f32::exp`
/// the reference executor uses, so `silu` / `sigmoid` match it bit for bit.
pub(crate) extern "C" fn ouroc_expf(x: f32) -> f32 {
    x.exp()
}

/// `cosf` for generated code: `f32::cos`, as the reference's RoPE table.
pub(crate) extern "C" fn ouroc_cosf(x: f32) -> f32 {
    x.cos()
}

/// `sinf` for generated code: `f32::sin`, as the reference's RoPE table.
pub(crate) extern "C" fn ouroc_sinf(x: f32) -> f32 {
    x.sin()
}

/// Symbol names of the helpers, in [`super::Helper`] order (an
/// executable linked by `ouroc build` defines them; see [`super::object`]).
pub const HELPER_NAMES: [&str; 3] = ["ouroc_expf", "ouroc_cosf", "ouroc_sinf"];

/// Symbol names and addresses of the helpers, in [`super::Helper`] order.
const HELPERS: [(&str, extern "C" fn(f32) -> f32); 3] = [
    ("ouroc_expf", ouroc_expf),
    ("ouroc_cosf", ouroc_cosf),
    ("ouroc_sinf", ouroc_sinf),
];

/// A compiled kernel in a [`Jit`]: its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId(usize);

/// A callable kernel, valid while its [`Jit`] is.
#[derive(Clone, Copy)]
pub struct KernelFn<'j> {
    raw: RawKernel,
    _jit: PhantomData<&'j Jit>,
}

impl KernelFn<'_> {
    /// Run the kernel on `tokens` rows.
    ///
    /// # Safety
    /// `args` holds one pointer per operand then per result, in the order of
    /// the kernel's family (`Family::operands` + `Family::results`), each
    /// valid for the rows the kernel reads or writes: `tokens` rows of
    /// `strides[i]` elements (the row stride, in elements of the operand's
    /// dtype; ignored for weights) for activations, the whole weight for
    /// weights. `strides` has the same length as `args`.
    pub unsafe fn call(&self, args: &[*mut u8], strides: &[usize], tokens: usize) {
        debug_assert_eq!(args.len(), strides.len());
        unsafe { (self.raw)(args.as_ptr(), strides.as_ptr(), tokens) }
    }

    /// The raw function pointer (for a runtime that calls it itself).
    pub fn raw(&self) -> RawKernel {
        self.raw
    }
}

/// A JIT module for the host with the kernels compiled so far.
pub struct Jit {
    module: Option<JITModule>,
    ctx: Context,
    fctx: FunctionBuilderContext,
    helpers: [FuncId; 3],
    by_key: HashMap<String, KernelId>,
    fns: Vec<RawKernel>,
}

impl Jit {
    /// A JIT for the host ISA (its features, such as FMA and AVX, detected
    /// by `cranelift-native`), optimising for speed. Fails with
    /// [`CodegenError::UnsupportedHost`] where Cranelift has no backend.
    pub fn new() -> Result<Jit, CodegenError> {
        let mut flags = settings::builder();
        let set = |f: &mut settings::Builder, k: &str, v: &str| {
            f.set(k, v)
                .map_err(|e| CodegenError::Cranelift(format!("setting {k}={v}: {e}")))
        };
        set(&mut flags, "opt_level", "speed")?;
        set(&mut flags, "is_pic", "false")?;
        let isa = cranelift_native::builder()
            .map_err(|e| CodegenError::UnsupportedHost(e.to_string()))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| CodegenError::UnsupportedHost(e.to_string()))?;
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        for (name, f) in HELPERS {
            jb.symbol(name, f as *const u8);
        }
        let mut module = JITModule::new(jb);
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(types::F32));
        sig.returns.push(AbiParam::new(types::F32));
        let mut helpers = Vec::new();
        for (name, _) in HELPERS {
            let id = module
                .declare_function(name, Linkage::Import, &sig)
                .map_err(|e| CodegenError::Cranelift(e.to_string()))?;
            helpers.push(id);
        }
        let helpers: [FuncId; 3] = helpers.try_into().expect("three helpers");
        Ok(Jit {
            ctx: module.make_context(),
            module: Some(module),
            fctx: FunctionBuilderContext::new(),
            helpers,
            by_key: HashMap::new(),
            fns: Vec::new(),
        })
    }

    fn module(&mut self) -> &mut JITModule {
        self.module.as_mut().expect("the module lives until drop")
    }

    /// Compile the kernel of `spec` (or find the one already compiled for
    /// its code key).
    pub fn compile(&mut self, spec: &KernelSpec) -> Result<KernelId, CodegenError> {
        let key = spec.code_key();
        if let Some(&id) = self.by_key.get(&key) {
            return Ok(id);
        }
        let cl = |e: cranelift_module::ModuleError| CodegenError::Cranelift(format!("{}: {e:?}", spec.name));
        let isa = self.module.as_ref().expect("live").isa();
        let env = Env {
            ptr: isa.pointer_type(),
            frontend: isa.frontend_config(),
            helpers: self.helpers.map(|f| f.as_u32()),
        };
        let mut sig = Signature::new(env.frontend.default_call_conv);
        super::kernel_params(&mut sig, env.ptr);
        let name = format!("k{}", self.fns.len());
        let id = self
            .module()
            .declare_function(&name, Linkage::Local, &sig)
            .map_err(cl)?;
        self.ctx.clear();
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        build(spec, &mut self.ctx.func, &mut self.fctx, &env)?;
        let module = self.module.as_mut().expect("live");
        module.define_function(id, &mut self.ctx).map_err(cl)?;
        module.finalize_definitions().map_err(cl)?;
        let ptr = module.get_finalized_function(id);
        // SAFETY: the function was declared with exactly this signature
        // (pointer, pointer, pointer-sized integer) in the host's C call
        // convention.
        let raw: RawKernel = unsafe { std::mem::transmute::<*const u8, RawKernel>(ptr) };
        let kid = KernelId(self.fns.len());
        self.fns.push(raw);
        self.by_key.insert(key, kid);
        Ok(kid)
    }

    /// A compiled kernel.
    pub fn kernel(&self, id: KernelId) -> KernelFn<'_> {
        KernelFn {
            raw: self.fns[id.0],
            _jit: PhantomData,
        }
    }

    /// Machine-code-level facts about the host ISA (for reports): its name
    /// and flags such as `has_fma`.
    pub fn isa_description(&self) -> String {
        let isa = self.module.as_ref().expect("live").isa();
        let flags: Vec<String> = isa
            .isa_flags()
            .iter()
            .filter(|f| f.as_bool() == Some(true))
            .map(|f| f.name.to_string())
            .collect();
        format!("{} [{}]", isa.triple(), flags.join(", "))
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: every KernelFn borrows the Jit, so none outlives this.
            unsafe { m.free_memory() }
        }
    }
}
