//! One memory-mapped safetensors file and its parsed header.
//!
//! The header is parsed here rather than with `safetensors::SafeTensors` so that the result owns
//! its data (no borrow of the mmap is kept) and so that every malformation gets a message naming
//! the file and tensor. Layout: 8 bytes little-endian header length N, N bytes of JSON
//! (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`), then the data
//! section, which `data_offsets` index relative to its start.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::ModelError;
use crate::strict_json;

/// Largest header accepted; the reference loader refuses more than 100 MB.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// A tensor as the header describes it, validated against the file's size.
#[derive(Debug, Clone)]
pub(crate) struct RawEntry {
    pub name: String,
    /// The safetensors dtype name as written ("BF16", "I64", ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included), always within the file.
    pub begin: usize,
    pub end: usize,
}

#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub entries: Vec<RawEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // Checked before mapping: mapping an empty file is an error on some platforms, and the
        // message for a too-short file is clearer than an mmap failure.
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(ModelError::FileTooShort {
                path: path.to_path_buf(),
                len,
            });
        }
        // SAFETY: the map is read-only and we only ever read it through bounds-checked slices.
        // The usual mmap caveat applies: if another process truncates or rewrites the file while
        // it is mapped, reads may see the new bytes or fault. Checkpoints are not expected to
        // change under a running compiler, and every loader of large weights accepts this.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let entries = parse_header(path, &mmap)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            entries,
        })
    }
}

/// Validates a whole safetensors file held in memory (as [`SafetensorsFile::open`] does a mapped
/// one): the name and absolute byte range of each tensor, or the error naming what is wrong.
pub fn validate(bytes: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>, ModelError> {
    let entries = parse_header(Path::new("<memory>"), bytes)?;
    Ok(entries.into_iter().map(|e| (e.name, e.begin..e.end)).collect())
}

/// Bytes per element of a safetensors dtype, `None` for sub-byte or unknown dtypes (whose data
/// size is then not checked: they are never read, only reported).
pub(crate) fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// Parses and validates the header of a whole safetensors file held in `bytes`.
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<RawEntry>, ModelError> {
    let file_len = bytes.len() as u64;
    let Some((len_field, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(ModelError::FileTooShort {
            path: path.to_path_buf(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*len_field);
    if header_len > MAX_HEADER_LEN {
        return Err(ModelError::HeaderJson {
            path: path.to_path_buf(),
            message: format!(
                "the header length field says {header_len} bytes; headers are at most {MAX_HEADER_LEN} bytes (the limit of the reference loader): corrupt, or not a safetensors file"
            ),
        });
    }
    let available = rest.len() as u64;
    if header_len > available {
        return Err(ModelError::HeaderTooLong {
            path: path.to_path_buf(),
            header_len,
            available,
            file_len,
        });
    }
    // header_len <= rest.len(), so it fits in usize and the split is in bounds.
    let (header, data) = rest.split_at(header_len as usize);
    let data_start = 8 + header.len();

    let json_err = |message: String| ModelError::HeaderJson {
        path: path.to_path_buf(),
        message,
    };
    if header.first() != Some(&b'{') {
        return Err(json_err(
            "the header does not start with `{` (a header length one off, or not a safetensors file)".into(),
        ));
    }
    let value = strict_json::from_slice(header).map_err(|e| json_err(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(json_err("the top level is not an object".into()));
    };

    let mut entries = Vec::with_capacity(map.len());
    for (name, v) in &map {
        // Free-form string metadata; nothing in it matters to us.
        if name == "__metadata__" {
            continue;
        }
        let entry = parse_entry(path, name, v, data.len() as u64)?;
        // In bounds of `data` (checked in parse_entry), hence of the file: no overflow.
        entries.push(RawEntry {
            begin: data_start + entry.0,
            end: data_start + entry.1,
            name: name.clone(),
            dtype: entry.2,
            shape: entry.3,
        });
    }
    check_layout(path, &entries, data_start, data.len())?;
    Ok(entries)
}

/// The tensors' byte ranges, in order, must tile the data section exactly: no gap, no overlap, no
/// byte after the last tensor. Anything else means the header and data disagree (a header length
/// one off still parses when the header ends in padding, and then every tensor is read shifted),
/// or one tensor aliases another's bytes. The reference loader enforces the same.
fn check_layout(path: &Path, entries: &[RawEntry], data_start: usize, data_len: usize) -> Result<(), ModelError> {
    let mut order: Vec<&RawEntry> = entries.iter().collect();
    order.sort_by_key(|e| (e.begin, e.end));
    let layout = |message: String| ModelError::DataLayout {
        path: path.to_path_buf(),
        message,
    };
    let mut expected = 0;
    let mut previous: Option<&str> = None;
    for e in order {
        let begin = e.begin - data_start;
        if begin != expected {
            let after = previous.map_or("the start of the data section".to_string(), |p| format!("tensor `{p}`"));
            return Err(layout(if begin < expected {
                format!(
                    "tensor `{}` (data_offsets begin {begin}) overlaps {after}, which ends at {expected}",
                    e.name
                )
            } else {
                format!(
                    "{} unused bytes between {after} (ending at {expected}) and tensor `{}` (beginning at {begin})",
                    begin - expected,
                    e.name
                )
            }));
        }
        expected = e.end - data_start;
        previous = Some(&e.name);
    }
    if expected != data_len {
        return Err(layout(format!(
            "the tensors end at byte {expected} of the data section but it is {data_len} bytes long ({} bytes unaccounted for: a wrong header length, or trailing garbage)",
            data_len - expected
        )));
    }
    Ok(())
}

/// (begin, end) relative to the data section, dtype, shape.
type Entry = (usize, usize, String, Vec<usize>);

fn parse_entry(path: &Path, name: &str, v: &Value, data_len: u64) -> Result<Entry, ModelError> {
    let bad = |message: String| ModelError::HeaderEntry {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad(format!("expected an object, found {v}")))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("`dtype` is missing or not a string".into()))?
        .to_string();
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`shape` is missing or not a list".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("`shape` must be a list of non-negative integers".into()))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>());
    let (begin, end) = match offsets.as_deref() {
        Some(&[begin, end]) => (begin, end),
        _ => {
            return Err(bad("`data_offsets` must be a list of two non-negative integers".into()));
        }
    };
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}) has begin > end")));
    }
    if end > data_len {
        return Err(ModelError::DataOutOfBounds {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            begin,
            end,
            data_len,
        });
    }
    if let Some(elem) = dtype_size(&dtype) {
        let expected = shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {shape:?} of {dtype} is too large (byte size overflows)")))?;
        if expected != end - begin {
            return Err(ModelError::DataSizeMismatch {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                dtype,
                shape,
                expected,
                actual: end - begin,
            });
        }
    }
    // end <= data_len <= the file's length, which is a usize.
    Ok((begin as usize, end as usize, dtype, shape))
}
