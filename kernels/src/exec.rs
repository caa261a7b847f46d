//! The reference kernels: what each kernel family computes, in plain Rust
//! loops and f32, from the kernel spec alone. They are the executable
//! meaning of a kernel spec: the reference device of `ouroc_driver`
//! (`ouroc_driver::host`) runs a whole Program on them, and the Cranelift
//! and PTX emitters are tested against them. `rd` rounds to the kernel's
//! activation dtype at its rounding points (the identity in f32 mode).

use crate::program::Kernel;
use crate::spec::{AttentionSpec, Family, NormWeight, RowReduceSpec, Trig};

/// The results of kernel `k` (every family but `Attention`, which needs
/// the KV cache: [`attention_seq`]) on `t` tokens: `input(i)` is operand i
/// (all its rows, or a whole weight).
pub fn compute<'a>(k: &Kernel, input: &dyn Fn(usize) -> &'a [f32], t: usize, rd: &dyn Fn(f32) -> f32) -> Vec<Vec<f32>> {
    match &k.spec.family {
        Family::Gather(g) => {
            let (table, ids) = (input(0), input(1));
            vec![
                ids.iter()
                    .flat_map(|&id| {
                        table[id as usize * g.width..(id as usize + 1) * g.width]
                            .iter()
                            .copied()
                    })
                    .collect(),
            ]
        }
        Family::RopeTable(s) => {
            let half = s.head_dim / 2;
            let inv: Vec<f32> = (0..half)
                .map(|j| 1.0 / (s.theta as f32).powf((2 * j) as f32 / s.head_dim as f32))
                .collect();
            let func = match s.func {
                Trig::Cos => f32::cos,
                Trig::Sin => f32::sin,
            };
            vec![
                input(0)
                    .iter()
                    .flat_map(|&p| (0..s.head_dim).map(move |j| (p, j)))
                    .map(|(p, j)| rd(func(p * inv[j % half])))
                    .collect(),
            ]
        }
        Family::Linear(l) => {
            let (x, w) = (input(0), input(1));
            let b = l.bias.then(|| input(2));
            let mut y = Vec::with_capacity(t * l.n);
            for row in x.chunks(l.k) {
                for o in 0..l.n {
                    let acc: f32 = row.iter().zip(&w[o * l.k..(o + 1) * l.k]).map(|(a, b)| a * b).sum();
                    y.push(rd(acc + b.map_or(0.0, |b| b[o])));
                }
            }
            vec![y]
        }
        Family::RowReduce(r) => row_reduce(r, input, t, rd),
        Family::Rope(r) => vec![rope(input(0), input(1), input(2), r.heads, r.head_dim, rd)],
        Family::Attention(_) => panic!("kernel {}: attention needs its KV cache (attention_seq)", k.spec.name),
        Family::Elementwise(e) => {
            let xs: Vec<&[f32]> = (0..e.inputs).map(input).collect();
            let mut out = Vec::with_capacity(t * e.width);
            let mut el = vec![0.0; e.inputs];
            for i in 0..t * e.width {
                for (x, src) in el.iter_mut().zip(&xs) {
                    *x = src[i];
                }
                out.push(e.expr.eval(&el, rd));
            }
            vec![out]
        }
    }
}

/// `x * (1 / sqrt(mean(x^2) + eps))`, rounded; times `w` and rounded again.
fn rms(x: &[f32], w: Option<&[f32]>, eps: f32, rd: &dyn Fn(f32) -> f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    match w {
        Some(w) => x.iter().zip(w).map(|(v, wv)| rd(wv * rd(v * inv))).collect(),
        None => x.iter().map(|v| rd(v * inv)).collect(),
    }
}

/// The reference `RowReduce` of `tokens` rows: `input(i)` is operand i (all
/// its rows); the results in the family's result order. Public so that
/// backends can test their emitters against it.
pub fn row_reduce<'a>(
    r: &RowReduceSpec,
    input: &dyn Fn(usize) -> &'a [f32],
    tokens: usize,
    rd: &dyn Fn(f32) -> f32,
) -> Vec<Vec<f32>> {
    let mut i = 0;
    let mut next_operand = || {
        i += 1;
        input(i - 1)
    };
    let x0 = next_operand();
    let x1 = r.add.then(&mut next_operand);
    let w = (r.norm == NormWeight::Weighted).then(&mut next_operand);
    let gate = r.gate.then(|| (next_operand(), next_operand()));
    let next_w = (r.next == Some(NormWeight::Weighted)).then(next_operand);
    let (eps, width) = (r.eps as f32, r.width);
    let (mut s_out, mut n_out, mut lam_out, mut next_out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in 0..tokens {
        let row = t * width..(t + 1) * width;
        let s: Vec<f32> = match x1 {
            Some(x1) => x0[row.clone()].iter().zip(&x1[row]).map(|(a, b)| rd(a + b)).collect(),
            None => x0[row].to_vec(),
        };
        let n = rms(&s, w, eps, rd);
        if let Some((gw, gb)) = gate {
            let acc: f32 = n.iter().zip(gw).map(|(a, b)| a * b).sum();
            lam_out.push(rd(1.0 / (1.0 + (-rd(acc + gb[0])).exp())));
        }
        if let Some(next) = r.next {
            let nw = if next == NormWeight::Weighted { next_w } else { None };
            next_out.extend(rms(&n, nw, eps, rd));
        }
        if r.add {
            s_out.extend(s);
        }
        n_out.extend(n);
    }
    let mut results = Vec::new();
    if r.add {
        results.push(s_out);
    }
    results.push(n_out);
    if r.gate {
        results.push(lam_out);
    }
    if r.next.is_some() {
        results.push(next_out);
    }
    results
}

/// The reference `Rope`: per token and head, `x*cos + rotate_half(x)*sin`,
/// each product and the sum rounded (`x`: rows of `heads * hd`; `cos`,
/// `sin`: rows of `hd`, one per token). Public so that backends can test
/// their emitters against it.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, rd: &dyn Fn(f32) -> f32) -> Vec<f32> {
    let half = hd / 2;
    let mut out = Vec::with_capacity(x.len());
    for (t, row) in x.chunks(heads * hd).enumerate() {
        let (c, s) = (&cos[t * hd..(t + 1) * hd], &sin[t * hd..(t + 1) * hd]);
        for xh in row.chunks(hd) {
            for j in 0..hd {
                let rot = if j < half { -xh[j + half] } else { xh[j - half] };
                out.push(rd(rd(xh[j] * c[j]) + rd(rot * s[j])));
            }
        }
    }
    out
}

/// The reference `Attention` for one sequence: `ins` are its `seq` new rows
/// of q, k, v (and cos, sin with `rope`); the new K (rotated) and V rows are
/// appended to `cache_k` / `cache_v` (position-major rows of
/// `kv_heads * head_dim`), then each token attends causally over the cache.
/// Public so that backends can test their emitters against it.
pub fn attention_seq(
    a: &AttentionSpec,
    ins: &[&[f32]],
    cache_k: &mut Vec<f32>,
    cache_v: &mut Vec<f32>,
    seq: usize,
    rd: &dyn Fn(f32) -> f32,
) -> Vec<f32> {
    let (hd, kvw, qw) = (a.head_dim, a.kv_heads * a.head_dim, a.heads * a.head_dim);
    let (q, k) = if a.rope {
        (
            rope(ins[0], ins[3], ins[4], a.heads, hd, rd),
            rope(ins[1], ins[3], ins[4], a.kv_heads, hd, rd),
        )
    } else {
        (ins[0].to_vec(), ins[1].to_vec())
    };
    let v = ins[2];
    let group = a.heads / a.kv_heads;
    let scale = (hd as f64).powf(-0.5) as f32;
    let mut out = vec![0.0f32; seq * qw];
    let past = cache_k.len() / kvw;
    cache_k.extend_from_slice(&k);
    cache_v.extend_from_slice(v);
    for t in 0..seq {
        for h in 0..a.heads {
            let kvh = h / group;
            let qh = &q[t * qw + h * hd..t * qw + (h + 1) * hd];
            let mut scores: Vec<f32> = (0..=past + t)
                .map(|j| {
                    let kj = &cache_k[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                    let dot: f32 = qh.iter().zip(kj).map(|(x, y)| x * y).sum();
                    rd(rd(dot) * scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let dst = &mut out[t * qw + h * hd..t * qw + (h + 1) * hd];
            for (j, s) in scores.iter().enumerate() {
                let pj = rd(s / sum);
                let vj = &cache_v[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                for (o, x) in dst.iter_mut().zip(vj) {
                    *o += pj * x;
                }
            }
            dst.iter_mut().for_each(|o| *o = rd(*o));
        }
    }
    out
}
