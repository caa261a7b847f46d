//! The HTTP layer driven in-process (`tower::ServiceExt::oneshot` on the router) over the real
//! engine on a test fixture (mha-r4, compiled and run on the CPU JIT): responses against what
//! the engine gives the same request alone, streaming against non-streaming, stop strings,
//! per-request exit policies, every error case in OpenAI's format, 503 when busy or shutting
//! down, and cancellation when a client drops its stream.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use ouroc_driver::Driver;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuDevice, CpuForward, CpuOptions};
use ouroc_runtime::{SamplingParams, Tokenizer};
use ouroc_serve::engine::{Engine, EngineConfig, Event};
use ouroc_serve::http::{Served, Server, ServerOptions};
use ouroc_serve::metrics::Metrics;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tower::ServiceExt;

const MODEL: &str = "mha-r4";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(MODEL)
}

fn driver(policy: &str, max_positions: usize) -> Result<Driver<CpuDevice>, String> {
    let ckpt = Checkpoint::open(&fixture()).map_err(|e| e.to_string())?;
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy)?,
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).map_err(|e| e.to_string())?;
    let p = ouroc_compile::compile_graph(g, false)
        .map_err(|e| e.to_string())?
        .program;
    let o = CpuOptions {
        threads: 1,
        early_exit: true,
        ..CpuOptions::new(max_positions)
    };
    Ok(CpuForward::with_options(p, &ckpt, &o)?.into_driver())
}

/// The fixture's stop ids, as `ouroc serve` takes them: the tokenizer's eos ids and the config's.
fn eos_ids(tok: &Tokenizer) -> Vec<u32> {
    let ckpt = Checkpoint::open(&fixture()).unwrap();
    let mut ids = tok.eos_ids.clone();
    ids.extend(ckpt.config.eos_token_ids.iter().copied());
    ids
}

/// A server on the fixture compiled for `policy`, with a context of `max_positions`;
/// `stop_at_eos: false` serves without stop ids (every completion runs to max_tokens).
fn server(config: EngineConfig, policy: &str, max_positions: usize, stop_at_eos: bool) -> Server {
    let policy = policy.to_string();
    let engine = Engine::start(config, Arc::new(Metrics::new()), move || driver(&policy, max_positions)).unwrap();
    let tokenizer = Tokenizer::load(&fixture()).unwrap();
    let stop_ids = if stop_at_eos { eos_ids(&tokenizer) } else { vec![] };
    let served = Served {
        name: MODEL.into(),
        tokenizer,
        stop_ids,
    };
    Server::new(engine, served, ServerOptions::default())
}

/// One server shared by the tests that do not look at the engine's load.
fn shared() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| server(EngineConfig::default(), "threshold:0.5", 64, true))
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::load(&fixture()).unwrap())
}

async fn send(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> axum::response::Response {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

/// Status, headers and the whole body.
async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let r = send(app, method, uri, body).await;
    let (parts, body) = r.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

async fn post(app: &Router, uri: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
    let (s, h, b) = call(app, "POST", uri, body.to_string()).await;
    let v =
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, h, v)
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.to_string())
        .collect()
}

/// What the engine gives a request alone: (token ids with depths, finish reason).
fn engine_alone(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop_ids: Vec<u32>,
) -> (Vec<(u32, usize)>, String) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(ouroc_serve::engine::Request {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            exit: None,
            stop_ids,
            events: tx,
        })
        .unwrap();
    let mut toks = Vec::new();
    loop {
        match rx.blocking_recv().expect("a final event") {
            Event::Token { id, depth } => toks.push((id, depth)),
            Event::Done { finish, .. } => return (toks, finish.name().to_string()),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn depths(v: &Value) -> Vec<usize> {
    v["ouroc"]["exit_depths"]
        .as_array()
        .unwrap_or_else(|| panic!("no ouroc.exit_depths in {v}"))
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn chat_prompt_ids(user: &str) -> Vec<u32> {
    let tok = tokenizer();
    let text = tok.chat().prompt(None, user).unwrap();
    tok.encode(&text).unwrap()
}

/// Checks a non-streaming answer against the engine's tokens for the same request alone.
fn check_against_engine(v: &Value, object: &str, text: &str, prompt_len: usize, alone: &(Vec<(u32, usize)>, String)) {
    let (toks, finish) = alone;
    let ids: Vec<u32> = toks.iter().map(|t| t.0).collect();
    assert_eq!(v["object"], object, "{v}");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().is_some_and(|t| t > 1_600_000_000), "{v}");
    assert_eq!(text, tokenizer().decode(&ids).unwrap(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], finish.as_str(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_len, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], ids.len(), "{v}");
    assert_eq!(v["usage"]["total_tokens"], prompt_len + ids.len(), "{v}");
    assert_eq!(depths(v), toks.iter().map(|t| t.1).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_equal_the_engine_alone() {
    let server = shared();
    let app = server.router();
    let tok = tokenizer();
    let stops = eos_ids(tok);

    let prompt = "def add(a, b):";
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (status, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    let ids = tok.encode(prompt).unwrap();
    let engine = server.engine().clone();
    let alone = tokio::task::spawn_blocking(move || engine_alone(&engine, ids, 12, stops))
        .await
        .unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    check_against_engine(&v, "text_completion", text, tok.encode(prompt).unwrap().len(), &alone);

    // The same prompt as token ids.
    let ids = tok.encode(prompt).unwrap();
    let (status, _, by_ids) = post(
        &app,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], v["choices"][0]["text"]);

    // Chat: the template's prompt, and <|im_end|> also stops.
    let user = "Write a loop.";
    let body = json!({"messages": [{"role": "user", "content": user}], "max_completion_tokens": 10, "temperature": 0});
    let (status, _, v) = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let prompt_ids = chat_prompt_ids(user);
    let mut stops = eos_ids(tok);
    stops.extend(tok.im_end);
    let engine = server.engine().clone();
    let n = prompt_ids.len();
    let alone = tokio::task::spawn_blocking(move || engine_alone(&engine, prompt_ids, 10, stops))
        .await
        .unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    check_against_engine(&v, "chat.completion", text, n, &alone);

    // Content parts are the same text.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": user}]}],
                       "max_tokens": 10, "temperature": 0});
    let (_, _, v2) = post(&app, "/v1/chat/completions", &parts).await;
    assert_eq!(
        v2["choices"][0]["message"]["content"],
        v["choices"][0]["message"]["content"]
    );
}

/// Streams `body` to `uri`: the chunks (parsed) and whether `[DONE]` ended the stream.
async fn stream(app: &Router, uri: &str, body: &Value) -> (Vec<Value>, bool) {
    let (status, headers, bytes) = call(app, "POST", uri, body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{headers:?}"
    );
    let data = sse_data(&bytes);
    let done = data.last().is_some_and(|d| d == "[DONE]");
    let chunks = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (chunks, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_add_up_to_the_whole_answer() {
    let app = shared().router();
    for (uri, base, object) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}],
                   "max_tokens": 14, "temperature": 0}),
            "chat.completion.chunk",
        ),
        (
            "/v1/completions",
            json!({"prompt": "for i in range(", "max_tokens": 14, "temperature": 0}),
            "text_completion",
        ),
    ] {
        let (_, _, whole) = post(&app, uri, &base).await;
        let mut body = base.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (chunks, done) = stream(&app, uri, &body).await;
        assert!(done, "{uri}: the stream ends with [DONE]");
        let chat = uri.contains("chat");
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(id.starts_with(if chat { "chatcmpl-" } else { "cmpl-" }));
        let (usage_chunk, token_chunks) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
        assert_eq!(usage_chunk["usage"], whole["usage"]);
        let mut text = String::new();
        let mut all_depths = Vec::new();
        for (i, c) in token_chunks.iter().enumerate() {
            assert_eq!(c["object"], object);
            assert_eq!(c["id"], id, "one id per stream");
            assert_eq!(c["usage"], Value::Null, "usage is null until the usage chunk: {c}");
            let choice = &c["choices"][0];
            let last = i + 1 == token_chunks.len();
            assert_eq!(choice["finish_reason"].is_null(), !last, "{c}");
            if chat {
                assert_eq!(choice["delta"]["role"].is_string(), i == 0, "{c}");
                text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            } else {
                text.push_str(choice["text"].as_str().unwrap());
            }
            all_depths.extend(depths(c));
        }
        let whole_text = if chat {
            &whole["choices"][0]["message"]["content"]
        } else {
            &whole["choices"][0]["text"]
        };
        assert_eq!(text, whole_text.as_str().unwrap(), "{uri}");
        assert_eq!(all_depths, depths(&whole), "{uri}");
        assert_eq!(
            token_chunks.last().unwrap()["choices"][0]["finish_reason"],
            whole["choices"][0]["finish_reason"]
        );

        // Without include_usage no chunk has a usage field.
        body["stream_options"] = json!({"include_usage": false});
        let (chunks, done) = stream(&app, uri, &body).await;
        assert!(done);
        assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{chunks:?}");
    }
}

/// Waits until the engine has nothing queued or running.
async fn until_idle(engine: &Engine) {
    let t = Instant::now();
    while engine.load() != (0, 0) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the engine still holds {:?}",
            engine.load()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_cuts_the_text_and_ends_the_sequence() {
    // No eos stop ids: the generation would run to max_tokens.
    let server = server(EngineConfig::default(), "threshold:0.5", 64, false);
    let app = server.router();
    let base = json!({"prompt": "x = [", "max_tokens": 40, "temperature": 0});
    let (_, _, whole) = post(&app, "/v1/completions", &base).await;
    let full = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(
        chars.len() >= 8,
        "the fixture's greedy text is too short for this test: {full:?}"
    );
    // A two-character stop string from the middle of the text; the text ends before its first
    // occurrence.
    let (a, _) = chars[chars.len() / 2];
    let b = chars.get(chars.len() / 2 + 2).map_or(full.len(), |c| c.0);
    let stop = full[a..b].to_string();
    let cut = full[..full.find(&stop).unwrap()].to_string();
    let mut body = base.clone();
    body["stop"] = json!(["\u{1}never", stop]);
    let (status, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], cut.as_str(), "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(n < 40, "the generation ended at the stop string");
    assert_eq!(depths(&v).len(), n);
    // The dropped receiver ended the sequence in the engine.
    until_idle(server.engine()).await;

    // Streaming gives the same text (held back while it could still be a stop string).
    body["stream"] = json!(true);
    let (chunks, done) = stream(&app, "/v1/completions", &body).await;
    assert!(done);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, cut);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    until_idle(server.engine()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_extension_sets_each_tokens_depth() {
    let app = shared().router();
    for (exit, depth) in [("step:0", 1), ("step:2", 3), ("last", 4)] {
        let body = json!({"prompt": "import os", "max_tokens": 6, "temperature": 0, "exit": exit});
        let (status, _, v) = post(&app, "/v1/completions", &body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let d = depths(&v);
        assert_eq!(d.len(), v["usage"]["completion_tokens"].as_u64().unwrap() as usize);
        assert!(!d.is_empty() && d.iter().all(|&x| x == depth), "exit {exit}: {d:?}");
    }
}

/// Checks an error answer: the status, OpenAI's error body, and the param or code.
fn check_error(
    what: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    want: StatusCode,
    param: Option<&str>,
) -> Value {
    assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(body));
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{what}: {headers:?}"
    );
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{what}: {v}");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_openai_errors() {
    let app = shared().router();
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let bad = StatusCode::BAD_REQUEST;
    let cases: Vec<(&str, &str, Value, StatusCode, Option<&str>)> = vec![
        ("no messages", chat, json!({"max_tokens": 3}), bad, Some("messages")),
        ("no prompt", cmpl, json!({"max_tokens": 3}), bad, Some("prompt")),
        (
            "messages not a list",
            chat,
            json!({"messages": "hi"}),
            bad,
            Some("messages"),
        ),
        ("empty messages", chat, json!({"messages": []}), bad, Some("messages")),
        (
            "unknown role",
            chat,
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            bad,
            Some("messages[0].role"),
        ),
        ("role missing", chat, json!({"messages": [{"content": "x"}]}), bad, None),
        (
            "image part",
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}),
            bad,
            Some("messages[0].content"),
        ),
        ("prompt a number", cmpl, json!({"prompt": 5}), bad, Some("prompt")),
        ("two prompts", cmpl, json!({"prompt": ["a", "b"]}), bad, Some("prompt")),
        (
            "token id out of vocab",
            cmpl,
            json!({"prompt": [1, 100000]}),
            bad,
            Some("prompt"),
        ),
        ("empty prompt", cmpl, json!({"prompt": ""}), bad, Some("prompt")),
        (
            "max_tokens a string",
            cmpl,
            json!({"prompt": "a", "max_tokens": "9"}),
            bad,
            Some("max_tokens"),
        ),
        (
            "max_tokens negative",
            cmpl,
            json!({"prompt": "a", "max_tokens": -1}),
            bad,
            Some("max_tokens"),
        ),
        (
            "max_tokens zero",
            cmpl,
            json!({"prompt": "a", "max_tokens": 0}),
            bad,
            Some("max_tokens"),
        ),
        (
            "temperature high",
            chat,
            json!({"messages": msgs, "temperature": 2.5}),
            bad,
            Some("temperature"),
        ),
        (
            "temperature a string",
            chat,
            json!({"messages": msgs, "temperature": "hot"}),
            bad,
            Some("temperature"),
        ),
        (
            "top_p zero",
            chat,
            json!({"messages": msgs, "top_p": 0}),
            bad,
            Some("top_p"),
        ),
        (
            "top_k negative",
            chat,
            json!({"messages": msgs, "top_k": -3}),
            bad,
            Some("top_k"),
        ),
        (
            "seed a float",
            chat,
            json!({"messages": msgs, "seed": 1.5}),
            bad,
            Some("seed"),
        ),
        ("n two", chat, json!({"messages": msgs, "n": 2}), bad, Some("n")),
        (
            "presence_penalty",
            chat,
            json!({"messages": msgs, "presence_penalty": 0.5}),
            bad,
            Some("presence_penalty"),
        ),
        (
            "frequency_penalty",
            cmpl,
            json!({"prompt": "a", "frequency_penalty": 1}),
            bad,
            Some("frequency_penalty"),
        ),
        (
            "logprobs",
            chat,
            json!({"messages": msgs, "logprobs": true}),
            bad,
            Some("logprobs"),
        ),
        (
            "completion logprobs",
            cmpl,
            json!({"prompt": "a", "logprobs": 2}),
            bad,
            Some("logprobs"),
        ),
        (
            "five stops",
            chat,
            json!({"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}),
            bad,
            Some("stop"),
        ),
        (
            "stop a number",
            chat,
            json!({"messages": msgs, "stop": 3}),
            bad,
            Some("stop"),
        ),
        (
            "stream a string",
            chat,
            json!({"messages": msgs, "stream": "yes"}),
            bad,
            Some("stream"),
        ),
        (
            "stream_options alone",
            chat,
            json!({"messages": msgs, "stream_options": {"include_usage": true}}),
            bad,
            Some("stream_options"),
        ),
        (
            "bad exit",
            cmpl,
            json!({"prompt": "a", "exit": "sometimes"}),
            bad,
            Some("exit"),
        ),
        (
            "exit step out of range",
            cmpl,
            json!({"prompt": "a", "exit": "step:9"}),
            bad,
            Some("exit"),
        ),
        (
            "tools",
            chat,
            json!({"messages": msgs, "tools": [{"type": "function"}]}),
            bad,
            Some("tools"),
        ),
        (
            "unknown model",
            chat,
            json!({"model": "gpt-9", "messages": msgs}),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
    ];
    for (what, uri, body, want, param) in cases {
        let (s, h, b) = call(&app, "POST", uri, body.to_string()).await;
        let v = check_error(what, s, &h, &b, want, param);
        if want == StatusCode::NOT_FOUND {
            assert_eq!(v["error"]["code"], "model_not_found");
        }
    }

    // Too long for the context (64): both numbers named.
    let (s, h, b) = call(
        &app,
        "POST",
        cmpl,
        json!({"prompt": "a b c", "max_tokens": 500}).to_string(),
    )
    .await;
    let v = check_error("too long", s, &h, &b, bad, Some("max_tokens"));
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("64") && m.contains("500"), "{m}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let long = "word ".repeat(200);
    let (s, h, b) = call(&app, "POST", cmpl, json!({"prompt": long}).to_string()).await;
    check_error("prompt over the context", s, &h, &b, bad, Some("prompt"));

    // Bodies that are not a JSON object.
    for (what, body) in [
        ("not JSON", "{not json"),
        ("empty body", ""),
        ("a list", "[1, 2]"),
        ("a string", "\"hi\""),
    ] {
        let (s, h, b) = call(&app, "POST", chat, body.to_string()).await;
        check_error(what, s, &h, &b, bad, None);
    }

    // Routes and methods.
    let (s, h, b) = call(&app, "GET", "/v1/nothing", Body::empty()).await;
    check_error("unknown route", s, &h, &b, StatusCode::NOT_FOUND, None);
    let (s, h, b) = call(&app, "GET", chat, Body::empty()).await;
    let v = check_error("wrong method", s, &h, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("POST"), "{v}");
    let (s, h, b) = call(&app, "POST", "/v1/models", Body::empty()).await;
    check_error(
        "wrong method on models",
        s,
        &h,
        &b,
        StatusCode::METHOD_NOT_ALLOWED,
        None,
    );
    let (s, h, b) = call(&app, "GET", "/v1/models/gpt-9", Body::empty()).await;
    check_error("unknown model card", s, &h, &b, StatusCode::NOT_FOUND, Some("model"));

    // Over the body limit.
    let huge = json!({"prompt": "a".repeat(5 << 20)}).to_string();
    let (s, h, b) = call(&app, "POST", cmpl, huge).await;
    check_error("body over the limit", s, &h, &b, StatusCode::PAYLOAD_TOO_LARGE, None);

    // Unknown fields are ignored; null is absent.
    let body = json!({"prompt": "a", "max_tokens": 2, "temperature": 0, "user": "me", "metadata": {"k": 1},
                      "stop": null, "n": 1, "logprobs": false, "presence_penalty": 0});
    let (s, _, v) = post(&app, cmpl, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_needing_the_gate_is_refused_without_one() {
    // Compiled for `last`: the Program has no exit gate.
    let server = server(EngineConfig::default(), "last", 64, true);
    let app = server.router();
    let (s, h, b) = call(
        &app,
        "POST",
        "/v1/completions",
        json!({"prompt": "a", "exit": "threshold:0.5"}).to_string(),
    )
    .await;
    let v = check_error(
        "threshold without the gate",
        s,
        &h,
        &b,
        StatusCode::BAD_REQUEST,
        Some("exit"),
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("gate"), "{v}");
    let body = json!({"prompt": "a", "max_tokens": 3, "temperature": 0, "exit": "step:1"});
    let (s, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(depths(&v).iter().all(|&d| d == 2), "{v}");
}

/// Reads one data event of a streaming body.
async fn next_data(body: &mut Body) -> String {
    loop {
        let frame = body.frame().await.expect("the stream ended").unwrap();
        if let Some(data) = frame.data_ref() {
            let text = String::from_utf8_lossy(data).to_string();
            if text.contains("data:") {
                return text;
            }
        }
    }
}

/// A server whose completions run long, one sequence: a context of 2048 positions and no eos,
/// so a request for 2000 tokens runs for about 0.4 s (2-core VM), long past the few steps a
/// test takes to look at it while it runs.
fn slow_server(max_queue: usize) -> Server {
    let config = EngineConfig {
        max_seqs: 1,
        max_queue,
        ..EngineConfig::default()
    };
    server(config, "threshold:0.5", 2048, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_answers_503_with_retry_after() {
    let server = slow_server(0);
    let app = server.router();
    let long = json!({"prompt": "a", "max_tokens": 2000, "temperature": 0, "stream": true});
    let first = send(&app, "POST", "/v1/completions", long.to_string()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let mut body = first.into_body();
    next_data(&mut body).await;
    let (s, h, b) = call(
        &app,
        "POST",
        "/v1/completions",
        json!({"prompt": "b", "max_tokens": 2}).to_string(),
    )
    .await;
    // The first request still runs, so the second could not be queued.
    assert_eq!(server.engine().load(), (0, 1));
    let v = check_error("busy", s, &h, &b, StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(v["error"]["code"], "server_busy");
    let retry: u64 = h[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let metrics = call(&app, "GET", "/metrics", Body::empty()).await.2;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("ouroc_requests_rejected_busy_total 1"), "{metrics}");
    assert!(
        metrics.contains("ouroc_requests_total{endpoint=\"/v1/completions\",status=\"503\"} 1"),
        "{metrics}"
    );
    drop(body);
    until_idle(server.engine()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_sequence() {
    let server = slow_server(4);
    let app = server.router();
    for uri in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"prompt": "a", "messages": [{"role": "user", "content": "a"}],
                          "max_tokens": 2000, "temperature": 0, "stream": true});
        let response = send(&app, "POST", uri, body.to_string()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        next_data(&mut body).await;
        next_data(&mut body).await;
        assert_eq!(server.engine().load(), (0, 1), "{uri}: running");
        drop(body);
        until_idle(server.engine()).await;
    }
    // A whole (non-streaming) answer: the client goes away while the handler waits.
    let waiting = {
        let app = app.clone();
        let body = json!({"prompt": "a", "max_tokens": 2000, "temperature": 0});
        tokio::spawn(async move { call(&app, "POST", "/v1/completions", body.to_string()).await })
    };
    let t = Instant::now();
    while server.engine().load() != (0, 1) {
        assert!(t.elapsed() < Duration::from_secs(20), "the request never ran");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    waiting.abort();
    until_idle(server.engine()).await;
    let metrics = String::from_utf8(call(&app, "GET", "/metrics", Body::empty()).await.2).unwrap();
    assert!(metrics.contains("ouroc_requests_cancelled_total 3"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_shutdown() {
    let server = server(EngineConfig::default(), "threshold:0.5", 64, true);
    let app = server.router();
    let (s, _, b) = call(&app, "GET", "/v1/models", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], 64);
    let (s, _, b) = call(&app, "GET", &format!("/v1/models/{MODEL}"), Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["id"], MODEL);
    let (s, _, _) = call(&app, "GET", "/health", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = post(&app, "/v1/completions", &json!({"prompt": "a", "max_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK);

    let (s, h, b) = call(&app, "GET", "/metrics", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(b).unwrap();
    for line in [
        "ouroc_requests_total{endpoint=\"/v1/models\",status=\"200\"} 1",
        "ouroc_requests_total{endpoint=\"/v1/models/{model}\",status=\"200\"} 1",
        "ouroc_requests_total{endpoint=\"/health\",status=\"200\"} 1",
        "ouroc_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "ouroc_queue_depth 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    server.begin_shutdown();
    let (s, h, b) = call(&app, "GET", "/health", Body::empty()).await;
    check_error(
        "health while shutting down",
        s,
        &h,
        &b,
        StatusCode::SERVICE_UNAVAILABLE,
        None,
    );
    let (s, h, b) = call(&app, "POST", "/v1/completions", json!({"prompt": "a"}).to_string()).await;
    let v = check_error(
        "completion while shutting down",
        s,
        &h,
        &b,
        StatusCode::SERVICE_UNAVAILABLE,
        None,
    );
    assert_eq!(v["error"]["code"], "shutting_down");
    assert!(h.contains_key(header::RETRY_AFTER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_with_a_seed_repeats() {
    let app = shared().router();
    let body = json!({"prompt": "class ", "max_tokens": 8, "temperature": 1.2, "top_p": 0.9, "top_k": 50, "seed": 7});
    let (_, _, a) = post(&app, "/v1/completions", &body).await;
    let (_, _, b) = post(&app, "/v1/completions", &body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "{a} {b}");
    assert_eq!(depths(&a), depths(&b));
}
