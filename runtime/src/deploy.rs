//! Deployable executables (`ouroc build`): what the build writes and the
//! executable (`ouroc-app`) reads back, shared so both sides agree.
//!
//! # The weights image
//!
//! The resident weights of the Program, encoded at build time in the
//! layouts the kernels read ([`ResidentWeights`]), as a file `APP.weights`
//! (memory-mapped at start) or embedded in the executable:
//!
//! ```text
//! magic "OUROCWT1" | u64 LE header length | header JSON | zero padding
//! to DATA_ALIGN | data: each entry at its offset (a multiple of
//! ENTRY_ALIGN) from the start of the data
//! ```
//!
//! The header ([`WeightsHeader`]) holds the [`Fingerprint`] (content hash
//! of the encoded weights, ouroc version, layout hash of the Program and
//! the entry table), the entries and the data length. The executable holds
//! the same fingerprint and refuses an image whose fingerprint differs or
//! whose length is not what the header says (truncated).
//!
//! # The executable's metadata
//!
//! [`AppMeta`] as JSON: the Program, tokenizer, chat template, stop ids,
//! target, CPU features, kernel table keys and the fingerprint.
//! Blobs linked into the executable are `u64 LE length | bytes`.

use crate::cpu::ResidentWeights;
use ouroc_kernels::Program;
use ouroc_kernels::spec::Encoding;
use serde::{Deserialize, Serialize};
use std::io::Write;

/// The first bytes of a weights image.
pub const WEIGHTS_MAGIC: [u8; 8] = *b"OUROCWT1";
/// The data of a weights image starts at a multiple of this (a page).
pub const DATA_ALIGN: usize = 4096;
/// Each entry starts at a multiple of this from the start of the data.
pub const ENTRY_ALIGN: usize = 64;
/// The ouroc version both sides record.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What ties an executable to its weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Hash of the encoded weight bytes (the checkpoint as transformed).
    pub checkpoint: String,
    /// The ouroc version that built it.
    pub ouroc: String,
    /// Hash of the Program and the weight entry table (ids, dtypes,
    /// offsets, lengths).
    pub layout: String,
}

impl Fingerprint {
    /// What differs from `want` (None: they match).
    pub fn mismatch(&self, want: &Fingerprint) -> Option<String> {
        let mut d = Vec::new();
        if self.checkpoint != want.checkpoint {
            d.push(format!(
                "checkpoint fingerprint {} (this executable expects {})",
                self.checkpoint, want.checkpoint
            ));
        }
        if self.ouroc != want.ouroc {
            d.push(format!(
                "built by ouroc {} (this executable: {})",
                self.ouroc, want.ouroc
            ));
        }
        if self.layout != want.layout {
            d.push(format!(
                "weight layout {} (this executable expects {})",
                self.layout, want.layout
            ));
        }
        (!d.is_empty()).then(|| d.join("; "))
    }
}

/// One encoded weight in the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightIndex {
    pub id: u32,
    pub dtype: String,
    /// Bytes from the start of the data.
    pub offset: u64,
    pub len: u64,
}

/// The JSON header of a weights image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsHeader {
    pub fingerprint: Fingerprint,
    pub entries: Vec<WeightIndex>,
    /// Bytes of data after the head.
    pub data_bytes: u64,
}

/// What an executable built by `ouroc build` knows about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppMeta {
    pub fingerprint: Fingerprint,
    pub program: Program,
    /// The checkpoint it was built from (its directory name).
    pub model: String,
    pub layers: usize,
    /// Loop steps R.
    pub steps: usize,
    /// The exit policy, fixed at build time.
    pub policy: String,
    pub precision: String,
    /// The context length.
    pub max_positions: usize,
    /// `cpu`, `a100` or `cpu+a100`.
    pub target: String,
    /// The `--cpu-features` level.
    pub cpu_level: String,
    /// The CPU features the kernels use (Cranelift names: `avx2`, `sse41`).
    pub cpu_features: Vec<String>,
    pub triple: String,
    /// The code key of each kernel of the linked table, in table order.
    pub kernel_keys: Vec<String>,
    /// `tokenizer.json`, when the checkpoint has one.
    pub tokenizer: Option<String>,
    pub chat_template: Option<String>,
    /// The tokenizer config's `bos_token` / `eos_token` (a template may name them).
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub eos_token: Option<String>,
    /// The tokenizer's stop ids (as `Tokenizer::load` reads them).
    pub eos_ids: Vec<u32>,
    /// The config's `eos_token_id`s.
    pub config_eos_ids: Vec<u32>,
    /// The default `--kv` mode.
    pub kv: String,
    /// The Program's PTX module with its launch records (GPU targets): the
    /// executable loads it as it is, without an emitter.
    pub ptx: Option<ouroc_kernels::abi::ptx::PtxModule>,
    /// The weights image is linked in.
    pub embedded_weights: bool,
    /// Bytes of the weights image.
    pub weights_bytes: u64,
}

/// A 64-bit hash over bytes (8 at a time), as 16 hex digits; not
/// cryptographic: it tells builds apart.
#[derive(Clone, Copy)]
pub struct Hasher(u64);

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0 ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            h = (h.rotate_left(5) ^ w).wrapping_mul(0x5165_5a2b_8f3c_4f69);
        }
        for &b in chunks.remainder() {
            h = (h.rotate_left(5) ^ b as u64).wrapping_mul(0x5165_5a2b_8f3c_4f69);
        }
        self.0 = h;
    }

    pub fn hex(&self) -> String {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        format!("{h:016x}")
    }
}

/// The entry table of `weights` (each entry at a multiple of
/// [`ENTRY_ALIGN`]) and the data length.
pub fn layout(weights: &ResidentWeights) -> (Vec<WeightIndex>, u64) {
    let mut at = 0usize;
    let mut index = Vec::new();
    for ((id, d), bytes) in weights.entries() {
        at = at.next_multiple_of(ENTRY_ALIGN);
        index.push(WeightIndex {
            id,
            dtype: d.name().to_string(),
            offset: at as u64,
            len: bytes.len() as u64,
        });
        at += bytes.len();
    }
    (index, at as u64)
}

/// The fingerprint of `program` with `weights` laid out as `index`.
pub fn fingerprint(program: &Program, weights: &ResidentWeights, index: &[WeightIndex]) -> Result<Fingerprint, String> {
    let mut content = Hasher::default();
    for (_, bytes) in weights.entries() {
        content.update(bytes);
    }
    Ok(Fingerprint {
        checkpoint: content.hex(),
        ouroc: VERSION.to_string(),
        layout: layout_hash(program, index)?,
    })
}

/// The hash of `program` with its weights laid out as `index`.
pub fn layout_hash(program: &Program, index: &[WeightIndex]) -> Result<String, String> {
    let mut layout = Hasher::default();
    layout.update(ouroc_kernels::quant::LAYOUT.as_bytes());
    layout.update(serde_json::to_string(program).map_err(|e| e.to_string())?.as_bytes());
    layout.update(serde_json::to_string(index).map_err(|e| e.to_string())?.as_bytes());
    Ok(layout.hex())
}

/// The head of a weights image: magic, header length, header, padding.
pub fn weights_head(header: &WeightsHeader) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a header serialises");
    let mut head = Vec::with_capacity(DATA_ALIGN);
    head.extend_from_slice(&WEIGHTS_MAGIC);
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    head.extend_from_slice(&json);
    head.resize(head.len().next_multiple_of(DATA_ALIGN), 0);
    head
}

/// Write the whole image (head, then each entry at its offset); returns
/// the bytes written.
pub fn write_weights(out: &mut dyn Write, header: &WeightsHeader, weights: &ResidentWeights) -> std::io::Result<u64> {
    let head = weights_head(header);
    out.write_all(&head)?;
    let mut at = 0u64;
    let zeros = [0u8; ENTRY_ALIGN];
    // The padding before each entry and at the end: less than ENTRY_ALIGN
    // bytes for a header made by [`layout`].
    let pad = |to: u64, at: u64| {
        to.checked_sub(at)
            .and_then(|n| zeros.get(..usize::try_from(n).ok()?))
            .ok_or_else(|| std::io::Error::other(format!("a weights header out of order: {to} after {at}")))
    };
    for (ix, (_, bytes)) in header.entries.iter().zip(weights.entries()) {
        out.write_all(pad(ix.offset, at)?)?;
        out.write_all(bytes)?;
        at = ix.offset + bytes.len() as u64;
    }
    out.write_all(pad(header.data_bytes, at)?)?;
    Ok(head.len() as u64 + header.data_bytes)
}

/// One encoded weight of an image: (weight id, dtype) and its bytes.
pub type WeightSlice<'a> = ((u32, Encoding), &'a [u8]);

/// Bytes before a weights image's header: the magic and the header length.
const PREFIX: usize = WEIGHTS_MAGIC.len() + 8;

/// The header of a weights image, before any check of its fingerprint or data (whose
/// length and offsets [`read_weights`] checks).
pub fn read_header(image: &[u8], what: &str) -> Result<WeightsHeader, String> {
    if image.len() < PREFIX || image[..8] != WEIGHTS_MAGIC {
        return Err(format!(
            "{what} is not an ouroc weights file (no `OUROCWT1` header; {} bytes)",
            image.len()
        ));
    }
    let hlen = u64::from_le_bytes(image[8..PREFIX].try_into().expect("8 bytes"));
    let json_end = usize::try_from(hlen)
        .ok()
        .and_then(|h| h.checked_add(PREFIX))
        .filter(|&end| end <= image.len())
        .ok_or_else(|| {
            format!(
                "{what} is truncated or corrupt: its header length ({hlen} bytes) runs past the end of \
                 the file ({} bytes)",
                image.len()
            )
        })?;
    serde_json::from_slice(&image[PREFIX..json_end]).map_err(|e| format!("{what}: unreadable weights header: {e}"))
}

/// The header length field of an image [`read_header`] accepted (so it fits the image).
fn header_len(image: &[u8]) -> usize {
    u64::from_le_bytes(image[8..PREFIX].try_into().expect("8 bytes")) as usize
}

/// Check a weights image against the fingerprint `want` and return its
/// entries. `what` names it in errors (a path, or "the embedded weights").
///
/// Every length and offset the image holds is untrusted: each is checked
/// (checked arithmetic, bounds) before it is used, and a bad one is an
/// error naming it, never a panic.
pub fn read_weights<'a>(image: &'a [u8], want: &Fingerprint, what: &str) -> Result<Vec<WeightSlice<'a>>, String> {
    let header = read_header(image, what)?;
    let json_end = PREFIX + header_len(image);
    if let Some(diff) = header.fingerprint.mismatch(want) {
        return Err(format!(
            "{what} does not belong to this executable: {diff}; use the weights file written with it \
             by the same `ouroc build`"
        ));
    }
    let start = json_end
        .checked_next_multiple_of(DATA_ALIGN)
        .ok_or_else(|| format!("{what} is corrupt: its header length ({json_end} bytes) overflows"))?;
    let want_len = (start as u64).checked_add(header.data_bytes).ok_or_else(|| {
        format!(
            "{what} is corrupt: its header's data length ({} bytes) overflows",
            header.data_bytes
        )
    })?;
    if (image.len() as u64) < want_len {
        return Err(format!(
            "{what} is truncated: {} bytes, its header says {want_len}",
            image.len()
        ));
    }
    if image.len() as u64 > want_len {
        return Err(format!(
            "{what} has {} bytes, its header says {want_len}: not the file `ouroc build` wrote",
            image.len()
        ));
    }
    // `start <= want_len == image.len()`: in bounds.
    let data = &image[start..];
    header
        .entries
        .iter()
        .map(|e| {
            let d =
                Encoding::parse(&e.dtype).ok_or_else(|| format!("{what}: unknown weight encoding `{}`", e.dtype))?;
            let range = entry_range(e, data.len() as u64).map_err(|m| format!("{what} is corrupt: {m}"))?;
            Ok(((e.id, d), &data[range]))
        })
        .collect()
}

/// Every weight `program`'s kernels read is among `slices`, in its encoding
/// and with exactly the bytes its shape takes (a short entry would let a
/// kernel read past it).
pub fn check_entries(program: &Program, slices: &[WeightSlice], what: &str) -> Result<(), String> {
    for (w, d) in ResidentWeights::required(program) {
        let n = program
            .weight(w)
            .and_then(|e| d.bytes(&e.shape))
            .ok_or_else(|| format!("{what}: weight %{w} has no size in {d}"))?;
        if !slices.iter().any(|((id, dt), b)| (*id, *dt) == (w, d) && b.len() == n) {
            return Err(format!("{what} lacks weight %{w} in {d} ({n} bytes)"));
        }
    }
    Ok(())
}

/// The bytes of entry `e` in data of `data_len` bytes, checked.
fn entry_range(e: &WeightIndex, data_len: u64) -> Result<std::ops::Range<usize>, String> {
    let end = e
        .offset
        .checked_add(e.len)
        .ok_or_else(|| format!("entry %{}: offset {} + length {} overflows", e.id, e.offset, e.len))?;
    if end > data_len {
        return Err(format!(
            "entry %{} (bytes {}..{end}) lies outside the data ({data_len} bytes)",
            e.id, e.offset
        ));
    }
    // Both fit in `data_len`, the length of a slice: they fit in usize.
    Ok(e.offset as usize..end as usize)
}

/// The length of a linked blob ([`blob`]) whose length field says `len`
/// with `available` bytes at most after the field (the size of the file it
/// is in): an error naming `what` when it cannot be.
pub fn blob_len(len: u64, available: u64, what: &str) -> Result<usize, String> {
    if len > available {
        return Err(format!(
            "corrupt executable: {what} says it has {len} bytes, more than the whole file ({available} bytes)"
        ));
    }
    usize::try_from(len).map_err(|_| format!("corrupt executable: {what} has {len} bytes, more than memory holds"))
}

/// A blob as linked into an executable: `u64 LE length | bytes`.
pub fn blob(bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + bytes.len());
    b.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    b.extend_from_slice(bytes);
    b
}

/// Whether this CPU has a feature, by its Cranelift name (`avx2`, `sse41`,
/// `avx512f`, as [`AppMeta::cpu_features`] lists them); None for a name
/// this check does not know (or off x86-64).
pub fn host_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        Some(match feature {
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "cmpxchg16b" => has!("cmpxchg16b"),
            "sse41" => has!("sse4.1"),
            "sse42" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "avx512f" => has!("avx512f"),
            "avx512dq" => has!("avx512dq"),
            "avx512vl" => has!("avx512vl"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512vnni" => has!("avx512vnni"),
            "avx_vnni" => has!("avxvnni"),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

/// The features of `required` this CPU lacks (or cannot be checked for),
/// by `has` ([`host_has`] on the machine running).
pub fn missing_features(required: &[String], has: impl Fn(&str) -> Option<bool>) -> Vec<String> {
    required.iter().filter(|f| has(f) != Some(true)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(c: &str) -> Fingerprint {
        Fingerprint {
            checkpoint: c.into(),
            ouroc: VERSION.into(),
            layout: "l".into(),
        }
    }

    fn image(fpr: &Fingerprint) -> Vec<u8> {
        let header = WeightsHeader {
            fingerprint: fpr.clone(),
            entries: vec![
                WeightIndex {
                    id: 3,
                    dtype: "f32".into(),
                    offset: 0,
                    len: 8,
                },
                WeightIndex {
                    id: 5,
                    dtype: "bf16".into(),
                    offset: 64,
                    len: 4,
                },
            ],
            data_bytes: 68,
        };
        let mut img = weights_head(&header);
        let mut data = vec![0u8; 68];
        data[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        data[64..].copy_from_slice(&[9, 9, 9, 9]);
        img.extend(data);
        img
    }

    #[test]
    fn an_image_reads_back_and_refuses_mismatches() {
        let img = image(&fp("a"));
        assert_eq!(img.len(), DATA_ALIGN + 68);
        let e = read_weights(&img, &fp("a"), "w").unwrap();
        assert_eq!(
            e[0],
            (
                (3, Encoding::Dense(ouroc_ir::DType::F32)),
                &[1u8, 2, 3, 4, 5, 6, 7, 8][..]
            )
        );
        assert_eq!(e[1], ((5, Encoding::Dense(ouroc_ir::DType::BF16)), &[9u8, 9, 9, 9][..]));
        let err = read_weights(&img, &fp("b"), "w").unwrap_err();
        assert!(
            err.contains("does not belong") && err.contains("checkpoint fingerprint a"),
            "{err}"
        );
        let err = read_weights(&img[..img.len() - 1], &fp("a"), "w").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let err = read_weights(&img[..100], &fp("a"), "w").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let err = read_weights(b"not weights at all", &fp("a"), "w").unwrap_err();
        assert!(err.contains("not an ouroc weights file"), "{err}");
    }

    #[test]
    fn missing_features_are_listed() {
        let need: Vec<String> = ["sse41", "avx2", "fma", "mystery"].map(String::from).to_vec();
        let has = |f: &str| match f {
            "sse41" | "fma" => Some(true),
            "avx2" => Some(false),
            _ => None,
        };
        assert_eq!(missing_features(&need, has), ["avx2", "mystery"]);
        // This machine has what a native build of it detects (SSE4.1 is in every x86-64-v2 CPU).
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host_has("sse41"), Some(std::arch::is_x86_feature_detected!("sse4.1")));
    }

    #[test]
    fn the_hash_tells_contents_apart() {
        let h = |b: &[u8]| {
            let mut x = Hasher::default();
            x.update(b);
            x.hex()
        };
        assert_eq!(h(b"abcdefghij"), h(b"abcdefghij"));
        assert_ne!(h(b"abcdefghij"), h(b"abcdefghik"));
        assert_ne!(h(b""), h(b"\0"));
    }
}
