//! The checkpoint's tokenizer: `tokenizer.json` through the tokenizers
//! crate, plus the ids that stop generation, read from
//! `generation_config.json` and `tokenizer_config.json`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no tokenizer.json in {0}: ouroc run needs the checkpoint's tokenizer")]
    Missing(String),
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `chat_template` of tokenizer_config.json, when present.
    pub chat_template: Option<String>,
    /// Ids that end generation (generation_config.json's eos ids, else the
    /// tokenizer config's eos_token).
    pub eos_ids: Vec<u32>,
    /// `<|im_end|>`, which ends a chat turn.
    pub im_end: Option<u32>,
}

impl Tokenizer {
    /// Load from a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(dir.display().to_string()));
        }
        let invalid = |p: &Path, msg: String| TokenizerError::Invalid {
            path: p.display().to_string(),
            msg,
        };
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| invalid(&path, e.to_string()))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>, TokenizerError> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Err(_) => Ok(None),
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| invalid(&p, e.to_string())),
            }
        };
        let config = read_json("tokenizer_config.json")?;
        let generation = read_json("generation_config.json")?;
        let chat_template = config
            .as_ref()
            .and_then(|c| c["chat_template"].as_str())
            .map(String::from);
        let mut eos_ids: Vec<u32> = match generation.as_ref().map(|g| &g["eos_token_id"]) {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
            _ => vec![],
        };
        if eos_ids.is_empty()
            && let Some(id) = config
                .as_ref()
                .and_then(|c| c["eos_token"].as_str())
                .and_then(|t| inner.token_to_id(t))
        {
            eos_ids.push(id);
        }
        let im_end = inner.token_to_id("<|im_end|>");
        Ok(Tokenizer {
            inner,
            chat_template,
            eos_ids,
            im_end,
        })
    }

    /// From the bytes of a `tokenizer.json` and what [`Tokenizer::load`]
    /// read beside it (an executable built by `ouroc build` carries these).
    pub fn from_parts(json: &[u8], chat_template: Option<String>, eos_ids: Vec<u32>) -> Result<Tokenizer, String> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let im_end = inner.token_to_id("<|im_end|>");
        Ok(Tokenizer {
            inner,
            chat_template,
            eos_ids,
            im_end,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        // Special tokens written in the text (`<|im_start|>`) become their ids.
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| format!("cannot decode tokens: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Streams text token by token: byte-level BPE tokens can end inside a
/// UTF-8 character, so the text of all tokens so far is decoded and only
/// the complete new part is returned.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        // A trailing U+FFFD means an unfinished character: wait for more bytes.
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}
