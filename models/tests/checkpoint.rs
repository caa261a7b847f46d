//! Opening tiny checkpoints: every storage dtype, shards, tied heads, GQA, odd alignment, and
//! every way a checkpoint can be broken (each error's text is checked).

mod common;

use std::path::Path;

use common::{H, I, Raw, V};
use ouroc_models::{Checkpoint, StorageDtype};
use safetensors::Dtype;
use serde_json::json;

/// Parameters of the tiny model (untied): embed + layer + norm + gate + head.
const TINY_PARAMS: u64 = (V * H) as u64 + (4 * H * H + 3 * I * H + 4 * H) as u64 + (H + H + 1) as u64 + (V * H) as u64;

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(c) => panic!("expected an error, opened {} tensors", c.tensors().count()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(text: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(text.contains(f), "message {text:?} should mention {f:?}");
    }
}

/// Every tensor of `list` reads back as exactly the values it was written with.
fn assert_values(ck: &Checkpoint, list: &[(String, Vec<usize>)]) {
    for (name, shape) in list {
        let n = shape.iter().product();
        assert_eq!(ck.read_f32(name).unwrap(), common::values_for(name, n), "{name}");
    }
}

/// A safetensors file laid out by hand, tensors packed back to back in the given order with
/// no padding (so data can sit at odd offsets).
fn write_packed(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            json!({"dtype": format!("{dtype}"), "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    common::write_raw_safetensors(path, &serde_json::Value::Object(header).to_string(), &data);
}

fn load_and_check(dtype: Dtype, expected: StorageDtype) {
    let dir = common::tiny_checkpoint(dtype);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(ck.warnings.is_empty(), "{:?}", ck.warnings);
    assert_values(&ck, &common::tiny_tensors());
    assert_eq!(ck.tensors().count(), 16);
    let names: Vec<&str> = ck.tensors().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "tensors() is sorted by name");
    assert_eq!(ck.head_tensor_name(), "lm_head.weight");
    assert_eq!(ck.parameter_count(), TINY_PARAMS);
    assert_eq!(ck.weight_bytes(), TINY_PARAMS * expected.size_bytes() as u64);
    assert_eq!(ck.dtypes().into_iter().collect::<Vec<_>>(), vec![(expected, 16)]);
    let q = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(
        (q.dtype, q.shape.as_slice(), q.file.as_str()),
        (expected, &[8, 8][..], "model.safetensors")
    );
    assert_eq!(ck.config.total_ut_steps, 4);
    assert_eq!(ck.dir, dir.path());
}

#[test]
fn loads_bf16() {
    load_and_check(Dtype::BF16, StorageDtype::BF16);
}

#[test]
fn loads_f16() {
    load_and_check(Dtype::F16, StorageDtype::F16);
}

#[test]
fn loads_f32() {
    load_and_check(Dtype::F32, StorageDtype::F32);
}

#[test]
fn storage_dtype_names_and_sizes() {
    assert_eq!(StorageDtype::BF16.to_string(), "bf16");
    assert_eq!(StorageDtype::F16.to_string(), "f16");
    assert_eq!(StorageDtype::F32.to_string(), "f32");
    assert_eq!(StorageDtype::BF16.size_bytes(), 2);
    assert_eq!(StorageDtype::F32.size_bytes(), 4);
}

#[test]
fn reads_tensors_at_odd_offsets() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    // A 1-byte tensor first shifts every bf16 tensor after it to an odd offset.
    let mut tensors: Vec<Raw> = vec![("aaa.odd".into(), Dtype::U8, vec![1], vec![7])];
    tensors.extend(common::make_tensors(&common::tiny_tensors(), Dtype::BF16));
    write_packed(&dir.path().join("model.safetensors"), &tensors);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_values(&ck, &common::tiny_tensors());
    assert_eq!(ck.warnings.len(), 1);
    assert_mentions(&ck.warnings[0], &["aaa.odd", "U8"]);
}

#[test]
fn loads_two_shards_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let all = common::make_tensors(&common::tiny_tensors(), Dtype::BF16);
    let (layers, rest): (Vec<Raw>, Vec<Raw>) = all.into_iter().partition(|t| t.0.starts_with("model.layers."));
    let s1 = "model-00001-of-00002.safetensors";
    let s2 = "model-00002-of-00002.safetensors";
    common::write_safetensors(&dir.path().join(s1), &rest);
    common::write_safetensors(&dir.path().join(s2), &layers);
    let mut map = serde_json::Map::new();
    for t in &rest {
        map.insert(t.0.clone(), json!(s1));
    }
    for t in &layers {
        map.insert(t.0.clone(), json!(s2));
    }
    let index = json!({"metadata": {"total_size": 1890}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(ck.warnings.is_empty(), "{:?}", ck.warnings);
    assert_values(&ck, &common::tiny_tensors());
    assert_eq!(ck.tensor("model.norm.weight").unwrap().file, s1);
    assert_eq!(ck.tensor("model.layers.0.mlp.up_proj.weight").unwrap().file, s2);
    assert_eq!(ck.parameter_count(), TINY_PARAMS);
}

#[test]
fn tied_embeddings_without_lm_head_use_embed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config();
    cfg["tie_word_embeddings"] = json!(true);
    common::write_config(dir.path(), &cfg);
    let list = common::tensor_list(1, H, H, false);
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::BF16),
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert!(ck.warnings.is_empty(), "{:?}", ck.warnings);
    assert_eq!(ck.head_tensor_name(), "model.embed_tokens.weight");
    assert_eq!(ck.parameter_count(), TINY_PARAMS - (V * H) as u64);
    assert!(ck.tensor("lm_head.weight").is_none());
}

#[test]
fn tied_embeddings_with_a_stored_lm_head_use_it_and_warn() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config();
    cfg["tie_word_embeddings"] = json!(true);
    common::write_config(dir.path(), &cfg);
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&common::tiny_tensors(), Dtype::BF16),
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.head_tensor_name(), "lm_head.weight");
    assert_eq!(ck.parameter_count(), TINY_PARAMS);
    assert_eq!(ck.warnings.len(), 1);
    assert_mentions(&ck.warnings[0], &["tie_word_embeddings", "lm_head.weight"]);
}

#[test]
fn gqa_and_explicit_head_dim_shapes() {
    // 2 query heads of head_dim 8 (explicit, != hidden/heads), 1 kv head: q 16, kv 8.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config();
    cfg["head_dim"] = json!(8);
    cfg["num_key_value_heads"] = json!(1);
    common::write_config(dir.path(), &cfg);
    let list = common::tensor_list(1, 16, 8, true);
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::F32),
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_values(&ck, &list);
    assert_eq!(
        ck.tensor("model.layers.0.self_attn.o_proj.weight").unwrap().shape,
        vec![H, 16]
    );

    // GQA with the derived head_dim 4: kv width 4.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::tiny_config();
    cfg["num_key_value_heads"] = json!(1);
    common::write_config(dir.path(), &cfg);
    let list = common::tensor_list(1, 8, 4, true);
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::BF16),
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        ck.tensor("model.layers.0.self_attn.k_proj.weight").unwrap().shape,
        vec![4, H]
    );
    assert_eq!(ck.config.kv_dim(), 4);
}

#[test]
fn unexpected_tensors_load_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let mut tensors = common::make_tensors(&common::tiny_tensors(), Dtype::BF16);
    tensors.push((
        "model.rotary_emb.inv_freq".into(),
        Dtype::F32,
        vec![2],
        common::encode(&[1.0, 0.5], Dtype::F32),
    ));
    tensors.push(("position_ids".into(), Dtype::I64, vec![1], vec![0; 8]));
    common::write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.warnings.len(), 2, "{:?}", ck.warnings);
    let all = ck.warnings.join("\n");
    assert_mentions(
        &all,
        &["model.rotary_emb.inv_freq", "position_ids", "I64", "unexpected"],
    );
    // Readable extras stay accessible but do not count as model parameters.
    assert_eq!(ck.read_f32("model.rotary_emb.inv_freq").unwrap(), vec![1.0, 0.5]);
    assert_eq!(ck.parameter_count(), TINY_PARAMS);
}

#[test]
fn unknown_tensor_names_are_errors() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.read_f32("model.layers.7.mlp.up_proj.weight").unwrap_err();
    assert_mentions(&e.to_string(), &["model.layers.7.mlp.up_proj.weight", "no tensor"]);
    assert!(ck.raw_bytes("nope").is_err());
}

// ---- broken files ----

#[test]
fn truncated_file() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 900).unwrap(); // the data section is 1890 bytes
    drop(file);
    assert_mentions(
        &open_err(dir.path()),
        &["model.safetensors", "data_offsets", "truncated"],
    );
}

#[test]
fn file_shorter_than_the_length_field() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    std::fs::write(dir.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
    assert_mentions(
        &open_err(dir.path()),
        &["model.safetensors", "3 bytes", "not a safetensors file"],
    );
}

#[test]
fn header_length_claims_more_than_the_file() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert_mentions(&open_err(dir.path()), &["model.safetensors", "1000000", "only 2 bytes"]);

    // A length that would overflow any addition.
    std::fs::write(dir.path().join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
    assert_mentions(&open_err(dir.path()), &["header length", &u64::MAX.to_string()]);
}

#[test]
fn header_that_is_not_json() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), "{this is not json", &[]);
    assert_mentions(&open_err(dir.path()), &["model.safetensors", "not a valid JSON object"]);
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), "[1, 2]", &[]);
    assert_mentions(&open_err(dir.path()), &["not a valid JSON object"]);
    // Not UTF-8 at all.
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert_mentions(&open_err(dir.path()), &["not a valid JSON object"]);
}

#[test]
fn malformed_header_entries() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let cases = [
        (r#"{"w": {"shape": [2], "data_offsets": [0, 4]}}"#, "`dtype`"),
        (
            r#"{"w": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}}"#,
            "`shape`",
        ),
        (
            r#"{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0]}}"#,
            "`data_offsets`",
        ),
        (
            r#"{"w": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}"#,
            "begin > end",
        ),
        (
            r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}"#,
            "overflows",
        ),
        (r#"{"w": 5}"#, "expected an object"),
    ];
    for (header, fragment) in cases {
        common::write_raw_safetensors(&path, header, &[0; 4]);
        assert_mentions(&open_err(dir.path()), &["tensor `w`", fragment]);
    }
}

#[test]
fn data_offsets_past_the_end() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let header = r#"{"model.embed_tokens.weight": {"dtype": "BF16", "shape": [16, 8], "data_offsets": [0, 256]}}"#;
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), header, &[0; 100]);
    assert_mentions(
        &open_err(dir.path()),
        &["model.embed_tokens.weight", "[0, 256)", "only 100 bytes"],
    );
    // Offsets near u64::MAX must not overflow anything.
    let header = format!(
        r#"{{"w": {{"dtype": "BF16", "shape": [1], "data_offsets": [{}, {}]}}}}"#,
        u64::MAX - 1,
        u64::MAX
    );
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), &header, &[0; 2]);
    assert_mentions(&open_err(dir.path()), &["tensor `w`", "data_offsets"]);
}

/// A header length one less than written still parses when the header ends in padding spaces;
/// every tensor would then be read one byte off. The data section is one byte too long for its
/// tensors, which is refused.
#[test]
fn header_length_one_short_is_refused_not_read_shifted() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let header = r#"{"model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}    "#;
    common::write_raw_safetensors(&path, header, &[0; 16]);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes[..8].copy_from_slice(&(n - 1).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(
        &open_err(dir.path()),
        &[
            "model.safetensors",
            "end at byte 16",
            "17 bytes long",
            "1 bytes unaccounted",
        ],
    );
    // One more than written: the header then swallows a data byte and starts no longer
    // parsing as JSON, or the data no longer fits; never a shifted read.
    common::write_raw_safetensors(&path, header, &[0; 16]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(n + 1).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(&open_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn overlapping_data_offsets_are_refused() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let header = r#"{"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]},
                     "b": {"dtype": "BF16", "shape": [8], "data_offsets": [8, 24]}}"#;
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), header, &[0; 24]);
    assert_mentions(
        &open_err(dir.path()),
        &["tensor `b`", "overlaps tensor `a`", "ends at 16"],
    );
    // Two names for the very same bytes.
    let header = r#"{"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]},
                     "b": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}"#;
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), header, &[0; 16]);
    assert_mentions(&open_err(dir.path()), &["overlaps tensor `a`"]);
}

#[test]
fn gaps_and_trailing_bytes_in_the_data_section_are_refused() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let path = dir.path().join("model.safetensors");
    let header = r#"{"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]},
                     "b": {"dtype": "BF16", "shape": [8], "data_offsets": [20, 36]}}"#;
    common::write_raw_safetensors(&path, header, &[0; 36]);
    assert_mentions(&open_err(dir.path()), &["4 unused bytes", "tensor `a`", "tensor `b`"]);
    let header = r#"{"a": {"dtype": "BF16", "shape": [8], "data_offsets": [4, 20]}}"#;
    common::write_raw_safetensors(&path, header, &[0; 20]);
    assert_mentions(&open_err(dir.path()), &["4 unused bytes", "start of the data section"]);
    let header = r#"{"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}"#;
    common::write_raw_safetensors(&path, header, &[0; 20]);
    assert_mentions(&open_err(dir.path()), &["20 bytes long", "4 bytes unaccounted"]);
}

#[test]
fn duplicate_tensor_names_are_refused() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let header = r#"{"model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]},
                     "model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [16, 32]}}"#;
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), header, &[0; 32]);
    assert_mentions(
        &open_err(dir.path()),
        &["model.safetensors", "duplicate key `model.norm.weight`"],
    );
}

#[test]
fn header_length_above_the_reference_limit_is_refused_before_reading() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert_mentions(&open_err(dir.path()), &["200000000", "at most 100000000"]);
}

#[test]
fn data_size_not_matching_dtype_and_shape() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let header = r#"{"model.norm.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 12]}}"#;
    common::write_raw_safetensors(&dir.path().join("model.safetensors"), header, &[0; 12]);
    assert_mentions(
        &open_err(dir.path()),
        &["model.norm.weight", "needs 16 bytes", "span 12 bytes"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let mut list = common::tiny_tensors();
    list.retain(|(n, _)| n != "model.layers.0.mlp.up_proj.weight");
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::BF16),
    );
    assert_mentions(
        &open_err(dir.path()),
        &["missing 1 tensor", "model.layers.0.mlp.up_proj.weight"],
    );
}

#[test]
fn many_missing_tensors_are_listed_briefly() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let mut cfg = common::tiny_config();
    cfg["num_hidden_layers"] = json!(3);
    cfg["layer_types"] = json!(["full_attention", "full_attention", "full_attention"]);
    common::write_config(dir.path(), &cfg);
    let text = open_err(dir.path());
    assert_mentions(
        &text,
        &[
            "missing 22 tensor",
            "model.layers.1.self_attn.q_proj.weight",
            "and 12 more",
        ],
    );
    assert!(!text.contains("model.layers.2.mlp.down_proj.weight"), "{text}");
}

#[test]
fn untied_model_without_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let list = common::tensor_list(1, H, H, false);
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::BF16),
    );
    assert_mentions(
        &open_err(dir.path()),
        &["lm_head.weight", "tie_word_embeddings is false"],
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let mut list = common::tiny_tensors();
    for (name, shape) in &mut list {
        if name == "model.layers.0.self_attn.q_proj.weight" {
            *shape = vec![4, 16];
        }
    }
    common::write_safetensors(
        &dir.path().join("model.safetensors"),
        &common::make_tensors(&list, Dtype::BF16),
    );
    assert_mentions(
        &open_err(dir.path()),
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "[8, 8]",
            "[4, 16]",
            "model.safetensors",
        ],
    );
}

#[test]
fn unsupported_dtype_of_a_weight() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let mut tensors = common::make_tensors(&common::tiny_tensors(), Dtype::BF16);
    for t in &mut tensors {
        if t.0 == "model.embed_tokens.weight" {
            t.1 = Dtype::I64;
            t.3 = vec![0; V * H * 8];
        }
    }
    common::write_safetensors(&dir.path().join("model.safetensors"), &tensors);
    assert_mentions(
        &open_err(dir.path()),
        &["model.embed_tokens.weight", "I64", "BF16, F16 and F32"],
    );
}

#[test]
fn unsupported_config_key_through_open() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    let mut cfg = common::tiny_config();
    cfg["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
    common::write_config(dir.path(), &cfg);
    assert_mentions(&open_err(dir.path()), &["config.json", "rope_scaling", "dynamic"]);
}

#[test]
fn missing_config_json() {
    let dir = common::tiny_checkpoint(Dtype::BF16);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_mentions(
        &open_err(dir.path()),
        &["no config.json", &dir.path().display().to_string()],
    );
}

#[test]
fn missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nope");
    assert_mentions(&open_err(&gone), &["does not exist", "nope"]);
}

#[test]
fn missing_weights() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    assert_mentions(
        &open_err(dir.path()),
        &["no weights", "model.safetensors", "model.safetensors.index.json"],
    );
    std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
    assert_mentions(&open_err(dir.path()), &["pytorch_model.bin"]);
}

fn write_index(dir: &Path, map: serde_json::Value) {
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let map: serde_json::Map<String, serde_json::Value> = common::tiny_tensors()
        .into_iter()
        .map(|(n, _)| (n, json!("model-00001-of-00001.safetensors")))
        .collect();
    write_index(dir.path(), map.into());
    assert_mentions(
        &open_err(dir.path()),
        &[
            "model-00001-of-00001.safetensors",
            "does not exist",
            "lm_head.weight",
            "and 15 other",
        ],
    );
}

#[test]
fn index_tensor_absent_from_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let shard = "model-00001-of-00001.safetensors";
    let mut list = common::tiny_tensors();
    let map: serde_json::Map<String, serde_json::Value> = list.iter().map(|(n, _)| (n.clone(), json!(shard))).collect();
    list.retain(|(n, _)| n != "model.norm.weight");
    common::write_safetensors(&dir.path().join(shard), &common::make_tensors(&list, Dtype::BF16));
    write_index(dir.path(), map.into());
    assert_mentions(
        &open_err(dir.path()),
        &["model.norm.weight", shard, "no tensor of that name"],
    );
}

#[test]
fn malformed_index() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    write_index(dir.path(), json!({"model.norm.weight": "../outside.safetensors"}));
    assert_mentions(
        &open_err(dir.path()),
        &["../outside.safetensors", "inside the checkpoint directory"],
    );
    write_index(dir.path(), json!({"model.norm.weight": 3}));
    assert_mentions(&open_err(dir.path()), &["model.norm.weight", "expected a file name"]);
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    assert_mentions(&open_err(dir.path()), &["index.json", "weight_map"]);
}

#[test]
fn shard_tensors_missing_from_the_index_are_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    common::write_config(dir.path(), &common::tiny_config());
    let shard = "model-00001-of-00001.safetensors";
    let mut tensors = common::make_tensors(&common::tiny_tensors(), Dtype::BF16);
    let map: serde_json::Map<String, serde_json::Value> = tensors.iter().map(|t| (t.0.clone(), json!(shard))).collect();
    tensors.push(("stray".into(), Dtype::F32, vec![1], common::encode(&[1.0], Dtype::F32)));
    common::write_safetensors(&dir.path().join(shard), &tensors);
    write_index(dir.path(), map.into());
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.warnings.len(), 1);
    assert_mentions(&ck.warnings[0], &["stray", shard, "not listed"]);
    assert!(ck.tensor("stray").is_none());
}
