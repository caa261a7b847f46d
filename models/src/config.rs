//! `config.json` of an Ouro checkpoint.
//!
//! Parsed from a `serde_json::Value` by hand rather than with a derived struct so that every
//! problem can be reported with the key's name, the expected type and the value found. Keys that
//! change the math and that ouroc does not implement are refused; unknown keys are ignored
//! (released configs carry many that do not matter here: initializer_range, use_cache, ...).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;
use crate::limits;

/// The hyper-parameters of an Ouro model that the compiler needs.
#[derive(Debug, Clone, PartialEq)]
pub struct OuroConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA).
    pub num_key_value_heads: usize,
    /// Given explicitly, or `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Whether `head_dim` came from config.json rather than being derived.
    pub head_dim_explicit: bool,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The loop count R: how many times the layer stack is applied.
    pub total_ut_steps: usize,
    /// Default exit threshold q of the reference's threshold policy, in (0, 1].
    pub early_exit_threshold: f64,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be a single id or a list; empty when absent or null.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (or `dtype`, as newer transformers write it).
    pub torch_dtype: Option<String>,
    /// "ouro" (assumed, with a warning, when the key is missing).
    pub model_type: String,
}

impl OuroConfig {
    /// Reads and parses `path`; the returned warnings are non-fatal oddities.
    pub fn load(path: &Path) -> Result<(OuroConfig, Vec<String>), ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses config.json text; `source_name` (usually the file path) prefixes every message.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<(OuroConfig, Vec<String>), ModelError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::ConfigJson {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::ConfigJson {
                source_name: source_name.to_string(),
                message: format!("the top level is {}", json_kind(&value)),
            });
        };
        Parser {
            map: &map,
            src: source_name,
            warnings: Vec::new(),
        }
        .parse()
    }

    /// heads * head_dim: the width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// kv_heads * head_dim: the width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Bytes of KV cache one token needs with a full cache (one slot per loop step and layer):
    /// R * L * 2 (K and V) * kv_heads * head_dim * bytes_per_elem. Saturates instead of
    /// overflowing for absurd configs.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> u64 {
        [
            self.total_ut_steps,
            self.num_hidden_layers,
            2,
            self.num_key_value_heads,
            self.head_dim,
            bytes_per_elem,
        ]
        .into_iter()
        .fold(1u64, |acc, x| acc.saturating_mul(x as u64))
    }
}

/// Holds the JSON object and the name used in messages while the fields are extracted.
struct Parser<'a> {
    map: &'a Map<String, Value>,
    src: &'a str,
    warnings: Vec<String>,
}

impl Parser<'_> {
    fn parse(mut self) -> Result<(OuroConfig, Vec<String>), ModelError> {
        let model_type = self.model_type()?;
        self.refuse_unsupported()?;

        let hidden_size = self.bounded("hidden_size", limits::MAX_HIDDEN)?;
        let intermediate_size = self.bounded("intermediate_size", limits::MAX_INTERMEDIATE)?;
        let num_hidden_layers = self.bounded("num_hidden_layers", limits::MAX_LAYERS)?;
        let num_attention_heads = self.bounded("num_attention_heads", limits::MAX_HEADS)?;
        let num_key_value_heads = match self.get("num_key_value_heads") {
            None => num_attention_heads,
            Some(_) => self.bounded("num_key_value_heads", limits::MAX_HEADS)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.invalid(
                "num_key_value_heads",
                num_key_value_heads,
                format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of it (each kv head serves a whole group of query heads)"
                ),
            ));
        }
        let (head_dim, head_dim_explicit) = match self.get("head_dim") {
            Some(_) => (self.bounded("head_dim", limits::MAX_HEAD_DIM)?, true),
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(self.invalid(
                        "hidden_size",
                        hidden_size,
                        format!(
                            "head_dim is not given and hidden_size is not divisible by num_attention_heads ({num_attention_heads})"
                        ),
                    ));
                }
                let derived = hidden_size / num_attention_heads;
                if derived > limits::MAX_HEAD_DIM {
                    return Err(self.invalid(
                        "hidden_size",
                        hidden_size,
                        format!(
                            "the derived head_dim hidden_size / num_attention_heads = {derived} is more than ouroc accepts (at most {})",
                            limits::MAX_HEAD_DIM
                        ),
                    ));
                }
                (derived, false)
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.invalid(
                "head_dim",
                head_dim,
                "must be even: RoPE rotates pairs of dimensions".to_string(),
            ));
        }
        // The projections' widths are used as tensor dimensions; make sure they exist.
        for (key, n) in [
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
        ] {
            if n.checked_mul(head_dim).is_none() {
                return Err(self.invalid(key, n, format!("{key} * head_dim ({head_dim}) overflows")));
            }
        }

        let vocab_size = self.bounded("vocab_size", limits::MAX_VOCAB)?;
        let rms_norm_eps = self.positive_float("rms_norm_eps")?;
        let rope_theta = self.rope_theta()?;
        let max_position_embeddings = self.bounded("max_position_embeddings", limits::MAX_POSITIONS)?;
        let tie_word_embeddings = self.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let total_ut_steps = match self.get("total_ut_steps") {
            None => 4,
            Some(_) => self.bounded("total_ut_steps", limits::MAX_LOOPS)?,
        };
        let early_exit_threshold = self.early_exit_threshold()?;
        let bos_token_id = self.opt_token_id("bos_token_id")?;
        let eos_token_ids = self.eos_token_ids()?;
        let pad_token_id = self.opt_token_id("pad_token_id")?;
        let torch_dtype = match self.opt_string("torch_dtype")? {
            Some(s) => Some(s),
            None => self.opt_string("dtype")?,
        };

        let cfg = OuroConfig {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            head_dim_explicit,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            total_ut_steps,
            early_exit_threshold,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            torch_dtype,
            model_type,
        };
        self.check_layer_types(num_hidden_layers)?;
        Ok((cfg, self.warnings))
    }

    /// A key whose value is JSON null counts as absent (HF writes null for "use the default").
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn model_type(&mut self) -> Result<String, ModelError> {
        match self.opt_string("model_type")? {
            Some(t) if t == "ouro" => Ok(t),
            Some(t) => Err(self.unsupported(
                "model_type",
                &Value::String(t),
                "ouroc compiles Ouro checkpoints (model_type \"ouro\") only",
            )),
            None => {
                self.warnings
                    .push(format!("{}: `model_type` is missing; assuming \"ouro\"", self.src));
                Ok("ouro".to_string())
            }
        }
    }

    /// Keys that would change the forward pass in ways ouroc does not implement.
    fn refuse_unsupported(&self) -> Result<(), ModelError> {
        if let Some(v) = self.get("hidden_act")
            && v.as_str() != Some("silu")
        {
            return Err(self.unsupported("hidden_act", v, "only \"silu\" (SwiGLU MLP) is implemented"));
        }
        if let Some(v) = self.get("rope_scaling") {
            return Err(self.unsupported(
                "rope_scaling",
                v,
                "RoPE scaling is not implemented; only null is accepted",
            ));
        }
        for (key, what) in [
            ("use_sliding_window", "sliding-window attention is not implemented"),
            (
                "attention_bias",
                "attention projections with biases are not implemented",
            ),
            ("mlp_bias", "MLP projections with biases are not implemented"),
        ] {
            if let Some(v) = self.get(key) {
                match v.as_bool() {
                    Some(false) => {}
                    Some(true) => return Err(self.unsupported(key, v, what)),
                    None => return Err(self.wrong_type(key, "a boolean", v)),
                }
            }
        }
        Ok(())
    }

    fn check_layer_types(&self, layers: usize) -> Result<(), ModelError> {
        let Some(v) = self.get("layer_types") else {
            return Ok(());
        };
        let Some(items) = v.as_array() else {
            return Err(self.wrong_type("layer_types", "a list of strings", v));
        };
        for item in items {
            if item.as_str() != Some("full_attention") {
                return Err(self.unsupported("layer_types", item, "only \"full_attention\" layers are implemented"));
            }
        }
        if items.len() != layers {
            return Err(self.invalid(
                "layer_types",
                format!("a list of {} entries", items.len()),
                format!("num_hidden_layers is {layers}"),
            ));
        }
        Ok(())
    }

    /// rope_theta, or (transformers >= 5) rope_parameters.rope_theta with the default rope type.
    fn rope_theta(&self) -> Result<f64, ModelError> {
        if self.get("rope_theta").is_some() {
            return self.positive_float("rope_theta");
        }
        let Some(params) = self.get("rope_parameters") else {
            return Err(self.missing("rope_theta"));
        };
        let Some(obj) = params.as_object() else {
            return Err(self.wrong_type("rope_parameters", "an object", params));
        };
        if let Some(t) = obj.get("rope_type").filter(|t| !t.is_null())
            && t.as_str() != Some("default")
        {
            return Err(self.unsupported("rope_parameters.rope_type", t, "only the default RoPE is implemented"));
        }
        match obj.get("rope_theta").and_then(Value::as_f64) {
            Some(t) if t.is_finite() && t > 0.0 => Ok(t),
            Some(t) => Err(self.invalid("rope_parameters.rope_theta", t, "must be > 0".into())),
            None => Err(self.missing("rope_theta")),
        }
    }

    fn early_exit_threshold(&self) -> Result<f64, ModelError> {
        let Some(v) = self.get("early_exit_threshold") else {
            return Ok(1.0);
        };
        let Some(q) = v.as_f64() else {
            return Err(self.wrong_type("early_exit_threshold", "a number", v));
        };
        if !(q > 0.0 && q <= 1.0) {
            return Err(self.invalid(
                "early_exit_threshold",
                v,
                "must lie in (0, 1]: it is a cumulative exit probability".into(),
            ));
        }
        Ok(q)
    }

    fn eos_token_ids(&self) -> Result<Vec<u32>, ModelError> {
        let key = "eos_token_id";
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    token_id(item).ok_or_else(|| self.wrong_type(key, "a token id or a list of token ids", item))
                })
                .collect(),
            Some(v) => token_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.wrong_type(key, "a token id or a list of token ids", v)),
        }
    }

    fn opt_token_id(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => token_id(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a token id (integer in 0..2^32)", v)),
        }
    }

    /// A required integer > 0.
    fn positive(&self, key: &str) -> Result<usize, ModelError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let n = v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong_type(key, "a positive integer", v))?;
        if n == 0 {
            return Err(self.invalid(key, v, "must be greater than 0".into()));
        }
        Ok(n)
    }

    /// A required integer in 1..=limit.
    fn bounded(&self, key: &str, limit: usize) -> Result<usize, ModelError> {
        let n = self.positive(key)?;
        if n > limit {
            return Err(self.invalid(key, n, format!("is more than ouroc accepts (at most {limit})")));
        }
        Ok(n)
    }

    /// A required finite number > 0 (integers accepted: rope_theta is often written 1000000).
    fn positive_float(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let x = v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(self.invalid(key, v, "must be greater than 0".into()));
        }
        Ok(x)
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a boolean", v)),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::ConfigMissingKey {
            source_name: self.src.to_string(),
            key: key.to_string(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        ModelError::ConfigWrongType {
            source_name: self.src.to_string(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: format!("{} {}", json_kind(found), short_json(found)),
        }
    }

    fn unsupported(&self, key: &str, value: &Value, reason: &str) -> ModelError {
        ModelError::ConfigUnsupported {
            source_name: self.src.to_string(),
            key: key.to_string(),
            value: short_json(value),
            reason: reason.to_string(),
        }
    }

    fn invalid(&self, key: &str, value: impl std::fmt::Display, reason: String) -> ModelError {
        ModelError::ConfigInvalid {
            source_name: self.src.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            reason,
        }
    }
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// The value as compact JSON, cut short so a huge value cannot flood the message.
fn short_json(v: &Value) -> String {
    const MAX: usize = 120;
    let s = v.to_string();
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}
