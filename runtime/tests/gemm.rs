//! The prefill GEMM (`ouroc_runtime::gemm`): every variant this CPU supports
//! (forced explicitly), every activation / weight dtype pair, against an
//! f64 reference on odd sizes, strided column windows, row ranges split at
//! odd places, with and without bias, and in place.
//!
//! Tolerances. The kernel sums in f32 in its own order: each product
//! passes through at most `k/8 + 32` roundings (8 or more lanes of k/lanes
//! steps, the horizontal sum, a scalar tail of under 16, one addition per
//! block of k, the bias), so by the usual gamma_n bound
//! `|y - exact| <= (k/8 + 32) * 2^-24 * sum|x w|` (products of bf16 values
//! are exact; with FMA an f32 product is not rounded on its own). For the
//! k <= 300 of most cases that is under 4.2e-6 of sum|x w|. A bf16 result
//! is that f32 sum rounded once: within one bf16 ulp of the exact value
//! plus the f32 bound.

mod common;

use common::Lcg;
use ouroc_ir::DType;
use ouroc_runtime::gemm::{self, LinearArgs, Variant};

const DTYPES: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::F32, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::BF16, DType::BF16),
];

/// (n, k): not multiples of 4, 8, 16 or 32 (and a few that are, k = 1, an
/// empty k: y = round(b), and k around the 16 and 32 steps).
const SHAPES: [(usize, usize); 8] = [
    (37, 67),
    (70, 131),
    (13, 300),
    (5, 33),
    (9, 1),
    (4, 0),
    (6, 32),
    (19, 15),
];

const TOKENS: [usize; 4] = [1, 3, 17, 64];

/// A matrix stored in a dtype: its values (already rounded) and bytes.
struct Buf {
    vals: Vec<f32>,
    bytes: Vec<u8>,
    dtype: DType,
}

impl Buf {
    fn new(vals: Vec<f32>, dtype: DType) -> Buf {
        let vals: Vec<f32> = vals.into_iter().map(|v| dtype.round(v)).collect();
        let bytes = vals
            .iter()
            .flat_map(|&v| match dtype {
                DType::BF16 => gemm::bf16_bits(v).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect();
        Buf { vals, bytes, dtype }
    }

    fn get(&self, i: usize) -> f32 {
        let s = self.dtype.size_bytes();
        let b = &self.bytes[i * s..(i + 1) * s];
        match self.dtype {
            DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    fn ptr(&self, elem: usize) -> *const u8 {
        self.bytes[elem * self.dtype.size_bytes()..].as_ptr()
    }
}

/// The relative bound on the f32 sum (see the top of the file).
fn f32_bound(k: usize) -> f64 {
    (k as f64 / 8.0 + 32.0) * f64::powi(2.0, -24)
}

/// One bf16 ulp at the magnitude of `v` (normal range).
fn bf16_ulp(v: f64) -> f64 {
    let e = ((v.abs() as f32).to_bits() >> 23) & 0xff;
    f32::from_bits((e.max(8) - 7) << 23) as f64
}

/// A Linear problem: x in a column window of a wider buffer, y likewise.
struct Case {
    tokens: usize,
    n: usize,
    k: usize,
    act: DType,
    weight: DType,
    bias: bool,
    /// Row stride and column offset of the x and y windows, in elements.
    xs: usize,
    xc: usize,
    ys: usize,
    yc: usize,
}

impl Case {
    fn plain(tokens: usize, n: usize, k: usize, act: DType, weight: DType, bias: bool) -> Case {
        Case {
            tokens,
            n,
            k,
            act,
            weight,
            bias,
            xs: k,
            xc: 0,
            ys: n,
            yc: 0,
        }
    }

    fn windowed(self) -> Case {
        Case {
            xs: self.k + 5,
            xc: 3,
            ys: self.n + 7,
            yc: 2,
            ..self
        }
    }

    /// Inputs from a seed: x buffer, W, optional bias.
    fn inputs(&self, seed: u64) -> (Buf, Buf, Option<Buf>) {
        let mut g = Lcg(seed);
        let x = Buf::new((0..self.tokens * self.xs).map(|_| g.next()).collect(), self.act);
        let w = Buf::new((0..self.n * self.k).map(|_| g.next()).collect(), self.weight);
        let b = self
            .bias
            .then(|| Buf::new((0..self.n).map(|_| g.next()).collect(), self.weight));
        (x, w, b)
    }

    /// Run `v` over the row ranges `parts` (start, end; in that order) into a y buffer
    /// pre-filled with a sentinel; returns the y buffer.
    fn run(&self, v: Variant, x: &Buf, w: &Buf, b: Option<&Buf>, parts: &[(usize, usize)]) -> Buf {
        let sentinel = -1280.0f32; // exact in bf16
        let mut y = Buf::new(vec![sentinel; self.tokens * self.ys + self.yc], self.act);
        let p = LinearArgs {
            tokens: self.tokens,
            n: self.n,
            k: self.k,
            act: self.act,
            weight: self.weight,
            x: x.ptr(self.xc),
            x_stride: self.xs,
            w: w.ptr(0),
            bias: b.map_or(std::ptr::null(), |b| b.ptr(0)),
            y: y.bytes[self.yc * self.act.size_bytes()..].as_mut_ptr(),
            y_stride: self.ys,
        };
        assert!(!p.aliased());
        for &(start, end) in parts {
            // SAFETY: x has tokens rows of xs >= xc + k elements, y tokens
            // rows of ys >= yc + n, W n x k, bias n.
            unsafe { gemm::linear_with(v, &p, start..end) };
        }
        // Everything outside the window is untouched.
        for i in 0..y.vals.len() {
            let inside = i >= self.yc && (i - self.yc) / self.ys < self.tokens && (i - self.yc) % self.ys < self.n;
            if !inside {
                assert_eq!(
                    y.get(i),
                    sentinel,
                    "{v:?}: y element {i} outside the window was written"
                );
            }
        }
        y
    }

    /// Check y against the f64 reference within the documented bounds.
    fn check(&self, what: &str, x: &Buf, w: &Buf, b: Option<&Buf>, y: &Buf) {
        for t in 0..self.tokens {
            for o in 0..self.n {
                let (mut exact, mut mag) = (0f64, 0f64);
                for i in 0..self.k {
                    let prod = x.vals[t * self.xs + self.xc + i] as f64 * w.vals[o * self.k + i] as f64;
                    exact += prod;
                    mag += prod.abs();
                }
                if let Some(b) = b {
                    exact += b.vals[o] as f64;
                    mag += (b.vals[o] as f64).abs();
                }
                let got = y.get(t * self.ys + self.yc + o) as f64;
                let mut tol = f32_bound(self.k) * mag + 1e-30;
                if self.act == DType::BF16 {
                    tol += bf16_ulp(exact);
                }
                assert!(
                    (got - exact).abs() <= tol,
                    "{what}: token {t} output {o}: got {got}, exact {exact}, tolerance {tol}"
                );
            }
        }
    }
}

/// Every supported variant on every shape and token count of one dtype
/// pair, plain and windowed, with and without bias, rows split at odd
/// places.
fn matches_reference(act: DType, weight: DType) {
    let variants = Variant::supported_all();
    assert!(variants.contains(&Variant::Scalar) && variants.contains(&Variant::best()));
    let mut seed = 1;
    for v in variants {
        for (n, k) in SHAPES {
            for tokens in TOKENS {
                for bias in [false, true] {
                    for windowed in [false, true] {
                        let mut case = Case::plain(tokens, n, k, act, weight, bias);
                        if windowed {
                            case = case.windowed();
                        }
                        seed += 1;
                        let (x, w, b) = case.inputs(seed);
                        let (a, c) = (n / 3 + 1, n - n / 4);
                        // Odd cuts, computed out of order; then all at once.
                        let splits = [vec![(c, n), (0, a), (a, c)], vec![(0, n)]];
                        for parts in &splits {
                            let what = format!(
                                "{} act={act} weight={weight} n={n} k={k} tokens={tokens} bias={bias} \
                                 windowed={windowed} rows={parts:?}",
                                v.name()
                            );
                            let y = case.run(v, &x, &w, b.as_ref(), parts);
                            case.check(&what, &x, &w, b.as_ref(), &y);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn f32_activations_f32_weights_match_the_reference() {
    matches_reference(DType::F32, DType::F32);
}

#[test]
fn f32_activations_bf16_weights_match_the_reference() {
    matches_reference(DType::F32, DType::BF16);
}

#[test]
fn bf16_activations_f32_weights_match_the_reference() {
    matches_reference(DType::BF16, DType::F32);
}

#[test]
fn bf16_activations_bf16_weights_match_the_reference() {
    matches_reference(DType::BF16, DType::BF16);
}

/// Small integers: every product and partial sum is exact in f32 whatever
/// the order, so y must be bit for bit the exact sum rounded once (bf16:
/// sums above 256 need rounding, ties to even included).
#[test]
fn exact_sums_round_once_like_the_reference() {
    let mut g = Lcg(99);
    for v in Variant::supported_all() {
        for (act, weight) in DTYPES {
            for (n, k) in [(23, 300), (7, 45)] {
                let case = Case::plain(17, n, k, act, weight, true).windowed();
                let int = |g: &mut Lcg| (g.next() * 4.0).round();
                let x = Buf::new((0..case.tokens * case.xs).map(|_| int(&mut g)).collect(), act);
                let w = Buf::new((0..n * k).map(|_| int(&mut g)).collect(), weight);
                let b = Buf::new((0..n).map(|_| int(&mut g) * 64.0 + 0.5).collect(), weight);
                let y = case.run(v, &x, &w, Some(&b), &[(0, n)]);
                for t in 0..case.tokens {
                    for o in 0..n {
                        let dot: f32 = (0..k)
                            .map(|i| x.vals[t * case.xs + case.xc + i] * w.vals[o * k + i])
                            .sum();
                        let want = act.round(dot + b.vals[o]);
                        let got = y.get(t * case.ys + case.yc + o);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{} act={act} weight={weight} n={n} k={k} token {t} output {o}",
                            v.name()
                        );
                    }
                }
            }
        }
    }
}

/// n == k with y in x's buffer (row t of y is row t of x), one call over all
/// rows: the same result as with a separate y.
#[test]
fn in_place_launch_matches_a_separate_output() {
    for v in Variant::supported_all() {
        for (act, weight) in DTYPES {
            for tokens in TOKENS {
                let n = 45;
                let case = Case::plain(tokens, n, n, act, weight, true);
                let (x, w, b) = case.inputs(7 + tokens as u64);
                let want = case.run(v, &x, &w, b.as_ref(), &[(0, n)]);
                let mut buf = Buf::new(x.vals.clone(), act);
                let p = LinearArgs {
                    tokens,
                    n,
                    k: n,
                    act,
                    weight,
                    x: buf.bytes.as_ptr(),
                    x_stride: n,
                    w: w.ptr(0),
                    bias: b.as_ref().map_or(std::ptr::null(), |b| b.ptr(0)),
                    y: buf.bytes.as_mut_ptr(),
                    y_stride: n,
                };
                assert!(p.aliased());
                // SAFETY: x = y, tokens rows of n elements, row for row; all rows in one call.
                unsafe { gemm::linear_with(v, &p, 0..n) };
                assert_eq!(
                    buf.bytes,
                    want.bytes,
                    "{} act={act} weight={weight} tokens={tokens}",
                    v.name()
                );
            }
        }
    }
}

/// Many tokens with a long k: two token blocks (over 256 tokens) and two or
/// three blocks of k (partial sums carried in f32), rows split, against the
/// reference.
#[test]
fn token_blocks_and_k_blocks_match_the_reference() {
    for v in Variant::supported_all() {
        for (act, weight) in DTYPES {
            let case = Case::plain(300, 11, 1500, act, weight, true).windowed();
            let (x, w, b) = case.inputs(5);
            let y = case.run(v, &x, &w, b.as_ref(), &[(0, 7), (7, 11)]);
            case.check(
                &format!("{} act={act} weight={weight}", v.name()),
                &x,
                &w,
                b.as_ref(),
                &y,
            );
        }
    }
}

#[test]
fn bf16_bits_rounds_like_half() {
    let mut vals = vec![
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -3e-39,
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (1.0)
        f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_ffff),
        f32::from_bits(0x7f80_0001), // a signalling NaN becomes quiet
    ];
    let mut g = Lcg(3);
    for _ in 0..100_000 {
        vals.push(f32::from_bits(
            (g.next().to_bits() ^ (g.next().to_bits() << 9)).rotate_left(7),
        ));
    }
    for x in vals {
        let want = DType::BF16.round(x).to_bits();
        let got = (gemm::bf16_bits(x) as u32) << 16;
        assert_eq!(got, want, "bf16 of {x:e} ({:#010x})", x.to_bits());
    }
}

#[test]
fn dtypes_and_variants_are_reported() {
    assert!(gemm::supports(DType::F32, DType::BF16));
    assert!(gemm::supports(DType::BF16, DType::BF16));
    assert!(!gemm::supports(DType::F16, DType::F32));
    assert_eq!(gemm::available(), Variant::best().name());
    assert!(Variant::Scalar.supported());
    for v in Variant::supported_all() {
        let (r, t) = v.tile(DType::BF16, DType::BF16);
        assert!(r >= 1 && t >= 1, "{v:?}");
    }
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = ["avx512f", "avx512bw", "avx512vl"];
        let has = |f: &str| match f {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            _ => std::arch::is_x86_feature_detected!("avx512vl"),
        };
        let all = avx512.iter().all(|f| has(f));
        assert_eq!(Variant::Avx512F.supported(), all);
        assert_eq!(
            Variant::Avx512Bf16.supported(),
            all && std::arch::is_x86_feature_detected!("avx512bf16")
        );
        assert_eq!(
            Variant::Avx2Fma.supported(),
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        );
    }
}
