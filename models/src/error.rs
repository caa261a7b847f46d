//! The one error type of checkpoint loading.
//!
//! Every message names the file (and the key or tensor) it is about and, where a value was
//! checked, what was expected and what was found: a user holding a broken checkpoint should be
//! able to fix it from the message alone.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// An I/O failure (open, read, stat, mmap) on a file we needed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The checkpoint path is not an existing directory.
    #[error("checkpoint directory {dir} does not exist or is not a directory")]
    NotADirectory { dir: PathBuf },

    /// The checkpoint directory has no config.json.
    #[error("no config.json in checkpoint directory {dir}")]
    ConfigNotFound { dir: PathBuf },

    /// config.json is not valid JSON, or not a JSON object.
    #[error("{source_name}: not a valid config (expected a JSON object): {message}")]
    ConfigJson { source_name: String, message: String },

    /// A key the model cannot do without is absent (or null).
    #[error("{source_name}: required key `{key}` is missing")]
    ConfigMissingKey { source_name: String, key: String },

    /// A key holds a JSON value of the wrong type or out of the representable range.
    #[error("{source_name}: key `{key}` must be {expected}, found {found}")]
    ConfigWrongType {
        source_name: String,
        key: String,
        expected: String,
        found: String,
    },

    /// A key asks for a feature that changes the math and that ouroc does not implement.
    #[error("{source_name}: unsupported `{key}` = {value}: {reason}")]
    ConfigUnsupported {
        source_name: String,
        key: String,
        value: String,
        reason: String,
    },

    /// A key has a well-typed but invalid value (zero size, indivisible dims, ...).
    #[error("{source_name}: invalid `{key}` = {value}: {reason}")]
    ConfigInvalid {
        source_name: String,
        key: String,
        value: String,
        reason: String,
    },

    /// Neither weight layout is present in the directory.
    #[error("no weights in {dir}: looked for {looked_for}{}", found_hint(found))]
    NoWeights {
        dir: PathBuf,
        looked_for: String,
        /// Other weight-like files that are present (e.g. pytorch_model.bin), as a hint.
        found: Vec<String>,
    },

    /// model.safetensors.index.json is malformed.
    #[error("{path}: invalid safetensors index: {message}")]
    IndexInvalid { path: PathBuf, message: String },

    /// The index maps tensors to a shard file that does not exist.
    #[error(
        "{index}: tensor `{tensor}`{} is mapped to shard `{shard}`, which does not exist in {dir}",
        others_hint(*others)
    )]
    ShardMissing {
        index: PathBuf,
        dir: PathBuf,
        shard: String,
        tensor: String,
        /// How many more tensors the index maps to the same shard.
        others: usize,
    },

    /// The index maps a tensor to a shard whose header does not contain it.
    #[error("{index}: tensor `{tensor}` is mapped to shard `{shard}`, but that shard has no tensor of that name")]
    TensorNotInShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },

    /// A safetensors file too short to hold even its 8-byte header length.
    #[error("{path}: not a safetensors file: {len} bytes long, a safetensors file starts with an 8-byte header length")]
    FileTooShort { path: PathBuf, len: u64 },

    /// The 8-byte header length claims more bytes than the file has.
    #[error(
        "{path}: safetensors header length is {header_len} bytes, but only {available} bytes follow the length field (file is {file_len} bytes; truncated or not a safetensors file?)"
    )]
    HeaderTooLong {
        path: PathBuf,
        header_len: u64,
        available: u64,
        file_len: u64,
    },

    /// The header bytes are not UTF-8 JSON describing an object.
    #[error("{path}: safetensors header is not a valid JSON object: {message}")]
    HeaderJson { path: PathBuf, message: String },

    /// The tensors' byte ranges do not tile the data section (gap, overlap, trailing bytes).
    #[error("{path}: tensor data layout is inconsistent with the header: {message}")]
    DataLayout { path: PathBuf, message: String },

    /// A header entry is structurally wrong (missing dtype/shape/data_offsets, wrong types,
    /// begin > end, sizes overflowing).
    #[error("{path}: tensor `{tensor}`: invalid header entry: {message}")]
    HeaderEntry {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// A tensor's data range lies (partly) beyond the data section.
    #[error(
        "{path}: tensor `{tensor}` has data_offsets [{begin}, {end}) but the data section is only {data_len} bytes long (truncated file?)"
    )]
    DataOutOfBounds {
        path: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },

    /// A tensor's byte range does not match its dtype and shape.
    #[error(
        "{path}: tensor `{tensor}` ({dtype}, shape {shape:?}) needs {expected} bytes, but its data_offsets span {actual} bytes"
    )]
    DataSizeMismatch {
        path: PathBuf,
        tensor: String,
        dtype: String,
        shape: Vec<usize>,
        expected: u64,
        actual: u64,
    },

    /// A tensor the model uses is stored in a dtype ouroc does not read.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; only BF16, F16 and F32 weights are supported")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    /// Tensors the config requires are absent.
    #[error("checkpoint {dir} is missing {count} tensor(s) required by its config: {names}{hint}")]
    MissingTensors {
        dir: PathBuf,
        count: usize,
        /// The first few names, then "and N more".
        names: String,
        /// Extra explanation (e.g. about tie_word_embeddings), empty or starting with "; ".
        hint: String,
    },

    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{tensor}` in {file}: expected shape {expected:?} (from config.json), found {actual:?}{}", others_hint_shapes(*others))]
    ShapeMismatch {
        tensor: String,
        file: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
        /// How many further tensors also have the wrong shape.
        others: usize,
    },

    /// A tensor name asked for through the API is not in the checkpoint.
    #[error("no tensor named `{tensor}` in checkpoint {dir}")]
    UnknownTensor { dir: PathBuf, tensor: String },
}

fn found_hint(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(
            " (the directory has {}; ouroc reads model.safetensors, or shards through the index)",
            found.join(", ")
        )
    }
}

fn others_hint(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} other tensor(s))"),
    }
}

fn others_hint_shapes(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!("; {n} other tensor(s) also have the wrong shape"),
    }
}
