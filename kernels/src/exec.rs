//! The reference executor: runs a [`Program`] on the host, in plain Rust
//! loops and f32, from the kernel specs alone. It is the executable meaning
//! of a Program (the Cranelift and PTX backends are checked against it) and
//! checks the lowering against the IR interpreter: it shares nothing with
//! the interpreter but public types and the exit-policy arithmetic
//! (`ouroc_ir::ExitPolicy`).
//!
//! It follows the Program's contract literally: one arena per call laid out
//! by the buffer plan (filled with NaN first, so reading a byte no kernel
//! wrote shows), activations stored at their planned offsets (a cell per
//! two bytes of the plan; values are kept in f32 whatever their dtype, the
//! kernels round at their rounding points), the carried values copied at
//! the end of each step, the exit policy applied per token as steps finish,
//! and a KV cache of one slot per (loop step, layer) that persists across
//! calls, so a prefill followed by decode calls equals one long prefill.

use crate::program::{ActRef, ActValue, Kernel, Operand, Program};
use crate::spec::{AttentionSpec, Family, NormWeight, RowReduceSpec, Trig};
use ouroc_ir::{DType, ExitPolicy, Tensor, WeightSource};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
pub struct ExecOptions {
    /// Round at the rounding points of each kernel (and weights to their
    /// dtype at load). Off: everything stays f32 whatever the dtypes say.
    pub round_low_precision: bool,
    /// In decode (one new token per sequence), stop the loop as soon as
    /// every token's exit step is decided, filling the KV slots of the steps
    /// not run with the last run step's K/V (what a runtime does for real
    /// early exit). Off, and always in prefill: every step runs.
    pub exit_skips: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            round_low_precision: true,
            exit_skips: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error("weight %{id}: {msg}")]
    Weight { id: u32, msg: String },
    #[error("input: {0}")]
    Input(String),
    #[error("program: {0}")]
    Program(String),
}

/// What one call computed.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    /// One tensor per program output, `[batch, seq, len]`.
    pub outputs: Vec<Tensor>,
    /// Per token (batch-major), the loop step its exit policy chose; empty
    /// without a loop.
    pub exit_steps: Vec<usize>,
    /// Loop steps run (fewer than the loop's steps only with `exit_skips`).
    pub steps_run: usize,
    /// Kernels launched.
    pub launches: usize,
}

/// One sequence's K and V rows in one slot.
#[derive(Clone, Default)]
struct SeqCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

pub struct Executor<'p> {
    p: &'p Program,
    opts: ExecOptions,
    policy: Option<ExitPolicy>,
    values: HashMap<u32, ActValue>,
    /// Resident weights after the load-time recipes ran.
    weights: HashMap<u32, Vec<f32>>,
    /// (loop step, layer) -> per-sequence cache.
    kv: HashMap<(usize, usize), Vec<SeqCache>>,
    past: usize,
    batch: Option<usize>,
}

/// The arena of one call: a cell per two bytes of the plan.
struct Frame {
    cells: Vec<f32>,
    tokens: usize,
    batch: usize,
    seq: usize,
}

impl<'p> Executor<'p> {
    /// Check the program, then load its weights: checkpoint tensors from
    /// `src`, then each recipe in table order; only resident weights are kept.
    pub fn new(p: &'p Program, src: &dyn WeightSource, opts: ExecOptions) -> Result<Self, ExecError> {
        p.check().map_err(ExecError::Program)?;
        if p.inputs.len() != 2 {
            return Err(ExecError::Program(format!(
                "a language-model program takes (ids, positions); this one has {} inputs",
                p.inputs.len()
            )));
        }
        let policy = p
            .loop_
            .as_ref()
            .map(|l| ExitPolicy::parse(&l.policy))
            .transpose()
            .map_err(ExecError::Program)?;
        let weights = p
            .materialise_weights(src, opts.round_low_precision)
            .map_err(|(id, msg)| ExecError::Weight { id, msg })?;
        Ok(Executor {
            p,
            opts,
            policy,
            values: p.arena.values.iter().map(|v| (v.id, v.clone())).collect(),
            weights,
            kv: HashMap::new(),
            past: 0,
            batch: None,
        })
    }

    /// Positions already in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forget the KV cache.
    pub fn reset(&mut self) {
        self.kv.clear();
        self.past = 0;
        self.batch = None;
    }

    /// Run on a batch of equally long token sequences; positions continue
    /// after the cache.
    pub fn run_tokens(&mut self, ids: &[Vec<u32>]) -> Result<ExecOutput, ExecError> {
        let p = self.p;
        let batch = ids.len();
        let seq = ids.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(ExecError::Input("no tokens given".into()));
        }
        if ids.iter().any(|s| s.len() != seq) {
            return Err(ExecError::Input(
                "all sequences of a batch must have the same length".into(),
            ));
        }
        if let Some(prev) = self.batch
            && prev != batch
        {
            return Err(ExecError::Input(format!(
                "batch size {batch} differs from the cached batch size {prev}"
            )));
        }
        for k in p.kernels() {
            if let Family::Gather(g) = &k.spec.family
                && let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= g.rows)
            {
                return Err(ExecError::Input(format!(
                    "token id {bad} is out of the vocabulary (0..{})",
                    g.rows
                )));
            }
        }
        let tokens = batch * seq;
        let cells = (p.arena.bytes_per_token as usize * tokens).div_ceil(2);
        let mut f = Frame {
            cells: vec![f32::NAN; cells],
            tokens,
            batch,
            seq,
        };
        let flat: Vec<f32> = ids.iter().flatten().map(|&t| t as f32).collect();
        let pos: Vec<f32> = (0..batch)
            .flat_map(|_| (0..seq).map(|s| (self.past + s) as f32))
            .collect();
        self.write(&mut f, p.inputs[0], &flat);
        self.write(&mut f, p.inputs[1], &pos);

        let mut launches = 0;
        for k in &p.before {
            self.launch(k, 0, &mut f)?;
            launches += 1;
        }
        let (mut exit_steps, mut steps_run) = (Vec::new(), 0);
        if let Some(l) = &p.loop_ {
            let policy = self.policy.expect("parsed with the loop");
            // Carried values get their initial values (a parallel copy).
            let inits: Vec<Vec<f32>> = l.carried.iter().map(|c| self.read(&f, &c.init)).collect();
            for (c, data) in l.carried.iter().zip(&inits) {
                self.write(&mut f, c.arg, data);
            }
            let result_dtype = self.values[&l.result].dtype;
            let width = l.out.len;
            let mut lambdas: Vec<Vec<f32>> = vec![Vec::new(); tokens];
            let mut decided: Vec<Option<usize>> = vec![None; tokens];
            // Weighted: the f32 expected output and each token's survival S_{r-1}.
            let mut acc = vec![0.0f32; tokens * width];
            let mut survive = vec![1.0f32; tokens];
            for r in 0..l.steps {
                for k in &l.body {
                    self.launch(k, r, &mut f)?;
                    launches += 1;
                }
                steps_run = r + 1;
                let out = self.read(&f, &l.out);
                let lam = match &l.exit {
                    Some(e) => self.read(&f, e),
                    None => vec![0.0; tokens],
                };
                for (t, ls) in lambdas.iter_mut().enumerate() {
                    ls.push(lam[t]);
                }
                let rows = out.chunks(width).enumerate();
                if let ExitPolicy::Weighted = policy {
                    for (t, row) in rows {
                        let pr = if r + 1 < l.steps {
                            let pr = lam[t] * survive[t];
                            survive[t] *= 1.0 - lam[t];
                            pr
                        } else {
                            survive[t]
                        };
                        for (a, x) in acc[t * width..(t + 1) * width].iter_mut().zip(row) {
                            *a += pr * x;
                        }
                    }
                } else {
                    for (t, row) in rows {
                        if decided[t].is_some() {
                            continue;
                        }
                        if let Some(s) = policy.decided_exit(&lambdas[t], l.steps) {
                            if s != r {
                                return Err(ExecError::Program(format!(
                                    "policy {policy} decided step {s} only at step {r}"
                                )));
                            }
                            self.write_row(&mut f, l.result, t, row);
                            decided[t] = Some(s);
                        }
                    }
                }
                if r + 1 == l.steps {
                    break;
                }
                let all_decided = lambdas.iter().all(|ls| policy.decided_exit(ls, l.steps).is_some());
                if self.opts.exit_skips && seq == 1 && all_decided {
                    self.fill_skipped_slots(l, r, seq);
                    break;
                }
                // End of step: every carried value gets its next (a parallel copy).
                let nexts: Vec<Vec<f32>> = l.carried.iter().map(|c| self.read(&f, &c.next)).collect();
                for (c, data) in l.carried.iter().zip(&nexts) {
                    self.write(&mut f, c.arg, data);
                }
            }
            if let ExitPolicy::Weighted = policy {
                let rd = if self.opts.round_low_precision {
                    result_dtype
                } else {
                    DType::F32
                };
                let data: Vec<f32> = acc.iter().map(|&x| rd.round(x)).collect();
                self.write(&mut f, l.result, &data);
            }
            exit_steps = lambdas
                .iter()
                .zip(&decided)
                .map(|(ls, d)| d.unwrap_or_else(|| policy.exit_step(ls)))
                .collect();
        }
        for k in &p.after {
            self.launch(k, 0, &mut f)?;
            launches += 1;
        }
        let outputs = p
            .outputs
            .iter()
            .map(|o| Tensor::new(vec![batch, seq, o.len], self.read(&f, o)))
            .collect();
        self.past += seq;
        self.batch = Some(batch);
        Ok(ExecOutput {
            outputs,
            exit_steps,
            steps_run,
            launches,
        })
    }

    /// After stopping at step `last`, append step `last`'s K/V rows of the
    /// new positions to the slots of every later step.
    fn fill_skipped_slots(&mut self, l: &crate::program::LoopSpec, last: usize, seq: usize) {
        for k in &l.body {
            let Family::Attention(a) = &k.spec.family else { continue };
            let kvw = a.kv_heads * a.head_dim;
            let src = self.kv.get(&(last, a.layer)).cloned().unwrap_or_default();
            for s in last + 1..l.steps {
                let dst = self.kv.entry((s, a.layer)).or_default();
                dst.resize_with(src.len(), SeqCache::default);
                for (d, from) in dst.iter_mut().zip(&src) {
                    let tail = from.k.len() - seq * kvw;
                    d.k.extend_from_slice(&from.k[tail..]);
                    d.v.extend_from_slice(&from.v[tail..]);
                }
            }
        }
    }

    /// Cell of element `e` of row `t` of value `v`.
    fn cell(&self, f: &Frame, v: &ActValue, t: usize, e: usize) -> usize {
        let size = v.dtype.size_bytes();
        (v.offset as usize * f.tokens + (t * v.width + e) * size) / 2
    }

    /// Every row of an operand: `tokens * len` elements.
    fn read(&self, f: &Frame, r: &ActRef) -> Vec<f32> {
        let v = &self.values[&r.value];
        let mut out = Vec::with_capacity(f.tokens * r.len);
        for t in 0..f.tokens {
            out.extend((0..r.len).map(|j| f.cells[self.cell(f, v, t, r.col + j)]));
        }
        out
    }

    /// Write a whole value (`tokens * width` elements).
    fn write(&self, f: &mut Frame, value: u32, data: &[f32]) {
        let v = &self.values[&value];
        debug_assert_eq!(data.len(), f.tokens * v.width);
        for (t, row) in data.chunks(v.width.max(1)).enumerate() {
            self.write_row(f, value, t, row);
        }
    }

    fn write_row(&self, f: &mut Frame, value: u32, t: usize, row: &[f32]) {
        let v = &self.values[&value];
        for (j, &x) in row.iter().enumerate() {
            let c = self.cell(f, v, t, j);
            f.cells[c] = x;
        }
    }

    /// Bytes of value `v` in a call of `tokens` tokens.
    fn extent(&self, v: &ActValue, tokens: usize) -> std::ops::Range<usize> {
        let start = v.offset as usize * tokens;
        start..start + tokens * v.width * v.dtype.size_bytes()
    }

    /// The aliasing rule of the contract: a result may share memory with an
    /// operand (or another result) only as the same rows (same offset and
    /// row size), never across rows; a kernel that processes rows in any
    /// order (threads) stays correct.
    fn check_aliasing(&self, k: &Kernel, tokens: usize) -> Result<(), ExecError> {
        let operands = k.inputs.iter().filter_map(|o| match o {
            Operand::Act(r) => Some(r.value),
            Operand::Weight(_) => None,
        });
        for (i, &o) in k.outputs.iter().enumerate() {
            let out = &self.values[&o];
            for other in operands.clone().chain(k.outputs[..i].iter().copied()) {
                let x = &self.values[&other];
                let (a, b) = (self.extent(out, tokens), self.extent(x, tokens));
                let overlap = a.start < b.end && b.start < a.end;
                let same_rows = out.offset == x.offset && a.len() == b.len();
                let is_output = k.outputs[..i].contains(&other);
                if overlap && (!same_rows || is_output) {
                    return Err(ExecError::Program(format!(
                        "kernel {}: result %{o} overlaps %{other} other than row for row",
                        k.spec.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Run one kernel: read its operands, compute, write its results.
    fn launch(&mut self, k: &Kernel, step: usize, f: &mut Frame) -> Result<(), ExecError> {
        self.check_aliasing(k, f.tokens)?;
        let d = if self.opts.round_low_precision {
            k.spec.act
        } else {
            DType::F32
        };
        let rd = |x: f32| d.round(x);
        let acts: Vec<Vec<f32>> = k
            .inputs
            .iter()
            .map(|o| match o {
                Operand::Act(r) => self.read(f, r),
                Operand::Weight(_) => Vec::new(),
            })
            .collect();
        let weights = &self.weights;
        let input = |i: usize| -> &[f32] {
            match &k.inputs[i] {
                Operand::Act(_) => &acts[i],
                Operand::Weight(w) => &weights[w],
            }
        };
        let t = f.tokens;
        let results: Vec<Vec<f32>> = match &k.spec.family {
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
            Family::RowReduce(r) => row_reduce(r, &input, t, &rd),
            Family::Rope(r) => vec![rope(input(0), input(1), input(2), r.heads, r.head_dim, &rd)],
            Family::Attention(a) => {
                let slots = self.kv.entry((step, a.layer)).or_default();
                let ins: Vec<&[f32]> = (0..k.inputs.len()).map(|i| &acts[i][..]).collect();
                vec![attention(a, &ins, slots, f.batch, f.seq, &rd)]
            }
            Family::Elementwise(e) => {
                let xs: Vec<&[f32]> = (0..e.inputs).map(input).collect();
                let mut out = Vec::with_capacity(t * e.width);
                let mut el = vec![0.0; e.inputs];
                for i in 0..t * e.width {
                    for (x, src) in el.iter_mut().zip(&xs) {
                        *x = src[i];
                    }
                    out.push(e.expr.eval(&el, &rd));
                }
                vec![out]
            }
        };
        for (&o, data) in k.outputs.iter().zip(&results) {
            if data.len() != t * self.values[&o].width {
                return Err(ExecError::Program(format!(
                    "kernel {} computed {} elements for %{o}",
                    k.spec.name,
                    data.len()
                )));
            }
            self.write(f, o, data);
        }
        Ok(())
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

/// Causal attention of `batch x seq` new tokens over their sequences'
/// slots, appending the new K/V rows first.
fn attention(
    a: &AttentionSpec,
    ins: &[&[f32]],
    slots: &mut Vec<SeqCache>,
    batch: usize,
    seq: usize,
    rd: &dyn Fn(f32) -> f32,
) -> Vec<f32> {
    slots.resize_with(batch, SeqCache::default);
    let mut out = Vec::with_capacity(batch * seq * a.heads * a.head_dim);
    for (b, slot) in slots.iter_mut().enumerate() {
        // Sequence b's rows of every operand (each operand has `seq` rows per sequence).
        let rows: Vec<&[f32]> = ins
            .iter()
            .map(|x| {
                let w = x.len() / (batch * seq);
                &x[b * seq * w..(b + 1) * seq * w]
            })
            .collect();
        out.extend(attention_seq(a, &rows, &mut slot.k, &mut slot.v, seq, rd));
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
