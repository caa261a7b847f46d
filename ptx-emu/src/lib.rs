//! ouroc-ptx-emu: an emulator for the subset of PTX that ouroc's sm_80
//! backend emits, parsed from the PTX text, with SIMT semantics (warps of
//! 32 lanes), so kernels can be checked numerically without a GPU. It
//! depends on no other ouroc crate.
//!
//! # Layout
//!
//! Text becomes a syntax tree, the tree becomes decoded kernels, and a
//! scheduler issues their instructions to the semantics.
//!
//! | file | holds |
//! |---|---|
//! | `lex.rs` | tokens; comments dropped |
//! | `ast.rs` | the syntax tree: directives, declarations, labels, instructions, operands as written |
//! | `parse.rs` | tokens -> syntax tree (grammar only) |
//! | `lower.rs` | syntax tree -> kernels: `.shared`/`.const`/`.param` layout, register scopes, labels |
//! | `decode.rs` | opcode and modifiers -> the executable `ir::Op`, every modifier checked |
//! | `operand.rs` | operands -> registers, immediates, addresses, with the ISA's type rules |
//! | `ty.rs`, `ir.rs` | PTX types; the decoded instruction set |
//! | `module.rs` | [`Module`]: launch limits, parameter marshalling, the grid loop |
//! | `sched.rs` | the warp scheduler: per-lane PCs, reconvergence, barriers, deadlocks, `cp.async` groups |
//! | `exec.rs` | instruction semantics on a warp's lanes |
//! | `alu.rs` | per-lane integer/float arithmetic, comparisons, `cvt` |
//! | `space.rs` | state-space addressing (generic windows, bounds checks) |
//! | `memory.rs` | [`Memory`]: global memory buffers |
//! | `num.rs` | f16/bf16 and correctly rounded conversions |
//! | `error.rs` | [`EmuError`] |
//!
//! # API
//!
//! ```
//! use ouroc_ptx_emu::{LaunchDims, Memory, Module, Param};
//!
//! let ptx = r#"
//! .version 8.0
//! .target sm_80
//! .address_size 64
//! .visible .entry scale(.param .u64 x, .param .u32 n)
//! {
//!     .reg .pred %p<2>;
//!     .reg .b32 %r<4>;
//!     .reg .f32 %f<2>;
//!     .reg .b64 %rd<4>;
//!     ld.param.u64 %rd1, [x];
//!     ld.param.u32 %r1, [n];
//!     mov.u32 %r2, %tid.x;
//!     setp.ge.u32 %p1, %r2, %r1;
//!     @%p1 bra DONE;
//!     cvta.to.global.u64 %rd1, %rd1;
//!     mul.wide.u32 %rd2, %r2, 4;
//!     add.s64 %rd3, %rd1, %rd2;
//!     ld.global.f32 %f1, [%rd3];
//!     mul.f32 %f1, %f1, 0f40000000;
//!     st.global.f32 [%rd3], %f1;
//! DONE:
//!     ret;
//! }
//! "#;
//! let module = Module::parse(ptx).unwrap();
//! let mut mem = Memory::new();
//! let x = mem.alloc_f32(&[1.0, 2.0, 3.0]);
//! let dims = LaunchDims { grid: (1, 1, 1), block: (32, 1, 1), shared_bytes: 0 };
//! module.launch("scale", dims, &[Param::Ptr(x), Param::U32(3)], &mut mem).unwrap();
//! assert_eq!(mem.read_f32(x, 3).unwrap(), vec![2.0, 4.0, 6.0]);
//! ```
//!
//! - [`Module::parse`] reads PTX text (`.version`, `.target`,
//!   `.address_size`, `.visible .entry` with `.param`s, `.reg` lists and
//!   `%r<N>` ranges, nested `{ }` scopes, `.shared` (static, `.align`,
//!   arrays) and `.extern .shared` (dynamic) variables at module or function
//!   scope, module-scope `.const` arrays with initialisers (`mov` of their
//!   name gives the `.const` address, [`CONST_WINDOW`] the generic one), labels, `@%p`/`@!%p` guards, comments, vector operands
//!   `{%f1, %f2}`, addresses `[%rd1+16]` / `[smem+8]` / `[param]`,
//!   immediates in decimal, hex `0x`, octal, binary, float `0f3F800000` /
//!   `0d...` / `1.5`, negative). Every instruction is decoded once: registers
//!   become indices, immediates become bits of the instruction type, labels
//!   become instruction indices. Operand types are checked against the
//!   instruction type with the ISA's compatibility rules.
//! - [`Module::launch`] runs every CTA of the grid and returns
//!   [`LaunchStats`]; kernel parameters are [`Param`]s matched against the
//!   declared `.param` sizes; [`Memory`] holds global memory as separate
//!   buffers at fake 64-bit device addresses (`Memory::alloc*` return them),
//!   with `read_*`/`write_*` helpers for f32, bf16 and u32 slices.
//! - Errors ([`EmuError`]) name the line and instruction text: parse errors,
//!   unsupported instructions or modifiers (at parse time), faults (out of
//!   bounds or misaligned accesses, with kernel, CTA, thread and address),
//!   deadlocks (a barrier that not all warps reach), and a step limit
//!   against infinite loops ([`Module::set_step_limit`]).
//!
//! # Execution model
//!
//! CTAs run one after another. A CTA's threads form warps of 32 lanes in
//! `%tid` order (x fastest); a partial last warp has absent lanes. Each lane
//! has its own program counter; a warp executes, in lockstep, the group of
//! its runnable lanes with the *lowest* PC, so divergent paths run one after
//! the other and reconverge where the PCs meet again (the join of an
//! if/else laid out in order, the instruction after a loop). Within a CTA a
//! warp runs until all its lanes are blocked at a barrier or have exited,
//! then the next warp runs.
//!
//! Barriers are warp-granular as the ISA describes: a warp arrives at
//! barrier `a` when all its non-exited lanes wait there; the barrier
//! completes when the expected number of warps arrived (all warps of the
//! CTA, or `b / 32` with a thread count). Exited warps never arrive, so a
//! barrier that some warp skips is reported as a [`EmuError::Deadlock`]
//! instead of hanging. `bar.sync` (= `barrier.sync.aligned`) additionally
//! requires the warp to be converged.
//!
//! `cp.async` reads its source at issue (bounds-checked then) and writes
//! shared memory only when the issuing thread's `cp.async.wait_group` /
//! `wait_all` retires its group, so reading the destination before waiting
//! sees the old contents. Fresh shared memory is filled with `0xff` bytes
//! (NaN as f32/bf16) and registers with all ones, so reads of unwritten
//! state show up in results.
//!
//! Numerics: IEEE operations (`add/mul/fma/div.rn/sqrt.rn/rcp.rn`, `cvt`)
//! are bit-exact. The `.approx` functions (`ex2 lg2 rsqrt sin cos tanh`,
//! `rcp/sqrt/div.approx`) are computed *correctly rounded*, more precisely
//! than the hardware (e.g. `tanh.approx` is good to about 2^-11 on an
//! A100), and `mma` sums exact products in f64 with one rounding, so
//! comparisons against a reference need the tolerance the hardware needs.
//!
//! Warp collectives check their contract: `shfl.sync`/`vote.sync`/
//! `redux.sync`/`bar.warp.sync` need every lane of `membermask` to execute
//! the instruction (and no other); `shfl` may only read lanes that executed
//! it; `ldmatrix`/`mma` need all 32 lanes converged.
//!
//! # Supported subset
//!
//! | instruction | forms |
//! |---|---|
//! | `mov` | `.b16/.b32/.b64/.u*/.s*/.f32/.f64/.pred`, special registers, address of a `.shared` variable, packing `mov.b32 d, {a, b}` / `mov.b64 d, {a, b}` (first element lowest) and unpacking `mov.b32 {a, b}, s` |
//! | `ld`, `st` | `.global` (`.nc`), `.shared{::cta}`, `.param` and `.const` (ld only), generic; `.v2/.v4` up to 16 bytes; `.b8-.b64/.u8-.u64/.s8-.s64/.f32/.f64`; cache hints (`.ca .cg .cs .lu .cv .L1::* .L2::64B/128B/256B`, `.volatile`) accepted; natural alignment enforced; narrow loads zero/sign-extend into wider registers |
//! | `cvta` | `{.to}.global/.shared.u32/.u64` (shared window at [`SHARED_WINDOW`]) |
//! | `add sub` | integers (`.sat.s32`), `{.rn}{.ftz}{.sat}.f32`, `.f64` |
//! | `mul` | `.lo/.hi/.wide` integers, `{.rn}{.ftz}{.sat}.f32`, `.f64` |
//! | `mad` | `.lo/.hi/.wide` integers, `.rn{.ftz}{.sat}.f32/.f64` (fused) |
//! | `fma` | `.rn{.ftz}{.sat}.f32`, `.rn.f64` |
//! | `div rem` | integers (division by zero is a fault); `div.approx/.full/.rn.f32`, `div.rn.f64` |
//! | `min max neg abs` | integers, `{.ftz}.f32`, `.f64` |
//! | `and or xor not cnot shl shr` | `.b16/.b32/.b64` (`shr.u/.s`), `and/or/xor/not.pred` |
//! | `popc clz brev bfe prmt` | `.b32/.b64`, `bfe.u32/s32/u64/s64`, `prmt.b32` default mode |
//! | `rcp sqrt` | `.approx{.ftz}.f32`, `.rn{.ftz}.f32`, `.rn.f64` |
//! | `rsqrt ex2 lg2 sin cos tanh` | `.approx{.ftz}.f32` (computed correctly rounded from f64) |
//! | `setp` | every comparison (`eq ne lt le gt ge lo ls hi hs equ neu ltu leu gtu geu num nan`), `.and/.or/.xor` with `{!}c`, `p\|q` destinations, `.ftz`, 16-64-bit integer and bit types, `.f32/.f64` |
//! | `selp` | 16-64-bit types, `.f32/.f64` |
//! | `cvt` | int<->int (`.sat`, truncation, extension), int->float (`.rn/.rz/.rm/.rp`), float->int (`.rni/.rzi/.rmi/.rpi`, saturating, NaN->0), float->float (narrowing with rounding, `.relu`, `.satfinite`; same-type `.rni...`; `.ftz`, `.sat`); `.f16/.bf16/.f32/.f64`; `.f16x2/.bf16x2` from two f32 (a in the upper half) |
//! | `shfl.sync` | `.up/.down/.bfly/.idx.b32 d{\|p}, a, b, c, membermask` with clamp and segment mask |
//! | `vote.sync`, `redux.sync`, `activemask` | `.all/.any/.uni.pred`, `.ballot.b32`; `redux .add/.min/.max.u32/.s32`, `.and/.or/.xor.b32` |
//! | `bra{.uni}`, `ret`, `exit` | `.uni` checks that the branch does not diverge |
//! | `bar.sync`, `barrier{.cta}.sync{.aligned}`, `bar.warp.sync` | barrier 0-15 with optional thread count |
//! | `membar`, `fence` | ordering only (the emulator is sequentially consistent): no-ops |
//! | `cp.async` | `.ca/.cg.shared{::cta}.global{.L2::NB}` with cp-size 4/8/16 (`.cg`: 16), `src-size` zero fill, `ignore-src` predicate; `commit_group`, `wait_group N`, `wait_all` |
//! | `ldmatrix` | `.sync.aligned.m8n8.x1/.x2/.x4{.trans}.shared{::cta}.b16`; row addresses from lanes 0-7/0-15/0-31, 16-byte aligned |
//! | `mma` | `.sync.aligned.m16n8k16/.m16n8k8.row.col` with `.f32.bf16.bf16.f32`, `.f32.f16.f16.f32`, `.f16.f16.f16.f16` (and mixed f16/f32 accumulators); fragments per the ISA's "Matrix Fragments for mma.m16n8k16/k8"; products exact, sums in f64, one rounding to the accumulator type |
//! | `mma` (integer) | `.sync.aligned.m16n8k32.row.col{.satfinite}.s32.{s8,u8}.{s8,u8}.s32`; fragments per the ISA's "Matrix Fragments for mma.m16n8k32"; exact sums, wrapping to 32 bits (`.satfinite`: clamped) |
//! | `dp4a` | `.{u32,s32}.{u32,s32}`: `c` plus four byte products, each byte sign extended when its operand is `.s32`, modulo 2^32 |
//! | `atom`, `red` | `.global/.shared`/generic; `.add.u32/.s32/.u64/.f32/.f64`, `.min/.max.u32/.s32/.u64/.s64`, `.and/.or/.xor/.exch/.cas.b32/.b64` |
//!
//! Not supported (a parse error naming the line): other instructions,
//! `.func`/`call`, `.local`/`.global` variables, vector registers,
//! 16-bit float arithmetic (`add.bf16x2`...), directed rounding (`.rz/.rm/
//! .rp`) on arithmetic (it is supported in `cvt`), `.cc` carries, cache
//! policies (`.L2::cache_hint`).
//!
//! Launch limits are the A100's: at most 1024 threads (z at most 64) per
//! block, grid y/z at most 65535, 48 KiB of static and 163 KiB of total
//! shared memory per block; `.reqntid`/`.maxntid` are checked.

mod alu;
mod ast;
mod decode;
mod error;
mod exec;
mod ir;
mod lex;
mod lower;
mod memory;
mod module;
mod num;
mod operand;
mod parse;
mod sched;
mod space;
mod ty;

pub use error::EmuError;
pub use memory::Memory;
pub use module::{LaunchDims, LaunchStats, Module, Param, ParamDecl};
pub use num::{bf16_from_f32, bf16_to_f32, f16_from_f32, f16_to_f32};

/// Generic addresses `SHARED_WINDOW + offset` refer to shared memory
/// (`cvta.shared`); every other generic address is global.
pub const SHARED_WINDOW: u64 = 1 << 52;

/// Generic addresses `CONST_WINDOW + offset` refer to `.const` data.
pub const CONST_WINDOW: u64 = 1 << 53;

/// The `.const` bank a module may initialise (64 KiB).
pub const MAX_CONST: usize = 64 * 1024;

/// Static shared memory per block on sm_80.
pub const MAX_STATIC_SHARED: usize = 48 * 1024;
/// Total (static + dynamic) shared memory per block on sm_80.
pub const MAX_SHARED: usize = 163 * 1024;
