//! The Cranelift CPU backend: one emitter per kernel family, shape
//! specialised (every size of the spec is a constant in the generated code;
//! only the number of rows, `tokens`, is a run-time value).
//!
//! # ABI (every kernel)
//!
//! ```text
//! extern "C" fn(args: *const *mut u8, strides: *const usize, tokens: usize)
//! ```
//!
//! - `args[i]`: the base pointer of operand i (in the family's operand
//!   order, `Family::operands()` of them), then of each result
//!   (`Family::results()`), as `ouroc_kernels::spec` lists them.
//! - `strides[i]`: for an activation operand or result, its row stride in
//!   elements (a column window `%v[a..b]` of a wider buffer has the
//!   buffer's width); ignored (but present) for weights.
//! - `tokens`: the number of rows; row t of an activation starts at
//!   `args[i] + t * strides[i] * size(dtype)`.
//!
//! Dtypes (see [`operand_dtypes`]): activations and results are stored in
//! the spec's `act` (f32, or bf16 as its 16 bits), `Linear` weights in the
//! spec's `weight` dtype. Weights whose dtype the spec does not carry (the
//! linear bias, the row-reduce norm and gate weights) are taken in the
//! activation dtype (the linear bias in the weight dtype). bf16 values are
//! widened in registers (`u16 << 16`, bitcast) and results rounded to bf16
//! round-to-nearest-even on the f32 bits, as `half::bf16::from_f32`.
//!
//! `Gather` ids and `RopeTable` positions are i32 (the Program's inputs).
//!
//! Kernels are correct in place (a result row may be an operand row): each
//! row is read before it is written at the same index.
//!
//! # Attention: the KV cache
//!
//! The KV cache is not in the arena: each (loop step, layer) slot holds, per
//! sequence of the batch, a K and a V store of `capacity` rows of
//! `kv_heads * head_dim` elements in the activation dtype, row p holding
//! position p (the reference's `SeqCache` layout; every value it stores is
//! already rounded to `act`, so nothing is lost). An `Attention` kernel
//! takes two arguments after its result ([`extra_args`]):
//!
//! - `args[n + 1]`: a `*const` [`KvSeq`] array, one per sequence (`k`, `v`
//!   base pointers and `past`, the positions already stored, which is the
//!   absolute position of the sequence's first new token); `strides[n + 1]`
//!   is `seq`, the new tokens per sequence (at least 1): the batch is
//!   `tokens / seq` sequences, sequence b owning rows `b * seq ..
//!   (b + 1) * seq` of every activation.
//! - `args[n + 2]`: an f32 scratch of at least `max(past) + seq` elements
//!   (the scores of one query head); `strides[n + 2]` is the
//!   [`ouroc_kernels::abi::AttentionPhase`]: 0 appends then attends, 1 only
//!   appends, 2 only attends (so a caller can append a prompt's rows on one
//!   thread, then attend blocks of its tokens on several).
//!
//! (`n` is the number of operands: 3, or 5 with `rope`.) The kernel first
//! writes each new token's K (rotated by the cos/sin rows of that token
//! when `rope`) and V to rows `past .. past + seq` of its sequence's slot
//! (the caller guarantees `capacity >= past + seq`), then computes token t
//! over positions `0 ..= past + t`. It does not update `past`: the caller
//! adds `seq` after the call (and copies slots forward for skipped steps).
//!
//! # Families
//!
//! - `Linear`: the output rows `row0 .. row1` of two extra arguments
//!   ([`extra_args`]: `strides[n]`, `strides[n + 1]` after the result, `n`
//!   operands + results; `0 .. n` for the whole Linear), so one kernel
//!   serves every row chunk of a Linear split over threads and an
//!   executable linked ahead of time needs no kernel per chunk size; per
//!   row of x, four rows of W at a time (from `row0`), `f32x4` loads and
//!   `fma` into 8 independent accumulators (4 rows x 2 k-chunks of 4) over
//!   k, one more chunk of 4 when `k % 8 >= 4`, a horizontal sum, a scalar
//!   tail for `k % 4`; then the `(row1 - row0) % 4` remaining rows one at a
//!   time (a row's arithmetic does not depend on its block).
//! - `Elementwise`: four elements of the row per f32x4 (a scalar tail for
//!   `width % 4`), the expression tree inline, each node rounded (bf16: on
//!   the lanes' bits, then packed to 8 bytes); `exp` is a call to `f32::exp`
//!   registered in the JIT (`ouroc_expf`), once per lane, so the result
//!   equals the reference bit for bit.
//! - `RowReduce`: passes over the row (add + sum of squares, norm + gate
//!   dot + next's sum of squares, next norm), four elements per f32x4 and a
//!   scalar tail; the sums add the four lanes one at a time, so they stay
//!   sequential as in the reference (bit for bit); `sqrt` native, the
//!   gate's sigmoid via `ouroc_expf`.
//!
//! - `Gather`: the id as an unsigned row index (the caller checks
//!   `id < rows`, as the reference does), a 16-bytes-at-a-time row copy
//!   when the table is in the activation dtype, else widened / rounded per
//!   element.
//! - `RopeTable`: `inv_freq` computed at codegen time with the reference's
//!   f32 expression and embedded as constants; `pos` converted i32 -> f32,
//!   `cos` / `sin` calls to `f32::cos` / `f32::sin` (`ouroc_cosf`,
//!   `ouroc_sinf`), so the table equals the reference bit for bit.
//! - `Rope`: per head, unrolled over `head_dim` (the head is loaded before
//!   it is stored, so in place works), the reference's three roundings.
//! - `Attention`: per sequence, append, then per token and query head: q
//!   (after RoPE) copied to a stack slot with each element splatted to four
//!   lanes; scores vectorised across positions: 4 K rows loaded per
//!   `head_dim` chunk of 4, transposed (byte shuffles), and `q[d] * k[d]`
//!   added for d in order, so each lane is one position's dot product in
//!   the reference's order (mul then add, no FMA; 8 positions per
//!   iteration, then 4, then scalar), rounded as the reference rounds;
//!   `exp(s - max)` via `ouroc_expf` and their sum; the probabilities
//!   rounded in place; then V accumulated in blocks of 8 `f32x4`
//!   accumulators across `head_dim` (each lane's sum over positions in the
//!   reference's order). Bit for bit the reference except when a score is
//!   NaN (`fmax` propagates it, `f32::max` drops it).
//!
//! Unsupported dtypes (f16, i32 activations) and shapes (odd `head_dim`
//! with RoPE, `heads` not a multiple of `kv_heads`) are
//! [`CodegenError::Unsupported`].

mod attention;
mod elementwise;
mod gather;
pub mod jit;
mod linear;
pub mod object;
mod rope;
mod row_reduce;

pub use jit::{Jit, KernelFn, KernelId};
pub use ouroc_kernels::abi::RawKernel;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    AbiParam, BlockArg, ExtFuncData, ExternalName, FuncRef, Function, InstBuilder, MemFlagsData, Signature,
    UserExternalName, UserFuncName, Value, types,
};
use cranelift_codegen::ir::{Endianness, Type};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use ouroc_ir::DType;
use ouroc_kernels::spec::Family;
use ouroc_kernels::{KernelSpec, NormWeight};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodegenError {
    #[error("the host ISA is not supported by Cranelift: {0}")]
    UnsupportedHost(String),
    #[error("kernel {kernel}: {msg}")]
    Unsupported { kernel: String, msg: String },
    #[error("cranelift: {0}")]
    Cranelift(String),
}

/// What an emitter needs to know about the target.
pub(crate) struct Env {
    pub ptr: Type,
    pub frontend: TargetFrontendConfig,
    /// Index (module function id) of each imported helper, by [`Helper`].
    pub helpers: [u32; 3],
}

/// The Rust `extern "C" fn(f32) -> f32` helpers generated code calls
/// (Cranelift has no transcendental functions): the same `f32` methods the
/// reference executor uses, so results match it bit for bit.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Helper {
    /// `f32::exp` (`ouroc_expf`).
    Exp = 0,
    /// `f32::cos` (`ouroc_cosf`).
    Cos = 1,
    /// `f32::sin` (`ouroc_sinf`).
    Sin = 2,
}

pub use ouroc_kernels::abi::{KvSeq, extra_args};
pub use ouroc_kernels::spec::operand_dtypes;

/// Whether this backend emits kernels of this family (every family now;
/// dtypes and shapes are checked by [`clif_text`] / [`Jit::compile`]).
/// A quantised Linear is not one of them: it runs on the runtime's
/// quantised microkernels (`ouroc_runtime::qlinear`), whatever the target.
pub fn supported(spec: &KernelSpec) -> bool {
    matches!(
        spec.family,
        Family::Linear(ouroc_kernels::spec::LinearSpec { quant: None, .. })
            | Family::Elementwise(_)
            | Family::RowReduce(_)
            | Family::Gather(_)
            | Family::RopeTable(_)
            | Family::Rope(_)
            | Family::Attention(_)
    )
}

/// The kernel parameters: `(args, strides, tokens)`.
pub(crate) fn kernel_params(sig: &mut Signature, ptr: Type) {
    for _ in 0..3 {
        sig.params.push(AbiParam::new(ptr));
    }
}

/// The CLIF of the kernel of `spec` before Cranelift's optimisations, for a
/// 64-bit System V target (the text is the same on every 64-bit host). The
/// kernel is `u0:1`; imported helpers are `u0:0` (`ouroc_expf`), `u0:2`
/// (`ouroc_cosf`) and `u0:3` (`ouroc_sinf`).
pub fn clif_text(spec: &KernelSpec) -> Result<String, CodegenError> {
    let env = Env {
        ptr: types::I64,
        frontend: TargetFrontendConfig {
            default_call_conv: CallConv::SystemV,
            pointer_width: target_lexicon::PointerWidth::U64,
            page_size_align_log2: 12,
        },
        helpers: [0, 2, 3],
    };
    let mut sig = Signature::new(CallConv::SystemV);
    kernel_params(&mut sig, env.ptr);
    let mut func = Function::with_name_signature(UserFuncName::user(0, 1), sig);
    build(spec, &mut func, &mut FunctionBuilderContext::new(), &env)?;
    Ok(func.display().to_string())
}

/// Emit the body of `func` (whose signature is the kernel ABI) for `spec`.
pub(crate) fn build(
    spec: &KernelSpec,
    func: &mut Function,
    fctx: &mut FunctionBuilderContext,
    env: &Env,
) -> Result<(), CodegenError> {
    let unsupported = |msg: String| CodegenError::Unsupported {
        kernel: spec.name.clone(),
        msg,
    };
    if !supported(spec) {
        return Err(unsupported(format!(
            "the CPU backend does not emit {} kernels yet",
            spec.family.name()
        )));
    }
    let index_operands = match spec.family {
        Family::Gather(_) => vec![1],
        Family::RopeTable(_) => vec![0],
        _ => Vec::new(),
    };
    for (i, d) in operand_dtypes(spec).into_iter().enumerate() {
        let ok = if index_operands.contains(&i) {
            d == DType::I32
        } else {
            matches!(d, DType::F32 | DType::BF16)
        };
        if !ok {
            return Err(unsupported(format!(
                "dtype {d} of operand {i} (the CPU backend handles f32 and bf16, i32 indices)"
            )));
        }
    }
    if !matches!(spec.act, DType::F32 | DType::BF16) {
        return Err(unsupported(format!(
            "activation dtype {} (the CPU backend handles f32 and bf16)",
            spec.act
        )));
    }
    check_shape(&spec.family).map_err(unsupported)?;
    let mut b = FunctionBuilder::new(func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let p = b.block_params(entry).to_vec();
    let mut e = Emit {
        b,
        ptr: env.ptr,
        args: p[0],
        strides: p[1],
        tokens: p[2],
        helpers: [None; 3],
        helper_index: env.helpers,
        call_conv: env.frontend.default_call_conv,
    };
    match &spec.family {
        Family::Linear(l) => linear::emit(&mut e, spec.act, l),
        Family::Elementwise(el) => elementwise::emit(&mut e, spec.act, el),
        Family::RowReduce(r) => row_reduce::emit(&mut e, spec.act, r),
        Family::Gather(g) => gather::emit(&mut e, spec.act, g),
        Family::RopeTable(t) => rope::emit_table(&mut e, spec.act, t),
        Family::Rope(r) => rope::emit(&mut e, spec.act, r),
        Family::Attention(a) => attention::emit(&mut e, spec.act, a),
    }
    e.b.ins().return_(&[]);
    e.b.finalize(env.frontend);
    Ok(())
}

/// Memory flags of every access: non-trapping (the caller guarantees the
/// buffers), not assumed aligned.
fn mf() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Flags of lane-reinterpreting vector bitcasts (lane order little-endian).
fn vbits() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// Emission state shared by the emitters: the builder and the kernel's parameters.
pub(crate) struct Emit<'a> {
    pub b: FunctionBuilder<'a>,
    pub ptr: Type,
    args: Value,
    strides: Value,
    pub tokens: Value,
    helpers: [Option<FuncRef>; 3],
    helper_index: [u32; 3],
    call_conv: CallConv,
}

impl Emit<'_> {
    pub fn iconst(&mut self, v: usize) -> Value {
        self.b.ins().iconst(self.ptr, v as i64)
    }

    /// `args[i]`.
    pub fn arg(&mut self, i: usize) -> Value {
        let bytes = self.ptr.bytes() as i32;
        self.b.ins().load(self.ptr, mf(), self.args, bytes * i as i32)
    }

    /// `strides[i]` as an integer (an extra argument's value).
    pub fn stride(&mut self, i: usize) -> Value {
        let bytes = self.ptr.bytes() as i32;
        self.b.ins().load(self.ptr, mf(), self.strides, bytes * i as i32)
    }

    /// The row stride of argument `i` in bytes, for elements of `dtype`.
    pub fn stride_bytes(&mut self, i: usize, dtype: DType) -> Value {
        let bytes = self.ptr.bytes() as i32;
        let s = self.b.ins().load(self.ptr, mf(), self.strides, bytes * i as i32);
        self.b.ins().imul_imm_u(s, dtype.size_bytes() as i64)
    }

    /// `base + t * stride`.
    pub fn row(&mut self, base: Value, stride: Value, t: Value) -> Value {
        let off = self.b.ins().imul(t, stride);
        self.b.ins().iadd(base, off)
    }

    /// `p + i * size(dtype)` for a run-time element index `i`.
    pub fn elem_addr(&mut self, p: Value, i: Value, dtype: DType) -> Value {
        let off = self.b.ins().imul_imm_u(i, dtype.size_bytes() as i64);
        self.b.ins().iadd(p, off)
    }

    /// One element of `dtype` at `p + off` bytes, as f32.
    pub fn load_s(&mut self, dtype: DType, p: Value, off: i32) -> Value {
        match dtype {
            DType::BF16 => {
                let h = self.b.ins().uload16(types::I32, mf(), p, off);
                let bits = self.b.ins().ishl_imm_u(h, 16);
                self.b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
            }
            _ => self.b.ins().load(types::F32, mf(), p, off),
        }
    }

    /// Four elements of `dtype` at `p + off` bytes, as f32x4.
    pub fn load_v(&mut self, dtype: DType, p: Value, off: i32) -> Value {
        match dtype {
            DType::BF16 => {
                let h = self.b.ins().uload16x4(mf(), p, off);
                let bits = self.b.ins().ishl_imm_u(h, 16);
                self.b.ins().bitcast(types::F32X4, vbits(), bits)
            }
            _ => self.b.ins().load(types::F32X4, mf(), p, off),
        }
    }

    /// Round an f32 to `dtype` (round-to-nearest-even; NaN stays a quiet
    /// NaN, as `half::bf16::from_f32`); the identity for f32.
    pub fn round_s(&mut self, dtype: DType, v: Value) -> Value {
        if dtype != DType::BF16 {
            return v;
        }
        let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), v);
        let lsb = self.b.ins().ushr_imm_u(bits, 16);
        let lsb = self.b.ins().band_imm_u(lsb, 1);
        let r = self.b.ins().iadd_imm_u(bits, 0x7fff);
        let r = self.b.ins().iadd(r, lsb);
        let quiet = self.b.ins().bor_imm_u(bits, 0x0040_0000);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
        let r = self.b.ins().select(nan, quiet, r);
        let r = self.b.ins().band_imm_u(r, 0xffff_0000i64);
        self.b.ins().bitcast(types::F32, MemFlagsData::new(), r)
    }

    /// [`Emit::round_s`] on each lane of an f32x4.
    pub fn round_v(&mut self, dtype: DType, v: Value) -> Value {
        if dtype != DType::BF16 {
            return v;
        }
        let (one, half, quiet_bit, hi) = (
            self.splat_i32(1),
            self.splat_i32(0x7fff),
            self.splat_i32(0x0040_0000),
            self.splat_i32(0xffff_0000),
        );
        let bits = self.b.ins().bitcast(types::I32X4, vbits(), v);
        let lsb = self.b.ins().ushr_imm_u(bits, 16);
        let lsb = self.b.ins().band(lsb, one);
        let r = self.b.ins().iadd(bits, half);
        let r = self.b.ins().iadd(r, lsb);
        let quiet = self.b.ins().bor(bits, quiet_bit);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
        let r = self.b.ins().bitselect(nan, quiet, r);
        let r = self.b.ins().band(r, hi);
        self.b.ins().bitcast(types::F32X4, vbits(), r)
    }

    /// An i32x4 of `x` in every lane.
    fn splat_i32(&mut self, x: i64) -> Value {
        let c = self.b.ins().iconst(types::I32, x);
        self.b.ins().splat(types::I32X4, c)
    }

    /// Round the four lanes of `v` to `dtype` and store them at `p + off`
    /// bytes (bf16: the top 16 bits of each, packed to 8 bytes).
    pub fn store_v(&mut self, dtype: DType, v: Value, p: Value, off: i32) {
        match dtype {
            DType::BF16 => {
                let r = self.round_v(dtype, v);
                let bits = self.b.ins().bitcast(types::I32X4, vbits(), r);
                let hi = self.b.ins().ushr_imm_u(bits, 16);
                // Lanes are 0..=0xffff: the saturating narrow keeps them.
                let packed = self.b.ins().unarrow(hi, hi);
                let q = self.b.ins().bitcast(types::I64X2, vbits(), packed);
                let lo = self.b.ins().extractlane(q, 0);
                self.b.ins().store(mf(), lo, p, off);
            }
            _ => {
                self.b.ins().store(mf(), v, p, off);
            }
        }
    }

    /// `exp` of each lane of an f32x4: four calls of `ouroc_expf`, so each
    /// lane is the scalar result bit for bit.
    pub fn exp_v(&mut self, v: Value) -> Value {
        let mut out = v;
        for l in 0..4u8 {
            let x = self.b.ins().extractlane(v, l);
            let y = self.exp(x);
            out = self.b.ins().insertlane(out, y, l);
        }
        out
    }

    /// Round `v` to `dtype` and store it at `p + off` bytes.
    pub fn store_s(&mut self, dtype: DType, v: Value, p: Value, off: i32) {
        match dtype {
            DType::BF16 => {
                let r = self.round_s(dtype, v);
                let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), r);
                let hi = self.b.ins().ushr_imm_u(bits, 16);
                self.b.ins().istore16(mf(), hi, p, off);
            }
            _ => {
                self.b.ins().store(mf(), v, p, off);
            }
        }
    }

    /// Store `v`, already representable in `dtype` (rounded), at `p + off`
    /// bytes: the top 16 bits for bf16.
    pub fn store_exact(&mut self, dtype: DType, v: Value, p: Value, off: i32) {
        match dtype {
            DType::BF16 => {
                let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), v);
                let hi = self.b.ins().ushr_imm_u(bits, 16);
                self.b.ins().istore16(mf(), hi, p, off);
            }
            _ => {
                self.b.ins().store(mf(), v, p, off);
            }
        }
    }

    /// `exp(x)` via the imported `ouroc_expf`.
    pub fn exp(&mut self, x: Value) -> Value {
        self.call_helper(Helper::Exp, x)
    }

    /// `h(x)` via the imported helper `h`.
    pub fn call_helper(&mut self, h: Helper, x: Value) -> Value {
        let f = match self.helpers[h as usize] {
            Some(f) => f,
            None => {
                let mut sig = Signature::new(self.call_conv);
                sig.params.push(AbiParam::new(types::F32));
                sig.returns.push(AbiParam::new(types::F32));
                let signature = self.b.import_signature(sig);
                let name = self
                    .b
                    .func
                    .declare_imported_user_function(UserExternalName::new(0, self.helper_index[h as usize]));
                let f = self.b.import_function(ExtFuncData {
                    name: ExternalName::user(name),
                    signature,
                    colocated: false,
                    patchable: false,
                });
                self.helpers[h as usize] = Some(f);
                f
            }
        };
        let call = self.b.ins().call(f, &[x]);
        self.b.inst_results(call)[0]
    }

    /// `round(1 / (1 + exp(-x)))`, the reference's sigmoid.
    pub fn sigmoid(&mut self, act: DType, x: Value) -> Value {
        let neg = self.b.ins().fneg(x);
        let e = self.exp(neg);
        let one = self.b.ins().f32const(1.0);
        let den = self.b.ins().fadd(one, e);
        let s = self.b.ins().fdiv(one, den);
        self.round_s(act, s)
    }

    /// A counted loop `for i in (start..end).step_by(step)` (pointer-sized
    /// `i`), threading `init` through the iterations; returns the final
    /// values. `body` gets `i` and the current values and returns the next.
    pub fn for_loop(
        &mut self,
        start: Value,
        end: Value,
        step: usize,
        init: &[Value],
        body: impl FnOnce(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        let tys: Vec<Type> = init.iter().map(|&v| self.b.func.dfg.value_type(v)).collect();
        let header = self.b.create_block();
        let body_blk = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, self.ptr);
        let carried: Vec<Value> = tys.iter().map(|&t| self.b.append_block_param(header, t)).collect();
        let outs: Vec<Value> = tys.iter().map(|&t| self.b.append_block_param(exit, t)).collect();
        let args = |first: Option<Value>, vs: &[Value]| -> Vec<BlockArg> {
            first
                .into_iter()
                .chain(vs.iter().copied())
                .map(BlockArg::Value)
                .collect()
        };
        self.b.ins().jump(header, &args(Some(start), init));
        self.b.switch_to_block(header);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(more, body_blk, &[], exit, &args(None, &carried));
        self.b.switch_to_block(body_blk);
        self.b.seal_block(body_blk);
        let next = body(self, i, &carried);
        let i2 = self.b.ins().iadd_imm_u(i, step as i64);
        self.b.ins().jump(header, &args(Some(i2), &next));
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
        outs
    }

    /// `for t in 0..tokens`.
    pub fn for_tokens(&mut self, body: impl FnOnce(&mut Self, Value)) {
        let zero = self.iconst(0);
        let tokens = self.tokens;
        self.for_loop(zero, tokens, 1, &[], |e, t, _| {
            body(e, t);
            Vec::new()
        });
    }

    /// `for i in 0..n` over a constant `n` (no loop when n == 0).
    pub fn for_const(
        &mut self,
        n: usize,
        init: &[Value],
        body: impl FnOnce(&mut Self, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        if n == 0 {
            return init.to_vec();
        }
        let (zero, end) = (self.iconst(0), self.iconst(n));
        self.for_loop(zero, end, 1, init, body)
    }
}

/// Shape conditions the emitters rely on (the reference would panic or
/// index out of bounds otherwise).
fn check_shape(f: &Family) -> Result<(), String> {
    let even = |what: &str, hd: usize| {
        if hd >= 2 && hd.is_multiple_of(2) {
            Ok(())
        } else {
            Err(format!("{what}: head_dim {hd} must be even and at least 2"))
        }
    };
    match f {
        Family::RopeTable(t) => even("rope_table", t.head_dim),
        Family::Rope(r) => even("rope", r.head_dim),
        Family::Attention(a) => {
            if a.rope {
                even("attention rope", a.head_dim)?;
            }
            if a.head_dim == 0 || a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
                return Err(format!(
                    "attention: heads {} must be a multiple of kv_heads {} (head_dim {} > 0)",
                    a.heads, a.kv_heads, a.head_dim
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether a norm multiplies by a weight operand.
pub(crate) fn norm_weighted(w: NormWeight) -> bool {
    w == NormWeight::Weighted
}
