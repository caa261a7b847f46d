//! The reference interpreter: the executable meaning of the IR.
//!
//! It computes in f32 and rounds every value whose type is bf16 or f16 to
//! that type when it is produced, plus the rounding points inside ops that
//! the reference has (documented on each op in `ops.rs`), so a graph built
//! with bf16 activations reproduces the bf16 reference and one built with
//! f32 reproduces the f32 reference. It is deliberately simple: plain loops,
//! no blocking, no threads.
//!
//! A KV cache persists across `run` calls: slot (loop step, attention
//! layer) holds the keys and values of every position seen so far, so
//! prefill followed by one-token decode steps equals one long prefill.

mod ops;

use crate::graph::{Block, Graph, Loop, Op, OpKind, Terminator, ValueId};
use crate::policy::{ExitPolicy, exit_distribution};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, Type};
use std::collections::HashMap;

/// Where weights come from: a checkpoint, or a test's own values.
pub trait WeightSource {
    /// The tensor `name` as f32, row-major, `numel` elements expected.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, String>;
}

impl WeightSource for HashMap<String, Vec<f32>> {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, String> {
        self.get(name).cloned().ok_or_else(|| format!("no weight named {name}"))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("weight \"{name}\": {msg}")]
    Weight { name: String, msg: String },
    #[error("input: {0}")]
    Input(String),
    #[error("{value}: {msg}")]
    Shape { value: ValueId, msg: String },
    #[error("context length exceeded: {past} cached + {new} new positions > the limit of {limit}")]
    Context { past: usize, new: usize, limit: usize },
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Round bf16/f16-typed values (and inside ops where the reference
    /// rounds). Off: everything stays f32 whatever the types say.
    pub round_low_precision: bool,
    /// Largest total number of positions (past + new); None = unlimited.
    pub max_positions: Option<usize>,
    /// In decode (seq = 1), stop a loop as soon as every token's exit step is
    /// decided (real early exit, as a runtime does). The KV slots of the
    /// steps not run get the last run step's K/V. Off, and always in
    /// prefill: every step runs for every token and the policy selects
    /// afterwards, as the reference does.
    pub exit_skips: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            round_low_precision: true,
            max_positions: None,
            exit_skips: false,
        }
    }
}

/// What the loop did during one `run`: per step, its output and exit signal,
/// and per token the exit step the policy chose.
#[derive(Clone, Debug, Default)]
pub struct LoopTrace {
    /// One tensor per step run of the body's `out` value, e.g. `[batch, seq, H]`
    /// (fewer than the loop's steps only with `Options::exit_skips`).
    pub step_outputs: Vec<Tensor>,
    /// One tensor per step run of the exit signal, `[batch, seq, 1]`.
    pub exit_signals: Vec<Tensor>,
    /// Per token (batch-major), the step chosen by the policy.
    pub exit_step: Vec<usize>,
}

pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    /// Present when the graph has a loop.
    pub trace: Option<LoopTrace>,
}

/// K and V rows of every cached position for one slot and one sequence.
#[derive(Clone, Default)]
struct KvSlot {
    k: Vec<f32>,
    v: Vec<f32>,
}

pub struct Interpreter<'g> {
    graph: &'g Graph,
    opts: Options,
    weights: HashMap<ValueId, Tensor>,
    /// (loop step, layer) -> per-sequence cache.
    cache: HashMap<(usize, usize), Vec<KvSlot>>,
    past: usize,
    batch: Option<usize>,
}

/// Values computed so far in one run; `step` is the enclosing loop step.
struct Frame {
    vals: HashMap<ValueId, Tensor>,
    syms: HashMap<String, usize>,
}

impl<'g> Interpreter<'g> {
    /// Load every weight the graph names (rounded to its declared dtype).
    pub fn new(graph: &'g Graph, source: &dyn WeightSource, opts: Options) -> Result<Self, InterpError> {
        let mut weights = HashMap::new();
        for op in graph.walk() {
            if let OpKind::Weight { name } = &op.kind {
                let ty = graph.ty(op.result());
                let dims = ty.fixed_dims().ok_or_else(|| InterpError::Weight {
                    name: name.clone(),
                    msg: format!("type {ty} has symbolic dims"),
                })?;
                let mut data = source.read_f32(name).map_err(|msg| InterpError::Weight {
                    name: name.clone(),
                    msg,
                })?;
                let n: usize = dims.iter().product();
                if data.len() != n {
                    return Err(InterpError::Weight {
                        name: name.clone(),
                        msg: format!("has {} elements, its type {ty} needs {n}", data.len()),
                    });
                }
                if opts.round_low_precision {
                    data.iter_mut().for_each(|x| *x = ty.dtype.round(*x));
                }
                weights.insert(op.result(), Tensor::new(dims, data));
            }
        }
        Ok(Interpreter {
            graph,
            opts,
            weights,
            cache: HashMap::new(),
            past: 0,
            batch: None,
        })
    }

    /// Number of positions already in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forget the KV cache (start a new sequence).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.past = 0;
        self.batch = None;
    }

    /// Run a language-model graph whose inputs are `(ids, pos)` on a batch of
    /// equally long token sequences; positions continue after the cache.
    pub fn run_tokens(&mut self, ids: &[Vec<u32>]) -> Result<RunOutput, InterpError> {
        let batch = ids.len();
        let seq = ids.first().map_or(0, Vec::len);
        if batch == 0 || seq == 0 {
            return Err(InterpError::Input("no tokens given (empty prompt)".into()));
        }
        if ids.iter().any(|s| s.len() != seq) {
            return Err(InterpError::Input(
                "all sequences of a batch must have the same length".into(),
            ));
        }
        let flat: Vec<f32> = ids.iter().flatten().map(|&t| t as f32).collect();
        let pos: Vec<f32> = (0..batch)
            .flat_map(|_| (0..seq).map(|i| (self.past + i) as f32))
            .collect();
        self.run(&[Tensor::new(vec![batch, seq], flat), Tensor::new(vec![batch, seq], pos)])
    }

    /// Run the graph on explicit inputs (one tensor per graph input).
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<RunOutput, InterpError> {
        let g = self.graph;
        if inputs.len() != g.inputs().len() {
            return Err(InterpError::Input(format!(
                "graph takes {} inputs, got {}",
                g.inputs().len(),
                inputs.len()
            )));
        }
        let mut frame = Frame {
            vals: HashMap::new(),
            syms: HashMap::new(),
        };
        for (&arg, t) in g.inputs().iter().zip(inputs) {
            bind(&mut frame.syms, arg, g.ty(arg), &t.shape)?;
            frame.vals.insert(arg, t.clone());
        }
        let seq = frame.syms.get("seq").copied().unwrap_or(0);
        let batch = frame.syms.get("batch").copied();
        if let (Some(b), Some(prev)) = (batch, self.batch)
            && b != prev
        {
            return Err(InterpError::Input(format!(
                "batch size {b} differs from the cached batch size {prev}"
            )));
        }
        if let Some(limit) = self.opts.max_positions
            && self.past + seq > limit
        {
            return Err(InterpError::Context {
                past: self.past,
                new: seq,
                limit,
            });
        }
        // Token ids are checked against the embedding table before anything runs.
        for op in g.walk() {
            if let OpKind::Embedding = op.kind {
                let vocab = g.ty(op.inputs[0]).shape[0].fixed().unwrap_or(usize::MAX);
                if let Some(ids) = frame.vals.get(&op.inputs[1])
                    && let Some(bad) = ids.data.iter().find(|&&t| t < 0.0 || t as usize >= vocab)
                {
                    return Err(InterpError::Input(format!(
                        "token id {bad} is out of the vocabulary (0..{vocab})"
                    )));
                }
            }
        }
        let mut trace = None;
        self.block(&g.body, &mut frame, 0, &mut trace)?;
        self.past += seq;
        self.batch = batch;
        let outputs = g.outputs().iter().map(|v| frame.vals[v].clone()).collect();
        Ok(RunOutput { outputs, trace })
    }

    fn block(
        &mut self,
        b: &Block,
        f: &mut Frame,
        step: usize,
        trace: &mut Option<LoopTrace>,
    ) -> Result<(), InterpError> {
        let g = self.graph;
        for op in &b.ops {
            let outs: Vec<Tensor> = match &op.kind {
                OpKind::Weight { .. } => vec![self.weights[&op.result()].clone()],
                OpKind::Loop(l) => vec![self.run_loop(op, l, f, trace)?],
                OpKind::ExitSelect { policy } => {
                    let n = op.inputs.len() / 2;
                    let outs: Vec<Tensor> = op.inputs[..n].iter().map(|v| f.vals[v].clone()).collect();
                    let exits: Vec<Tensor> = op.inputs[n..].iter().map(|v| f.vals[v].clone()).collect();
                    let (result, exit_step) = select(policy, &outs, &exits, self.rd(g.ty(op.result()).dtype));
                    *trace = Some(LoopTrace {
                        step_outputs: outs,
                        exit_signals: exits,
                        exit_step,
                    });
                    vec![result]
                }
                kind => {
                    let ins: Vec<&Tensor> = op.inputs.iter().map(|v| &f.vals[v]).collect();
                    let dtype = self.rd(g.ty(op.result()).dtype);
                    match kind {
                        OpKind::Attention(a) => {
                            let slots = self.cache.entry((step, a.layer)).or_default();
                            vec![ops::attention(a, &ins, slots, dtype)]
                        }
                        _ => ops::eval(kind, &ins, dtype),
                    }
                }
            };
            for (&r, out) in op.results.iter().zip(outs) {
                bind(&mut f.syms, r, g.ty(r), &out.shape)?;
                f.vals.insert(r, out);
            }
        }
        Ok(())
    }

    /// Run a loop: every step for every token, as the reference does, unless
    /// `Options::exit_skips` lets it stop once every token's exit is decided.
    fn run_loop(
        &mut self,
        op: &Op,
        l: &Loop,
        f: &mut Frame,
        trace: &mut Option<LoopTrace>,
    ) -> Result<Tensor, InterpError> {
        let mut carried: Vec<Tensor> = op.inputs.iter().map(|v| f.vals[v].clone()).collect();
        let (mut outs, mut exits) = (Vec::new(), Vec::new());
        for s in 0..l.steps {
            f.vals.insert(l.body.args[0], Tensor::new(vec![], vec![s as f32]));
            for (a, c) in l.body.args[1..].iter().zip(carried.drain(..)) {
                f.vals.insert(*a, c);
            }
            self.block(&l.body, f, s, trace)?;
            let Terminator::Yield { next, out, exit } = &l.body.term else {
                unreachable!("verified: a loop body ends in yield")
            };
            carried = next.iter().map(|v| f.vals[v].clone()).collect();
            outs.push(f.vals[out].clone());
            if let Some(exit) = exit {
                exits.push(f.vals[exit].clone());
            }
            // Only in decode (one new position per sequence): prefill fills every
            // step's KV slots for real, as the reference (and the paper) do.
            let decoding = f.syms.get("seq") == Some(&1);
            if self.opts.exit_skips && decoding && s + 1 < l.steps && all_decided(&l.policy, &outs, &exits, l.steps) {
                self.fill_skipped_slots(&l.body, s, l.steps, outs[0].shape[1]);
                break;
            }
        }
        let (result, exit_step) = select(&l.policy, &outs, &exits, self.rd(self.graph.ty(op.result()).dtype));
        *trace = Some(LoopTrace {
            step_outputs: outs,
            exit_signals: exits,
            exit_step,
        });
        Ok(result)
    }

    /// After stopping at step `last`, the slots of the steps not run still
    /// need these positions' K/V for later tokens: copy step `last`'s rows
    /// forward (for a single decoded token that is its exit step's K/V).
    fn fill_skipped_slots(&mut self, body: &Block, last: usize, steps: usize, seq: usize) {
        let layers: Vec<usize> = body
            .ops
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Attention(a) => Some(a.layer),
                _ => None,
            })
            .collect();
        for layer in layers {
            let src = self.cache.get(&(last, layer)).cloned().unwrap_or_default();
            for s in last + 1..steps {
                let dst = self.cache.entry((s, layer)).or_default();
                dst.resize_with(src.len(), KvSlot::default);
                for (d, from) in dst.iter_mut().zip(&src) {
                    let row = from.k.len() / (self.past + seq).max(1);
                    let tail = from.k.len() - seq * row;
                    d.k.extend_from_slice(&from.k[tail..]);
                    d.v.extend_from_slice(&from.v[tail..]);
                }
            }
        }
    }

    fn rd(&self, dtype: DType) -> DType {
        if self.opts.round_low_precision {
            dtype
        } else {
            DType::F32
        }
    }
}

/// Check a runtime shape against a declared type, binding symbolic dims.
fn bind(syms: &mut HashMap<String, usize>, v: ValueId, ty: &Type, shape: &[usize]) -> Result<(), InterpError> {
    let bad = || InterpError::Shape {
        value: v,
        msg: format!("has shape {shape:?} but its type is {ty}"),
    };
    if ty.shape.len() != shape.len() {
        return Err(bad());
    }
    for (d, &n) in ty.shape.iter().zip(shape) {
        match d {
            Dim::Fixed(m) if *m != n => return Err(bad()),
            Dim::Fixed(_) => {}
            Dim::Sym(s) => {
                if *syms.entry(s.clone()).or_insert(n) != n {
                    return Err(bad());
                }
            }
        }
    }
    Ok(())
}

/// Token `t`'s exit signals over the steps run; zeros when the body yields
/// none (then the policy is `last` or `step:K`, which do not read them).
fn lambdas_of(exits: &[Tensor], steps_run: usize, t: usize) -> Vec<f32> {
    if exits.is_empty() {
        vec![0.0; steps_run]
    } else {
        exits.iter().map(|e| e.data[t]).collect()
    }
}

/// Whether every token's exit step is decided by the exit signals so far.
fn all_decided(policy: &ExitPolicy, outs: &[Tensor], exits: &[Tensor], steps: usize) -> bool {
    let tokens = outs[0].numel() / outs[0].row_len().max(1);
    (0..tokens).all(|t| policy.decided_exit(&lambdas_of(exits, outs.len(), t), steps).is_some())
}

/// Apply the exit policy per token. Every step ran for every token (as in
/// the reference); the policy picks or mixes their outputs.
fn select(policy: &ExitPolicy, outs: &[Tensor], exits: &[Tensor], dtype: DType) -> (Tensor, Vec<usize>) {
    let tokens = outs[0].numel() / outs[0].row_len().max(1);
    let width = outs[0].row_len();
    let mut result = Tensor::zeros(outs[0].shape.clone());
    let mut steps = Vec::with_capacity(tokens);
    for t in 0..tokens {
        let lambdas = lambdas_of(exits, outs.len(), t);
        let row = t * width..(t + 1) * width;
        let dst = &mut result.data[row.clone()];
        if let ExitPolicy::Weighted = policy {
            // Expected output: sum_r p_r * out_r with the exact (f32) distribution.
            let p = exit_distribution(&lambdas, DType::F32);
            for (pr, o) in p.iter().zip(outs) {
                for (d, x) in dst.iter_mut().zip(&o.data[row.clone()]) {
                    *d += pr * x;
                }
            }
            dst.iter_mut().for_each(|d| *d = dtype.round(*d));
        } else {
            let s = policy.exit_step(&lambdas);
            dst.copy_from_slice(&outs[s].data[row]);
        }
        steps.push(policy.exit_step(&lambdas));
    }
    (result, steps)
}
