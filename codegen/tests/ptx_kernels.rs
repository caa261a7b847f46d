//! Every PTX kernel family of `ouroc_codegen::ptx`, emitted, parsed from
//! its text and run on the PTX emulator (`ouroc_ptx_emu`) at
//! small shapes, against the reference (`ouroc_kernels::exec`, or its
//! loops where they are private, as codegen/tests/cpu_families.rs does),
//! in f32 and bf16: Linear (GEMV entry, every weight dtype, bias, odd
//! shapes; the tensor-core GEMM entry over several CTA and K tiles),
//! every RowReduce variant, Elementwise, Gather, RopeTable, Rope (also in
//! place), Attention (append, split decode, tiled prefill; GQA, RoPE,
//! batches, KV tiles) and argmax. Activation operands and results are
//! given padded row strides, and the padding must stay untouched.
//!
//! # Tolerances
//!
//! Where a kernel performs exactly the reference's operations (copies,
//! `cvt.rn` rounding, RoPE's `mul.rn` / `add.rn` chain, the KV cache
//! writes, argmax) results must be bit for bit equal. Elsewhere the
//! kernels compute the same rounding points but their f32 arithmetic
//! differs from the reference's in documented ways: dot products are
//! `fma.rn` chains split over lanes and reduced by shuffles (or, in the
//! GEMM, `mma` sums of exact products with one rounding), sums of squares
//! and softmax sums run in another order, `exp` is `ex2.approx` of a
//! rounded product (the emulator computes it correctly rounded), `sin` /
//! `cos` are software approximations. So:
//!
//! - f32 results may differ by the error bounds of those computations:
//!   for a dot product of k terms both sides are within `k u sum|x_i w_i|`
//!   of the exact value (u = 2^-24), so they differ by at most
//!   `2 k u sum|x_i w_i|`; for the other families a few ulps, stated at
//!   each check.
//! - bf16 results round those f32 values once more: where the f32 values
//!   straddle a bf16 rounding boundary the results differ by one bf16 ulp,
//!   and such a flip can propagate one rounding further. So bf16 results
//!   may differ by the f32 bound plus one or two bf16 ulps, *and* at least
//!   90% of the elements must be bit-identical: a flip needs the f32 value
//!   within the (tiny) f32 discrepancy of a boundary, while a systematic
//!   error (truncation instead of round-to-nearest-even, a misplaced
//!   rounding point) changes about half of them.

use ouroc_codegen::ptx::{self, KvSeqDesc, ParamDesc, ParamRole, PtxKernel};
use ouroc_ir::DType;
use ouroc_kernels::spec::{
    AttentionSpec, ElementwiseSpec, Family, GatherSpec, LinearSpec, RopeSpec, RopeTableSpec, RowReduceSpec, Trig,
};
use ouroc_kernels::{Expr, KernelSpec, NormWeight};
use ouroc_ptx_emu::{LaunchDims, Memory, Module, Param};

/// Deterministic uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

const U: f32 = 1.0 / (1u32 << 24) as f32;

fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn decode(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::I32 => b
            .chunks(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        _ => b
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

fn rounded(v: &[f32], d: DType) -> Vec<f32> {
    v.iter().map(|&x| d.round(x)).collect()
}

/// The spacing of `d` values at `x` (one ulp).
fn ulp(x: f32, d: DType) -> f32 {
    let mant = if d == DType::BF16 { 7 } else { 23 };
    2f32.powi(x.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - mant)
}

fn spec(name: &str, act: DType, family: Family) -> KernelSpec {
    KernelSpec {
        name: name.into(),
        act,
        family,
    }
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g}, want {w}");
    }
}

/// `|got - want| <= bound(i)` everywhere; in bf16 also at least 90% of
/// the elements bit-identical (see the module docs).
fn assert_close(what: &str, act: DType, got: &[f32], want: &[f32], bound: &dyn Fn(usize) -> f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut exact = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= bound(i),
            "{what}: element {i}: got {g}, want {w} (difference {d}, bound {})",
            bound(i)
        );
        exact += (g.to_bits() == w.to_bits()) as usize;
    }
    if act == DType::BF16 {
        assert!(
            exact * 10 >= got.len() * 9,
            "{what}: only {exact} of {} elements bit-identical",
            got.len()
        );
    }
}

/// A kernel parsed for the emulator.
struct Emu {
    k: PtxKernel,
    m: Module,
}

fn emu(s: &KernelSpec) -> Emu {
    let k = ptx::emit(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let m = Module::parse(&k.text).unwrap_or_else(|e| panic!("{s}: the emulator rejects the PTX: {e}"));
    Emu { k, m }
}

/// A buffer of rows: its address and row stride in elements.
#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    stride: u32,
}

/// The attention extras of a call.
#[derive(Clone, Copy, Default)]
struct AttnArgs {
    kv: u64,
    kv_cap: u32,
    scratch: u64,
}

/// Launch every entry of `e` whose `when` holds, with the ABI's parameters.
fn launch(e: &Emu, mem: &mut Memory, ops: &[Buf], res: &[Buf], tokens: u32, seq: u32, at: AttnArgs) -> Vec<String> {
    let params: Vec<Param> =
        e.k.abi
            .params
            .iter()
            .map(|p: &ParamDesc| match p.role {
                ParamRole::Operand(i) => Param::Ptr(ops[i].addr),
                ParamRole::Result(i) => Param::Ptr(res[i].addr),
                ParamRole::OperandStride(i) => Param::U32(ops[i].stride),
                ParamRole::ResultStride(i) => Param::U32(res[i].stride),
                ParamRole::Tokens => Param::U32(tokens),
                ParamRole::Kv => Param::Ptr(at.kv),
                ParamRole::Seq => Param::U32(seq),
                ParamRole::KvCap => Param::U32(at.kv_cap),
                ParamRole::Scratch => Param::Ptr(at.scratch),
            })
            .collect();
    let mut ran = Vec::new();
    for en in &e.k.abi.entries {
        if !en.when.holds(tokens, seq) {
            continue;
        }
        let g = en.launch.grid(tokens, seq);
        let dims = LaunchDims {
            grid: (g[0], g[1], g[2]),
            block: (en.launch.block, 1, 1),
            shared_bytes: en.launch.shared_bytes,
        };
        e.m.launch(&en.entry, dims, &params, mem)
            .unwrap_or_else(|err| panic!("{}: {err}", en.entry));
        ran.push(en.entry.clone());
    }
    ran
}

/// Allocate `tokens` rows of `v` (row width `v.len() / tokens`) with
/// `pad` extra elements per row filled with NaN.
fn alloc_rows(mem: &mut Memory, v: &[f32], tokens: usize, pad: usize, d: DType) -> Buf {
    let w = v.len() / tokens;
    // The ABI: a row whose byte length is a multiple of 16 starts on a
    // 16-byte boundary (what the arena plan guarantees).
    let size = d.size_bytes();
    let pad = if (w * size).is_multiple_of(16) {
        pad.next_multiple_of(16 / size)
    } else {
        pad
    };
    let stride = w + pad;
    let mut all = vec![f32::NAN; tokens * stride];
    for t in 0..tokens {
        all[t * stride..t * stride + w].copy_from_slice(&v[t * w..(t + 1) * w]);
    }
    Buf {
        addr: mem.alloc_bytes(&encode(&all, d)),
        stride: stride as u32,
    }
}

/// Read `tokens` rows of `width` from `b`, checking the padding is still NaN.
fn read_rows(what: &str, mem: &Memory, b: Buf, tokens: usize, width: usize, d: DType) -> Vec<f32> {
    let all = decode(
        &mem.read_bytes(b.addr, tokens * b.stride as usize * d.size_bytes())
            .unwrap(),
        d,
    );
    let mut out = Vec::with_capacity(tokens * width);
    for t in 0..tokens {
        let row = &all[t * b.stride as usize..(t + 1) * b.stride as usize];
        out.extend_from_slice(&row[..width]);
        assert!(
            row[width..].iter().all(|x| x.is_nan()),
            "{what}: row {t}'s padding was written"
        );
    }
    out
}

/// Run a kernel without attention state on `tokens` rows: operands given
/// as f32 values (activations `tokens` rows, weights whole), each
/// activation and result row padded by `pad`. Returns each result.
fn run(s: &KernelSpec, operands: &[Vec<f32>], tokens: usize, pad: usize) -> Vec<Vec<f32>> {
    let e = emu(s);
    let dtypes = ptx::operand_dtypes(s);
    let is_act: Vec<bool> = (0..operands.len())
        .map(|i| e.k.abi.params.iter().any(|p| p.role == ParamRole::OperandStride(i)))
        .collect();
    let mut mem = Memory::new();
    let ops: Vec<Buf> = operands
        .iter()
        .zip(&dtypes)
        .zip(&is_act)
        .map(|((v, &d), &act)| {
            if act {
                alloc_rows(&mut mem, v, tokens, pad, d)
            } else {
                Buf {
                    addr: mem.alloc_bytes(&encode(v, d)),
                    stride: 0,
                }
            }
        })
        .collect();
    let widths = s.family.result_widths();
    let res: Vec<Buf> = widths
        .iter()
        .map(|&w| alloc_rows(&mut mem, &vec![f32::NAN; tokens * w], tokens, pad, s.act))
        .collect();
    launch(
        &e,
        &mut mem,
        &ops,
        &res,
        tokens as u32,
        tokens as u32,
        AttnArgs::default(),
    );
    res.iter()
        .zip(&widths)
        .map(|(&b, &w)| read_rows(&s.name, &mem, b, tokens, w, s.act))
        .collect()
}

// ---------------------------------------------------------------- Linear

fn linear(n: usize, k: usize, weight: DType, bias: bool, act: DType) -> KernelSpec {
    spec(
        "lin",
        act,
        Family::Linear(LinearSpec {
            n,
            k,
            weight,
            bias,
            quant: None,
        }),
    )
}

/// The reference (exec's loop): the f32 dot product, plus the bias,
/// rounded once; and per element the bound `2 k u sum|x w|` (+ one ulp).
fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, k: usize, act: DType) -> (Vec<f32>, Vec<f32>) {
    let (mut y, mut bound) = (Vec::new(), Vec::new());
    for row in x.chunks(k) {
        for o in 0..n {
            let wr = &w[o * k..(o + 1) * k];
            let acc: f32 = row.iter().zip(wr).map(|(a, c)| a * c).sum();
            let v = act.round(acc + b.map_or(0.0, |b| b[o]));
            let mag: f32 = row.iter().zip(wr).map(|(a, c)| (a * c).abs()).sum::<f32>() + b.map_or(0.0, |b| b[o].abs());
            y.push(v);
            bound.push(2.0 * (k + 1) as f32 * U * mag + if act == DType::BF16 { ulp(v, act) } else { 0.0 });
        }
    }
    (y, bound)
}

/// Run a Linear of `tokens` rows (activation rows padded by `pad`) on
/// random inputs against [`linear_ref`]; returns the entries that ran.
fn check_linear(l: LinearSpec, act: DType, tokens: usize, pad: usize, seed: u64) -> Vec<String> {
    let LinearSpec { n, k, weight, bias, .. } = l;
    let s = linear(n, k, weight, bias, act);
    let mut rng = Rng(seed);
    let x = rounded(&rng.vec(tokens * k, 2.0), act);
    let w = rounded(&rng.vec(n * k, 0.5), weight);
    let b = rounded(&rng.vec(n, 1.0), weight);
    let mut ops = vec![x.clone(), w.clone()];
    if bias {
        ops.push(b.clone());
    }
    let e = emu(&s);
    let mut mem = Memory::new();
    let xb = alloc_rows(&mut mem, &x, tokens, pad, act);
    let wb = Buf {
        addr: mem.alloc_bytes(&encode(&w, weight)),
        stride: 0,
    };
    let bb = Buf {
        addr: mem.alloc_bytes(&encode(&b, weight)),
        stride: 0,
    };
    let yb = alloc_rows(&mut mem, &vec![f32::NAN; tokens * n], tokens, pad, act);
    let opbufs = if bias { vec![xb, wb, bb] } else { vec![xb, wb] };
    let ran = launch(
        &e,
        &mut mem,
        &opbufs,
        &[yb],
        tokens as u32,
        tokens as u32,
        AttnArgs::default(),
    );
    let got = read_rows(&s.name, &mem, yb, tokens, n, act);
    let (want, bound) = linear_ref(&x, &w, bias.then_some(&b[..]), n, k, act);
    let what = format!("{s} tokens={tokens} pad={pad} ({ran:?})");
    assert_close(&what, act, &got, &want, &|i| bound[i]);
    ran
}

#[test]
fn linear_gemv_every_dtype_bias_and_odd_shape() {
    let mut seed = 1;
    for (act, weight) in [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
    ] {
        // Fixture shapes, k not a multiple of the vector width, n not a
        // multiple of the 16 rows of a CTA.
        for (n, k) in [(96, 32), (32, 88), (30, 30), (17, 40), (5, 3)] {
            for bias in [false, true] {
                for (tokens, pad) in [(1, 0), (3, 5)] {
                    seed += 1;
                    let ran = check_linear(
                        LinearSpec {
                            n,
                            k,
                            weight,
                            bias,
                            quant: None,
                        },
                        act,
                        tokens,
                        pad,
                        seed,
                    );
                    assert!(ran.iter().all(|e| !e.ends_with("_gemm")), "{ran:?}");
                }
            }
        }
    }
}

#[test]
fn linear_tensor_core_gemm_over_several_tiles() {
    // 16 tokens (the GEMM's threshold), several CTA tiles of 128 x 128
    // (n, T > 128), K tiles of 32 with a partial last one (k = 72, 88).
    for (tokens, n, k, bias, pad) in [
        (16, 96, 32, false, 0),
        (40, 176, 88, true, 8),
        (130, 130, 72, false, 8),
        (20, 288, 32, true, 0),
    ] {
        let l = LinearSpec {
            n,
            k,
            weight: DType::BF16,
            bias,
            quant: None,
        };
        let ran = check_linear(l, DType::BF16, tokens, pad, 77 + tokens as u64);
        assert_eq!(ran.len(), 1, "{ran:?}");
        assert!(
            ran[0].ends_with("_gemm"),
            "the GEMM entry runs at {tokens} tokens: {ran:?}"
        );
    }
    // Below the threshold the same kernel runs its GEMV entry.
    let l = LinearSpec {
        n: 96,
        k: 32,
        weight: DType::BF16,
        bias: false,
        quant: None,
    };
    let ran = check_linear(l, DType::BF16, 15, 0, 5);
    assert!(ran[0].ends_with("_gemv"), "{ran:?}");
}

// ------------------------------------------------------------- RowReduce

fn row_reduce_spec(width: usize, add: bool, norm: NormWeight, gate: bool, next: Option<NormWeight>) -> RowReduceSpec {
    RowReduceSpec {
        width,
        eps: 1e-6,
        add,
        norm,
        gate,
        next,
    }
}

/// Every RowReduce variant (add, weighted or unweighted norm, gate, next
/// weighted / unweighted / none) at widths below, at and above one block.
/// Each result is checked against the reference given the kernel's own
/// inputs to that stage (s exactly; n from s; lambda and next from the
/// kernel's n), so a bound holds per stage:
/// - n: `inv = 1 / sqrt(sum x^2 / w + eps)` differs by the sum's order
///   (`2 w u` relative) and the square root's rounding; `x * inv` and the
///   weight product each round: f32 within `(2 w + 8) u` relative, bf16
///   plus two ulps.
/// - lambda: the gate dot (`2 w u sum|n g|`) and the bias add, then the
///   sigmoid (slope at most 1/4, exp via ex2.approx of a rounded product:
///   a few f32 ulps): within `(2 w u sum|n g| + ulp(z)) / 4` plus two
///   ulps of lambda in the activation dtype.
#[test]
fn row_reduce_every_variant() {
    let mut rng = Rng(42);
    for act in [DType::F32, DType::BF16] {
        for width in [32, 88, 300] {
            for add in [false, true] {
                for norm in [NormWeight::Weighted, NormWeight::Unweighted] {
                    for gate in [false, true] {
                        for next in [None, Some(NormWeight::Weighted), Some(NormWeight::Unweighted)] {
                            let r = row_reduce_spec(width, add, norm, gate, next);
                            check_row_reduce(&r, act, 3, &mut rng);
                        }
                    }
                }
            }
        }
    }
}

fn check_row_reduce(r: &RowReduceSpec, act: DType, tokens: usize, rng: &mut Rng) {
    let s = spec("rr", act, Family::RowReduce(r.clone()));
    let w = r.width;
    let x0 = rounded(&rng.vec(tokens * w, 3.0), act);
    let x1 = rounded(&rng.vec(tokens * w, 3.0), act);
    let nw = rounded(&rng.vec(w, 1.5), act);
    let gw = rounded(&rng.vec(w, 0.5), act);
    let gb = rounded(&rng.vec(1, 1.0), act);
    let xw = rounded(&rng.vec(w, 1.5), act);
    let mut ops = vec![x0.clone()];
    if r.add {
        ops.push(x1.clone());
    }
    if r.norm == NormWeight::Weighted {
        ops.push(nw.clone());
    }
    if r.gate {
        ops.push(gw.clone());
        ops.push(gb.clone());
    }
    if r.next == Some(NormWeight::Weighted) {
        ops.push(xw.clone());
    }
    let got = run(&s, &ops, tokens, 3);
    let rd = |v: f32| act.round(v);
    let refs: Vec<&[f32]> = ops.iter().map(|v| &v[..]).collect();
    let want = ouroc_kernels::exec::row_reduce(r, &|i| refs[i], tokens, &rd);
    let what = format!("{s}");
    let mut i = 0;
    if r.add {
        // s = round(x0 + x1): the same single rounding.
        assert_bits(&format!("{what}: s"), &got[0], &want[0]);
        i += 1;
    }
    let rel = (2 * w + 8) as f32 * U;
    let lo = |v: f32| if act == DType::BF16 { 2.0 * ulp(v, act) } else { 0.0 };
    let (n_got, n_want) = (&got[i], &want[i]);
    assert_close(&format!("{what}: n"), act, n_got, n_want, &|j| {
        rel * n_want[j].abs() + lo(n_want[j])
    });
    i += 1;
    if r.gate {
        let lg = &got[i];
        for t in 0..tokens {
            let n = &n_got[t * w..(t + 1) * w];
            let dot: f32 = n.iter().zip(&gw).map(|(a, b)| a * b).sum();
            let mag: f32 = n.iter().zip(&gw).map(|(a, b)| (a * b).abs()).sum();
            let z = rd(dot + gb[0]);
            let lam = rd(1.0 / (1.0 + (-z).exp()));
            let bound = (2.0 * w as f32 * U * mag + ulp(z, act)) / 4.0 + 2.0 * ulp(lam, act) + 8.0 * U;
            let d = (lg[t] - lam).abs();
            assert!(
                d <= bound,
                "{what}: lambda of row {t}: got {}, want {lam} (bound {bound})",
                lg[t]
            );
        }
        i += 1;
    }
    if let Some(next) = r.next {
        // The reference's next = rms(n) (times next_w), from the kernel's n.
        let r2 = row_reduce_spec(w, false, next, false, None);
        let src: Vec<&[f32]> = vec![&n_got[..], &xw[..]];
        let want2 = ouroc_kernels::exec::row_reduce(&r2, &|k| src[k], tokens, &rd);
        assert_close(&format!("{what}: next"), act, &got[i], &want2[0], &|j| {
            rel * want2[0][j].abs() + lo(want2[0][j])
        });
    }
}

// ----------------------------------------------------------- Elementwise

/// Value, magnitude and bf16 flip bound of an expression at one element:
/// `mag` bounds the f32 error's scale (the sum of the magnitudes of
/// everything that was added, so cancellation is accounted for), `flips`
/// one ulp of `act` at every rounding node, propagated to the root by the
/// node's slope (|silu'| < 1.1, |sigmoid'| <= 1/4, a product by the other
/// factor).
fn expr_bounds(e: &Expr, x: &[f32], act: DType) -> (f32, f32, f32) {
    let rd = |v: f32| act.round(v);
    let u = |v: f32| if act == DType::BF16 { ulp(v, act) } else { 0.0 };
    match e {
        Expr::Input(i) => (x[*i], x[*i].abs(), 0.0),
        Expr::Add(a, b) => {
            let ((va, ma, fa), (vb, mb, fb)) = (expr_bounds(a, x, act), expr_bounds(b, x, act));
            let v = rd(va + vb);
            (v, ma + mb, fa + fb + u(v))
        }
        Expr::Mul(a, b) => {
            let ((va, ma, fa), (vb, mb, fb)) = (expr_bounds(a, x, act), expr_bounds(b, x, act));
            let v = rd(va * vb);
            (v, ma * mb, fa * vb.abs() + fb * va.abs() + fa * fb + u(v))
        }
        Expr::Silu(a) => {
            let (va, ma, fa) = expr_bounds(a, x, act);
            let v = rd(va / (1.0 + (-va).exp()));
            (v, v.abs() + 1.1 * ma, 1.1 * fa + u(v))
        }
        Expr::Sigmoid(a) => {
            let (va, ma, fa) = expr_bounds(a, x, act);
            let v = rd(1.0 / (1.0 + (-va).exp()));
            (v, v.abs() + 0.25 * ma, 0.25 * fa + u(v))
        }
    }
}

/// Expressions the pipeline produces (swiglu, residual add, sigmoid) and a
/// deeper one, at widths of one and several CTAs (grid.y splits rows of
/// more than 256). Each node rounds like the reference; `silu` and
/// `sigmoid` use exp = ex2.approx(x log2 e), whose argument is a rounded
/// product: for |x| <= 4 the exp is within about 8 u relative and the
/// division adds a rounding, so each node is within 16 u of its
/// magnitude, 32 u for two levels ([`expr_bounds`]'s `mag`); bf16 may
/// also flip one ulp at each rounding node (`flips`).
#[test]
fn elementwise_expressions() {
    let x = Expr::input;
    let exprs = [
        Expr::silu(x(0)) * x(1),
        x(0) + x(1),
        Expr::sigmoid(x(0)),
        x(0) * x(1),
        (x(0) * x(1)) + Expr::silu(x(2)),
    ];
    let mut rng = Rng(7);
    for act in [DType::F32, DType::BF16] {
        for e in &exprs {
            for width in [88, 300, 1000] {
                let inputs = e.arity();
                let s = spec(
                    "ew",
                    act,
                    Family::Elementwise(ElementwiseSpec {
                        width,
                        inputs,
                        expr: e.clone(),
                    }),
                );
                let tokens = 3;
                let ops: Vec<Vec<f32>> = (0..inputs)
                    .map(|_| rounded(&rng.vec(tokens * width, 4.0), act))
                    .collect();
                let got = run(&s, &ops, tokens, 2);
                let el = |i: usize| -> Vec<f32> { ops.iter().map(|o| o[i]).collect() };
                let want: Vec<f32> = (0..tokens * width).map(|i| e.eval(&el(i), &|v| act.round(v))).collect();
                assert_close(&format!("{s}"), act, &got[0], &want, &|i| {
                    let (_, mag, flips) = expr_bounds(e, &el(i), act);
                    32.0 * U * mag + flips
                });
            }
        }
    }
}

// ---------------------------------------------------------------- Gather

#[test]
fn gather_copies_table_rows_exactly() {
    let mut rng = Rng(0x1234_5678);
    for (rows, width) in [(64, 32), (50, 7), (3, 1), (17, 40)] {
        for (table, act) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            for tokens in [1, 3, 6] {
                let s = spec("embed", act, Family::Gather(GatherSpec { rows, width, table }));
                let t = rounded(&rng.vec(rows * width, 4.0), table);
                let ids: Vec<f32> = (0..tokens)
                    .map(|i| {
                        if i == 0 {
                            (rows - 1) as f32
                        } else {
                            (rng.next() % rows as u64) as f32
                        }
                    })
                    .collect();
                let got = run(&s, &[t.clone(), ids.clone()], tokens, 4);
                // A copy, or one rounding of an f32 table into bf16 rows.
                let want: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| t[id as usize * width..(id as usize + 1) * width].iter())
                    .map(|&x| act.round(x))
                    .collect();
                assert_bits(&format!("{s} tokens={tokens}"), &got[0], &want);
            }
        }
    }
}

// ------------------------------------------------------- RopeTable, Rope

/// exec's `RopeTable` loop.
fn rope_table_ref(s: &RopeTableSpec, pos: &[f32], act: DType) -> Vec<f32> {
    let half = s.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| 1.0 / (s.theta as f32).powf((2 * j) as f32 / s.head_dim as f32))
        .collect();
    let func = match s.func {
        Trig::Cos => f32::cos,
        Trig::Sin => f32::sin,
    };
    pos.iter()
        .flat_map(|&p| (0..s.head_dim).map(move |j| (p, j)))
        .map(|(p, j)| act.round(func(p * inv[j % half])))
        .collect()
}

/// The angle `pos * inv_freq` is the same f32 product on both sides; the
/// kernel's software sin / cos is within about one ulp of the correctly
/// rounded value, libm's too: f32 within 4 ulps of 1 (values lie in
/// [-1, 1]); bf16 one ulp more (a flip).
#[test]
fn rope_table_cos_and_sin() {
    let positions: Vec<f32> = [0, 1, 2, 3, 7, 31, 100, 1023, 4097, 32767, 65535, 1 << 20]
        .iter()
        .map(|&p| p as f32)
        .collect();
    for act in [DType::F32, DType::BF16] {
        for func in [Trig::Cos, Trig::Sin] {
            for (hd, theta) in [
                (8, 10000.0),
                (16, 1_000_000.0),
                (2, 10000.0),
                (6, 500.0),
                (128, 1_000_000.0),
            ] {
                let t = RopeTableSpec {
                    func,
                    head_dim: hd,
                    theta,
                };
                let s = spec("rope_table", act, Family::RopeTable(t.clone()));
                let tokens = positions.len();
                let got = run(&s, std::slice::from_ref(&positions), tokens, 1);
                let want = rope_table_ref(&t, &positions, act);
                assert_close(&format!("{s}"), act, &got[0], &want, &|i| {
                    4.0 * ulp(1.0, DType::F32) + if act == DType::BF16 { ulp(want[i], act) } else { 0.0 }
                });
            }
        }
    }
}

/// cos / sin rows of `positions` in `act` (as the table kernels compute them).
fn tables(positions: &[usize], hd: usize, act: DType) -> (Vec<f32>, Vec<f32>) {
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let t = |func| {
        rope_table_ref(
            &RopeTableSpec {
                func,
                head_dim: hd,
                theta: 10000.0,
            },
            &pos,
            act,
        )
    };
    (t(Trig::Cos), t(Trig::Sin))
}

/// RoPE performs the reference's three roundings with `mul.rn` / `add.rn`:
/// bit for bit.
#[test]
fn rope_bit_for_bit_and_in_place() {
    let mut rng = Rng(99);
    for act in [DType::F32, DType::BF16] {
        for (heads, hd) in [(4, 8), (4, 16), (2, 16), (3, 6), (1, 2)] {
            for tokens in [1, 4] {
                let s = spec("rope", act, Family::Rope(RopeSpec { heads, head_dim: hd }));
                let x = rounded(&rng.vec(tokens * heads * hd, 3.0), act);
                let positions: Vec<usize> = (0..tokens).map(|t| 5 + 3 * t).collect();
                let (c, sn) = tables(&positions, hd, act);
                let got = run(&s, &[x.clone(), c.clone(), sn.clone()], tokens, 2);
                let want = ouroc_kernels::exec::rope(&x, &c, &sn, heads, hd, &|v| act.round(v));
                assert_bits(&format!("{s} tokens={tokens}"), &got[0], &want);
            }
        }
    }
    // In place: the result rows are the x rows.
    let (heads, hd, tokens, act) = (4, 8, 3, DType::BF16);
    let s = spec("rope", act, Family::Rope(RopeSpec { heads, head_dim: hd }));
    let x = rounded(&Rng(5).vec(tokens * heads * hd, 2.0), act);
    let (c, sn) = tables(&[0, 9, 10], hd, act);
    let e = emu(&s);
    let mut mem = Memory::new();
    let xb = alloc_rows(&mut mem, &x, tokens, 0, act);
    let cb = alloc_rows(&mut mem, &c, tokens, 0, act);
    let sb = alloc_rows(&mut mem, &sn, tokens, 0, act);
    launch(
        &e,
        &mut mem,
        &[xb, cb, sb],
        &[xb],
        tokens as u32,
        tokens as u32,
        AttnArgs::default(),
    );
    let want = ouroc_kernels::exec::rope(&x, &c, &sn, heads, hd, &|v| act.round(v));
    assert_bits(
        "rope in place",
        &read_rows("rope", &mem, xb, tokens, heads * hd, act),
        &want,
    );
}

// ------------------------------------------------------------- Attention

/// A batch of sequences through calls of `seq` new tokens each (prefill,
/// decode, prefill again), checking outputs and the KV stores (head-major,
/// `kv_cap` positions) against the reference after each call.
///
/// The stores must equal the reference bit for bit (K rotated with the
/// reference's roundings, V copied). Outputs: scores are
/// `round(round(q . k) * scale)` with the dot in another order, exp via
/// ex2.approx, sums in another order (decode: per split, then combined).
/// Inputs in [-1, 1) keep scores small (|s| < 2), where one f32 ulp of a
/// dot or one bf16 flip of a score changes p by at most 2^-8 relative.
/// f32: within 2^-16 max|V| (the p's within a few hundred u, weighted
/// sums of |v| <= max|V|). bf16: one ulp of the output plus 2^-8 max|V|
/// (the effect of one flipped probability or score), with 90% exact.
fn check_attention(a: &AttentionSpec, act: DType, batch: usize, calls: &[usize]) -> Vec<String> {
    let s = spec("attn", act, Family::Attention(a.clone()));
    let e = emu(&s);
    let (hd, kvw, qw) = (a.head_dim, a.kv_heads * a.head_dim, a.heads * a.head_dim);
    let size = act.size_bytes();
    let cap: usize = calls.iter().sum::<usize>() + 3;
    let mut rng = Rng(0xa77e ^ (a.heads * 100 + a.kv_heads * 10 + hd) as u64);
    let mut mem = Memory::new();
    let nan = encode(&vec![f32::NAN; a.kv_heads * cap * hd], act);
    let stores: Vec<(u64, u64)> = (0..batch)
        .map(|_| (mem.alloc_bytes(&nan), mem.alloc_bytes(&nan)))
        .collect();
    let kv = mem.alloc(batch * 24);
    let scratch = mem.alloc(ptx::attention_scratch_bytes(a, batch, cap) as usize);
    let mut rk: Vec<Vec<f32>> = vec![Vec::new(); batch];
    let mut rv: Vec<Vec<f32>> = vec![Vec::new(); batch];
    let mut past = 0;
    let mut ran = Vec::new();
    for &seq in calls {
        let tokens = batch * seq;
        let q = rounded(&rng.vec(tokens * qw, 1.0), act);
        let k = rounded(&rng.vec(tokens * kvw, 1.0), act);
        let v = rounded(&rng.vec(tokens * kvw, 2.0), act);
        let positions: Vec<usize> = (0..batch).flat_map(|_| past..past + seq).collect();
        let (c, sn) = tables(&positions, hd, act);
        let mut ops = vec![q, k, v];
        if a.rope {
            ops.extend([c, sn]);
        }
        let bufs: Vec<Buf> = ops.iter().map(|o| alloc_rows(&mut mem, o, tokens, 1, act)).collect();
        let out = alloc_rows(&mut mem, &vec![f32::NAN; tokens * qw], tokens, 1, act);
        let mut desc = Vec::new();
        for &(kb, vb) in &stores {
            let d = KvSeqDesc {
                k: kb,
                v: vb,
                past: past as u32,
                pad: 0,
            };
            desc.extend(d.k.to_le_bytes());
            desc.extend(d.v.to_le_bytes());
            desc.extend(d.past.to_le_bytes());
            desc.extend(d.pad.to_le_bytes());
        }
        mem.write_bytes(kv, &desc).unwrap();
        let at = AttnArgs {
            kv,
            kv_cap: cap as u32,
            scratch,
        };
        ran.extend(launch(&e, &mut mem, &bufs, &[out], tokens as u32, seq as u32, at));
        let got = read_rows("attention", &mem, out, tokens, qw, act);
        let what = format!("{s} batch={batch} past={past} seq={seq}");
        for b in 0..batch {
            let rows = |x: &[f32], w: usize| x[b * seq * w..(b + 1) * seq * w].to_vec();
            let ins: Vec<Vec<f32>> = ops
                .iter()
                .enumerate()
                .map(|(i, o)| rows(o, [qw, kvw, kvw, hd, hd][i]))
                .collect();
            let refs: Vec<&[f32]> = ins.iter().map(|x| &x[..]).collect();
            let want = ouroc_kernels::exec::attention_seq(a, &refs, &mut rk[b], &mut rv[b], seq, &|x| act.round(x));
            let vmax = rv[b].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let bound = |i: usize| match act {
                DType::BF16 => ulp(want[i], act) + vmax / 256.0,
                _ => vmax / 65536.0,
            };
            assert_close(&format!("{what} seq {b} output"), act, &rows(&got, qw), &want, &bound);
            // The stores, head-major: element (h, p, d) at (h * cap + p) * hd + d.
            for (store, reference, name) in [(stores[b].0, &rk[b], "K"), (stores[b].1, &rv[b], "V")] {
                let all = decode(&mem.read_bytes(store, a.kv_heads * cap * hd * size).unwrap(), act);
                let mut pm = Vec::new();
                for p in 0..past + seq {
                    for h in 0..a.kv_heads {
                        pm.extend_from_slice(&all[(h * cap + p) * hd..(h * cap + p + 1) * hd]);
                    }
                }
                assert_bits(&format!("{what} seq {b} {name} store"), &pm, reference);
            }
        }
        past += seq;
    }
    ran
}

fn attn(heads: usize, kv_heads: usize, head_dim: usize, rope: bool) -> AttentionSpec {
    AttentionSpec {
        layer: 1,
        heads,
        kv_heads,
        head_dim,
        rope,
    }
}

#[test]
fn attention_prefill_and_split_decode_with_gqa_and_rope() {
    for act in [DType::F32, DType::BF16] {
        for rope in [false, true] {
            // mha-r4, gqa-hd, one kv head, head_dim not a power of two.
            for (h, kvh, hd) in [(4, 4, 8), (4, 2, 16), (2, 1, 32), (3, 3, 12)] {
                let a = attn(h, kvh, hd, rope);
                let ran = check_attention(&a, act, 1, &[5, 1, 1, 3, 1]);
                for want in ["_append", "_prefill", "_scores", "_pv", "_combine"] {
                    assert!(ran.iter().any(|e| e.ends_with(want)), "{want} ran: {ran:?}");
                }
                check_attention(&a, act, 2, &[4, 1, 2]);
            }
        }
    }
}

/// A prefill over more than one 32-position KV tile and one 16-query tile,
/// then a decode step over them.
#[test]
fn attention_prefill_over_several_tiles() {
    for act in [DType::F32, DType::BF16] {
        check_attention(&attn(4, 2, 16, true), act, 1, &[40, 1]);
    }
}

// ---------------------------------------------------------------- argmax

/// `sampling::argmax`'s rule: the first maximum, NaN never wins, a row of
/// only NaN gives 0.
fn argmax_ref(row: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|b| x > row[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

#[test]
fn argmax_first_maximum_exactly() {
    let mut rng = Rng(3);
    for act in [DType::F32, DType::BF16] {
        for vocab in [288, 1000, 4099] {
            let tokens = 5;
            let mut logits = rounded(&rng.vec(tokens * vocab, 8.0), act);
            // Row 1: a tie between two positions (the first wins); row 2: a
            // NaN at the front and a maximum at the very end; row 3: all NaN;
            // row 4: -inf everywhere but one.
            let r = |t: usize, i: usize| t * vocab + i;
            logits[r(1, 17)] = 100.0;
            logits[r(1, vocab - 3)] = 100.0;
            logits[r(2, 0)] = f32::NAN;
            logits[r(2, vocab - 1)] = 50.0;
            logits[r(3, 0)..r(4, 0)].iter_mut().for_each(|x| *x = f32::NAN);
            logits[r(4, 0)..r(5, 0)].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            logits[r(4, vocab / 2 + 1)] = -1e30;
            let k = ptx::argmax(vocab, act).unwrap();
            let e = Emu {
                m: Module::parse(&k.text).unwrap(),
                k,
            };
            let mut mem = Memory::new();
            let lb = alloc_rows(&mut mem, &logits, tokens, 3, act);
            let ib = alloc_rows(&mut mem, &vec![f32::NAN; tokens], tokens, 1, DType::I32);
            launch(
                &e,
                &mut mem,
                &[lb],
                &[ib],
                tokens as u32,
                tokens as u32,
                AttnArgs::default(),
            );
            let all = mem.read_u32(ib.addr, tokens * 2).unwrap();
            let got: Vec<u32> = (0..tokens).map(|t| all[2 * t]).collect();
            assert!((0..tokens).all(|t| all[2 * t + 1] == 0), "padding untouched");
            let want: Vec<u32> = logits.chunks(vocab).map(|row| argmax_ref(&rounded(row, act))).collect();
            assert_eq!(got, want, "argmax<{act}> vocab {vocab}");
            assert_eq!(want[1], 17);
        }
    }
}
