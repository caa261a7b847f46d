//! The HTTP server: axum routes in OpenAI's API, each generation request
//! submitted to the [`Engine`] and its tokens turned into text as they come
//! (one JSON answer, or server-sent events with `"stream": true`), errors in
//! OpenAI's format, and a graceful shutdown (stop admitting, let the running
//! requests finish within a grace period).
//!
//! Cancellation is by ownership: a request's event receiver lives in its
//! handler's future or its response stream, so a client that goes away drops
//! it, and the engine frees the sequence at its next step.

use crate::api::{
    ApiError, ChatChoice, ChatChunkChoice, ChatMessage, Chunk, Completion, Delta, Endpoint, GenerateBody, Generation,
    ModelCard, ModelView, OurocExt, TextChoice, Usage,
};
use crate::engine::{Engine, Event, Rejected, Request as EngineRequest};
use crate::text::TextOutput;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use ouroc_runtime::Tokenizer;
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Request bodies above this are refused (413).
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

/// A 503's `Retry-After` while shutting down: another replica can answer now.
const SHUTDOWN_RETRY_AFTER_S: u64 = 1;

/// The model a server serves, beside the engine that runs it.
pub struct Served {
    /// The name clients give as `model` (and `GET /v1/models` lists).
    pub name: String,
    pub tokenizer: Tokenizer,
    /// Ids that end every generation: the tokenizer's eos ids and the
    /// config's (chat requests add `<|im_end|>`).
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub body_limit: usize,
    /// After a shutdown signal, how long running requests may take.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            body_limit: DEFAULT_BODY_LIMIT,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The server: routes over one engine (cheap to clone).
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

struct AppState {
    engine: Engine,
    served: Served,
    options: ServerOptions,
    /// `created` of the model card.
    started: u64,
    shutting_down: AtomicBool,
    /// Generation requests whose response is not finished.
    in_flight: AtomicUsize,
    /// Request ids and default seeds: a counter through a random hash.
    counter: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl AppState {
    fn fresh(&self) -> u64 {
        self.hasher.hash_one(self.counter.fetch_add(1, Ordering::Relaxed))
    }
}

/// Counts a generation request in flight while it lives.
struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: &Arc<AppState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Server {
    pub fn new(engine: Engine, served: Served, options: ServerOptions) -> Server {
        Server {
            state: Arc::new(AppState {
                engine,
                served,
                options,
                started: unix_time(),
                shutting_down: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                counter: AtomicU64::new(0),
                hasher: Default::default(),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    /// The routes (every response, errors included, in OpenAI's format).
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/v1/models/{model}", get(model))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(state.clone(), record))
            .layer(DefaultBodyLimit::max(self.state.options.body_limit))
            .with_state(state)
    }

    /// Stop admitting requests: `/health` answers 503, new generations get
    /// 503 with `Retry-After`; those running go on.
    pub fn begin_shutdown(&self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.state.engine.begin_shutdown();
    }

    /// Generation requests whose response is not finished.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Serve on `listener` until the first message on `signals`; then shut
    /// down gracefully: stop admitting, wait for the running requests (at
    /// most the grace period, or until a second message), close.
    pub async fn serve(&self, listener: TcpListener, mut signals: mpsc::UnboundedReceiver<()>) -> std::io::Result<()> {
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            let _ = close_rx.await;
        });
        let mut server = tokio::spawn(server.into_future());
        // A closed `signals` sends nothing more: it does not stop the server.
        tokio::select! {
            r = &mut server => return r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Some(()) = signals.recv() => {}
        }
        self.begin_shutdown();
        let grace = self.state.options.shutdown_grace;
        eprintln!(
            "shutting down: {} request(s) running, {} s to finish",
            self.in_flight(),
            grace.as_secs_f64()
        );
        let drained = tokio::select! {
            r = tokio::time::timeout(grace, self.idle()) => r.is_ok(),
            Some(()) = signals.recv() => false,
        };
        if !drained {
            eprintln!(
                "shutting down: {} request(s) still running are cut off",
                self.in_flight()
            );
        }
        let _ = close_tx.send(());
        // Idle keep-alive connections close at once; a response still
        // streaming after the grace period is cut.
        let linger = if drained {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(100)
        };
        match tokio::time::timeout(linger, &mut server).await {
            Ok(r) => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(_) => {
                server.abort();
                Ok(())
            }
        }
    }

    /// Until no generation request is in flight.
    async fn idle(&self) {
        while self.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Bind `addr` and serve until SIGTERM or Ctrl-C (then shut down
    /// gracefully; a second signal cuts the grace period short), on a
    /// runtime of its own. `on_listening` gets the bound address.
    pub fn run_blocking(&self, addr: &str, on_listening: impl FnOnce(SocketAddr)) -> Result<(), String> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("ouroc-http")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        rt.block_on(async {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(forward_signals(tx));
            on_listening(local);
            self.serve(listener, rx).await.map_err(|e| format!("server error: {e}"))
        })
    }
}

/// Sends one message per SIGTERM or Ctrl-C (SIGINT).
async fn forward_signals(tx: mpsc::UnboundedSender<()>) {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        #[cfg(unix)]
        let terminate = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
            _ = terminate => {}
        }
        if tx.send(()).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- middleware

/// The endpoint label of a path in `/metrics` (unknown paths share one, so
/// clients cannot grow the label set).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models/") => "/v1/models/{model}",
        _ => "other",
    }
}

/// The method a known path takes.
fn allowed_method(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" | "/v1/completions" => "POST",
        _ => "GET",
    }
}

/// Records every answer in the metrics, and turns any error answer not
/// already in OpenAI's format (axum's own: 405, 413, ...) into it.
async fn record(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let label = endpoint_label(req.uri().path());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let response = if response.status().as_u16() >= 400 && !is_json {
        as_api_error(response, &method, &path).await
    } else {
        response
    };
    state.engine.metrics().request(label, response.status().as_u16());
    response
}

/// An error answer with a plain-text or empty body, in OpenAI's format.
async fn as_api_error(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    let allow = response.headers().get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        // axum adds `Allow` outside this layer: the routes say it here.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("method {method} is not allowed on {path}; use {}", allowed_method(path))
        }
        _ if !text.is_empty() => text,
        _ => format!("{} ({method} {path})", status.canonical_reason().unwrap_or("error")),
    };
    let mut error = ApiError::new(status, message);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        error = error.code("request_too_large");
    }
    let mut out = error.into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    out
}

/// A JSON body, its errors in OpenAI's format: 400 for bad JSON or a
/// field of the wrong type (naming the field), 413 over the body limit.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let e = ApiError::new(r.status(), r.body_text());
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                e.code("request_too_large")
            } else {
                e
            }
        })?;
        crate::api::parse_body(&bytes).map(JsonBody)
    }
}

// ---------------------------------------------------------------- small routes

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("Invalid URL ({method} {})", uri.path())).code("not_found")
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    // The engine also closes itself if it fails (a bug): then this replica
    // must leave the balancer's pool too.
    if state.shutting_down.load(Ordering::SeqCst) || state.engine.shutting_down() {
        return shutting_down().into_response();
    }
    let (queued, running) = state.engine.load();
    Json(serde_json::json!({"status": "ok", "queued": queued, "running": running})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = state.engine.metrics();
    let (queued, running) = state.engine.load();
    metrics.occupancy(queued, running);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics.render(),
    )
        .into_response()
}

fn model_card(state: &AppState) -> ModelCard {
    let info = state.engine.info();
    ModelCard {
        id: state.served.name.clone(),
        object: "model",
        created: state.started,
        owned_by: "ouroc",
        max_model_len: info.max_positions,
        loop_steps: info.loop_steps,
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({"object": "list", "data": [model_card(&state)]})).into_response()
}

async fn model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if name != state.served.name {
        return model_not_found(&name, &state.served.name).into_response();
    }
    Json(model_card(&state)).into_response()
}

fn model_not_found(asked: &str, served: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("The model `{asked}` does not exist. This server serves `{served}`."),
    )
    .param("model")
    .code("model_not_found")
}

fn shutting_down() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")
        .code("shutting_down")
        .retry_after(SHUTDOWN_RETRY_AFTER_S)
}

// ---------------------------------------------------------------- generation

async fn chat_completions(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<GenerateBody>) -> Response {
    generate(state, Endpoint::Chat, body)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn completions(State(state): State<Arc<AppState>>, JsonBody(body): JsonBody<GenerateBody>) -> Response {
    generate(state, Endpoint::Completions, body)
        .await
        .unwrap_or_else(|e| e.into_response())
}

/// Check, submit, answer.
async fn generate(state: Arc<AppState>, endpoint: Endpoint, body: GenerateBody) -> Result<Response, ApiError> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(shutting_down());
    }
    // Rendering the chat template and tokenising a prompt of up to the body limit take a
    // while: off the threads that serve the other connections.
    let checking = state.clone();
    let generation = tokio::task::spawn_blocking(move || {
        let state = checking;
        let view = ModelView {
            name: &state.served.name,
            tokenizer: &state.served.tokenizer,
            info: state.engine.info(),
            stop_ids: &state.served.stop_ids,
        };
        body.check(endpoint, &view, state.fresh())
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("checking the request failed: {e}"),
        )
    })??;
    let (events_tx, events) = mpsc::unbounded_channel();
    let in_flight = InFlight::new(&state);
    let Generation {
        prompt,
        max_tokens,
        sampling,
        exit,
        stop_ids,
        stop_strings,
        stream,
        include_usage,
    } = generation;
    let prompt_tokens = prompt.len();
    state
        .engine
        .submit(EngineRequest {
            prompt,
            max_tokens,
            sampling,
            exit,
            stop_ids,
            events: events_tx,
        })
        .map_err(rejected)?;
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let head = Head {
        id: format!("{prefix}-{:016x}", state.fresh()),
        created: unix_time(),
        model: state.served.name.clone(),
        endpoint,
    };
    let run = Run {
        events: Some(events),
        text: TextOutput::new(stop_strings),
        prompt_tokens,
        completion_tokens: 0,
        _in_flight: in_flight,
        state,
    };
    if stream {
        Ok(stream_response(head, run, include_usage))
    } else {
        whole_response(head, run).await
    }
}

fn rejected(r: Rejected) -> ApiError {
    match r {
        // The engine counts these in its metrics.
        Rejected::Busy { retry_after_s, .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, r.to_string())
            .code("server_busy")
            .retry_after(retry_after_s.max(1)),
        Rejected::ShuttingDown => shutting_down(),
        Rejected::Invalid(msg) => ApiError::new(StatusCode::BAD_REQUEST, msg),
    }
}

/// What every response or chunk of a request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
}

/// A submitted request, read event by event.
struct Run {
    /// None once the request ended (dropping it cancels a sequence still
    /// running, e.g. after a stop string).
    events: Option<mpsc::UnboundedReceiver<Event>>,
    text: TextOutput,
    prompt_tokens: usize,
    completion_tokens: usize,
    _in_flight: InFlight,
    state: Arc<AppState>,
}

/// What the events at hand gave.
#[derive(Default)]
struct Progress {
    text: String,
    exit_depths: Vec<usize>,
    end: Option<End>,
}

enum End {
    /// OpenAI's finish_reason.
    Finished(&'static str),
    Failed(String),
}

impl Run {
    /// Waits for the next event, then takes every event already there (one
    /// chunk for them all); None after the end.
    async fn next(&mut self) -> Option<Progress> {
        let events = self.events.as_mut()?;
        let mut event = events.recv().await;
        let mut progress = Progress::default();
        let tok = &self.state.served.tokenizer;
        loop {
            match event {
                Some(Event::Token { id, depth }) => {
                    self.completion_tokens += 1;
                    progress.exit_depths.push(depth);
                    match self.text.push(tok, id) {
                        Ok(r) => {
                            progress.text.push_str(&r.text);
                            if r.stopped {
                                progress.end = Some(End::Finished("stop"));
                            }
                        }
                        Err(e) => progress.end = Some(End::Failed(e)),
                    }
                }
                Some(Event::Done { finish, .. }) => {
                    progress.end = Some(match self.text.finish(tok) {
                        Ok(r) => {
                            progress.text.push_str(&r.text);
                            End::Finished(if r.stopped { "stop" } else { finish.name() })
                        }
                        Err(e) => End::Failed(e),
                    });
                }
                Some(Event::Error(msg)) => progress.end = Some(End::Failed(msg)),
                None => progress.end = Some(End::Failed("the engine stopped before the request finished".into())),
            }
            if progress.end.is_some() {
                break;
            }
            event = match events.try_recv() {
                Ok(e) => Some(e),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
        }
        if progress.end.is_some() {
            self.events = None;
        }
        Some(progress)
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.completion_tokens)
    }
}

fn failed(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("generation failed: {message}"),
    )
}

/// The whole completion as one JSON answer.
async fn whole_response(head: Head, mut run: Run) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut exit_depths = Vec::new();
    let finish = loop {
        let Some(p) = run.next().await else {
            return Err(failed("the request ended without a result".into()));
        };
        text.push_str(&p.text);
        exit_depths.extend(p.exit_depths);
        match p.end {
            Some(End::Finished(reason)) => break reason,
            Some(End::Failed(msg)) => return Err(failed(msg)),
            None => {}
        }
    };
    let usage = run.usage();
    let ouroc = OurocExt { exit_depths };
    let response = match head.endpoint {
        Endpoint::Chat => Json(Completion {
            id: head.id,
            object: "chat.completion",
            created: head.created,
            model: head.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            ouroc,
        })
        .into_response(),
        Endpoint::Completions => Json(Completion {
            id: head.id,
            object: "text_completion",
            created: head.created,
            model: head.model,
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish),
            }],
            usage,
            ouroc,
        })
        .into_response(),
    };
    Ok(response)
}

/// Where a streamed response is.
enum Phase {
    /// Chat: the chunk with the assistant's role comes first.
    Start,
    Tokens,
    /// The usage chunk (`stream_options.include_usage`).
    Usage,
    Done,
    End,
}

struct StreamState {
    head: Head,
    run: Run,
    include_usage: bool,
    phase: Phase,
}

impl StreamState {
    fn chunk_event<C: serde::Serialize>(
        &self,
        choices: Vec<C>,
        usage: Option<Usage>,
        ouroc: Option<OurocExt>,
    ) -> SseEvent {
        let chunk = Chunk {
            id: self.head.id.clone(),
            object: match self.head.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            },
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
            ouroc,
        };
        sse_json(&chunk)
    }

    /// The chunk of some tokens' text and depths.
    fn progress_event(&self, text: String, exit_depths: Vec<usize>, finish: Option<&'static str>) -> SseEvent {
        let ouroc = Some(OurocExt { exit_depths });
        match self.head.endpoint {
            Endpoint::Chat => {
                let delta = Delta {
                    role: None,
                    content: (!text.is_empty() || finish.is_none()).then_some(text),
                };
                let choice = ChatChunkChoice {
                    index: 0,
                    delta,
                    logprobs: None,
                    finish_reason: finish,
                };
                self.chunk_event(vec![choice], None, ouroc)
            }
            Endpoint::Completions => {
                let choice = TextChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason: finish,
                };
                self.chunk_event(vec![choice], None, ouroc)
            }
        }
    }

    /// The next event of the stream; None after `[DONE]`.
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.phase = Phase::Tokens;
                    if self.head.endpoint == Endpoint::Chat {
                        let choice = ChatChunkChoice {
                            index: 0,
                            delta: Delta {
                                role: Some("assistant"),
                                content: Some(String::new()),
                            },
                            logprobs: None,
                            finish_reason: None,
                        };
                        return Some(self.chunk_event(vec![choice], None, Some(OurocExt::default())));
                    }
                }
                Phase::Tokens => {
                    let Some(p) = self.run.next().await else {
                        self.phase = Phase::Done;
                        continue;
                    };
                    return Some(match p.end {
                        None => self.progress_event(p.text, p.exit_depths, None),
                        Some(End::Finished(reason)) => {
                            self.phase = if self.include_usage { Phase::Usage } else { Phase::Done };
                            self.progress_event(p.text, p.exit_depths, Some(reason))
                        }
                        Some(End::Failed(msg)) => {
                            self.phase = Phase::Done;
                            sse_json(&failed(msg).body())
                        }
                    });
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let usage = self.run.usage();
                    return Some(self.chunk_event(Vec::<ChatChunkChoice>::new(), Some(usage), None));
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    return Some(SseEvent::default().data("[DONE]"));
                }
                Phase::End => return None,
            }
        }
    }
}

fn sse_json<T: serde::Serialize>(value: &T) -> SseEvent {
    // These types always serialise.
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// Server-sent events: `data: {chunk}` per batch of tokens, then
/// `data: [DONE]`. The stream owns the request: a client that disconnects
/// drops it, and with it the engine's receiver.
fn stream_response(head: Head, run: Run, include_usage: bool) -> Response {
    let state = StreamState {
        head,
        run,
        include_usage,
        phase: Phase::Start,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        let e = s.next_event().await?;
        Some((Ok::<_, Infallible>(e), s))
    });
    sse(events)
}

fn sse<S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static>(events: S) -> Response {
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
