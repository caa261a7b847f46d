//! The engine: one thread that owns the model's [`Driver`] and runs every
//! admitted sequence through it with continuous batching. Requests arrive
//! through [`Engine::submit`]; each gets its tokens back as [`Event`]s on
//! its own channel. Dropping the receiver cancels the sequence (its KV is
//! freed at the next step).
//!
//! Scheduling, per iteration: admit queued requests up to `max_seqs`;
//! prefill at most `prefill_chunk` prompt tokens (one sequence's chunk);
//! then one batched loop step over every in-flight token (a "tick", see
//! [`ouroc_driver::Batch`]). Under [`Batching::CrossDepth`] a sequence whose
//! token exited starts its next token at the next tick while the others
//! finish theirs; under [`Batching::Step`] new tokens start only when every
//! in-flight token has finished (all sequences step through the loop
//! together, as an engine batching per loop step would).

use crate::metrics::Metrics;
use ouroc_driver::{Device, Driver, Sequence};
use ouroc_ir::ExitPolicy;
use ouroc_runtime::{Sampler, SamplingParams};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How in-flight tokens share the loop's batched calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// New tokens start only when no token is in the loop.
    Step,
    /// A sequence starts its next token as soon as its last one exited.
    CrossDepth,
}

impl Batching {
    pub fn parse(s: &str) -> Result<Batching, String> {
        match s {
            "step" => Ok(Batching::Step),
            "cross-depth" => Ok(Batching::CrossDepth),
            _ => Err(format!("unknown batching `{s}`; valid: cross-depth, step")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Batching::Step => "step",
            Batching::CrossDepth => "cross-depth",
        }
    }
}

/// Limits and scheduling of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences prefilled or decoded at once.
    pub max_seqs: usize,
    /// Requests waiting beyond those; more are refused ([`Rejected::Busy`]).
    pub max_queue: usize,
    pub batching: Batching,
    /// Prompt tokens prefilled per scheduler iteration (long prompts are
    /// prefilled in chunks between decode steps).
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_seqs: 16,
            max_queue: 64,
            batching: Batching::CrossDepth,
            prefill_chunk: 256,
        }
    }
}

/// One generation.
#[derive(Debug)]
pub struct Request {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (prompt + max_tokens must fit the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// The exit policy of this request's tokens (None: the Program's).
    pub exit: Option<ExitPolicy>,
    /// Token ids that end the generation (not sent as a [`Event::Token`]).
    pub stop_ids: Vec<u32>,
    /// Where the tokens go; dropping the receiver cancels the request.
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// A request's event channel: the sender goes into [`Request::events`].
pub fn events() -> (
    tokio::sync::mpsc::UnboundedSender<Event>,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    tokio::sync::mpsc::unbounded_channel()
}

/// What a request receives, in order: tokens, then one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the loop depth (1..=R) it exited at.
    Token { id: u32, depth: usize },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The model failed on this request (the server goes on).
    Error(String),
}

/// Why a generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Why [`Engine::submit`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The queue is full: retry after this many seconds (503).
    #[error("the server is busy ({queued} requests queued); retry later")]
    Busy { queued: usize, retry_after_s: u64 },
    /// Shutting down: no new requests (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request cannot run on this model (400), e.g. a prompt longer
    /// than the context.
    #[error("{0}")]
    Invalid(String),
}

/// What the HTTP layer needs to know of the model the engine runs.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Positions (prompt + generated) a sequence may hold.
    pub max_positions: usize,
    /// Loop steps R.
    pub loop_steps: usize,
    /// Whether the Program computes the exit gate (else a per-request
    /// `exit` other than `last` / `step:K` is refused).
    pub has_exit_gate: bool,
    /// The Program's own exit policy.
    pub policy: Option<ExitPolicy>,
    /// Token ids below this are valid.
    pub vocab: usize,
}

/// A handle on the engine thread (cheap to clone). The thread ends, and
/// its sequences are dropped, when the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Shared>,
    _life: Arc<Life>,
}

struct Shared {
    info: ModelInfo,
    metrics: Arc<Metrics>,
    config: EngineConfig,
    state: Mutex<State>,
    /// Signalled on a new request, on shutdown and when the engine drains.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Request, Instant)>,
    running: usize,
    shutting_down: bool,
    /// Every handle is gone: the thread stops.
    closed: bool,
    /// The batching now (the config's, unless changed since).
    batching: Option<Batching>,
}

/// Dropped with the last [`Engine`] handle: tells the thread to stop.
struct Life(Arc<Shared>);

impl Drop for Life {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The engine thread never panics holding the lock (and if it did,
        // the queue is still consistent).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine {
    /// Start the engine thread; `make` builds the model's driver on it (a
    /// driver is not `Send`). Fails if `make` does, or if the Program cannot
    /// be batched by loop step ([`Driver::batching_refused`]).
    pub fn start<D, F>(config: EngineConfig, metrics: Arc<Metrics>, make: F) -> Result<Engine, String>
    where
        D: Device + 'static,
        F: FnOnce() -> Result<Driver<D>, String> + Send + 'static,
    {
        if config.max_seqs == 0 {
            return Err("--max-seqs must be at least 1".into());
        }
        if config.prefill_chunk < 2 {
            return Err("the prefill chunk must be at least 2 tokens".into());
        }
        let (tx, rx) = std::sync::mpsc::channel::<Result<Arc<Shared>, String>>();
        let cfg = config.clone();
        std::thread::Builder::new()
            .name("ouroc-engine".into())
            .spawn(move || {
                let driver = match make().and_then(|d| match d.batching_refused() {
                    Some(why) => Err(why),
                    None => Ok(d),
                }) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let info = ModelInfo {
                    max_positions: driver.options().max_positions,
                    loop_steps: driver.loop_steps(),
                    has_exit_gate: driver.program().loop_.as_ref().is_some_and(|l| l.exit.is_some()),
                    policy: driver.exit_policy(),
                    vocab: driver.vocab().unwrap_or(usize::MAX),
                };
                let shared = Arc::new(Shared {
                    info,
                    metrics,
                    config: cfg,
                    state: Mutex::new(State::default()),
                    wake: Condvar::new(),
                });
                if tx.send(Ok(shared.clone())).is_err() {
                    return;
                }
                let worker = Worker::new(driver, shared.clone());
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())).is_err() {
                    // A bug, not a request's fault: the running requests'
                    // channels are gone (their clients see an error), and
                    // the engine takes no more (health checks fail, so a
                    // balancer stops sending here).
                    let mut st = shared.lock();
                    st.shutting_down = true;
                    st.closed = true;
                    st.queue.clear();
                    st.running = 0;
                    drop(st);
                    shared.wake.notify_all();
                }
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let inner = rx
            .recv()
            .map_err(|_| "the engine thread stopped while loading the model".to_string())??;
        Ok(Engine {
            _life: Arc::new(Life(inner.clone())),
            inner,
        })
    }

    /// What the engine runs.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The metrics the engine records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The engine's limits and scheduling.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Queue a request (refused when the queue is full, the engine is
    /// shutting down, or the request cannot fit the model).
    pub fn submit(&self, request: Request) -> Result<(), Rejected> {
        self.check(&request).map_err(Rejected::Invalid)?;
        let mut st = self.inner.lock();
        if st.shutting_down || st.closed {
            return Err(Rejected::ShuttingDown);
        }
        let free = self.inner.config.max_seqs.saturating_sub(st.running);
        if st.queue.len() >= free + self.inner.config.max_queue {
            self.inner.metrics.rejected_busy();
            return Err(Rejected::Busy {
                queued: st.queue.len(),
                retry_after_s: 1,
            });
        }
        st.queue.push_back((request, Instant::now()));
        self.inner.metrics.occupancy(st.queue.len(), st.running);
        drop(st);
        self.inner.wake.notify_all();
        Ok(())
    }

    fn check(&self, r: &Request) -> Result<(), String> {
        let info = &self.inner.info;
        if r.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= info.vocab) {
            return Err(format!("token id {bad} is out of the vocabulary (0..{})", info.vocab));
        }
        if r.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        let want = r.prompt.len().saturating_add(r.max_tokens);
        if want > info.max_positions {
            return Err(format!(
                "this model's maximum context length is {} tokens; the request asks for {want} ({} in the prompt, {} to generate)",
                info.max_positions,
                r.prompt.len(),
                r.max_tokens
            ));
        }
        r.sampling.check()?;
        if let Some(p) = r.exit {
            p.check(info.loop_steps)?;
            if !info.has_exit_gate && !matches!(p, ExitPolicy::Last | ExitPolicy::Step(_)) {
                return Err(format!(
                    "exit policy {p} reads the exit gate, which this server's Program does not compute (it was compiled with exit policy {}); use last or step:K, or serve with a threshold policy",
                    info.policy.map_or("none".to_string(), |p| p.to_string())
                ));
            }
        }
        Ok(())
    }

    /// Requests queued and sequences running.
    pub fn load(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (st.queue.len(), st.running)
    }

    /// Switch the batching for the tokens that start from now on (the
    /// benchmark compares both on one loaded model).
    pub fn set_batching(&self, batching: Batching) {
        self.inner.lock().batching = Some(batching);
    }

    /// Whether [`Engine::begin_shutdown`] was called.
    pub fn shutting_down(&self) -> bool {
        self.inner.lock().shutting_down
    }

    /// Stop admitting requests ([`Engine::submit`] answers
    /// [`Rejected::ShuttingDown`]); those queued or running go on.
    pub fn begin_shutdown(&self) {
        self.inner.lock().shutting_down = true;
        self.inner.wake.notify_all();
    }

    /// Wait (blocking) until nothing is queued or running, at most
    /// `timeout`; true if drained.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            if st.queue.is_empty() && st.running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            st = self
                .inner
                .wake
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A request admitted to a sequence.
struct Active {
    req: Request,
    arrived: Instant,
    seq: Sequence,
    /// Prompt tokens prefilled so far.
    prefilled: usize,
    /// Prompt then generated tokens (the repetition penalty's context).
    context: Vec<u32>,
    generated: usize,
    /// The sampled token waiting to enter the loop.
    next: Option<u32>,
    sampler: Sampler,
    last_token: Option<Instant>,
}

/// What became of a request in an iteration.
enum Outcome {
    Going,
    Done(Event),
    /// The client went away.
    Cancelled,
}

/// The engine thread's state: the driver and the admitted requests.
struct Worker<D: Device> {
    driver: Driver<D>,
    shared: Arc<Shared>,
    active: Vec<Active>,
    batching: Batching,
}

impl<D: Device> Worker<D> {
    fn new(driver: Driver<D>, shared: Arc<Shared>) -> Worker<D> {
        Worker {
            driver,
            batching: shared.config.batching,
            shared,
            active: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            self.drop_cancelled();
            self.prefill_one();
            self.step();
            self.report();
        }
        for a in std::mem::take(&mut self.active) {
            let _ = self.driver.close_sequence(a.seq);
        }
    }

    /// Take queued requests into free sequences; wait while there is
    /// nothing to do. False once every handle is gone.
    fn admit(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        loop {
            if st.closed {
                return false;
            }
            while self.active.len() < shared.config.max_seqs
                && let Some((req, arrived)) = st.queue.pop_front()
            {
                let seq = match self.driver.open_sequence() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = req.events.send(Event::Error(format!("cannot open a sequence: {e}")));
                        continue;
                    }
                };
                let sampler = Sampler::new(req.sampling.clone());
                self.active.push(Active {
                    context: req.prompt.clone(),
                    req,
                    arrived,
                    seq,
                    prefilled: 0,
                    generated: 0,
                    next: None,
                    sampler,
                    last_token: None,
                });
            }
            st.running = self.active.len();
            self.batching = st.batching.unwrap_or(shared.config.batching);
            shared.metrics.occupancy(st.queue.len(), st.running);
            if !self.active.is_empty() {
                return true;
            }
            shared.wake.notify_all();
            st = shared
                .wake
                .wait_timeout(st, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Requests whose receiver is gone (client disconnected, or the HTTP
    /// layer stopped at a stop string) leave now.
    fn drop_cancelled(&mut self) {
        let gone: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].req.events.is_closed())
            .collect();
        for i in gone.into_iter().rev() {
            self.finish(i, Outcome::Cancelled);
        }
    }

    /// One prompt chunk of the first admitted request still prefilling.
    fn prefill_one(&mut self) {
        let Some(i) = self.active.iter().position(|a| a.prefilled < a.req.prompt.len()) else {
            return;
        };
        let chunk = self.shared.config.prefill_chunk;
        let a = &mut self.active[i];
        let rest = a.req.prompt.len() - a.prefilled;
        // A chunk of one token would run as a decode call (early exit, KV
        // sharing): chunks stay at two tokens or more, so a prompt's result
        // does not depend on how it was cut.
        let mut n = rest.min(chunk);
        if rest - n == 1 {
            n -= 1;
        }
        let ids = &a.req.prompt[a.prefilled..a.prefilled + n];
        match self.driver.prefill_sequence(&mut a.seq, ids, a.req.exit) {
            Ok(step) => {
                a.prefilled += n;
                if a.prefilled == a.req.prompt.len() {
                    self.shared.metrics.prompt(a.req.prompt.len());
                    let out = self.take_token(i, &step.logits, step.depth);
                    if !matches!(out, Outcome::Going) {
                        self.finish(i, out);
                    }
                }
            }
            Err(e) => self.finish(i, Outcome::Done(Event::Error(format!("prefill failed: {e}")))),
        }
    }

    /// Start the tokens that may start, then one loop step of every token
    /// in the loop.
    fn step(&mut self) {
        let cross = self.batching == Batching::CrossDepth;
        let idle = self.active.iter().all(|a| !a.seq.in_flight());
        let mut failed = Vec::new();
        if cross || idle {
            for (i, a) in self.active.iter_mut().enumerate() {
                if let Some(id) = a.next
                    && !a.seq.in_flight()
                {
                    match self.driver.start_token(&mut a.seq, id, a.req.exit) {
                        Ok(()) => a.next = None,
                        Err(e) => failed.push((i, e.to_string())),
                    }
                }
            }
        }
        for (i, e) in failed.into_iter().rev() {
            self.finish(i, Outcome::Done(Event::Error(format!("decode failed: {e}"))));
        }
        let rows: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].seq.in_flight())
            .collect();
        if rows.is_empty() {
            return;
        }
        let mut seqs: Vec<&mut Sequence> = self
            .active
            .iter_mut()
            .filter(|a| a.seq.in_flight())
            .map(|a| &mut a.seq)
            .collect();
        let exited = match self.driver.tick(&mut seqs) {
            Ok(e) => e,
            Err(e) => {
                // A device failure: every sequence in the loop fails.
                let msg = format!("decode failed: {e}");
                for &i in rows.iter().rev() {
                    self.finish(i, Outcome::Done(Event::Error(msg.clone())));
                }
                return;
            }
        };
        self.shared.metrics.batch(rows.len());
        let mut done = Vec::new();
        for (&i, e) in rows.iter().zip(exited) {
            if let Some(e) = e {
                let out = self.take_token(i, &e.logits, e.depth);
                if !matches!(out, Outcome::Going) {
                    done.push((i, out));
                }
            }
        }
        for (i, out) in done.into_iter().rev() {
            self.finish(i, out);
        }
    }

    /// The next token of request `i` from `logits` (computed at exit depth
    /// `depth`): sent, or the end of the request.
    fn take_token(&mut self, i: usize, logits: &[f32], depth: usize) -> Outcome {
        let a = &mut self.active[i];
        let id = a.sampler.sample(logits, &a.context);
        if a.req.stop_ids.contains(&id) {
            return Outcome::Done(self.done_event(i, Finish::Stop));
        }
        let now = Instant::now();
        let since = a.last_token.map(|t| (now - t).as_secs_f64());
        if since.is_none() {
            self.shared.metrics.first_token((now - a.arrived).as_secs_f64());
        }
        self.shared.metrics.token(depth, since);
        a.last_token = Some(now);
        a.generated += 1;
        a.context.push(id);
        if a.req.events.send(Event::Token { id, depth }).is_err() {
            return Outcome::Cancelled;
        }
        if a.generated >= a.req.max_tokens {
            return Outcome::Done(self.done_event(i, Finish::Length));
        }
        a.next = Some(id);
        Outcome::Going
    }

    fn done_event(&self, i: usize, finish: Finish) -> Event {
        let a = &self.active[i];
        Event::Done {
            finish,
            prompt_tokens: a.req.prompt.len(),
            completion_tokens: a.generated,
        }
    }

    /// Request `i` leaves: its last event sent, its KV freed.
    fn finish(&mut self, i: usize, out: Outcome) {
        let a = self.active.remove(i);
        let cancelled = matches!(out, Outcome::Cancelled);
        if let Outcome::Done(ev) = out {
            let _ = a.req.events.send(ev);
        }
        self.shared
            .metrics
            .finished(a.arrived.elapsed().as_secs_f64(), cancelled);
        let _ = self.driver.close_sequence(a.seq);
    }

    /// Occupancy for `load()`, the metrics and `wait_drained`.
    fn report(&self) {
        let mut st = self.shared.lock();
        st.running = self.active.len();
        self.shared.metrics.occupancy(st.queue.len(), st.running);
        if st.running == 0 && st.queue.is_empty() {
            self.shared.wake.notify_all();
        }
    }
}
