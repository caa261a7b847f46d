//! The Cranelift CPU kernels against the reference (`ouroc_kernels::exec`
//! or the same plain loop), on random inputs at fixture shapes and awkward
//! ones, f32 and bf16; and the CLIF of each family as a snapshot.

use ouroc_codegen::cpu::{CodegenError, Jit, clif_text, operand_dtypes};
use ouroc_ir::DType;
use ouroc_kernels::spec::{ElementwiseSpec, Family, LinearSpec, RowReduceSpec};
use ouroc_kernels::{Expr, KernelSpec, NormWeight};

/// Deterministic uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// Bytes of `v` stored as `d` (bf16: rounded to nearest even).
fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn decode(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => b
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// Operand values as the kernel sees them (rounded to their dtype).
fn rounded(v: &[f32], d: DType) -> Vec<f32> {
    v.iter().map(|&x| d.round(x)).collect()
}

/// Run `spec` on `tokens` rows: `operands` as f32 values (encoded in their
/// dtypes, contiguous rows); returns the results decoded to f32.
fn run(jit: &mut Jit, spec: &KernelSpec, operands: &[Vec<f32>], tokens: usize) -> Vec<Vec<f32>> {
    let dtypes = operand_dtypes(spec);
    let widths = spec.family.result_widths();
    let mut bufs: Vec<Vec<u8>> = operands.iter().zip(&dtypes).map(|(v, &d)| encode(v, d)).collect();
    let mut strides: Vec<usize> = operands.iter().map(|v| v.len() / tokens).collect();
    for &w in &widths {
        bufs.push(vec![0xff; w * tokens * spec.act.size_bytes()]);
        strides.push(w);
    }
    let id = jit.compile(spec).expect("compiles");
    let mut ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    if let Family::Linear(l) = &spec.family {
        // The output rows: all of them.
        ptrs.extend([std::ptr::null_mut(); 2]);
        strides.extend([0, l.n]);
    }
    assert_eq!(ptrs.len(), strides.len());
    // SAFETY: every buffer holds `tokens` rows of its stride (weights whole).
    unsafe { jit.kernel(id).call(&ptrs, &strides, tokens) };
    bufs[operands.len()..].iter().map(|b| decode(b, spec.act)).collect()
}

fn spec(name: &str, act: DType, family: Family) -> KernelSpec {
    KernelSpec {
        name: name.into(),
        act,
        family,
    }
}

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

/// The reference linear (exec's loop): sequential f32 sum, bias, one rounding.
/// Also returns, per element, `sum |x w| + |b|`, the scale of its rounding error.
fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, k: usize, act: DType) -> (Vec<f32>, Vec<f32>) {
    let (mut y, mut scale) = (Vec::new(), Vec::new());
    for row in x.chunks(k) {
        for o in 0..n {
            let wr = &w[o * k..(o + 1) * k];
            let acc: f32 = row.iter().zip(wr).map(|(a, b)| a * b).sum();
            let bias = b.map_or(0.0, |b| b[o]);
            y.push(act.round(acc + bias));
            scale.push(row.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum::<f32>() + bias.abs());
        }
    }
    (y, scale)
}

/// |got - want| within `rel` of `scale` (f32) or one bf16 rounding step more (bf16).
fn check(what: &str, got: &[f32], want: &[f32], scale: &[f32], act: DType) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let tol = match act {
            DType::BF16 => 1e-5 * s + w.abs() / 128.0,
            _ => 1e-5 * s.max(w.abs()),
        };
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
        );
    }
}

fn check_linear(jit: &mut Jit, n: usize, k: usize, weight: DType, bias: bool, act: DType, tokens: usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (n * 1000 + k) as u64);
    let s = linear(n, k, weight, bias, act);
    let x = rounded(&rng.vec(tokens * k, 2.0), act);
    let w = rounded(&rng.vec(n * k, 0.5), weight);
    let b = rounded(&rng.vec(n, 1.0), weight);
    let mut ops = vec![x.clone(), w.clone()];
    if bias {
        ops.push(b.clone());
    }
    let got = run(jit, &s, &ops, tokens);
    let (want, scale) = linear_ref(&x, &w, bias.then_some(&b[..]), n, k, act);
    check(
        &format!("linear n={n} k={k} {weight} bias={bias} act={act}"),
        &got[0],
        &want,
        &scale,
        act,
    );
}

#[test]
fn linear_matches_the_reference_at_fixture_and_awkward_shapes() {
    let mut jit = Jit::new().expect("host ISA");
    for (n, k) in [
        (96, 32),
        (176, 32),
        (288, 32),
        (32, 88),
        (32, 32),
        (7, 5),
        (5, 3),
        (13, 37),
        (9, 12),
        (1, 1),
    ] {
        for tokens in [1, 3] {
            check_linear(&mut jit, n, k, DType::F32, false, DType::F32, tokens);
        }
        check_linear(&mut jit, n, k, DType::F32, true, DType::F32, 2);
    }
}

#[test]
fn linear_widens_bf16_weights_and_rounds_bf16_results() {
    let mut jit = Jit::new().expect("host ISA");
    for (n, k) in [(96, 32), (32, 88), (11, 21), (4, 4)] {
        check_linear(&mut jit, n, k, DType::BF16, false, DType::F32, 3);
        check_linear(&mut jit, n, k, DType::BF16, true, DType::BF16, 3);
        check_linear(&mut jit, n, k, DType::F32, false, DType::BF16, 2);
    }
}

#[test]
fn linear_is_correct_in_place_when_n_equals_k() {
    let mut jit = Jit::new().expect("host ISA");
    let (n, tokens) = (12, 3);
    let s = linear(n, n, DType::F32, false, DType::F32);
    let mut rng = Rng(7);
    let x = rng.vec(tokens * n, 1.0);
    let w = rng.vec(n * n, 1.0);
    let mut buf = encode(&x, DType::F32);
    let mut wb = encode(&w, DType::F32);
    let id = jit.compile(&s).unwrap();
    let null = std::ptr::null_mut();
    let ptrs = [buf.as_mut_ptr(), wb.as_mut_ptr(), buf.as_mut_ptr(), null, null];
    // SAFETY: x and y are the same rows of one buffer, as the contract allows.
    unsafe { jit.kernel(id).call(&ptrs, &[n, 0, n, 0, n], tokens) };
    let (want, scale) = linear_ref(&x, &w, None, n, n, DType::F32);
    check("in place", &decode(&buf, DType::F32), &want, &scale, DType::F32);
}

/// The output-row range (the two extra arguments): chunks of rows run one
/// call each, in any order, write exactly their rows, bit for bit what the
/// whole-range call writes, with no write outside them.
#[test]
fn linear_computes_exactly_the_row_range_given() {
    let mut jit = Jit::new().expect("host ISA");
    for (weight, bias) in [(DType::F32, false), (DType::BF16, true)] {
        let (n, k, tokens) = (23, 37, 3);
        let s = linear(n, k, weight, bias, DType::F32);
        let mut rng = Rng(11);
        let x = rng.vec(tokens * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let b = rng.vec(n, 1.0);
        let mut xb = encode(&x, DType::F32);
        let mut wb = encode(&w, weight);
        let mut bb = encode(&b, weight);
        let id = jit.compile(&s).unwrap();
        let call = |y: &mut Vec<u8>, row0: usize, row1: usize, xb: &mut Vec<u8>, wb: &mut Vec<u8>, bb: &mut Vec<u8>| {
            let null = std::ptr::null_mut();
            let mut ptrs = vec![xb.as_mut_ptr(), wb.as_mut_ptr()];
            let mut strides = vec![k, 0];
            if bias {
                ptrs.push(bb.as_mut_ptr());
                strides.push(0);
            }
            ptrs.extend([y.as_mut_ptr(), null, null]);
            strides.extend([n, row0, row1]);
            // SAFETY: x and y hold `tokens` rows, W and b are whole.
            unsafe { jit.kernel(id).call(&ptrs, &strides, tokens) };
        };
        let mut whole = vec![0xffu8; tokens * n * 4];
        call(&mut whole, 0, n, &mut xb, &mut wb, &mut bb);
        let mut parts = vec![0xffu8; tokens * n * 4];
        for (r0, r1) in [(12, 23), (0, 4), (4, 5), (5, 12)] {
            let mut one = vec![0xeeu8; tokens * n * 4];
            call(&mut one, r0, r1, &mut xb, &mut wb, &mut bb);
            for t in 0..tokens {
                for o in 0..n {
                    let at = (t * n + o) * 4..(t * n + o + 1) * 4;
                    if (r0..r1).contains(&o) {
                        parts[at.clone()].copy_from_slice(&one[at]);
                    } else {
                        assert_eq!(one[at], [0xee; 4], "{weight}: row {o} written by rows {r0}..{r1}");
                    }
                }
            }
        }
        assert_eq!(parts, whole, "{weight}: chunks differ from the whole");
        let mut none = vec![0xeeu8; tokens * n * 4];
        call(&mut none, 7, 7, &mut xb, &mut wb, &mut bb);
        assert!(none.iter().all(|&b| b == 0xee), "an empty range writes nothing");
    }
}

fn elementwise(width: usize, inputs: usize, expr: Expr, act: DType) -> KernelSpec {
    spec("ew", act, Family::Elementwise(ElementwiseSpec { width, inputs, expr }))
}

fn check_elementwise(jit: &mut Jit, width: usize, inputs: usize, expr: Expr, act: DType) {
    let tokens = 3;
    let mut rng = Rng(0xabcdef ^ width as u64);
    let xs: Vec<Vec<f32>> = (0..inputs)
        .map(|_| rounded(&rng.vec(tokens * width, 8.0), act))
        .collect();
    let s = elementwise(width, inputs, expr.clone(), act);
    let got = run(jit, &s, &xs, tokens);
    let want: Vec<f32> = (0..tokens * width)
        .map(|i| {
            let el: Vec<f32> = xs.iter().map(|x| x[i]).collect();
            expr.eval(&el, &|v| act.round(v))
        })
        .collect();
    // Same operations in the same order, and the same exp: equal bit for bit.
    for (i, (g, w)) in got[0].iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{expr} {act} element {i}: got {g}, want {w}");
    }
}

#[test]
fn elementwise_equals_the_reference_bit_for_bit() {
    let mut jit = Jit::new().expect("host ISA");
    let swiglu = Expr::silu(Expr::input(0)) * Expr::input(1);
    for act in [DType::F32, DType::BF16] {
        check_elementwise(&mut jit, 88, 2, swiglu.clone(), act);
        check_elementwise(&mut jit, 32, 2, Expr::input(0) + Expr::input(1), act);
        check_elementwise(&mut jit, 7, 1, Expr::sigmoid(Expr::input(0)), act);
        check_elementwise(
            &mut jit,
            5,
            3,
            Expr::sigmoid(Expr::input(2) * Expr::input(0)) + Expr::input(1),
            act,
        );
        check_elementwise(&mut jit, 3, 1, Expr::input(0), act);
    }
}

#[test]
fn elementwise_reads_column_windows_of_a_wider_buffer() {
    // swiglu over %54[0..88] and %54[88..176], as in mha-r4.
    let mut jit = Jit::new().expect("host ISA");
    let (width, tokens) = (88, 2);
    let s = elementwise(width, 2, Expr::silu(Expr::input(0)) * Expr::input(1), DType::F32);
    let mut rng = Rng(42);
    let gu = rng.vec(tokens * 2 * width, 4.0);
    let mut buf = encode(&gu, DType::F32);
    let mut out = vec![0u8; tokens * width * 4];
    let base = buf.as_mut_ptr();
    // SAFETY: both windows lie in `buf` for `tokens` rows of stride 176.
    let ptrs = [base, unsafe { base.add(width * 4) }, out.as_mut_ptr()];
    let id = jit.compile(&s).unwrap();
    unsafe { jit.kernel(id).call(&ptrs, &[2 * width, 2 * width, width], tokens) };
    let got = decode(&out, DType::F32);
    for t in 0..tokens {
        for i in 0..width {
            let (g, u) = (gu[t * 2 * width + i], gu[t * 2 * width + width + i]);
            let want = s_expr_eval(g, u);
            assert_eq!(got[t * width + i], want, "row {t} column {i}");
        }
    }
}

/// In place: the result written over its first operand's window (as the
/// memory plan may place it), in bf16 with a row whose width is not a
/// multiple of the four lanes; bit for bit a separate output.
#[test]
fn elementwise_is_correct_in_place() {
    let mut jit = Jit::new().expect("host ISA");
    let act = DType::BF16;
    let (width, tokens) = (90, 3);
    let s = elementwise(width, 2, Expr::silu(Expr::input(0)) * Expr::input(1), act);
    let id = jit.compile(&s).unwrap();
    let mut rng = Rng(43);
    let gu = rounded(&rng.vec(tokens * 2 * width, 4.0), act);
    let mut buf = encode(&gu, act);
    let mut apart = vec![0u8; tokens * width * 2];
    let base = buf.as_mut_ptr();
    // SAFETY: both windows lie in `buf` for `tokens` rows of stride 2 * width.
    let up = unsafe { base.add(width * 2) };
    unsafe {
        jit.kernel(id)
            .call(&[base, up, apart.as_mut_ptr()], &[2 * width, 2 * width, width], tokens)
    };
    // The same kernel writing over the gate window it reads.
    unsafe {
        jit.kernel(id)
            .call(&[base, up, base], &[2 * width, 2 * width, 2 * width], tokens)
    };
    let inplace = decode(&buf, act);
    let apart = decode(&apart, act);
    for t in 0..tokens {
        for i in 0..width {
            let (g, w) = (inplace[t * 2 * width + i], apart[t * width + i]);
            assert_eq!(g.to_bits(), w.to_bits(), "row {t} column {i}");
        }
    }
}

fn s_expr_eval(g: f32, u: f32) -> f32 {
    (Expr::silu(Expr::input(0)) * Expr::input(1)).eval(&[g, u], &|v| v)
}

fn row_reduce(r: RowReduceSpec, act: DType) -> KernelSpec {
    spec("rr", act, Family::RowReduce(r))
}

fn check_row_reduce(jit: &mut Jit, r: RowReduceSpec, act: DType) {
    let tokens = 3;
    let mut rng = Rng(0x5eed ^ r.width as u64);
    let s = row_reduce(r.clone(), act);
    let widths: Vec<usize> = {
        let mut w = vec![r.width * tokens];
        if r.add {
            w.push(r.width * tokens);
        }
        if r.norm == NormWeight::Weighted {
            w.push(r.width);
        }
        if r.gate {
            w.extend([r.width, 1]);
        }
        if r.next == Some(NormWeight::Weighted) {
            w.push(r.width);
        }
        w
    };
    let ops: Vec<Vec<f32>> = widths.iter().map(|&n| rounded(&rng.vec(n, 3.0), act)).collect();
    let got = run(jit, &s, &ops, tokens);
    let want = ouroc_kernels::exec::row_reduce(&r, &|i| &ops[i][..], tokens, &|v| act.round(v));
    assert_eq!(got.len(), want.len());
    // Sums in the reference's sequential order, four elements per vector
    // but added lane by lane: equal bit for bit.
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len());
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{r} {act} result {j} element {i}: got {g}, want {w}"
            );
        }
    }
}

fn rr(width: usize, add: bool, norm: NormWeight, gate: bool, next: Option<NormWeight>) -> RowReduceSpec {
    RowReduceSpec {
        width,
        eps: 1e-6,
        add,
        norm,
        gate,
        next,
    }
}

#[test]
fn row_reduce_equals_the_reference_bit_for_bit() {
    use NormWeight::{Unweighted as U, Weighted as W};
    let mut jit = Jit::new().expect("host ISA");
    for act in [DType::F32, DType::BF16] {
        for width in [32, 10, 7, 1] {
            check_row_reduce(&mut jit, rr(width, false, U, false, None), act);
            check_row_reduce(&mut jit, rr(width, false, W, false, None), act);
            check_row_reduce(&mut jit, rr(width, true, U, false, None), act);
            check_row_reduce(&mut jit, rr(width, true, W, false, None), act);
            check_row_reduce(&mut jit, rr(width, false, W, true, Some(U)), act);
            check_row_reduce(&mut jit, rr(width, true, W, true, Some(W)), act);
            check_row_reduce(&mut jit, rr(width, false, U, false, Some(W)), act);
        }
    }
}

#[test]
fn unsupported_dtypes_and_shapes_are_an_error_not_a_panic() {
    let rope = |act, head_dim| {
        spec(
            "rope",
            act,
            Family::Rope(ouroc_kernels::spec::RopeSpec { heads: 4, head_dim }),
        )
    };
    let mut jit = Jit::new().expect("host ISA");
    for s in [rope(DType::F16, 8), rope(DType::F32, 7)] {
        assert!(matches!(jit.compile(&s), Err(CodegenError::Unsupported { .. })));
        assert!(matches!(clif_text(&s), Err(CodegenError::Unsupported { .. })));
    }
    let f16 = linear(4, 4, DType::F16, false, DType::F32);
    assert!(matches!(jit.compile(&f16), Err(CodegenError::Unsupported { .. })));
}

#[test]
fn clif_snapshots_at_fixture_shapes() {
    use NormWeight::{Unweighted as U, Weighted as W};
    let snap = |name: &str, s: &KernelSpec| {
        let text = format!("; {s}\n{}", clif_text(s).expect("emits"));
        insta::assert_snapshot!(name, text);
    };
    snap("linear_f32_n96_k32", &linear(96, 32, DType::F32, false, DType::F32));
    snap(
        "linear_bf16_n32_k88_bias",
        &linear(32, 88, DType::BF16, true, DType::BF16),
    );
    snap(
        "elementwise_swiglu_88",
        &elementwise(88, 2, Expr::silu(Expr::input(0)) * Expr::input(1), DType::F32),
    );
    snap(
        "row_reduce_add_norm_32",
        &row_reduce(rr(32, true, U, false, None), DType::F32),
    );
    snap(
        "row_reduce_step_end_32",
        &row_reduce(rr(32, false, W, true, Some(U)), DType::F32),
    );
    // bf16: four lanes rounded and packed to 8 bytes per store, then a
    // scalar tail of 10 % 4 = 2 elements.
    snap(
        "row_reduce_add_norm_bf16_10",
        &row_reduce(rr(10, true, W, false, None), DType::BF16),
    );
}
