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
    /// `bos_token` and `eos_token` of tokenizer_config.json (what a chat
    /// template names), when present.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
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
        let read = |name: &str| -> Result<Option<Vec<u8>>, TokenizerError> {
            let p = dir.join(name);
            match std::fs::read(&p) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(TokenizerError::Invalid {
                    path: p.display().to_string(),
                    msg: e.to_string(),
                }),
            }
        };
        let json = read("tokenizer.json")?.unwrap_or_default();
        let config = read("tokenizer_config.json")?;
        let generation = read("generation_config.json")?;
        Self::from_files(&json, config.as_deref(), generation.as_deref()).map_err(|(name, msg)| {
            TokenizerError::Invalid {
                path: dir.join(name).display().to_string(),
                msg,
            }
        })
    }

    /// From the bytes of `tokenizer.json` and, when present, `tokenizer_config.json` (the chat
    /// template, the eos token) and `generation_config.json` (the eos ids). An error names the
    /// file at fault.
    pub fn from_files(
        json: &[u8],
        config: Option<&[u8]>,
        generation: Option<&[u8]>,
    ) -> Result<Tokenizer, (&'static str, String)> {
        let in_file = |name: &'static str| move |msg: String| (name, msg);
        check_added_tokens(json).map_err(in_file("tokenizer.json"))?;
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| ("tokenizer.json", e.to_string()))?;
        let parse =
            |name: &'static str, bytes: Option<&[u8]>| -> Result<Option<serde_json::Value>, (&'static str, String)> {
                bytes
                    .map(|b| serde_json::from_slice(b).map_err(|e| (name, e.to_string())))
                    .transpose()
            };
        let config = parse("tokenizer_config.json", config)?;
        let generation = parse("generation_config.json", generation)?;
        let chat_template = match config.as_ref().map(|c| &c["chat_template"]) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            // A list of named templates (transformers >= 4.43): the "default" one.
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            Some(other) => {
                return Err((
                    "tokenizer_config.json",
                    format!("`chat_template` must be a string or a list of named templates, found {other}"),
                ));
            }
        };
        let mut eos_ids = match generation.as_ref().map(|g| &g["eos_token_id"]) {
            None | Some(serde_json::Value::Null) => Ok(vec![]),
            Some(serde_json::Value::Array(a)) => a.iter().map(token_id).collect::<Result<_, _>>(),
            Some(v) => token_id(v).map(|id| vec![id]),
        }
        .map_err(in_file("generation_config.json"))?;
        if eos_ids.is_empty()
            && let Some(id) = config
                .as_ref()
                .and_then(|c| c["eos_token"].as_str())
                .and_then(|t| inner.token_to_id(t))
        {
            eos_ids.push(id);
        }
        let im_end = inner.token_to_id("<|im_end|>");
        // A string, or an AddedToken object with its `content`.
        let special = |key: &str| {
            let v = config.as_ref().map(|c| &c[key])?;
            v.as_str().or_else(|| v["content"].as_str()).map(String::from)
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            eos_ids,
            im_end,
        })
    }

    /// The chat template with the special tokens it may name (ChatML when
    /// the checkpoint has none).
    pub fn chat(&self) -> crate::chat::ChatTemplate {
        crate::chat::ChatTemplate {
            source: self.chat_template.clone(),
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        }
    }

    /// From the bytes of a `tokenizer.json` and what [`Tokenizer::load`]
    /// read beside it (an executable built by `ouroc build` carries these).
    pub fn from_parts(json: &[u8], chat: crate::chat::ChatTemplate, eos_ids: Vec<u32>) -> Result<Tokenizer, String> {
        check_added_tokens(json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let im_end = inner.token_to_id("<|im_end|>");
        Ok(Tokenizer {
            inner,
            chat_template: chat.source,
            bos_token: chat.bos_token,
            eos_token: chat.eos_token,
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

    /// The id of a token written out (`<|endoftext|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// A token id of `eos_token_id`: an integer that fits in 32 bits.
fn token_id(v: &serde_json::Value) -> Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("`eos_token_id` must be a token id or a list of them, found {v}"))
}

/// Refuses a `tokenizer.json` whose `added_tokens` give a token (`<|im_start|>`) an id other than
/// the one its vocabulary gives the same text. The tokenizers library then keeps the vocabulary's
/// id with only a log warning, while the file's author meant the added token's: which one the
/// model was trained with cannot be told from the file, so it is an error, not a guess.
fn check_added_tokens(json: &[u8]) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let (Some(added), Some(vocab)) = (v["added_tokens"].as_array(), v["model"]["vocab"].as_object()) else {
        return Ok(());
    };
    for t in added {
        let (Some(content), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) else {
            continue;
        };
        if let Some(vocab_id) = vocab.get(content).and_then(|x| x.as_u64())
            && vocab_id != id
        {
            return Err(format!(
                "added token {content:?} has id {id} in `added_tokens` but id {vocab_id} in the vocabulary \
                 (`model.vocab`); the two must agree: fix whichever the model was not trained with"
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mha-r4")
    }

    /// A copy of the fixture checkpoint's tokenizer files whose `<|im_start|>` added token has id
    /// `id` (the vocabulary keeps 1).
    fn with_im_start_id(id: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(fixture_dir().join("tokenizer.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for t in v["added_tokens"].as_array_mut().unwrap() {
            if t["content"] == "<|im_start|>" {
                t["id"] = id.into();
            }
        }
        std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
        dir
    }

    #[test]
    fn added_tokens_that_agree_with_the_vocabulary_load() {
        let dir = with_im_start_id(1);
        let tok = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    }

    #[test]
    fn an_added_token_whose_id_disagrees_with_the_vocabulary_is_refused() {
        let dir = with_im_start_id(7);
        let e = Tokenizer::load(dir.path()).err().expect("refused").to_string();
        for part in [
            "tokenizer.json",
            "<|im_start|>",
            "id 7 in `added_tokens`",
            "id 1 in the vocabulary",
        ] {
            assert!(e.contains(part), "{e} should mention {part}");
        }
        let json = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
        let e = Tokenizer::from_parts(&json, Default::default(), vec![])
            .err()
            .expect("refused");
        assert!(e.contains("<|im_start|>"), "{e}");
    }
}
