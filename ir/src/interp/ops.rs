//! The math of each op. `d` is the result dtype: every result element is
//! rounded with `d.round`, and the comments say where the reference rounds
//! inside an op as well. Accumulations are in f32.

use crate::graph::{Attention, NextNorm, OpKind};
use crate::tensor::Tensor;
use crate::types::DType;

use super::KvSlot;

pub(super) fn eval(kind: &OpKind, ins: &[&Tensor], d: DType) -> Vec<Tensor> {
    let one = match kind {
        OpKind::Embedding => embedding(ins[0], ins[1]),
        OpKind::RmsNorm { eps } => rms_norm(ins[0], Some(ins[1]), *eps as f32, d),
        OpKind::RmsScale { eps } => rms_norm(ins[0], None, *eps as f32, d),
        OpKind::Linear => linear(ins[0], ins[1], ins.get(2).copied(), d),
        OpKind::RopeCos(t) => rope_table(ins[0], t.head_dim, t.theta, f32::cos, d),
        OpKind::RopeSin(t) => rope_table(ins[0], t.head_dim, t.theta, f32::sin, d),
        OpKind::Rope { heads, head_dim } => rope(ins[0], ins[1], ins[2], *heads, *head_dim, d),
        OpKind::Silu => map(ins[0], d, silu),
        OpKind::Sigmoid => map(ins[0], d, sigmoid),
        OpKind::Add => zip(ins[0], ins[1], d, |a, b| a + b),
        OpKind::Mul => zip(ins[0], ins[1], d, |a, b| a * b),
        OpKind::ScaleCols => {
            let (w, s) = (ins[0], ins[1]);
            let cols = s.numel();
            Tensor::new(
                w.shape.clone(),
                w.data
                    .iter()
                    .enumerate()
                    .map(|(i, x)| d.round(x * s.data[i % cols]))
                    .collect(),
            )
        }
        OpKind::Concat { axis } => concat(ins, *axis),
        OpKind::Slice { start, len } => {
            let x = ins[0];
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("slice input has a last dim") = *len;
            Tensor::new(shape, x.rows().flat_map(|r| r[*start..start + len].to_vec()).collect())
        }
        OpKind::Swiglu => swiglu(ins, d),
        OpKind::AddRmsNorm { eps } => {
            let sum = zip(ins[0], ins[1], d, |a, b| a + b);
            let n = rms_norm(&sum, ins.get(2).copied(), *eps as f32, d);
            return vec![sum, n];
        }
        OpKind::StepEnd { eps, next, gate } => {
            let eps = *eps as f32;
            let hn = rms_norm(ins[0], Some(ins[1]), eps, d);
            let lam = gate.then(|| map(&linear(&hn, ins[2], Some(ins[3]), d), d, sigmoid));
            let next = match next {
                NextNorm::None => None,
                NextNorm::Scale => Some(rms_norm(&hn, None, eps, d)),
                NextNorm::Norm => Some(rms_norm(&hn, Some(ins[ins.len() - 1]), eps, d)),
            };
            return [Some(hn), lam, next].into_iter().flatten().collect();
        }
        OpKind::Weight { .. } | OpKind::Loop(_) | OpKind::Attention(_) | OpKind::ExitSelect { .. } => {
            unreachable!("{} is evaluated by the interpreter itself", kind.name())
        }
    };
    vec![one]
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Concatenate along `axis`: for each index of the dims before it, each
/// operand's block in turn.
fn concat(ins: &[&Tensor], axis: usize) -> Tensor {
    let outer: usize = ins[0].shape[..axis].iter().product();
    let mut shape = ins[0].shape.clone();
    shape[axis] = ins.iter().map(|t| t.shape[axis]).sum();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for t in ins {
            let block = t.numel() / outer.max(1);
            data.extend_from_slice(&t.data[o * block..(o + 1) * block]);
        }
    }
    Tensor::new(shape, data)
}

/// silu(g) rounded, times u, rounded: the same roundings as `silu` then `mul`.
fn swiglu(ins: &[&Tensor], d: DType) -> Tensor {
    let f = |g: f32, u: f32| d.round(d.round(silu(g)) * u);
    match ins {
        [g, u] => zip(g, u, d, f),
        [gu] => {
            let half = gu.row_len() / 2;
            let mut shape = gu.shape.clone();
            *shape.last_mut().expect("swiglu input has a last dim") = half;
            let data = gu
                .rows()
                .flat_map(|r| (0..half).map(move |i| f(r[i], r[half + i])))
                .collect();
            Tensor::new(shape, data)
        }
        _ => unreachable!("verified: swiglu has 1 or 2 operands"),
    }
}

fn map(x: &Tensor, d: DType, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor::new(x.shape.clone(), x.data.iter().map(|&v| d.round(f(v))).collect())
}

fn zip(a: &Tensor, b: &Tensor, d: DType, f: impl Fn(f32, f32) -> f32) -> Tensor {
    Tensor::new(
        a.shape.clone(),
        a.data.iter().zip(&b.data).map(|(&x, &y)| d.round(f(x, y))).collect(),
    )
}

/// Row lookup; the table is already in its dtype.
fn embedding(table: &Tensor, ids: &Tensor) -> Tensor {
    let h = table.shape[1];
    let mut shape = ids.shape.clone();
    shape.push(h);
    let mut data = Vec::with_capacity(ids.numel() * h);
    for &id in &ids.data {
        let i = id as usize;
        data.extend_from_slice(&table.data[i * h..(i + 1) * h]);
    }
    Tensor::new(shape, data)
}

/// x * rsqrt(mean(x^2) + eps) in f32, rounded to `d`, then times the weight
/// and rounded again (the reference casts back before multiplying). Without
/// a weight (folded into the consumers) only the first rounding happens.
fn rms_norm(x: &Tensor, w: Option<&Tensor>, eps: f32, d: DType) -> Tensor {
    let mut data = Vec::with_capacity(x.numel());
    for row in x.rows() {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        match w {
            Some(w) => data.extend(row.iter().zip(&w.data).map(|(v, wv)| d.round(wv * d.round(v * inv)))),
            None => data.extend(row.iter().map(|v| d.round(v * inv))),
        }
    }
    Tensor::new(x.shape.clone(), data)
}

/// y = x W^T (+ b), accumulated in f32, rounded once.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, d: DType) -> Tensor {
    let (out, inp) = (w.shape[0], w.shape[1]);
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("linear input has a last dim") = out;
    let mut data = Vec::with_capacity(x.numel() / inp * out);
    for row in x.rows() {
        for o in 0..out {
            let wr = &w.data[o * inp..(o + 1) * inp];
            let acc: f32 = row.iter().zip(wr).map(|(a, b)| a * b).sum();
            data.push(d.round(acc + b.map_or(0.0, |b| b.data[o])));
        }
    }
    Tensor::new(shape, data)
}

/// cos or sin of pos * inv_freq, inv_freq[j] = 1 / theta^(2j/hd), in f32,
/// both halves of the head identical; rounded to `d`.
fn rope_table(pos: &Tensor, hd: usize, theta: f64, f: fn(f32) -> f32, d: DType) -> Tensor {
    let half = hd / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / hd as f32))
        .collect();
    let mut shape = pos.shape.clone();
    shape.push(hd);
    let mut data = Vec::with_capacity(pos.numel() * hd);
    for &p in &pos.data {
        for j in 0..hd {
            data.push(d.round(f(p * inv[j % half])));
        }
    }
    Tensor::new(shape, data)
}

/// Per head: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]; each
/// product and the sum rounded to `d`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize, hd: usize, d: DType) -> Tensor {
    let half = hd / 2;
    let mut data = Vec::with_capacity(x.numel());
    for (t, row) in x.rows().enumerate() {
        let (c, s) = (&cos.data[t * hd..(t + 1) * hd], &sin.data[t * hd..(t + 1) * hd]);
        for h in 0..heads {
            let xh = &row[h * hd..(h + 1) * hd];
            for j in 0..hd {
                let rot = if j < half { -xh[j + half] } else { xh[j - half] };
                data.push(d.round(d.round(xh[j] * c[j]) + d.round(rot * s[j])));
            }
        }
    }
    Tensor::new(x.shape.clone(), data)
}

/// Causal attention for `q/k/v: [batch, seq, ..]`. The new keys and values
/// are appended to each sequence's slot first; a new token at absolute
/// position p attends to positions 0..=p. Scores: q.k rounded to `d`, times
/// head_dim^-0.5 rounded to `d`; softmax in f32, probabilities rounded to
/// `d`; output sum_j p_j v_j rounded to `d`. Query head h reads kv head
/// h / (heads / kv_heads).
pub(super) fn attention(a: &Attention, ins: &[&Tensor], slots: &mut Vec<KvSlot>, d: DType) -> Tensor {
    // With cos/sin operands RoPE is fused in: applied here exactly as `rope` does.
    let roped;
    let (q, k, v) = match ins {
        [q, k, v] => (*q, *k, *v),
        [q, k, v, cos, sin] => {
            roped = (
                rope(q, cos, sin, a.heads, a.head_dim, d),
                rope(k, cos, sin, a.kv_heads, a.head_dim, d),
            );
            (&roped.0, &roped.1, *v)
        }
        _ => unreachable!("verified: attention has 3 or 5 operands"),
    };
    let (batch, seq) = (q.shape[0], q.shape[1]);
    let (hd, kvw, qw) = (a.head_dim, a.kv_heads * a.head_dim, a.heads * a.head_dim);
    let group = a.heads / a.kv_heads;
    // The reference multiplies by the Python float hd**-0.5, i.e. f64 rounded to f32.
    let scale = (hd as f64).powf(-0.5) as f32;
    slots.resize_with(batch, KvSlot::default);
    let mut out = Tensor::zeros(q.shape.clone());
    for (b, slot) in slots.iter_mut().enumerate() {
        let past = slot.k.len() / kvw;
        slot.k.extend_from_slice(&k.data[b * seq * kvw..(b + 1) * seq * kvw]);
        slot.v.extend_from_slice(&v.data[b * seq * kvw..(b + 1) * seq * kvw]);
        for t in 0..seq {
            let p = past + t;
            let qrow = &q.data[(b * seq + t) * qw..(b * seq + t + 1) * qw];
            for h in 0..a.heads {
                let kvh = h / group;
                let qh = &qrow[h * hd..(h + 1) * hd];
                let mut scores: Vec<f32> = (0..=p)
                    .map(|j| {
                        let kj = &slot.k[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                        let dot: f32 = qh.iter().zip(kj).map(|(x, y)| x * y).sum();
                        d.round(d.round(dot) * scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let dst = &mut out.data[(b * seq + t) * qw + h * hd..(b * seq + t) * qw + (h + 1) * hd];
                for (j, s) in scores.iter().enumerate() {
                    let pj = d.round(s / sum);
                    let vj = &slot.v[j * kvw + kvh * hd..j * kvw + (kvh + 1) * hd];
                    for (o, x) in dst.iter_mut().zip(vj) {
                        *o += pj * x;
                    }
                }
                dst.iter_mut().for_each(|o| *o = d.round(*o));
            }
        }
    }
    out
}
