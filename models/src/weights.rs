//! Finding the weight files of a checkpoint directory: `model.safetensors`, or the shards listed
//! by `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path};

use serde_json::Value;

use crate::error::ModelError;
use crate::safetensors_file::{RawEntry, SafetensorsFile};

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// The mapped files and, for every tensor the checkpoint provides, the index of its file.
pub(crate) struct WeightFiles {
    pub files: Vec<SafetensorsFile>,
    /// File names relative to the checkpoint directory, parallel to `files`.
    pub names: Vec<String>,
    pub tensors: Vec<(usize, RawEntry)>,
}

pub(crate) fn load(dir: &Path, warnings: &mut Vec<String>) -> Result<WeightFiles, ModelError> {
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    if single.exists() {
        if index.exists() {
            warnings.push(format!(
                "{}: both {SINGLE_FILE} and {INDEX_FILE} are present; using {SINGLE_FILE}",
                dir.display()
            ));
        }
        let file = SafetensorsFile::open(&single)?;
        let tensors = file.entries.iter().map(|e| (0, e.clone())).collect();
        return Ok(WeightFiles {
            files: vec![file],
            names: vec![SINGLE_FILE.to_string()],
            tensors,
        });
    }
    if index.exists() {
        return load_sharded(dir, &index, warnings);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
        looked_for: format!("{SINGLE_FILE} or {INDEX_FILE}"),
        found: other_weight_files(dir),
    })
}

fn load_sharded(dir: &Path, index: &Path, warnings: &mut Vec<String>) -> Result<WeightFiles, ModelError> {
    let by_shard = read_index(index)?;
    let mut out = WeightFiles {
        files: Vec::with_capacity(by_shard.len()),
        names: Vec::with_capacity(by_shard.len()),
        tensors: Vec::new(),
    };
    // Each shard is opened and mapped once, however many tensors it holds.
    for (shard, names) in by_shard {
        let path = dir.join(&shard);
        if !path.is_file() {
            return Err(ModelError::ShardMissing {
                index: index.to_path_buf(),
                dir: dir.to_path_buf(),
                tensor: names.first().cloned().unwrap_or_default(),
                others: names.len().saturating_sub(1),
                shard,
            });
        }
        let file = SafetensorsFile::open(&path)?;
        let mut in_file: HashMap<&str, &RawEntry> = file.entries.iter().map(|e| (e.name.as_str(), e)).collect();
        let file_idx = out.files.len();
        for name in &names {
            let Some(entry) = in_file.remove(name.as_str()) else {
                return Err(ModelError::TensorNotInShard {
                    index: index.to_path_buf(),
                    shard,
                    tensor: name.clone(),
                });
            };
            out.tensors.push((file_idx, entry.clone()));
        }
        let mut unlisted: Vec<&str> = in_file.into_keys().collect();
        unlisted.sort_unstable();
        for name in unlisted {
            warnings.push(format!(
                "tensor `{name}` in shard {shard} is not listed in {INDEX_FILE}; ignored"
            ));
        }
        out.names.push(shard);
        out.files.push(file);
    }
    Ok(out)
}

/// weight_map grouped by shard: shard file -> tensor names (both sorted).
fn read_index(index: &Path) -> Result<BTreeMap<String, Vec<String>>, ModelError> {
    let bytes = std::fs::read(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    parse_index(&bytes, index)
}

/// The tensors of each shard named by the index file `bytes` (read from `index`), sorted. A
/// tensor mapped twice, a shard name that leaves the directory and a malformed map are errors.
pub fn parse_index(bytes: &[u8], index: &Path) -> Result<BTreeMap<String, Vec<String>>, ModelError> {
    let bad = |message: String| ModelError::IndexInvalid {
        path: index.to_path_buf(),
        message,
    };
    let value: Value = crate::strict_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("`weight_map` is missing or not an object".into()))?;
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            bad(format!(
                "weight_map entry for `{tensor}` is {shard}, expected a file name"
            ))
        })?;
        // Shard names come from a file we do not control: keep them inside the directory.
        let inside = Path::new(shard).components().all(|c| matches!(c, Component::Normal(_)));
        if shard.is_empty() || !inside {
            return Err(bad(format!(
                "weight_map maps `{tensor}` to `{shard}`, which is not a file name inside the checkpoint directory"
            )));
        }
        by_shard.entry(shard.to_string()).or_default().push(tensor.clone());
    }
    for names in by_shard.values_mut() {
        names.sort_unstable();
    }
    Ok(by_shard)
}

/// Weight files of formats we do not read, named in the "no weights" error as a hint.
fn other_weight_files(dir: &Path) -> Vec<String> {
    const EXTS: [&str; 7] = ["safetensors", "bin", "pt", "pth", "gguf", "ckpt", "h5"];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = rd
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            Path::new(n)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTS.contains(&e))
        })
        .collect();
    found.sort();
    found
}
