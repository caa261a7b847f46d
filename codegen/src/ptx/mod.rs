//! The PTX backend: PTX ISA 8.0 text for `.target sm_80` (A100),
//! `.address_size 64`, one emitter per kernel family of
//! [`ouroc_kernels::spec::Family`], shape specialised like the CPU backend
//! (every size of the spec is an immediate; the number of rows, `tokens`,
//! and for attention the sequence length are parameters).
//!
//! [`emit`] turns one [`KernelSpec`] into a [`PtxKernel`]: a complete PTX
//! module with one or more `.entry` functions and their [`KernelAbi`]
//! (parameters, and per entry when it runs and its [`Launch`]
//! configuration, serialisable so a Program or runtime can store it).
//! [`module`] emits every kernel of a [`Program`] into one module, one copy
//! per [`KernelSpec::code_key`], plus the greedy-sampling [`argmax`].
//!
//! # ABI (every entry of a kernel takes the kernel's parameter list)
//!
//! ```text
//! .param .u64 <operand>...  .param .u64 <result>...        (family order)
//! .param .u32 <act>_stride...                               (activations only)
//! .param .u32 tokens
//! [attention: .param .u64 kv, .param .u32 seq, .param .u32 kv_cap, .param .u64 scratch]
//! ```
//!
//! - One `.u64` global address per operand, then per result, in the order
//!   `ouroc_kernels::spec` lists them; [`ParamDesc::role`] says which.
//!   Parameter names: `x`, `w`, `b`, `y` (Linear); `x0`, `x1`, `w`,
//!   `gate_w`, `gate_b`, `next_w` -> `s`, `n`, `lambda`, `next`
//!   (RowReduce); `table`, `ids` -> `out` (Gather); `pos` -> `out`
//!   (RopeTable); `x`, `cos`, `sin` -> `out` (Rope); `q`, `k`, `v`, `cos`,
//!   `sin` -> `out` (Attention); `x0`, `x1`, ... -> `out` (Elementwise);
//!   `logits` -> `ids` ([`argmax`]).
//! - `<name>_stride`: for each activation operand and result (not for
//!   weights), the row stride in elements: row t starts at
//!   `ptr + t * stride * size(dtype)`. A column window `%v[a..b]` passes
//!   the buffer's width and a pointer to column a.
//! - `tokens`: the number of rows T of this call.
//!
//! Dtypes ([`operand_dtypes`]), as in the CPU backend: activations and
//! results in `act` (f32, or bf16 as 16 bits), Linear weight and bias in
//! the spec's `weight` dtype, every other weight in `act`, Gather's table
//! in its `table` dtype, ids / positions i32. bf16 is widened exactly
//! (`shl.b32 16` into an f32 register) and rounded with
//! `cvt.rn.bf16.f32` / `cvt.rn.bf16x2.f32` (round to nearest even).
//!
//! Alignment: weights 16-byte aligned (any device allocation is); every
//! activation row whose byte length is a multiple of 16 starts on a 16-byte
//! boundary (the arena plan's 64-byte offsets times T guarantee it for
//! whole values). The Linear GEMM entry further needs the `x` rows 16-byte
//! aligned (whole `x`, or a window at a column that is a multiple of 8).
//!
//! Kernels are correct in place (a result row the same memory as an
//! operand row, which the memory plan allows for Elementwise and
//! RowReduce): each element is read, by the thread that writes it, before
//! it is written. Loads use the read-only path (`ld.global.nc`) only for
//! data no result of the kernel can share memory with: weights, the KV
//! cache, and the activations of Gather, RopeTable, Linear and Attention
//! (never planned in place).
//!
//! # Entries, `when` and launch
//!
//! A kernel has one or more entries, launched in order, each only when its
//! [`When`] holds for the call (T tokens, `seq` new tokens per sequence;
//! `batch = T / seq`). Each entry's [`Launch`] gives the grid as a function
//! of T, seq and batch ([`Dim`]), the block size (1-D, also the entry's
//! `.maxntid`) and the dynamic shared memory (`extern .shared ouroc_smem`);
//! above 48 KiB the runtime must raise
//! `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` first. Math:
//! additions and products of a rounding chain use `.rn` (no contraction
//! into FMA), dot products use `fma.rn.f32`; `exp(x)` is
//! `ex2.approx.f32(x * log2 e)`, `sqrt.rn`, `div.rn`, `rcp.rn` are IEEE;
//! `sin` / `cos` are computed in software to about 1 ulp
//! ([`asm::Body::sincos`]).
//!
//! # Families
//!
//! - `Gather` (grid T, block <= 256): the i32 id of row t indexes the
//!   table (the caller checks `id < rows`); 16-byte `ld.global.nc.v4`
//!   copies when the table is in `act` and a row is a multiple of 16
//!   bytes, else widened and rounded per element.
//! - `RopeTable` (grid T, block head_dim): `inv_freq` computed at codegen
//!   time with the reference's f32 expression, a `.const` table;
//!   `f(pos * inv_freq[j % half])` rounded.
//! - `Rope` (grid T): a thread per (head, j < half) pair writes `j` and
//!   `j + half` from registers (so in place is safe); the reference's
//!   three roundings.
//! - `Elementwise` (grid (T, ceil(width / 256)), block <= 256): a thread
//!   per element, the expression tree inline (a table from node to
//!   instruction), every node rounded.
//! - `RowReduce` (grid T, block <= 256): each thread keeps its elements in
//!   registers; add + sum of squares, one block reduction (warp `shfl.bfly`
//!   then shared memory), norm, weight, gate dot and next sum of squares,
//!   a second block reduction, gate sigmoid (thread 0), next norm.
//! - `Linear`, entry `gemv` (`T < GEMM_MIN_TOKENS`, or every T when the
//!   GEMM's conditions fail; grid (T, ceil(n / 16)), block 128): x staged
//!   in shared memory as f32 (`4 k` bytes dynamic), 4 rows of W per warp
//!   read with `ld.global.nc.v4` (8 bf16 or 4 f32 per lane and load) and
//!   `fma` over k, a butterfly reduction, the bias added, rounded once.
//! - `Linear`, entry `gemm` (`T >= GEMM_MIN_TOKENS`; only bf16 x, W and
//!   bias, `k % 8 == 0`, `n % 2 == 0`): 128x128x32 CTA tiles, 8 warps of
//!   64x32, `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` with
//!   f32 accumulators, fragments by `ldmatrix.x4` from XOR-swizzled shared
//!   tiles (conflict free), a 3-stage `cp.async.cg` (16 bytes, zero fill
//!   outside M / N / K) pipeline with `commit_group` / `wait_group 1`
//!   (48 KiB dynamic shared memory); epilogue bias + one rounding
//!   (`cvt.rn.bf16x2.f32`), 32-bit stores. Grid (ceil(n / 128),
//!   ceil(T / 128)).
//! - `Linear` with quantised weights (`LinearSpec::quant`, q8_0 / q4_0, the
//!   weight operand the interleaved tiles of `ouroc_kernels::quant` as they
//!   are stored; the bias stays in `weight`), entries `gemv`
//!   (`T < GEMM_MIN_TOKENS`; grid (T, ceil(n / 16)), block 128: the token's
//!   row quantised per block of 32 into shared memory, `dp4a.u32.s32` on the
//!   stored quants, the blocks' f32 terms added in order by one thread per
//!   row) and `gemm` (`T >= GEMM_MIN_TOKENS`, any dtype and shape; grid
//!   (ceil(n / 128), ceil(T / 64)), block 256: each block of k quantised for
//!   the CTA's 64 rows in shared memory, then
//!   `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`, one quant block per
//!   k step, B fragments read straight from the tiles). Both compute the
//!   reference's operations in its order: its bits (see `qlinear.rs`).
//! - `Attention`: see below.
//!
//! [`argmax`] (grid T, block 256): the index of the first maximum of each
//! row (NaN never wins; the reference's `sampling::argmax`), i32.
//!
//! # Attention and the KV cache
//!
//! The KV cache is not in the arena. Each (loop step, layer) slot holds,
//! per sequence of the batch, a K and a V store of `kv_cap` positions,
//! head-major: element (head h, position p, d) of a store is at
//! `((h * kv_cap + p) * head_dim + d) * size(act)` (a head's keys are one
//! contiguous block, what a tile load wants). The extra parameters:
//!
//! - `kv`: a global array of one [`KvSeqDesc`] per sequence (24 bytes:
//!   `k: u64`, `v: u64`, `past: u32`, pad), `past` the positions already
//!   stored, the absolute position of the sequence's first new token;
//! - `seq`: new tokens per sequence (`batch = T / seq`, sequence b owns
//!   rows `b * seq .. (b + 1) * seq`);
//! - `kv_cap`: positions per store (the caller guarantees
//!   `past + seq <= kv_cap`);
//! - `scratch`: f32 scratch for the decode entries,
//!   [`attention_scratch_bytes`] bytes: per (sequence b, head h), at float
//!   `(b * heads + h) * (kv_cap + splits * (2 + head_dim))`, the scores
//!   (`kv_cap`), then per split its max and sum (2), then per split its
//!   partial output (`head_dim`).
//!
//! Entries, in order:
//! 1. `append` (always; grid T): writes each new token's K (rotated with
//!    its cos / sin rows when `rope`, rounded like [`ouroc_kernels::exec::rope`])
//!    and V to position `past + s` of its sequence's stores. The caller
//!    adds `seq` to `past` after the kernel's entries ran.
//! 2. decode (`seq == 1`), split over the KV length in
//!    [`decode_splits`] parts: `scores` (grid (splits, heads, batch),
//!    block 128: q rotated in registers, a warp per key, the scores
//!    `round(round(q . k) * scale)` to the scratch, each split's max and
//!    `sum exp(s - max)`), `pv` (same grid, block head_dim rounded up to
//!    32: the global max and sum from the splits' statistics, the
//!    probabilities `round(exp(s - max) / sum)` times V into the split's
//!    partial output), `combine` (grid (heads, batch): the sum of the
//!    partials, rounded).
//! 3. `prefill` (`seq > 1`; grid (ceil(seq / 16), heads, batch), block
//!    128): 16 queries per CTA (4 per warp), K and V in tiles of 32
//!    positions staged to shared memory as f32 with 128-bit loads, a lane
//!    per key. The contract rounds the normalised probability, which a
//!    single online pass cannot produce, so two passes over the tiles: the
//!    first keeps the online softmax statistics (running max, rescaled
//!    sum), the second computes the rounded probabilities and accumulates
//!    `p V` (a lane per output column, p broadcast by `shfl.idx`). Causal:
//!    query s sees positions `0 ..= past + s`.
//!
//! Unsupported dtypes (f16, i32 activations) and shapes (odd head_dim,
//! head_dim not a multiple of 4 or above 1024 for attention, heads not a
//! multiple of kv_heads) are [`PtxError::Unsupported`].

pub(crate) mod asm;
mod attention;
mod kv_copy;
mod linear;
mod qlinear;
mod simple;

use ouroc_ir::DType;
use ouroc_kernels::spec::Family;
use ouroc_kernels::{KernelSpec, NormWeight, Program};
use std::collections::HashMap;

pub use kv_copy::KV_COPY_PTX;
pub use linear::GEMM_MIN_TOKENS;
/// The launch records are the contract beside the Program (`ouroc_kernels::abi::ptx`).
pub use ouroc_kernels::abi::ptx::{
    Dim, KV_COPY_BLOCK, KV_COPY_ENTRY, KernelAbi, KvSeqDesc, Launch, ParamDesc, ParamRole, ParamTy, PtxEntry,
    PtxModule, When, attention_scratch_bytes, decode_splits,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PtxError {
    #[error("kernel {kernel}: {msg}")]
    Unsupported { kernel: String, msg: String },
}

/// One kernel as PTX: a complete module and its ABI.
#[derive(Clone, Debug, PartialEq)]
pub struct PtxKernel {
    pub abi: KernelAbi,
    pub text: String,
}

const HEADER: &str = "//\n// Generated by ouroc (codegen/src/ptx)\n//\n\n.version 8.0\n.target sm_80\n\
                      .address_size 64\n\n.extern .shared .align 16 .b8 ouroc_smem[];\n";

pub use ouroc_kernels::spec::operand_dtypes;

/// Operand names and whether each is an activation (has a stride), then result names.
fn arg_names(spec: &KernelSpec) -> (Vec<(String, bool)>, Vec<String>) {
    let act = |n: &str| (n.to_string(), true);
    let wt = |n: &str| (n.to_string(), false);
    let (ops, res): (Vec<(String, bool)>, Vec<&str>) = match &spec.family {
        Family::Gather(_) => (vec![wt("table"), act("ids")], vec!["out"]),
        Family::RopeTable(_) => (vec![act("pos")], vec!["out"]),
        Family::Linear(l) => {
            let mut o = vec![act("x"), wt("w")];
            if l.bias {
                o.push(wt("b"));
            }
            (o, vec!["y"])
        }
        Family::RowReduce(r) => {
            let mut o = vec![act("x0")];
            let mut res = Vec::new();
            if r.add {
                o.push(act("x1"));
                res.push("s");
            }
            if r.norm == NormWeight::Weighted {
                o.push(wt("w"));
            }
            res.push("n");
            if r.gate {
                o.extend([wt("gate_w"), wt("gate_b")]);
                res.push("lambda");
            }
            if r.next == Some(NormWeight::Weighted) {
                o.push(wt("next_w"));
            }
            if r.next.is_some() {
                res.push("next");
            }
            (o, res)
        }
        Family::Rope(_) => (vec![act("x"), act("cos"), act("sin")], vec!["out"]),
        Family::Attention(a) => {
            let mut o = vec![act("q"), act("k"), act("v")];
            if a.rope {
                o.extend([act("cos"), act("sin")]);
            }
            (o, vec!["out"])
        }
        Family::Elementwise(e) => ((0..e.inputs).map(|i| act(&format!("x{i}"))).collect(), vec!["out"]),
    };
    (ops, res.into_iter().map(String::from).collect())
}

/// The parameter list of a kernel (see the module docs).
pub fn params(spec: &KernelSpec) -> Vec<ParamDesc> {
    let (ops, res) = arg_names(spec);
    let p = |name: String, ty, role| ParamDesc { name, ty, role };
    let mut v: Vec<ParamDesc> = ops
        .iter()
        .enumerate()
        .map(|(i, (n, _))| p(n.clone(), ParamTy::U64, ParamRole::Operand(i)))
        .collect();
    v.extend(
        res.iter()
            .enumerate()
            .map(|(i, n)| p(n.clone(), ParamTy::U64, ParamRole::Result(i))),
    );
    for (i, (n, is_act)) in ops.iter().enumerate() {
        if *is_act {
            v.push(p(format!("{n}_stride"), ParamTy::U32, ParamRole::OperandStride(i)));
        }
    }
    v.extend(
        res.iter()
            .enumerate()
            .map(|(i, n)| p(format!("{n}_stride"), ParamTy::U32, ParamRole::ResultStride(i))),
    );
    v.push(p("tokens".into(), ParamTy::U32, ParamRole::Tokens));
    if let Family::Attention(_) = spec.family {
        v.push(p("kv".into(), ParamTy::U64, ParamRole::Kv));
        v.push(p("seq".into(), ParamTy::U32, ParamRole::Seq));
        v.push(p("kv_cap".into(), ParamTy::U32, ParamRole::KvCap));
        v.push(p("scratch".into(), ParamTy::U64, ParamRole::Scratch));
    }
    v
}

/// An entry an emitter produced: name suffix, when, launch and body.
pub(crate) struct Emitted {
    pub suffix: &'static str,
    pub when: When,
    pub launch: Launch,
    /// Module-scope declarations the body uses (constant tables).
    pub globals: String,
    pub body: asm::Body,
}

impl Emitted {
    pub fn new(suffix: &'static str, when: When, launch: Launch, body: asm::Body) -> Emitted {
        Emitted {
            suffix,
            when,
            launch,
            globals: String::new(),
            body,
        }
    }
}

/// `l0.qkv` -> `ouroc_l0_qkv`.
fn entry_base(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("ouroc_{s}")
}

/// Unsupported-spec error for kernel `spec`.
pub(crate) fn unsupported(spec: &KernelSpec, msg: impl Into<String>) -> PtxError {
    PtxError::Unsupported {
        kernel: spec.name.clone(),
        msg: msg.into(),
    }
}

fn check(spec: &KernelSpec) -> Result<(), PtxError> {
    let fl = |d: DType| matches!(d, DType::F32 | DType::BF16);
    if let Family::Linear(l @ ouroc_kernels::spec::LinearSpec { quant: Some(q), .. }) = &spec.family
        && (l.n == 0 || l.k == 0)
    {
        return Err(unsupported(spec, format!("a {q} Linear of shape [{}, {}]", l.n, l.k)));
    }
    if !fl(spec.act) {
        return Err(unsupported(
            spec,
            format!("activation dtype {} (f32 and bf16 only)", spec.act),
        ));
    }
    let index = match spec.family {
        Family::Gather(_) => Some(1),
        Family::RopeTable(_) => Some(0),
        _ => None,
    };
    for (i, d) in operand_dtypes(spec).into_iter().enumerate() {
        if !(fl(d) || (Some(i) == index && d == DType::I32)) {
            return Err(unsupported(spec, format!("dtype {d} of operand {i}")));
        }
    }
    let even = |hd: usize| hd >= 2 && hd.is_multiple_of(2);
    match &spec.family {
        Family::RopeTable(t) if !even(t.head_dim) || t.head_dim > 1024 => Err(unsupported(
            spec,
            format!("head_dim {} must be even, at most 1024", t.head_dim),
        )),
        Family::Rope(r) if !even(r.head_dim) => Err(unsupported(spec, format!("head_dim {} must be even", r.head_dim))),
        Family::Attention(a)
            if a.head_dim == 0
                || !a.head_dim.is_multiple_of(4)
                || a.head_dim > 1024
                || a.kv_heads == 0
                || !a.heads.is_multiple_of(a.kv_heads) =>
        {
            Err(unsupported(
                spec,
                format!(
                    "attention needs head_dim ({}) a multiple of 4 up to 1024 and heads ({}) a multiple of kv_heads ({})",
                    a.head_dim, a.heads, a.kv_heads
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// The entries of a spec, before assembly.
fn emit_entries(spec: &KernelSpec) -> Result<Vec<Emitted>, PtxError> {
    check(spec)?;
    Ok(match &spec.family {
        Family::Gather(g) => vec![simple::gather(spec.act, g)],
        Family::RopeTable(t) => vec![simple::rope_table(spec.act, t, &entry_base(&spec.name))],
        Family::Rope(r) => vec![simple::rope(spec.act, r)],
        Family::Elementwise(e) => vec![simple::elementwise(spec.act, e)],
        Family::RowReduce(r) => vec![simple::row_reduce(spec.act, r)],
        Family::Linear(l) => match l.quant {
            Some(q) => qlinear::emit(spec.act, l, q),
            None => linear::emit(spec.act, l),
        },
        Family::Attention(a) => attention::emit(spec.act, a),
    })
}

/// Assemble entries into module text (without the header) and their ABI entries.
fn assemble(base: &str, params: &[ParamDesc], entries: Vec<Emitted>) -> (String, Vec<PtxEntry>) {
    let single = entries.len() == 1;
    let mut text = String::new();
    let mut out = Vec::new();
    let plist: Vec<String> = params
        .iter()
        .map(|p| {
            let ty = match p.ty {
                ParamTy::U64 => "u64",
                ParamTy::U32 => "u32",
            };
            format!("\t.param .{ty} {}", p.name)
        })
        .collect();
    for e in entries {
        let entry = if single {
            base.to_string()
        } else {
            format!("{base}_{}", e.suffix)
        };
        text.push('\n');
        text.push_str(&e.globals);
        text.push_str(&format!(
            ".visible .entry {entry}(\n{}\n)\n.maxntid {}, 1, 1\n",
            plist.join(",\n"),
            e.launch.block
        ));
        text.push_str(&e.body.finish());
        out.push(PtxEntry {
            entry,
            when: e.when,
            launch: e.launch,
        });
    }
    (text, out)
}

/// The PTX of one kernel: a module with its entries, and its ABI.
pub fn emit(spec: &KernelSpec) -> Result<PtxKernel, PtxError> {
    let params = params(spec);
    let (text, entries) = assemble(&entry_base(&spec.name), &params, emit_entries(spec)?);
    Ok(PtxKernel {
        abi: KernelAbi {
            name: spec.name.clone(),
            params,
            entries,
        },
        text: format!("{HEADER}{text}"),
    })
}

/// The greedy-sampling kernel: per row of `vocab` logits in `act`, the i32
/// index of the first maximum. Parameters `logits`, `ids`,
/// `logits_stride`, `ids_stride`, `tokens`.
pub fn argmax(vocab: usize, act: DType) -> Result<PtxKernel, PtxError> {
    let spec_name = "argmax";
    if !matches!(act, DType::F32 | DType::BF16) {
        return Err(PtxError::Unsupported {
            kernel: spec_name.into(),
            msg: format!("activation dtype {act}"),
        });
    }
    let params = argmax_params();
    let (text, entries) = assemble(&entry_base(spec_name), &params, vec![simple::argmax(vocab, act)]);
    Ok(PtxKernel {
        abi: KernelAbi {
            name: spec_name.into(),
            params,
            entries,
        },
        text: format!("{HEADER}{text}"),
    })
}

fn argmax_params() -> Vec<ParamDesc> {
    let p = |name: &str, ty, role| ParamDesc {
        name: name.into(),
        ty,
        role,
    };
    vec![
        p("logits", ParamTy::U64, ParamRole::Operand(0)),
        p("ids", ParamTy::U64, ParamRole::Result(0)),
        p("logits_stride", ParamTy::U32, ParamRole::OperandStride(0)),
        p("ids_stride", ParamTy::U32, ParamRole::ResultStride(0)),
        p("tokens", ParamTy::U32, ParamRole::Tokens),
    ]
}

/// Every kernel of `program` in one module: one set of entries per
/// distinct [`KernelSpec::code_key`] (named after its first kernel), and
/// [`argmax`] over the program's first output.
pub fn module(program: &Program) -> Result<PtxModule, PtxError> {
    let mut text = String::from(HEADER);
    let mut by_key: HashMap<String, Vec<PtxEntry>> = HashMap::new();
    let mut kernels = Vec::new();
    for k in program.kernels() {
        let key = k.spec.code_key();
        let params = params(&k.spec);
        let entries = match by_key.get(&key) {
            Some(e) => e.clone(),
            None => {
                let (t, e) = assemble(&entry_base(&k.spec.name), &params, emit_entries(&k.spec)?);
                text.push_str(&t);
                by_key.insert(key, e.clone());
                e
            }
        };
        kernels.push(KernelAbi {
            name: k.spec.name.clone(),
            params,
            entries,
        });
    }
    if let Some(out) = program.outputs.first() {
        let act = program.value(out.value).map_or(DType::F32, |v| v.dtype);
        let a = argmax(out.len, act)?;
        text.push_str(a.text.strip_prefix(HEADER).unwrap_or(&a.text));
        kernels.push(a.abi);
    }
    Ok(PtxModule {
        text,
        kernels,
        runtime_text: KV_COPY_PTX.to_string(),
    })
}
