//! A checkpoint directory, opened and validated against its config.
//!
//! `Checkpoint::open` maps the weight files and checks every tensor the model needs (presence,
//! dtype, shape) up front, so later stages can rely on them; tensor data is only decoded when
//! asked for (`read_f32`), straight from the map.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::config::OuroConfig;
use crate::error::ModelError;
use crate::safetensors_file::SafetensorsFile;
use crate::weights;

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// How many missing names a "missing tensors" message lists before "and N more".
const MAX_LISTED: usize = 10;

/// The storage dtypes ouroc reads weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StorageDtype {
    BF16,
    F16,
    F32,
}

impl StorageDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            StorageDtype::BF16 | StorageDtype::F16 => 2,
            StorageDtype::F32 => 4,
        }
    }

    /// From a safetensors header dtype name ("BF16", "F16", "F32"); `None` for any other.
    pub fn from_safetensors(name: &str) -> Option<Self> {
        match name {
            "BF16" => Some(StorageDtype::BF16),
            "F16" => Some(StorageDtype::F16),
            "F32" => Some(StorageDtype::F32),
            _ => None,
        }
    }
}

impl fmt::Display for StorageDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageDtype::BF16 => "bf16",
            StorageDtype::F16 => "f16",
            StorageDtype::F32 => "f32",
        })
    }
}

/// What the checkpoint says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: StorageDtype,
    pub shape: Vec<usize>,
    /// The file holding it, relative to the checkpoint directory.
    pub file: String,
}

impl TensorInfo {
    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        // Cannot overflow for tensors of an opened checkpoint (their byte size was checked
        // against the file); saturates for hand-made TensorInfos rather than panicking.
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Stored size in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel().saturating_mul(self.dtype.size_bytes())
    }
}

/// A tensor plus where its bytes are.
#[derive(Debug)]
struct Stored {
    info: TensorInfo,
    file: usize,
    begin: usize,
    end: usize,
}

/// An opened, validated Ouro checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: OuroConfig,
    /// Non-fatal findings (unexpected tensors, a missing model_type, ...), for the CLI to print.
    pub warnings: Vec<String>,
    files: Vec<SafetensorsFile>,
    /// Every tensor with a supported dtype, used by the model or not, by name.
    tensors: BTreeMap<String, Stored>,
    /// The tensors the model uses (head included once), in `expected_tensors` order.
    used: Vec<String>,
    head: &'static str,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotADirectory { dir: dir.to_path_buf() });
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(ModelError::ConfigNotFound { dir: dir.to_path_buf() });
        }
        let (config, mut warnings) = OuroConfig::load(&config_path)?;
        let wf = weights::load(dir, &mut warnings)?;

        let mut tensors = BTreeMap::new();
        // Tensors in a dtype we cannot read: (dtype, file path). An error only if the model
        // uses them.
        let mut unreadable: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
        for (file, raw) in wf.tensors {
            let Some(dtype) = StorageDtype::from_safetensors(&raw.dtype) else {
                let path = wf.files.get(file).map(|f| f.path.clone()).unwrap_or_default();
                unreadable.insert(raw.name, (raw.dtype, path));
                continue;
            };
            let info = TensorInfo {
                name: raw.name.clone(),
                dtype,
                shape: raw.shape,
                file: wf.names.get(file).cloned().unwrap_or_default(),
            };
            let stored = Stored {
                info,
                file,
                begin: raw.begin,
                end: raw.end,
            };
            tensors.insert(raw.name, stored);
        }

        let (used_shapes, head) = validate(dir, &config, &tensors, &unreadable, &mut warnings)?;
        let used: Vec<String> = used_shapes.into_iter().map(|(n, _)| n).collect();
        let used_set: HashSet<&str> = used.iter().map(String::as_str).collect();
        for name in tensors.keys().chain(unreadable.keys()) {
            if !used_set.contains(name.as_str()) {
                let what = match (tensors.get(name), unreadable.get(name)) {
                    (Some(s), _) => format!("{}, shape {:?}, in {}", s.info.dtype, s.info.shape, s.info.file),
                    (None, Some((dtype, path))) => format!("{dtype}, in {}", path.display()),
                    (None, None) => String::new(),
                };
                warnings.push(format!(
                    "unexpected tensor `{name}` ({what}) is not part of an Ouro model; ignored"
                ));
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            warnings,
            files: wf.files,
            tensors,
            used,
            head,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|s| &s.info)
    }

    /// Every readable tensor of the checkpoint (including unexpected ones), sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values().map(|s| &s.info)
    }

    /// The tensors the model uses (the head once), in `expected_tensors` order.
    pub fn used_tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.used.iter().filter_map(|n| self.tensor(n))
    }

    /// The tensor the output projection reads: "lm_head.weight", or
    /// "model.embed_tokens.weight" when the embeddings are tied and no lm_head is stored.
    pub fn head_tensor_name(&self) -> &str {
        self.head
    }

    /// The stored little-endian bytes of a tensor, straight from the map.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8], ModelError> {
        self.stored(name).map(|(_, bytes)| bytes)
    }

    /// The tensor's values converted to f32, row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let (info, bytes) = self.stored(name)?;
        // Decoded from byte chunks, never by casting pointers: safetensors data may sit at any
        // alignment in the map.
        let values = match info.dtype {
            StorageDtype::BF16 => bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| bf16::from_le_bytes(*b).to_f32())
                .collect(),
            StorageDtype::F16 => bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| f16::from_le_bytes(*b).to_f32())
                .collect(),
            StorageDtype::F32 => bytes
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect(),
        };
        self.release(name);
        Ok(values)
    }

    /// What identifies this checkpoint's contents cheaply, for caches keyed by it: config.json's
    /// bytes and each weight file's name, size and modification time. A file rewritten in place
    /// with the same size and time is not noticed (as with make or ccache's default).
    pub fn identity(&self) -> String {
        let mut id = std::fs::read_to_string(self.dir.join("config.json")).unwrap_or_default();
        for f in &self.files {
            let meta = std::fs::metadata(&f.path).ok();
            let mtime = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let name = f
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            id.push_str(&format!("\n{name} {} {mtime}", f.mmap.len()));
        }
        id
    }

    /// Drops the mapped pages of tensor `name` from this process's resident memory: each tensor
    /// is read once while weights are prepared, so keeping the whole file resident beside its
    /// encoding would double the memory a model needs. The pages stay in the page cache, and a
    /// later read maps them back.
    fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(s) = self.tensors.get(name)
            && let Some(f) = self.files.get(s.file)
        {
            // SAFETY: the map is a read-only shared file mapping: MADV_DONTNEED only drops
            // this process's page table entries, and any later access reads the same bytes from
            // the file again. Best effort: a failure only leaves the pages resident.
            let _ = unsafe {
                f.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s.begin, s.end - s.begin)
            };
        }
    }

    fn stored(&self, name: &str) -> Result<(&TensorInfo, &[u8]), ModelError> {
        let unknown = || ModelError::UnknownTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        };
        let s = self.tensors.get(name).ok_or_else(unknown)?;
        // The range was checked against the file at open; `get` keeps this panic-free anyway.
        let bytes = self
            .files
            .get(s.file)
            .and_then(|f| f.mmap.get(s.begin..s.end))
            .ok_or_else(unknown)?;
        Ok((&s.info, bytes))
    }

    /// Parameters of the tensors the model uses (a tied head counted once).
    pub fn parameter_count(&self) -> u64 {
        self.used_tensors()
            .fold(0u64, |acc, t| acc.saturating_add(t.numel() as u64))
    }

    /// Stored bytes of the tensors the model uses.
    pub fn weight_bytes(&self) -> u64 {
        self.used_tensors()
            .fold(0u64, |acc, t| acc.saturating_add(t.byte_len() as u64))
    }

    /// How many of the tensors the model uses are stored in each dtype.
    pub fn dtypes(&self) -> BTreeMap<StorageDtype, usize> {
        let mut counts = BTreeMap::new();
        for t in self.used_tensors() {
            *counts.entry(t.dtype).or_insert(0) += 1;
        }
        counts
    }
}

/// The tensors an Ouro model with this config needs and their shapes ([out, in] for linears),
/// in a fixed order: embeddings, layers 0..L, final norm, exit gate, head. `lm_head.weight` is
/// listed only when `tie_word_embeddings` is false (when tied, the head is the embeddings
/// unless the checkpoint stores an lm_head anyway).
pub fn expected_tensors(cfg: &OuroConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    let mut out = vec![(EMBED_TOKENS.to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let layer: [(&str, Vec<usize>); 11] = [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("input_layernorm_2.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("post_attention_layernorm_2.weight", vec![h]),
        ];
        out.extend(layer.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    out.push(("model.early_exit_gate.weight".to_string(), vec![1, h]));
    out.push(("model.early_exit_gate.bias".to_string(), vec![1]));
    if !cfg.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![v, h]));
    }
    out
}

/// Tensor names with their expected shapes.
type NamedShapes = Vec<(String, Vec<usize>)>;

/// Checks presence, dtype and shape of every tensor the model uses; returns those tensors with
/// their shapes and the head's name.
fn validate(
    dir: &Path,
    cfg: &OuroConfig,
    tensors: &BTreeMap<String, Stored>,
    unreadable: &BTreeMap<String, (String, PathBuf)>,
    warnings: &mut Vec<String>,
) -> Result<(NamedShapes, &'static str), ModelError> {
    let mut used = expected_tensors(cfg);
    let present = |n: &str| tensors.contains_key(n) || unreadable.contains_key(n);

    let missing: Vec<&str> = used.iter().map(|(n, _)| n.as_str()).filter(|n| !present(n)).collect();
    if !missing.is_empty() {
        let hint = if missing.contains(&LM_HEAD) {
            format!("; {LM_HEAD} is required because tie_word_embeddings is false")
        } else {
            String::new()
        };
        return Err(ModelError::MissingTensors {
            dir: dir.to_path_buf(),
            count: missing.len(),
            names: list_some(&missing),
            hint,
        });
    }

    let head = if !cfg.tie_word_embeddings {
        LM_HEAD
    } else if present(LM_HEAD) {
        warnings.push(format!(
            "tie_word_embeddings is true but the checkpoint stores {LM_HEAD}; using {LM_HEAD} as the output head"
        ));
        used.push((LM_HEAD.to_string(), vec![cfg.vocab_size, cfg.hidden_size]));
        LM_HEAD
    } else {
        EMBED_TOKENS
    };

    for (name, _) in &used {
        if let Some((dtype, path)) = unreadable.get(name) {
            return Err(ModelError::UnsupportedDtype {
                path: path.clone(),
                tensor: name.clone(),
                dtype: dtype.clone(),
            });
        }
    }

    let wrong: Vec<(&String, &Vec<usize>, &TensorInfo)> = used
        .iter()
        .filter_map(|(n, shape)| {
            let info = &tensors.get(n)?.info;
            (info.shape != *shape).then_some((n, shape, info))
        })
        .collect();
    if let Some((name, expected, info)) = wrong.first() {
        return Err(ModelError::ShapeMismatch {
            tensor: (*name).clone(),
            file: info.file.clone(),
            expected: (*expected).clone(),
            actual: info.shape.clone(),
            others: wrong.len() - 1,
        });
    }
    Ok((used, head))
}

/// "a, b, c" for up to MAX_LISTED names, then ", and N more".
fn list_some(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().take(MAX_LISTED).copied().collect();
    let mut s = shown.join(", ");
    if names.len() > MAX_LISTED {
        s.push_str(&format!(", and {} more", names.len() - MAX_LISTED));
    }
    s
}
