//! The attention microkernel (`ouroc_runtime::attention`): every variant
//! this CPU runs (forced explicitly, the portable one always) against the
//! reference `ouroc_kernels::exec::attention_seq`, in f32 and bf16, with and
//! without RoPE, grouped-query heads, head sizes that are and are not
//! multiples of the 16 lanes, prompts after a filled cache and single
//! decode tokens; and attended in blocks of tokens (as threads split it)
//! bit for bit the same as in one call.
//!
//! Tolerances. The kernel differs from the reference only in the order of
//! each score's dot product (16 lanes, then a horizontal sum) and in fusing
//! `p_j * v_j` into the output sum (see the module docs). In f32 that moves
//! a score by a few ulps of `sum |q k|` and an output by a few ulps of
//! `max |v|`: 1e-5 of `max |v|` is far above it and far below any real
//! error (a wrong position, a missing scale, an unrotated q). In bf16 a
//! score that changes by an ulp can round to the neighbouring bf16 value,
//! which moves its probability by up to 2^-8 of itself and the output by
//! that share of `max |v|`, after which the output itself rounds to bf16
//! (2^-8): 2e-2 of `max |v|` bounds that, and at least 90% of the outputs
//! must be exact.

mod common;

use common::Lcg;
use ouroc_driver::codec::{decode, encode};
use ouroc_ir::DType;
use ouroc_kernels::exec;
use ouroc_kernels::spec::AttentionSpec;
use ouroc_runtime::attention::{self, AttendArgs, Variant};

/// `n` values in [-scale, scale), rounded to `act`.
fn values(g: &mut Lcg, n: usize, scale: f32, act: DType) -> Vec<f32> {
    (0..n).map(|_| act.round(g.next() * scale)).collect()
}

/// RoPE tables of positions `pos` (as the model's: cos/sin of pos * inv_freq, twice).
fn tables(pos: &[usize], hd: usize, act: DType) -> (Vec<f32>, Vec<f32>) {
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for &p in pos {
        for j in 0..hd {
            let f = 1.0 / 10000f32.powf((2 * (j % (hd / 2))) as f32 / hd as f32);
            c.push(act.round((p as f32 * f).cos()));
            s.push(act.round((p as f32 * f).sin()));
        }
    }
    (c, s)
}

/// One case: its inputs and the reference's output.
struct Case {
    a: AttentionSpec,
    act: DType,
    past: usize,
    seq: usize,
    q: Vec<u8>,
    cos: Vec<u8>,
    sin: Vec<u8>,
    /// The store after the append: past rows, then the new rows (K rotated).
    k: Vec<u8>,
    v: Vec<u8>,
    want: Vec<f32>,
    vmax: f32,
}

impl Case {
    fn new(heads: usize, kv_heads: usize, hd: usize, rope: bool, act: DType, past: usize, seq: usize) -> Case {
        let a = AttentionSpec {
            layer: 0,
            heads,
            kv_heads,
            head_dim: hd,
            rope,
        };
        let (qw, kvw) = (heads * hd, kv_heads * hd);
        let mut g = Lcg((heads * 131 + hd * 7 + past * 3 + seq) as u64 ^ (act == DType::BF16) as u64);
        let q = values(&mut g, seq * qw, 2.0, act);
        let k = values(&mut g, seq * kvw, 2.0, act);
        let v = values(&mut g, seq * kvw, 1.5, act);
        let (c, s) = tables(&(past..past + seq).collect::<Vec<_>>(), hd, act);
        let mut ck = values(&mut g, past * kvw, 2.0, act);
        let mut cv = values(&mut g, past * kvw, 1.5, act);
        let rd = |x: f32| act.round(x);
        let ins: Vec<&[f32]> = vec![&q, &k, &v, &c, &s];
        let want = exec::attention_seq(&a, &ins[..if rope { 5 } else { 3 }], &mut ck, &mut cv, seq, &rd);
        let vmax = cv.iter().fold(0f32, |m, x| m.max(x.abs()));
        Case {
            a,
            act,
            past,
            seq,
            q: encode(&q, act),
            cos: encode(&c, act),
            sin: encode(&s, act),
            k: encode(&ck, act),
            v: encode(&cv, act),
            want,
            vmax,
        }
    }

    /// The microkernel's output for tokens `t0 .. t0 + len` called as blocks.
    fn run(&self, var: Variant, blocks: &[(usize, usize)]) -> Vec<f32> {
        self.run_split(var, blocks, &[(0, self.a.heads)])
    }

    /// As `run`, each block computed as calls on the given query head ranges.
    fn run_split(&self, var: Variant, blocks: &[(usize, usize)], heads: &[(usize, usize)]) -> Vec<f32> {
        let qw = self.a.heads * self.a.head_dim;
        let hd = self.a.head_dim;
        let mut out = vec![0u8; self.seq * qw * self.act.size_bytes()];
        let whole = AttendArgs {
            heads: self.a.heads,
            head_from: 0,
            head_to: self.a.heads,
            kv_heads: self.a.kv_heads,
            head_dim: hd,
            act: self.act,
            tokens: self.seq,
            past: self.past,
            q: self.q.as_ptr(),
            q_stride: qw,
            cos: if self.a.rope {
                self.cos.as_ptr()
            } else {
                std::ptr::null()
            },
            cos_stride: hd,
            sin: if self.a.rope {
                self.sin.as_ptr()
            } else {
                std::ptr::null()
            },
            sin_stride: hd,
            out: out.as_mut_ptr(),
            out_stride: qw,
            k: self.k.as_ptr(),
            v: self.v.as_ptr(),
        };
        for &(t0, len) in blocks {
            for &(h0, h1) in heads {
                // SAFETY: the buffers hold `seq` rows and `past + seq` store rows.
                unsafe { attention::attend_with(var, &whole.block(t0, len).heads(h0, h1)) };
            }
        }
        decode(&out, self.act)
    }
}

fn shapes() -> Vec<(usize, usize, usize, bool)> {
    // (heads, kv_heads, head_dim, rope)
    vec![
        (2, 2, 16, true),
        (4, 2, 64, true),
        (4, 1, 24, true),
        (3, 3, 8, false),
        (2, 1, 40, false),
    ]
}

#[test]
fn every_variant_matches_the_reference() {
    let variants: Vec<Variant> = Variant::ALL.into_iter().filter(|v| v.supported()).collect();
    assert!(variants.contains(&Variant::Scalar));
    for var in variants {
        for act in [DType::F32, DType::BF16] {
            for (heads, kv, hd, rope) in shapes() {
                for (past, seq) in [(0, 1), (0, 9), (5, 7), (17, 1), (3, 33)] {
                    let c = Case::new(heads, kv, hd, rope, act, past, seq);
                    let got = c.run(var, &[(0, seq)]);
                    let what = format!(
                        "{} {act} heads {heads}/{kv} hd {hd} rope {rope} past {past} seq {seq}",
                        var.name()
                    );
                    let tol = if act == DType::BF16 { 2e-2 } else { 1e-5 } * c.vmax.max(1e-3);
                    let mut exact = 0;
                    for (i, (g, w)) in got.iter().zip(&c.want).enumerate() {
                        assert!(
                            (g - w).abs() <= tol,
                            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
                        );
                        exact += (g.to_bits() == w.to_bits()) as usize;
                    }
                    if act == DType::BF16 {
                        assert!(
                            exact * 10 >= got.len() * 9,
                            "{what}: only {exact} of {} outputs exact",
                            got.len()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn blocks_of_tokens_and_ranges_of_heads_give_the_whole_call_bit_for_bit() {
    for var in Variant::ALL.into_iter().filter(|v| v.supported()) {
        for act in [DType::F32, DType::BF16] {
            let c = Case::new(4, 2, 24, true, act, 6, 13);
            let whole = c.run(var, &[(0, 13)]);
            let blocks = c.run(var, &[(0, 1), (1, 5), (6, 4), (10, 3)]);
            let same = whole.iter().zip(&blocks).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{} {act}: blocks differ from one call", var.name());
            // Query heads in ranges, as a decode token's heads are split.
            let heads = c.run_split(var, &[(0, 13)], &[(0, 1), (1, 3), (3, 4)]);
            let same = whole.iter().zip(&heads).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{} {act}: head ranges differ from one call", var.name());
        }
    }
}

/// A wrong kernel fails the tolerance: the same case with the scale of the
/// scores left out differs from the reference by far more than it allows.
#[test]
fn the_tolerance_catches_a_wrong_kernel() {
    let c = Case::new(4, 2, 64, true, DType::F32, 5, 7);
    let mut wrong = c.want.clone();
    // Attention without RoPE on q and K: what a kernel that skipped it gives.
    let mut unrot = Case::new(4, 2, 64, false, DType::F32, 5, 7);
    unrot.q = c.q.clone();
    unrot.k = c.k.clone();
    wrong.copy_from_slice(&unrot.run(Variant::Scalar, &[(0, 7)]));
    let tol = 1e-5 * c.vmax;
    let worst = wrong.iter().zip(&c.want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(worst > 100.0 * tol, "an unrotated q moved outputs by only {worst}");
}
