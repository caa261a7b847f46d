//! Continuous, cross-depth batching: sequences that join and leave a
//! [`Driver`] at any time, each with its own KV stores and length, whose
//! in-flight tokens go through the loop body together even when they are at
//! different loop steps.
//!
//! A [`Sequence`] owns its KV cache (the stores of every (step, layer) slot,
//! in the driver's [`KvMode`](crate::KvMode)) and its filled positions. Its
//! prompt runs as an ordinary call ([`Driver::prefill_sequence`], in chunks
//! if wanted). A decoded token is started with [`Driver::start_token`]; each
//! [`Driver::tick`] then runs **one loop step** for every started token in
//! one launch per body kernel: the weights are read once per tick for all
//! rows, and a row's attention reads the KV slot of its own step (the loop
//! body depends on the step only through that slot: `LoopSpec::step_index`).
//! Between ticks a token's loop state (carried rows, gates, the weighted
//! sum) is held on the host, so prefills of other sequences may run in
//! between. A token whose exit is decided (early exit) or that ran the last
//! step leaves the loop: the kernels after the loop run on its row alone and
//! its logits come back; its sequence can start the next token at the next
//! tick while the others finish theirs.
//!
//! The arithmetic per row is the whole-call driver's: the same kernels, the
//! same policy bookkeeping, the same KV fill of skipped steps, so a
//! sequence decoded in ticks produces the logits it would alone (tested).
//! Needs a Program whose attention is all inside the loop (the kernels
//! before and after it run per token).

use crate::device::{CallShape, Device, KvArg};
use crate::driver::{Driver, DriverError, Plan, Step, Want};
use crate::kv::{KvCache, KvMode};
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::{ActRef, LoopSpec, Operand};

/// One sequence of a batch: its KV stores, its filled positions and the
/// token it has in the loop, if any.
pub struct Sequence {
    kv: KvCache,
    past: usize,
    token: Option<InFlight>,
}

impl Sequence {
    /// Positions in its KV cache (prompt and finished tokens).
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Whether a token is in the loop.
    pub fn in_flight(&self) -> bool {
        self.token.is_some()
    }

    /// The loop step its in-flight token runs next (0-based).
    pub fn token_step(&self) -> Option<usize> {
        self.token.as_ref().map(|t| t.step)
    }

    /// Bytes of KV rows stored.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// A token in the loop, between ticks.
struct InFlight {
    id: u32,
    /// The next step to run.
    step: usize,
    policy: ExitPolicy,
    /// Per carried value, its row entering `step` (empty before step 0).
    carried: Vec<Vec<f32>>,
    lambdas: Vec<f32>,
    /// `weighted`: sum of p_r * out_r so far, and the mass not yet assigned.
    acc: Vec<f32>,
    survive: f32,
    /// The exit step, once decided, and its `out` row (kept when the loop
    /// goes on: early exit off).
    decided: Option<usize>,
    result: Option<Vec<f32>>,
}

fn tok(s: &Sequence) -> &InFlight {
    s.token.as_ref().expect("checked in tick")
}

/// A token that left the loop in a tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Exited {
    /// Its logits, `[vocab]`.
    pub logits: Vec<f32>,
    /// The exit depth (exit step + 1).
    pub depth: usize,
    /// Loop steps it ran.
    pub steps_run: usize,
}

impl<D: Device> Driver<D> {
    /// A new, empty sequence (its own KV stores, in the driver's KV mode).
    pub fn open_sequence(&mut self) -> Result<Sequence, DriverError> {
        let mut kv = self.kv.empty_like();
        kv.open(&mut self.dev, 1)?;
        Ok(Sequence {
            kv,
            past: 0,
            token: None,
        })
    }

    /// Free a sequence's stores.
    pub fn close_sequence(&mut self, mut s: Sequence) -> Result<(), DriverError> {
        Ok(s.kv.close(&mut self.dev)?)
    }

    /// Run `ids` (a prompt, or a chunk of it) after the sequence's cache, as
    /// [`Driver::run`] does for the driver's own sequence: the last
    /// position's logits and exit depth, under `policy` (None: the
    /// Program's).
    pub fn prefill_sequence(
        &mut self,
        s: &mut Sequence,
        ids: &[u32],
        policy: Option<ExitPolicy>,
    ) -> Result<Step, DriverError> {
        if s.token.is_some() {
            return Err(DriverError::Input(
                "a sequence with a token in the loop cannot take a prompt".into(),
            ));
        }
        if let Some(p) = policy
            && let Some(why) = self.policy_refused(p)
        {
            return Err(DriverError::Input(why));
        }
        std::mem::swap(&mut self.kv, &mut s.kv);
        let (past, last, own) = (self.past, self.last_tokens, self.policy);
        self.past = s.past;
        if self.policy.is_some() && policy.is_some() {
            self.policy = policy;
        }
        let plan = Plan::whole(s.past, self.opts.early_exit);
        let r = self.call_inner(&[ids], Want::default(), true, &plan);
        s.past = self.past;
        std::mem::swap(&mut self.kv, &mut s.kv);
        (self.past, self.last_tokens, self.policy) = (past, last, own);
        let vocab = self.program.outputs[0].len;
        Ok(r?.step(vocab))
    }

    /// The Program's exit policy (None without a loop).
    pub fn exit_policy(&self) -> Option<ExitPolicy> {
        self.policy
    }

    /// Token ids must be below this (the smallest embedding table).
    pub fn vocab(&self) -> Option<usize> {
        self.vocab
    }

    /// Whether ticks can run this Program (why not, if not).
    pub fn batching_refused(&self) -> Option<String> {
        let Some(l) = &self.program.loop_ else {
            return Some("the Program has no loop (an unrolled model): batching by loop step needs one".into());
        };
        if self.before.iter().chain(&self.after).any(|k| k.layer.is_some()) {
            return Some(
                "the Program has attention outside the loop: batching by loop step needs it all inside".into(),
            );
        }
        if self.policy.is_none() || l.steps == 0 {
            return Some("the Program's loop has no exit policy".into());
        }
        None
    }

    /// Whether tokens may use `policy` instead of the Program's (the gate
    /// is computed unless the Program's policy never reads it).
    pub fn policy_refused(&self, policy: ExitPolicy) -> Option<String> {
        let l = self.program.loop_.as_ref()?;
        if let Err(e) = policy.check(l.steps) {
            return Some(e);
        }
        let needs_gate = !matches!(policy, ExitPolicy::Last | ExitPolicy::Step(_));
        (needs_gate && l.exit.is_none()).then(|| {
            format!(
                "exit policy {policy} reads the exit gate, which this Program (compiled with exit policy {}) does not compute",
                l.policy
            )
        })
    }

    /// Put token `id` into the loop for sequence `s` at its next position;
    /// `policy` overrides the Program's exit policy for this token.
    pub fn start_token(&mut self, s: &mut Sequence, id: u32, policy: Option<ExitPolicy>) -> Result<(), DriverError> {
        if let Some(why) = self.batching_refused() {
            return Err(DriverError::Program(why));
        }
        if s.token.is_some() {
            return Err(DriverError::Input(
                "the sequence already has a token in the loop".into(),
            ));
        }
        if s.past == 0 {
            return Err(DriverError::Input(
                "a sequence starts with a prompt (prefill_sequence)".into(),
            ));
        }
        if s.past + 1 > self.opts.max_positions {
            return Err(DriverError::Input(format!(
                "{} positions exceed the context of {}",
                s.past + 1,
                self.opts.max_positions
            )));
        }
        if let Some(vocab) = self.vocab
            && id as usize >= vocab
        {
            return Err(DriverError::Input(format!(
                "token id {id} is out of the vocabulary (0..{vocab})"
            )));
        }
        let policy = policy.unwrap_or(self.policy.expect("checked above"));
        if let Some(why) = self.policy_refused(policy) {
            return Err(DriverError::Input(why));
        }
        if self.kv.mode != KvMode::Full && !s.kv.shared() {
            // The sequence's first decoded token: one shared store per loop layer.
            s.kv.collapse(&mut self.dev)?;
        }
        let width = self.program.loop_.as_ref().map_or(0, |l| l.out.len);
        s.token = Some(InFlight {
            id,
            step: 0,
            policy,
            carried: Vec::new(),
            lambdas: Vec::new(),
            acc: if matches!(policy, ExitPolicy::Weighted) {
                vec![0.0; width]
            } else {
                Vec::new()
            },
            survive: 1.0,
            decided: None,
            result: None,
        });
        Ok(())
    }

    /// One loop step for the in-flight token of every sequence in `seqs`
    /// (each must have one), in one launch per body kernel. Returns, per
    /// sequence, the token that left the loop at this step, if it did.
    pub fn tick(&mut self, seqs: &mut [&mut Sequence]) -> Result<Vec<Option<Exited>>, DriverError> {
        if let Some(why) = self.batching_refused() {
            return Err(DriverError::Program(why));
        }
        if seqs.is_empty() {
            return Err(DriverError::Input("no sequences to step".into()));
        }
        if seqs.iter().any(|s| s.token.is_none()) {
            return Err(DriverError::Input(
                "every sequence of a tick needs a token in the loop".into(),
            ));
        }
        if seqs.len() > self.dev.max_batch() {
            return Err(DriverError::Input(format!(
                "{} sequences in one call; the {} device runs at most {}",
                seqs.len(),
                self.dev.name(),
                self.dev.max_batch()
            )));
        }
        let l = self.program.loop_.take().expect("checked above");
        let r = self.tick_inner(&l, seqs);
        self.program.loop_ = Some(l);
        r
    }

    fn tick_inner(&mut self, l: &LoopSpec, seqs: &mut [&mut Sequence]) -> Result<Vec<Option<Exited>>, DriverError> {
        let t = seqs.len();
        let shape = CallShape { tokens: t, seq: 1 };
        for s in seqs.iter() {
            s.kv.reserve(&mut self.dev, s.past + 1)?;
        }
        let args: Vec<KvArg> = seqs.iter().flat_map(|s| s.kv.all_args()).collect();
        self.dev.begin_call(shape, &args)?;
        let ids: Vec<f32> = seqs.iter().map(|s| tok(s).id as f32).collect();
        let pos: Vec<f32> = seqs.iter().map(|s| s.past as f32).collect();
        let (ids_v, pos_v) = (self.program.inputs[0], self.program.inputs[1]);
        self.dev.write(self.span(&ActRef::whole(ids_v, 1), t, 0, t), &ids)?;
        self.dev.write(self.span(&ActRef::whole(pos_v, 1), t, 0, t), &pos)?;
        // The kernels before the loop are per token: running them on every
        // row costs little and gives the new tokens their inits.
        for k in &self.before {
            self.dev.launch(&k.bound, shape, &[])?;
        }
        self.launches += self.before.len();
        self.carry_in(l, seqs, t)?;
        for i in 0..self.body.len() {
            match self.body[i].layer {
                Some(layer) => {
                    let kv: Vec<KvArg> = seqs.iter().map(|s| s.kv.arg(0, true, tok(s).step, layer)).collect();
                    self.dev.launch(&self.body[i].bound, shape, &kv)?;
                    for s in seqs.iter_mut() {
                        let step = tok(s).step;
                        s.kv.appended(&mut self.dev, true, step, layer, 1)?;
                    }
                }
                None => self.dev.launch(&self.body[i].bound, shape, &[])?,
            }
        }
        self.launches += self.body.len();
        let width = l.out.len;
        let lam = match &l.exit {
            Some(e) => self.dev.read(self.span(e, t, 0, t))?,
            None => vec![0.0; t],
        };
        let outs = self.dev.read(self.span(&l.out, t, 0, t))?;
        let mut finished = Vec::new();
        for (row, s) in seqs.iter_mut().enumerate() {
            let tk = s.token.as_mut().expect("checked in tick");
            let (r, out) = (tk.step, &outs[row * width..(row + 1) * width]);
            tk.lambdas.push(lam[row]);
            let last = r + 1 == l.steps;
            if matches!(tk.policy, ExitPolicy::Weighted) {
                let pr = if last {
                    tk.survive
                } else {
                    let pr = lam[row] * tk.survive;
                    tk.survive *= 1.0 - lam[row];
                    pr
                };
                tk.acc.iter_mut().zip(out).for_each(|(a, x)| *a += pr * x);
            } else if tk.decided.is_none()
                && let Some(e) = tk.policy.decided_exit(&tk.lambdas, l.steps)
            {
                if e != r {
                    return Err(DriverError::Program(format!(
                        "policy {} decided step {e} only at step {r}",
                        tk.policy
                    )));
                }
                tk.decided = Some(e);
                tk.result = Some(out.to_vec());
            }
            let early = self.opts.early_exit && tk.decided.is_some();
            if last || early {
                finished.push(row);
            }
        }
        // Tokens going on: their carried rows for the next step.
        let going: Vec<usize> = (0..t).filter(|r| !finished.contains(r)).collect();
        if !going.is_empty() {
            let nexts: Vec<(usize, Vec<f32>)> = l
                .carried
                .iter()
                .map(|c| Ok((c.next.len, self.dev.read(self.span(&c.next, t, 0, t))?)))
                .collect::<Result<_, DriverError>>()?;
            for &row in &going {
                let tk = seqs[row].token.as_mut().expect("checked in tick");
                tk.carried = nexts
                    .iter()
                    .map(|(w, rows)| rows[row * w..(row + 1) * w].to_vec())
                    .collect();
                tk.step += 1;
            }
        }
        let mut exited: Vec<Option<Exited>> = vec![None; t];
        if finished.is_empty() {
            return Ok(exited);
        }
        // The loop's result for each finished row, then the kernels after
        // the loop on those rows alone: gathered into the first rows when
        // those kernels read nothing but the result (one launch each, the
        // LM head's weights read once for all of them), else row by row.
        let result = ActRef::whole(l.result, width);
        let rd = if self.dev.rounds() {
            self.values[&l.result].dtype
        } else {
            DType::F32
        };
        let gather = finished.len() > 1 && self.after_reads_only(l.result);
        for (i, &row) in finished.iter().enumerate() {
            let tk = seqs[row].token.as_ref().expect("checked in tick");
            let data: Vec<f32> = if matches!(tk.policy, ExitPolicy::Weighted) {
                tk.acc.iter().map(|&x| rd.round(x)).collect()
            } else {
                tk.result
                    .clone()
                    .unwrap_or_else(|| outs[row * width..(row + 1) * width].to_vec())
            };
            let at = if gather { i } else { row };
            self.dev.write(self.span(&result, t, at, 1), &data)?;
        }
        let at: Vec<usize> = if gather {
            (0..finished.len()).collect()
        } else {
            finished.clone()
        };
        for k in &self.after {
            if gather {
                self.dev.launch_rows(&k.bound, shape, 0..finished.len())?;
            } else {
                for &row in &at {
                    self.dev.launch_rows(&k.bound, shape, row..row + 1)?;
                }
            }
        }
        self.launches += self.after.len();
        let logits = &self.program.outputs[0];
        for (&row, &from) in finished.iter().zip(&at) {
            let data = self.dev.read(self.span(logits, t, from, 1))?;
            let s = &mut seqs[row];
            let tk = s.token.take().expect("checked in tick");
            let steps_run = tk.step + 1;
            if s.kv.shared() {
                s.kv.finish_shared(&mut self.dev, 1, steps_run)?;
            } else if steps_run < l.steps {
                s.kv.fill_skipped(&mut self.dev, tk.step, 1)?;
            }
            s.past += 1;
            let exit = tk.decided.unwrap_or_else(|| tk.policy.exit_step(&tk.lambdas));
            exited[row] = Some(Exited {
                logits: data,
                depth: exit + 1,
                steps_run,
            });
        }
        Ok(exited)
    }

    /// Whether the kernels after the loop read no activation but `result`
    /// and what they compute themselves (then rows may be gathered).
    fn after_reads_only(&self, result: u32) -> bool {
        let mut known = vec![result];
        for k in &self.program.after {
            let reads_known = k.inputs.iter().all(|o| match o {
                Operand::Act(r) => known.contains(&r.value),
                Operand::Weight(_) => true,
            });
            if !reads_known {
                return false;
            }
            known.extend(&k.outputs);
        }
        true
    }

    /// The carried values of every row: the inits for tokens at step 0, the
    /// held rows for the others.
    fn carry_in(&mut self, l: &LoopSpec, seqs: &[&mut Sequence], t: usize) -> Result<(), DriverError> {
        self.set_carried(l, true, t)?;
        for (row, s) in seqs.iter().enumerate() {
            let tk = s.token.as_ref().expect("checked in tick");
            if tk.step == 0 {
                continue;
            }
            for (c, data) in l.carried.iter().zip(&tk.carried) {
                let arg = ActRef::whole(c.arg, self.values[&c.arg].width);
                self.dev.write(self.span(&arg, t, row, 1), data)?;
            }
        }
        Ok(())
    }
}
