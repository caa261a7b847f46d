//! The OpenAI API's wire format: request bodies (serde, every field
//! optional so that a missing or mistyped one gets OpenAI's error, not
//! axum's), the checks that turn one into an engine [`Request`]'s
//! parameters, the response bodies, and the error body
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Fields a client sends that ouroc does not know are ignored (OpenAI
//! clients send many); fields it knows but cannot honour (`n` > 1,
//! `logprobs`, penalties, tools, ...) are refused with a 400 naming them,
//! rather than silently giving another answer than the one asked for.
//!
//! [`Request`]: crate::engine::Request

use crate::engine::ModelInfo;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ouroc_ir::ExitPolicy;
use ouroc_runtime::chat::Turn;
use ouroc_runtime::{SamplingParams, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

// ---------------------------------------------------------------- errors

/// An error answer in OpenAI's format.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `type`: invalid_request_error, server_error, ...
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for a 503's `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about the field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    pub fn param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    /// The body `{"error": {...}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

// ---------------------------------------------------------------- requests

/// The body of `POST /v1/chat/completions` and `POST /v1/completions`
/// (one type: the endpoints differ in `messages` / `prompt` only).
#[derive(Debug, Default, Deserialize)]
pub struct GenerateBody {
    pub model: Option<String>,
    /// Chat: the conversation.
    pub messages: Option<Vec<Message>>,
    /// Completions: a string, a list of one string, a list of token ids,
    /// or a list of one list of token ids.
    pub prompt: Option<Value>,
    pub max_tokens: Option<u64>,
    /// Chat's newer name for `max_tokens` (wins when both are given).
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (as vLLM's): keep the k most likely tokens; 0 = all.
    pub top_k: Option<i64>,
    /// Extension (as vLLM's): the CTRL penalty on tokens already in the
    /// context; 1 = off.
    pub repetition_penalty: Option<f64>,
    /// Any integer (a negative one is taken modulo 2^64).
    pub seed: Option<serde_json::Number>,
    /// A string or a list of up to 4.
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Chat: a bool; completions: an integer.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
    /// Extension: this request's exit policy (`last`, `step:K`,
    /// `threshold:Q`, `threshold:Q:bf16`, `weighted`).
    pub exit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// A string, a list of content parts (`{"type": "text", "text": ...}`),
    /// or null (an assistant turn that only called tools).
    pub content: Option<Value>,
}

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// The model a request runs on: what the checks need of it.
pub struct ModelView<'a> {
    pub name: &'a str,
    pub tokenizer: &'a Tokenizer,
    pub info: &'a ModelInfo,
    /// Ids that end every generation (the tokenizer's and the config's eos).
    pub stop_ids: &'a [u32],
}

/// A checked request: what the engine and the text layer need.
#[derive(Debug)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub exit: Option<ExitPolicy>,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A request body: a JSON object deserialised into `T`, or OpenAI's 400
/// naming what is wrong (the field's path for a wrong type).
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("We could not parse the JSON body of your request: {e}"),
        )
        .code("invalid_json")
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "The body of your request must be a JSON object.",
        )
        .code("invalid_json"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let param = e.path().to_string();
        ApiError::invalid(&param, format!("{param}: {}", e.inner()))
    })
}

impl GenerateBody {
    /// Check every field and tokenise the prompt. `fresh_seed`: the seed
    /// of a sampled request that gives none (OpenAI's output then varies).
    pub fn check(self, endpoint: Endpoint, model: &ModelView, fresh_seed: u64) -> Result<Generation, ApiError> {
        if let Some(m) = &self.model
            && m != model.name
        {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{m}` does not exist. This server serves `{}`.", model.name),
            )
            .param("model")
            .code("model_not_found"));
        }
        self.refuse_unsupported(endpoint)?;
        let sampling = self.sampling(fresh_seed)?;
        let exit = self.exit_policy(model.info)?;
        let stop_strings = stop_strings(self.stop.as_ref())?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = match &self.stream_options {
            Some(_) if !stream => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options may only be given with stream: true",
                ));
            }
            Some(o) => o.include_usage.unwrap_or(false),
            None => false,
        };
        let mut stop_ids = model.stop_ids.to_vec();
        let (prompt, what) = match endpoint {
            Endpoint::Chat => {
                // A chat turn ends at <|im_end|> too.
                stop_ids.extend(model.tokenizer.im_end);
                (chat_prompt(self.messages.as_deref(), model.tokenizer)?, "messages")
            }
            Endpoint::Completions => (completion_prompt(self.prompt.as_ref(), model)?, "prompt"),
        };
        let asked = self.max_completion_tokens.or(self.max_tokens);
        let param = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let max_tokens = token_budget(prompt.len(), asked, model.info.max_positions, what, param)?;
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Generation {
            prompt,
            max_tokens,
            sampling,
            exit,
            stop_ids,
            stop_strings,
            stream,
            include_usage,
        })
    }

    /// Known fields whose meaning ouroc does not implement.
    fn refuse_unsupported(&self, endpoint: Endpoint) -> Result<(), ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
        if let Some(b) = self.best_of
            && b != 1
        {
            return Err(ApiError::invalid("best_of", format!("best_of must be 1, got {b}")));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(x) = v
                && x != 0.0
            {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} is not supported (only 0); repetition_penalty is, got {x}"),
                ));
            }
        }
        let wants_logprobs = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) if endpoint == Endpoint::Completions => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if wants_logprobs || self.top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        if let Some(b) = &self.logit_bias
            && !(b.is_null() || b.as_object().is_some_and(|m| m.is_empty()))
        {
            return Err(ApiError::invalid("logit_bias", "logit_bias is not supported"));
        }
        if let Some(t) = &self.tools
            && !(t.is_null() || t.as_array().is_some_and(|a| a.is_empty()))
        {
            return Err(ApiError::invalid("tools", "tools (function calling) are not supported"));
        }
        if let Some(f) = &self.response_format
            && !(f.is_null() || f["type"] == "text")
        {
            return Err(ApiError::invalid(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
        Ok(())
    }

    fn sampling(&self, fresh_seed: u64) -> Result<SamplingParams, ApiError> {
        // OpenAI's defaults: temperature 1, top_p 1.
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be in [0, 2] (0 = greedy), got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = self.top_k.unwrap_or(0);
        let top_k = usize::try_from(top_k)
            .map_err(|_| ApiError::invalid("top_k", format!("top_k must be >= 0 (0 = all tokens), got {top_k}")))?;
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10] (1 = off), got {repetition_penalty}"),
            ));
        }
        let seed = match &self.seed {
            None => fresh_seed,
            Some(n) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer, got {n}")))?,
        };
        let params = SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            repetition_penalty: repetition_penalty as f32,
            seed,
        };
        // The ranges above are narrower; this is a guard for f64 -> f32.
        params.check().map_err(|e| ApiError::invalid("temperature", e))?;
        Ok(params)
    }

    fn exit_policy(&self, info: &ModelInfo) -> Result<Option<ExitPolicy>, ApiError> {
        let Some(text) = &self.exit else { return Ok(None) };
        let policy = ExitPolicy::parse(text).map_err(|e| ApiError::invalid("exit", e))?;
        policy
            .check(info.loop_steps)
            .map_err(|e| ApiError::invalid("exit", e))?;
        let needs_gate = matches!(policy, ExitPolicy::Threshold { .. } | ExitPolicy::Weighted);
        if needs_gate && !info.has_exit_gate {
            let own = info.policy.map_or("none".to_string(), |p| p.to_string());
            return Err(ApiError::invalid(
                "exit",
                format!(
                    "exit policy `{text}` needs the exit gate, which this model's Program does not compute \
                     (it was compiled for exit policy {own}): use last or step:K, or serve the model with \
                     a threshold or weighted --exit"
                ),
            ));
        }
        Ok(Some(policy))
    }
}

/// `stop`: null, a string, or a list of up to 4 non-empty strings.
fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let items: Vec<&Value> = match stop {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
    };
    if items.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("stop takes at most {MAX_STOP_STRINGS} strings, got {}", items.len()),
        ));
    }
    items
        .into_iter()
        .map(|v| match v.as_str() {
            Some("") => Err(ApiError::invalid("stop", "stop strings must not be empty")),
            Some(s) => Ok(s.to_string()),
            None => Err(ApiError::invalid(
                "stop",
                format!("stop must be a string or a list of strings, found {v}"),
            )),
        })
        .collect()
}

/// The chat's prompt tokens: the messages through the model's chat
/// template, then the assistant's turn opened.
fn chat_prompt(messages: Option<&[Message]>, tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let messages = messages.ok_or_else(|| ApiError::invalid("messages", "Missing required parameter: 'messages'."))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = match m.role.as_str() {
            // Chat templates know `system`; OpenAI's `developer` is its newer name.
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool" | "function") => r,
            other => {
                return Err(ApiError::invalid(
                    &format!("{param}.role"),
                    format!(
                        "unknown role `{other}` in {param}; valid roles: system, developer, user, assistant, tool, function"
                    ),
                ));
            }
        };
        let content =
            message_text(m.content.as_ref()).map_err(|e| ApiError::invalid(&format!("{param}.content"), e))?;
        turns.push(Turn::new(role, &content));
    }
    let text = tok
        .chat()
        .render(&turns, true)
        .map_err(|e| ApiError::invalid("messages", e))?;
    encode(tok, &text, "messages")
}

/// A message's content as text: a string, or its text parts joined by
/// newlines (as vLLM joins them).
fn message_text(content: Option<&Value>) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(t)) => texts.push(t),
                    (Some("text"), None) => return Err("a text content part needs a string `text`".into()),
                    (Some(other), _) => {
                        return Err(format!("content parts of type `{other}` are not supported (only text)"));
                    }
                    (None, _) => return Err(format!("a content part needs a `type`, found {part}")),
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(format!(
            "content must be a string or a list of content parts, found {other}"
        )),
    }
}

/// The completion's prompt tokens.
fn completion_prompt(prompt: Option<&Value>, model: &ModelView) -> Result<Vec<u32>, ApiError> {
    let bad = |msg: String| ApiError::invalid("prompt", msg);
    let prompt = match prompt {
        None | Some(Value::Null) => return Err(bad("Missing required parameter: 'prompt'.".into())),
        Some(p) => p,
    };
    // A list of one prompt is that prompt.
    let one = match prompt.as_array().map(Vec::as_slice) {
        Some([single @ (Value::String(_) | Value::Array(_))]) => single,
        Some(items) if items.len() > 1 && items.iter().all(|v| v.is_string() || v.is_array()) => {
            return Err(bad(format!(
                "one prompt per request (got {}): send the prompts as separate requests",
                items.len()
            )));
        }
        _ => prompt,
    };
    match one {
        Value::String(s) => encode(model.tokenizer, s, "prompt"),
        Value::Array(ids) => {
            let ids = ids
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|&id| (id as usize) < model.info.vocab)
                        .ok_or_else(|| {
                            bad(format!(
                                "a token id prompt holds integers from 0 to {} (the vocabulary), found {v}",
                                model.info.vocab.saturating_sub(1)
                            ))
                        })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            if ids.is_empty() {
                return Err(bad("the prompt is empty".into()));
            }
            Ok(ids)
        }
        other => Err(bad(format!(
            "prompt must be a string, a list of one string, or a list of token ids, found {other}"
        ))),
    }
}

fn encode(tok: &Tokenizer, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    let ids = tok.encode(text).map_err(|e| ApiError::invalid(param, e))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(param, format!("the {param} give an empty prompt")));
    }
    Ok(ids)
}

/// Tokens the request may generate: `asked`, or the rest of the context.
fn token_budget(prompt: usize, asked: Option<u64>, context: usize, what: &str, param: &str) -> Result<usize, ApiError> {
    let too_long = |msg: String| ApiError::invalid(what, msg).code("context_length_exceeded");
    match asked {
        Some(0) => Err(ApiError::invalid(param, format!("{param} must be at least 1"))),
        Some(n) => {
            let total = (prompt as u64).saturating_add(n);
            if total > context as u64 {
                return Err(too_long(format!(
                    "This model's maximum context length is {context} tokens. However, you requested {total} \
                     tokens ({prompt} in the {what}, {n} in the completion). Please reduce the length of the \
                     {what} or completion."
                ))
                .param(param));
            }
            Ok(n as usize)
        }
        None if prompt >= context => Err(too_long(format!(
            "This model's maximum context length is {context} tokens. However, your {what} resulted in \
             {prompt} tokens, which leaves none for the completion. Please reduce the length of the {what}."
        ))),
        None => Ok(context - prompt),
    }
}

// ---------------------------------------------------------------- responses

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// The `ouroc` extension object of a response or chunk.
#[derive(Debug, Serialize, Clone, Default)]
pub struct OurocExt {
    /// The loop depth (1..=R) each generated token exited at, in order.
    pub exit_depths: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion` and `text_completion` (non-streaming), with `C` the
/// choice type.
#[derive(Debug, Serialize)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    pub usage: Usage,
    pub ouroc: OurocExt,
}

#[derive(Debug, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// A streamed `chat.completion.chunk` or `text_completion` chunk. `usage`
/// is present (null until the usage chunk) when the client asked for it.
#[derive(Debug, Serialize)]
pub struct Chunk<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ouroc: Option<OurocExt>,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Positions (prompt + completion) a request may use (vLLM's field).
    pub max_model_len: usize,
    /// Loop steps R of the model.
    pub loop_steps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_defaults_to_the_rest_of_the_context_and_names_both_numbers() {
        assert_eq!(token_budget(10, None, 64, "prompt", "max_tokens").unwrap(), 54);
        assert_eq!(token_budget(10, Some(54), 64, "prompt", "max_tokens").unwrap(), 54);
        let e = token_budget(10, Some(60), 64, "prompt", "max_tokens").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(
            e.message.contains("64 tokens") && e.message.contains("70 tokens"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("10 in the prompt, 60 in the completion"),
            "{}",
            e.message
        );
        assert!(token_budget(64, None, 64, "prompt", "max_tokens").is_err());
        assert!(token_budget(3, Some(0), 64, "prompt", "max_tokens").is_err());
    }

    #[test]
    fn stop_takes_a_string_or_up_to_four() {
        assert_eq!(stop_strings(Some(&serde_json::json!("x"))).unwrap(), ["x"]);
        assert_eq!(stop_strings(Some(&serde_json::json!(["a", "b"]))).unwrap(), ["a", "b"]);
        assert!(stop_strings(Some(&serde_json::json!(["a", "b", "c", "d", "e"]))).is_err());
        assert!(stop_strings(Some(&serde_json::json!([""]))).is_err());
        assert!(stop_strings(Some(&serde_json::json!(7))).is_err());
        assert!(stop_strings(Some(&Value::Null)).unwrap().is_empty());
    }

    #[test]
    fn content_parts_join_their_text_and_refuse_images() {
        let parts = serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(Some(&parts)).unwrap(), "a\nb");
        let image = serde_json::json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        assert!(message_text(Some(&image)).unwrap_err().contains("image_url"));
        assert!(message_text(Some(&serde_json::json!(3))).is_err());
    }
}
