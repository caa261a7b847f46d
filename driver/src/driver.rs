//! [`Driver`]: a Program run on a [`Device`]: the call (inputs, arena, KV
//! stores), the kernels in order, the loop with its exit policy per token,
//! early exit in decode, and the trace. The contract is the crate docs'.

use crate::check;
use crate::device::{CallShape, Device, DeviceError, KvArg, KvLayout, Span};
use crate::kv::{KvCache, KvMode};
use crate::trace::Trace;
use crate::weights::ResidentWeights;
use ouroc_ir::{DType, ExitPolicy, WeightSource};
use ouroc_kernels::spec::Family;
use ouroc_kernels::{ActRef, ActValue, Kernel, LoopSpec, Program};
use std::collections::HashMap;
use std::ops::Range;

/// K and V rows of a KV store, position-major, as f32.
pub type KvValues = (Vec<f32>, Vec<f32>);

/// How a [`Driver`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverOptions {
    /// The context length (prompt + generated positions) accepted.
    pub max_positions: usize,
    /// In decode (one new token per sequence), stop the loop once every
    /// token's exit is decided; the skipped steps' KV slots get the exit
    /// step's rows. Off, and always in prefill: every step runs.
    pub early_exit: bool,
    /// KV-cache sharing in decode.
    pub kv: KvMode,
}

impl DriverOptions {
    /// `max_positions` positions, no early exit, [`KvMode::Full`].
    pub fn new(max_positions: usize) -> DriverOptions {
        DriverOptions {
            max_positions,
            early_exit: false,
            kv: KvMode::Full,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// A bad call (no tokens, out of the vocabulary, beyond the context).
    #[error("{0}")]
    Input(String),
    /// The Program cannot run (invalid, or not on this device).
    #[error("program: {0}")]
    Program(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// What one forward call returns to a generation loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Logits of the last position, `[vocab]`.
    pub logits: Vec<f32>,
    /// The exit depth (exit step + 1) the policy chose at the last position.
    pub depth: usize,
    /// Loop steps actually run (less than the loop's steps when a decode
    /// token exited early and its later steps were skipped).
    pub steps_run: usize,
}

/// What [`Driver::call`] reads back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// Every position of every output (else the last position of output 0).
    pub all_positions: bool,
    /// Each step's `out` rows and lambdas ([`Trace`]).
    pub trace: bool,
}

/// What one call computed.
#[derive(Clone, Debug, PartialEq)]
pub struct CallOutput {
    /// Per Program output: every position's rows (token-major, sequence
    /// after sequence), or only output 0's last row.
    pub outputs: Vec<Vec<f32>>,
    /// Per token, the loop step its policy chose (0 without a loop).
    pub exit_steps: Vec<usize>,
    /// Loop steps run (1 without a loop).
    pub steps_run: usize,
    /// Kernels launched by this call.
    pub launches: usize,
    pub trace: Option<Trace>,
    /// Per token, its loop state after the last step run, when the call's
    /// [`Plan`] asked for it (speculation's drafts).
    pub states: Vec<LoopState>,
}

impl CallOutput {
    /// The [`Step`] of the last position.
    pub fn step(&self, vocab: usize) -> Step {
        let o = &self.outputs[0];
        Step {
            logits: o[o.len() - vocab..].to_vec(),
            depth: self.exit_steps.last().map_or(1, |s| s + 1),
            steps_run: self.steps_run,
        }
    }
}

/// A Program kernel bound on the device.
pub(crate) struct Launch<B> {
    pub(crate) bound: B,
    /// Attention: its layer.
    pub(crate) layer: Option<usize>,
}

/// A Program run on a device (see the crate docs).
pub struct Driver<D: Device> {
    // Dropped before the weights it may point into.
    pub(crate) dev: D,
    pub(crate) weights: ResidentWeights,
    pub(crate) program: Program,
    pub(crate) values: HashMap<u32, ActValue>,
    pub(crate) policy: Option<ExitPolicy>,
    pub(crate) opts: DriverOptions,
    pub(crate) before: Vec<Launch<D::Bound>>,
    pub(crate) body: Vec<Launch<D::Bound>>,
    pub(crate) after: Vec<Launch<D::Bound>>,
    /// Smallest gather table (token ids must be below it).
    pub(crate) vocab: Option<usize>,
    pub(crate) kv: KvCache,
    /// Positions in the cache (every sequence has the same).
    pub(crate) past: usize,
    /// Tokens of the last call (rows still in the arena).
    pub(crate) last_tokens: usize,
    /// Kernels launched so far, one per Program kernel run.
    pub launches: usize,
}

impl<D: Device> Driver<D> {
    /// Materialise and encode `program`'s weights from `src`, then as
    /// [`Driver::new`].
    pub fn from_source(
        program: Program,
        src: &dyn WeightSource,
        dev: D,
        opts: DriverOptions,
    ) -> Result<Driver<D>, DriverError> {
        check::runnable(&program).map_err(DriverError::Program)?;
        let weights = ResidentWeights::encode(&program, src, dev.rounds()).map_err(DriverError::Program)?;
        Driver::new(program, weights, dev, opts)
    }

    /// Check `program`, load it with its encoded `weights` on `dev` and
    /// bind every kernel.
    pub fn new(
        program: Program,
        weights: ResidentWeights,
        mut dev: D,
        opts: DriverOptions,
    ) -> Result<Driver<D>, DriverError> {
        let policy = check::runnable(&program).map_err(DriverError::Program)?;
        if opts.max_positions == 0 {
            return Err(DriverError::Input("max_positions must be at least 1".into()));
        }
        dev.load(&program, &weights)?;
        let mut bind = |ks: &[Kernel]| -> Result<Vec<Launch<D::Bound>>, DeviceError> {
            ks.iter()
                .map(|k| {
                    Ok(Launch {
                        bound: dev.bind(k)?,
                        layer: match &k.spec.family {
                            Family::Attention(a) => Some(a.layer),
                            _ => None,
                        },
                    })
                })
                .collect()
        };
        let before = bind(&program.before)?;
        let body = match &program.loop_ {
            Some(l) => bind(&l.body)?,
            None => Vec::new(),
        };
        let after = bind(&program.after)?;
        let layouts = |ks: &[Kernel]| -> Vec<(usize, KvLayout)> {
            ks.iter()
                .filter_map(|k| match &k.spec.family {
                    Family::Attention(a) => Some((
                        a.layer,
                        KvLayout {
                            kv_heads: a.kv_heads,
                            head_dim: a.head_dim,
                            dtype: k.spec.act,
                        },
                    )),
                    _ => None,
                })
                .collect()
        };
        let outer = [layouts(&program.before), layouts(&program.after)].concat();
        let inner = program.loop_.as_ref().map(|l| layouts(&l.body)).unwrap_or_default();
        let steps = program.loop_.as_ref().map_or(1, |l| l.steps);
        let mut kv = KvCache::new(opts.kv, steps, outer, inner);
        kv.open(&mut dev, 1)?;
        let vocab = program
            .kernels()
            .filter_map(|k| match &k.spec.family {
                Family::Gather(g) => Some(g.rows),
                _ => None,
            })
            .min();
        Ok(Driver {
            dev,
            weights,
            values: program.arena.values.iter().map(|v| (v.id, v.clone())).collect(),
            program,
            policy,
            opts,
            before,
            body,
            after,
            vocab,
            kv,
            past: 0,
            last_tokens: 0,
            launches: 0,
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn weights(&self) -> &ResidentWeights {
        &self.weights
    }

    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }

    /// The loop's number of steps R (1 without a loop).
    pub fn loop_steps(&self) -> usize {
        self.program.loop_.as_ref().map_or(1, |l| l.steps)
    }

    /// Positions in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Tokens of the last call (0 before the first).
    pub fn last_tokens(&self) -> usize {
        self.last_tokens
    }

    /// Sequences the KV cache holds.
    pub fn kv_batch(&self) -> usize {
        self.kv.batch()
    }

    /// The exit step the policy has decided after gates `lambdas`, if any.
    pub fn policy_decided(&self, lambdas: &[f32]) -> Option<usize> {
        let p = self.policy?;
        (!matches!(p, ExitPolicy::Weighted)).then(|| p.decided_exit(lambdas, self.loop_steps()))?
    }

    /// A draft or verification from step `from` can run.
    pub(crate) fn check_speculation(&self, from: usize) -> Result<(), DriverError> {
        if let Some(why) = crate::Speculate::speculation_refused(self) {
            return Err(DriverError::Input(why));
        }
        if from == 0 || from >= self.loop_steps() {
            return Err(DriverError::Input(format!(
                "a draft runs 1 to {} of the loop's {} steps, not {from}",
                self.loop_steps() - 1,
                self.loop_steps()
            )));
        }
        Ok(())
    }

    /// Keep the first `positions` positions of every KV slot (speculation's
    /// rollback of rejected tokens: later rows are overwritten by the next
    /// call).
    pub(crate) fn truncate(&mut self, positions: usize) -> Result<(), DriverError> {
        if positions > self.past {
            return Err(DriverError::Input(format!(
                "cannot keep {positions} positions: the cache holds {}",
                self.past
            )));
        }
        self.kv.truncate(positions);
        self.past = positions;
        Ok(())
    }

    /// The later steps' KV rows at `position` become step `exit`'s (what
    /// early exit leaves there in decode).
    pub(crate) fn fill_position(&mut self, position: usize, exit: usize) -> Result<(), DriverError> {
        if position >= self.past || exit >= self.loop_steps() {
            return Err(DriverError::Input(format!(
                "no position {position} of {} or step {exit} of {} to fill from",
                self.past,
                self.loop_steps()
            )));
        }
        Ok(self.kv.fill_position(&mut self.dev, position, exit)?)
    }

    /// The KV-cache sharing mode.
    pub fn kv_mode(&self) -> KvMode {
        self.kv.mode
    }

    /// Forget the KV cache (under `last` / `mean` the next call is prefill
    /// again, with one store per (step, layer)).
    pub fn reset(&mut self) -> Result<(), DriverError> {
        self.kv.reset(&mut self.dev)?;
        self.past = 0;
        self.last_tokens = 0;
        Ok(())
    }

    /// Bytes of KV cache in use: the K and V rows of the positions stored,
    /// over every store.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Bytes of KV cache the device has allocated.
    pub fn kv_reserved_bytes(&self) -> usize {
        self.kv.reserved(&self.dev)
    }

    /// The K and V rows (position-major, f32) that step `step`'s attention
    /// of `layer` reads for the past positions of sequence 0: its own slot,
    /// or the layer's shared store once decode shares one. None if there is
    /// no such slot.
    pub fn kv_rows(&mut self, step: usize, layer: usize) -> Result<Option<KvValues>, DriverError> {
        let Some((store, len, _)) = self.kv.lookup(0, step, layer) else {
            return Ok(None);
        };
        Ok(Some(self.dev.kv_read(store, 0..len)?))
    }

    /// Replace those rows (for experiments on the cache: tests replace slots
    /// to check the sharing modes against `full`).
    pub fn set_kv_rows(&mut self, step: usize, layer: usize, k: &[f32], v: &[f32]) -> Result<(), DriverError> {
        let (store, len, layout) = self
            .kv
            .lookup(0, step, layer)
            .ok_or_else(|| DriverError::Input(format!("no KV slot of step {step}, layer {layer}")))?;
        if k.len() != len * layout.row_elems() || v.len() != k.len() {
            return Err(DriverError::Input(format!(
                "KV rows of step {step}, layer {layer}: {len} positions of {} elements expected",
                layout.row_elems()
            )));
        }
        Ok(self.dev.kv_write(store, 0, k, v)?)
    }

    /// The rows of `r` in the arena for tokens `t0..t0 + n` of a call of `tokens`.
    pub fn span(&self, r: &ActRef, tokens: usize, t0: usize, n: usize) -> Span {
        let v = &self.values[&r.value];
        let size = v.dtype.size_bytes();
        Span {
            byte: v.offset as usize * tokens + (t0 * v.width + r.col) * size,
            stride: v.width * size,
            rows: n,
            len: r.len,
            dtype: v.dtype,
        }
    }

    /// The last position's logits row of the last call (still in the arena).
    pub fn last_logits_span(&self) -> Option<Span> {
        let t = self.last_tokens;
        (t > 0).then(|| self.span(&self.program.outputs[0], t, t - 1, 1))
    }

    /// Run `ids` after the cache: the last position's logits, its exit depth
    /// and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, DriverError> {
        let vocab = self.program.outputs[0].len;
        Ok(self.call(&[ids], Want::default())?.step(vocab))
    }

    /// Run `ids` without reading anything back but the exit steps (a
    /// device then picks the next token itself, e.g. an argmax on a GPU).
    pub fn run_quiet(&mut self, ids: &[u32]) -> Result<CallOutput, DriverError> {
        self.call_inner(
            &[ids],
            Want::default(),
            false,
            &Plan::whole(self.past, self.opts.early_exit),
        )
    }

    /// [`Driver::run`], also returning every position's logits, each step's
    /// outputs and lambdas, and the exit steps.
    pub fn run_traced(&mut self, ids: &[u32]) -> Result<(Step, Trace), DriverError> {
        let out = self.call(
            &[ids],
            Want {
                all_positions: true,
                trace: true,
            },
        )?;
        let vocab = self.program.outputs[0].len;
        let step = out.step(vocab);
        let mut trace = out.trace.expect("asked for");
        trace.logits = out.outputs.into_iter().next().expect("an output");
        trace.exit_steps = out.exit_steps;
        Ok((step, trace))
    }

    /// One call: `batch` sequences of equally many new tokens each, after
    /// the cache.
    pub fn call(&mut self, batch: &[&[u32]], want: Want) -> Result<CallOutput, DriverError> {
        self.call_inner(batch, want, true, &Plan::whole(self.past, self.opts.early_exit))
    }

    fn validate(&mut self, batch: &[&[u32]], pos0: usize) -> Result<(usize, usize), DriverError> {
        let seq = batch.first().map_or(0, |s| s.len());
        if batch.is_empty() || seq == 0 {
            return Err(DriverError::Input("no tokens given".into()));
        }
        if batch.iter().any(|s| s.len() != seq) {
            return Err(DriverError::Input(
                "all sequences of a batch must have the same length".into(),
            ));
        }
        if batch.len() > self.dev.max_batch() {
            return Err(DriverError::Input(format!(
                "{} sequences in one call; the {} device runs at most {}",
                batch.len(),
                self.dev.name(),
                self.dev.max_batch()
            )));
        }
        if pos0 + seq > self.opts.max_positions {
            return Err(DriverError::Input(format!(
                "{} positions exceed the context of {}",
                pos0 + seq,
                self.opts.max_positions
            )));
        }
        if let Some(vocab) = self.vocab
            && let Some(bad) = batch.iter().flat_map(|s| s.iter()).find(|&&t| t as usize >= vocab)
        {
            return Err(DriverError::Input(format!(
                "token id {bad} is out of the vocabulary (0..{vocab})"
            )));
        }
        if self.kv.batch() != batch.len() {
            if self.past > 0 {
                return Err(DriverError::Input(format!(
                    "batch size {} differs from the cached batch size {}",
                    batch.len(),
                    self.kv.batch()
                )));
            }
            self.kv.open(&mut self.dev, batch.len())?;
        }
        Ok((batch.len() * seq, seq))
    }

    pub(crate) fn call_inner(
        &mut self,
        batch: &[&[u32]],
        want: Want,
        read: bool,
        plan: &Plan,
    ) -> Result<CallOutput, DriverError> {
        let (tokens, seq) = self.validate(batch, plan.pos0)?;
        let shape = CallShape { tokens, seq };
        if seq == 1 && self.kv.mode != KvMode::Full && !self.kv.shared() {
            // The first decode call: one shared store per loop layer.
            self.kv.collapse(&mut self.dev)?;
        }
        self.kv.reserve(&mut self.dev, plan.pos0 + seq)?;
        self.dev.begin_call(shape, &self.kv.all_args())?;
        let ids: Vec<f32> = batch.iter().flat_map(|s| s.iter()).map(|&t| t as f32).collect();
        let pos: Vec<f32> = (0..batch.len())
            .flat_map(|_| (0..seq).map(|s| (plan.pos0 + s) as f32))
            .collect();
        let (ids_v, pos_v) = (self.program.inputs[0], self.program.inputs[1]);
        self.dev
            .write(self.span(&ActRef::whole(ids_v, 1), tokens, 0, tokens), &ids)?;
        self.dev
            .write(self.span(&ActRef::whole(pos_v, 1), tokens, 0, tokens), &pos)?;
        let launches0 = self.launches;
        for i in 0..self.before.len() {
            self.launch(Which::Before, i, 0, shape)?;
        }
        let mut out = CallOutput {
            outputs: Vec::new(),
            exit_steps: vec![0; tokens],
            steps_run: 1,
            launches: 0,
            trace: want.trace.then(Trace::default),
            states: Vec::new(),
        };
        if let Some(l) = self.program.loop_.take() {
            let r = self.run_loop(&l, shape, plan, &mut out);
            self.program.loop_ = Some(l);
            r?;
        }
        // Only each sequence's last row is read: the kernels after the loop
        // (final norm, lm_head: per token) run on those rows alone.
        let last_rows = !want.all_positions && self.after.iter().all(|l| l.layer.is_none());
        for i in 0..self.after.len() {
            if last_rows && seq > 1 {
                for b in 0..batch.len() {
                    let last = (b + 1) * seq - 1;
                    self.dev.launch_rows(&self.after[i].bound, shape, last..last + 1)?;
                }
                self.launches += 1;
            } else {
                self.launch(Which::After, i, 0, shape)?;
            }
        }
        self.past = plan.pos0 + seq;
        self.last_tokens = tokens;
        out.launches = self.launches - launches0;
        if read {
            out.outputs = if want.all_positions {
                let outs = self.program.outputs.clone();
                outs.iter()
                    .map(|o| self.dev.read(self.span(o, tokens, 0, tokens)))
                    .collect::<Result<_, _>>()?
            } else {
                vec![self.dev.read(self.last_logits_span().expect("a call ran"))?]
            };
        }
        if let Some(t) = out.trace.as_mut() {
            t.vocab = self.program.outputs[0].len;
            t.hidden_size = self.program.loop_.as_ref().map_or(0, |l| l.out.len);
            t.steps_run = out.steps_run;
        }
        Ok(out)
    }

    fn launch(&mut self, which: Which, i: usize, step: usize, shape: CallShape) -> Result<(), DriverError> {
        let l = match which {
            Which::Before => &self.before[i],
            Which::Body => &self.body[i],
            Which::After => &self.after[i],
        };
        let in_loop = which == Which::Body;
        match l.layer {
            Some(layer) => {
                let kv: Vec<KvArg> = (0..self.kv.batch())
                    .map(|b| self.kv.arg(b, in_loop, step, layer))
                    .collect();
                self.dev.launch(&l.bound, shape, &kv)?;
                self.kv.appended(&mut self.dev, in_loop, step, layer, shape.seq)?;
            }
            None => self.dev.launch(&l.bound, shape, &[])?,
        }
        self.launches += 1;
        Ok(())
    }

    /// Every carried value gets its init (`init`) or next: a parallel copy.
    pub(crate) fn set_carried(&mut self, l: &LoopSpec, init: bool, tokens: usize) -> Result<(), DriverError> {
        let pairs: Vec<(Span, Span)> = l
            .carried
            .iter()
            .map(|c| {
                let arg = ActRef::whole(c.arg, self.values[&c.arg].width);
                let src = if init { c.init } else { c.next };
                (self.span(&arg, tokens, 0, tokens), self.span(&src, tokens, 0, tokens))
            })
            .collect();
        let extent = |s: &Span| (s.byte, s.byte + (s.rows.max(1) - 1) * s.stride + s.row_bytes());
        // A source overlapping another destination could be overwritten
        // before it is read: then read every source first.
        let clash = pairs.iter().enumerate().any(|(i, (_, src))| {
            let (a0, a1) = extent(src);
            pairs.iter().enumerate().any(|(j, (dst, _))| {
                let (b0, b1) = extent(dst);
                a0 < b1 && b0 < a1 && !(i == j && src == dst)
            })
        });
        if clash {
            let data: Vec<Vec<f32>> = pairs.iter().map(|(_, s)| self.dev.read(*s)).collect::<Result<_, _>>()?;
            for ((dst, _), d) in pairs.iter().zip(&data) {
                self.dev.write(*dst, d)?;
            }
        } else {
            for (dst, src) in pairs {
                if dst != src {
                    self.dev.copy(dst, src)?;
                }
            }
        }
        Ok(())
    }

    /// The loop: per step the body, then the policy per token; steps
    /// `plan.steps` only, after `plan.seed`'s earlier steps when given.
    fn run_loop(
        &mut self,
        l: &LoopSpec,
        shape: CallShape,
        plan: &Plan,
        out: &mut CallOutput,
    ) -> Result<(), DriverError> {
        let CallShape { tokens, seq } = shape;
        let policy = self.policy.expect("parsed with the loop");
        let width = l.out.len;
        let weighted = matches!(policy, ExitPolicy::Weighted);
        let mut lambdas: Vec<Vec<f32>> = vec![Vec::new(); tokens];
        let mut decided: Vec<Option<usize>> = vec![None; tokens];
        let mut acc = if weighted {
            vec![0.0f32; tokens * width]
        } else {
            Vec::new()
        };
        let mut survive = vec![1.0f32; tokens];
        let out_span = self.span(&l.out, tokens, 0, tokens);
        let result = ActRef::whole(l.result, l.out.len);
        let (from, to) = (plan.steps.start, plan.steps.end.min(l.steps));
        // Each step's out rows, kept for the states a draft returns.
        let mut outs: Vec<Vec<f32>> = Vec::new();
        match plan.seed {
            None => self.set_carried(l, true, tokens)?,
            Some(seed) => {
                // The earlier steps as a draft ran them: carried values,
                // gates, and the policy's bookkeeping replayed over them.
                let widths: Vec<usize> = l.carried.iter().map(|c| self.values[&c.arg].width).collect();
                let fits = |s: &LoopState| {
                    s.steps() == from
                        && s.outs.len() == from
                        && s.outs.iter().all(|o| o.len() == width)
                        && s.carried.len() == widths.len()
                        && s.carried.iter().zip(&widths).all(|(c, &w)| c.len() == w)
                };
                if seed.len() != tokens || !seed.iter().all(fits) {
                    return Err(DriverError::Input(format!(
                        "verification of {tokens} tokens needs {tokens} states of drafts of {from} steps that did not exit"
                    )));
                }
                for (i, c) in l.carried.iter().enumerate() {
                    let arg = ActRef::whole(c.arg, self.values[&c.arg].width);
                    let rows: Vec<f32> = seed.iter().flat_map(|s| s.carried[i].iter().copied()).collect();
                    self.dev.write(self.span(&arg, tokens, 0, tokens), &rows)?;
                }
                for (t, s) in seed.iter().enumerate() {
                    for r in 0..from {
                        lambdas[t].push(s.lambdas[r]);
                        if weighted {
                            let pr = lambdas[t][r] * survive[t];
                            survive[t] *= 1.0 - lambdas[t][r];
                            acc[t * width..(t + 1) * width]
                                .iter_mut()
                                .zip(&s.outs[r])
                                .for_each(|(a, x)| *a += pr * x);
                        }
                    }
                    if !weighted && let Some(e) = policy.decided_exit(&lambdas[t], l.steps) {
                        decided[t] = Some(e);
                        self.dev.write(self.span(&result, tokens, t, 1), &s.outs[e])?;
                    }
                }
            }
        }
        for r in from..to {
            for i in 0..self.body.len() {
                self.launch(Which::Body, i, r, shape)?;
            }
            out.steps_run = r + 1;
            let lam = match &l.exit {
                Some(e) => self.dev.read(self.span(e, tokens, 0, tokens))?,
                None => vec![0.0; tokens],
            };
            for (ls, &x) in lambdas.iter_mut().zip(&lam) {
                ls.push(x);
            }
            let rows = if out.trace.is_some() || weighted || plan.keep_states {
                Some(self.dev.read(out_span)?)
            } else {
                None
            };
            if weighted {
                let rows = rows.as_ref().expect("read above");
                for t in 0..tokens {
                    let pr = if r + 1 < l.steps {
                        let pr = lam[t] * survive[t];
                        survive[t] *= 1.0 - lam[t];
                        pr
                    } else {
                        survive[t]
                    };
                    let (a, x) = (&mut acc[t * width..(t + 1) * width], &rows[t * width..(t + 1) * width]);
                    a.iter_mut().zip(x).for_each(|(a, x)| *a += pr * x);
                }
            } else {
                // Tokens deciding at this step; consecutive ones copied at once.
                let mut now = Vec::new();
                for t in 0..tokens {
                    if decided[t].is_none()
                        && let Some(s) = policy.decided_exit(&lambdas[t], l.steps)
                    {
                        if s != r {
                            return Err(DriverError::Program(format!(
                                "policy {policy} decided step {s} only at step {r}"
                            )));
                        }
                        decided[t] = Some(s);
                        now.push(t);
                    }
                }
                self.copy_rows(&result, &l.out, tokens, &now)?;
            }
            if plan.keep_states {
                outs.push(rows.clone().expect("read for the states"));
            }
            if let Some(t) = out.trace.as_mut() {
                t.step_outputs.push(rows.expect("read for the trace"));
                if l.exit.is_some() {
                    t.lambdas.push(lam);
                }
            }
            if r + 1 == l.steps {
                break;
            }
            let all_decided = lambdas.iter().all(|ls| policy.decided_exit(ls, l.steps).is_some());
            if plan.early_exit && seq == 1 && all_decided {
                if !self.kv.shared() {
                    self.kv.fill_skipped(&mut self.dev, r, seq)?;
                }
                out.states = self.states(l, tokens, &lambdas, &mut outs, plan.keep_states, false)?;
                break;
            }
            if r + 1 == to {
                // A draft ends here: its output is the last step's for the
                // tokens not yet decided; the carried values are kept.
                let open: Vec<usize> = (0..tokens).filter(|&t| decided[t].is_none()).collect();
                self.copy_rows(&result, &l.out, tokens, &open)?;
                out.states = self.states(l, tokens, &lambdas, &mut outs, plan.keep_states, true)?;
                out.exit_steps = exit_steps(&lambdas, &decided, policy, l.steps);
                return Ok(());
            }
            self.set_carried(l, false, tokens)?;
        }
        if self.kv.shared() {
            self.kv.finish_shared(&mut self.dev, seq, out.steps_run)?;
        }
        if weighted {
            let rd = if self.dev.rounds() {
                self.values[&l.result].dtype
            } else {
                DType::F32
            };
            let data: Vec<f32> = acc.iter().map(|&x| rd.round(x)).collect();
            self.dev.write(self.span(&result, tokens, 0, tokens), &data)?;
        }
        out.exit_steps = exit_steps(&lambdas, &decided, policy, l.steps);
        Ok(())
    }

    /// Copy rows `ts` of `src` into `dst` (consecutive tokens at once).
    fn copy_rows(&mut self, dst: &ActRef, src: &ActRef, tokens: usize, ts: &[usize]) -> Result<(), DriverError> {
        let mut i = 0;
        while i < ts.len() {
            let mut j = i + 1;
            while j < ts.len() && ts[j] == ts[j - 1] + 1 {
                j += 1;
            }
            let (t0, n) = (ts[i], j - i);
            self.dev
                .copy(self.span(dst, tokens, t0, n), self.span(src, tokens, t0, n))?;
            i = j;
        }
        Ok(())
    }

    /// Each token's [`LoopState`] after the steps run (`carried`: read the
    /// carried values' nexts, the state the next step would start from).
    fn states(
        &mut self,
        l: &LoopSpec,
        tokens: usize,
        lambdas: &[Vec<f32>],
        outs: &mut Vec<Vec<f32>>,
        keep: bool,
        carried: bool,
    ) -> Result<Vec<LoopState>, DriverError> {
        if !keep {
            return Ok(Vec::new());
        }
        let width = l.out.len;
        let nexts: Vec<(usize, Vec<f32>)> = if carried {
            l.carried
                .iter()
                .map(|c| Ok((c.next.len, self.dev.read(self.span(&c.next, tokens, 0, tokens))?)))
                .collect::<Result<_, DriverError>>()?
        } else {
            Vec::new()
        };
        let outs = std::mem::take(outs);
        Ok((0..tokens)
            .map(|t| LoopState {
                carried: nexts
                    .iter()
                    .map(|(w, rows)| rows[t * w..(t + 1) * w].to_vec())
                    .collect(),
                lambdas: lambdas[t].clone(),
                outs: outs
                    .iter()
                    .map(|rows| rows[t * width..(t + 1) * width].to_vec())
                    .collect(),
            })
            .collect())
    }
}

/// What a call runs of the loop: the whole loop, or (speculation) its first
/// steps for a draft, or its last steps after a draft's.
pub(crate) struct Plan<'a> {
    /// The position of the call's first token (the cache's filled positions
    /// for a whole call; earlier for a verification).
    pub pos0: usize,
    /// Loop steps to run.
    pub steps: Range<usize>,
    /// Per token, its state after steps `0..steps.start`.
    pub seed: Option<&'a [LoopState]>,
    /// Return each token's state after the last step run.
    pub keep_states: bool,
    /// Stop a decode token's loop once its exit is decided (filling the
    /// later steps' KV slots).
    pub early_exit: bool,
}

impl Plan<'_> {
    pub fn whole(pos0: usize, early_exit: bool) -> Plan<'static> {
        Plan {
            pos0,
            steps: 0..usize::MAX,
            seed: None,
            keep_states: false,
            early_exit,
        }
    }
}

/// One token's loop state after its first steps: what a draft hands to the
/// verification of its last steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopState {
    /// Per carried value, its row entering the next step (empty when the
    /// token's loop ended: early exit).
    pub carried: Vec<Vec<f32>>,
    /// The exit gate per step run.
    pub lambdas: Vec<f32>,
    /// The loop's `out` row per step run.
    pub outs: Vec<Vec<f32>>,
}

impl LoopState {
    /// Loop steps run.
    pub fn steps(&self) -> usize {
        self.lambdas.len()
    }
}

/// Each token's exit step: decided, or the policy's over its gates (a
/// draft's undecided tokens: its last step).
fn exit_steps(lambdas: &[Vec<f32>], decided: &[Option<usize>], policy: ExitPolicy, steps: usize) -> Vec<usize> {
    lambdas
        .iter()
        .zip(decided)
        .map(|(ls, d)| {
            d.unwrap_or_else(|| {
                if ls.len() < steps {
                    ls.len() - 1
                } else {
                    policy.exit_step(ls)
                }
            })
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Before,
    Body,
    After,
}
