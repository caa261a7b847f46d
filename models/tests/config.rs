//! config.json parsing: defaults, derived values, and every refusal naming its key and value.

mod common;

use ouroc_models::{ModelError, OuroConfig, expected_tensors};
use serde_json::{Value, json};

fn parse(cfg: &Value) -> Result<(OuroConfig, Vec<String>), ModelError> {
    OuroConfig::from_json_str(&cfg.to_string(), "test/config.json")
}

fn with(key: &str, value: Value) -> Value {
    let mut cfg = common::tiny_config();
    cfg[key] = value;
    cfg
}

fn without(keys: &[&str]) -> Value {
    let mut cfg = common::tiny_config();
    for k in keys {
        cfg.as_object_mut().unwrap().remove(*k);
    }
    cfg
}

/// The error text, failing the test if parsing succeeded.
fn err_text(cfg: &Value) -> String {
    match parse(cfg) {
        Ok((c, _)) => panic!("expected an error, parsed {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(text: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(text.contains(f), "message {text:?} should mention {f:?}");
    }
}

#[test]
fn parses_the_tiny_config() {
    let (c, warnings) = parse(&common::tiny_config()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.hidden_size, 8);
    assert_eq!(c.intermediate_size, 16);
    assert_eq!(c.num_hidden_layers, 1);
    assert_eq!(c.num_attention_heads, 2);
    assert_eq!(c.num_key_value_heads, 2);
    assert_eq!(c.head_dim, 4);
    assert!(!c.head_dim_explicit);
    assert_eq!(c.vocab_size, 16);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(c.max_position_embeddings, 64);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.total_ut_steps, 4);
    assert_eq!(c.early_exit_threshold, 1.0);
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![0]);
    assert_eq!(c.pad_token_id, Some(0));
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.model_type, "ouro");
    assert_eq!(c.q_dim(), 8);
    assert_eq!(c.kv_dim(), 8);
    // R * L * 2 * kv_heads * head_dim * bytes = 4 * 1 * 2 * 2 * 4 * 2
    assert_eq!(c.kv_bytes_per_token(2), 128);
}

#[test]
fn defaults_apply_when_keys_are_absent_or_null() {
    let mut cfg = without(&[
        "num_key_value_heads",
        "tie_word_embeddings",
        "total_ut_steps",
        "early_exit_threshold",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "hidden_act",
        "layer_types",
    ]);
    cfg["pad_token_id"] = Value::Null;
    let (c, warnings) = parse(&cfg).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.num_key_value_heads, 2);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.total_ut_steps, 4);
    assert_eq!(c.early_exit_threshold, 1.0);
    assert_eq!(c.bos_token_id, None);
    assert!(c.eos_token_ids.is_empty());
    assert_eq!(c.pad_token_id, None);
    assert_eq!(c.torch_dtype, None);
}

#[test]
fn eos_may_be_a_list_and_dtype_may_use_the_new_key() {
    let mut cfg = with("eos_token_id", json!([0, 2]));
    cfg.as_object_mut().unwrap().remove("torch_dtype");
    cfg["dtype"] = json!("float32");
    let (c, _) = parse(&cfg).unwrap();
    assert_eq!(c.eos_token_ids, vec![0, 2]);
    assert_eq!(c.torch_dtype.as_deref(), Some("float32"));
}

#[test]
fn explicit_head_dim_and_gqa() {
    let mut cfg = with("head_dim", json!(8));
    cfg["num_key_value_heads"] = json!(1);
    let (c, _) = parse(&cfg).unwrap();
    assert!(c.head_dim_explicit);
    assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (8, 16, 8));
}

#[test]
fn rope_parameters_of_newer_transformers_are_read() {
    let mut cfg = without(&["rope_theta"]);
    cfg["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
    assert_eq!(parse(&cfg).unwrap().0.rope_theta, 10000.0);

    cfg["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    assert_mentions(&err_text(&cfg), &["rope_parameters.rope_type", "\"yarn\""]);
}

#[test]
fn missing_model_type_is_a_warning() {
    let (c, warnings) = parse(&without(&["model_type"])).unwrap();
    assert_eq!(c.model_type, "ouro");
    assert_eq!(warnings.len(), 1);
    assert_mentions(&warnings[0], &["model_type", "test/config.json"]);
}

#[test]
fn unsupported_settings_are_refused_naming_key_and_value() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "model_type",
            json!("llama"),
            &["model_type", "\"llama\"", "unsupported"],
        ),
        ("hidden_act", json!("gelu"), &["hidden_act", "\"gelu\"", "silu"]),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            &["rope_scaling", "\"linear\"", "factor"],
        ),
        (
            "use_sliding_window",
            json!(true),
            &["use_sliding_window", "true", "sliding-window"],
        ),
        ("attention_bias", json!(true), &["attention_bias", "true"]),
        ("mlp_bias", json!(true), &["mlp_bias", "true"]),
        (
            "layer_types",
            json!(["sliding_attention"]),
            &["layer_types", "\"sliding_attention\"", "full_attention"],
        ),
    ];
    for (key, value, fragments) in cases {
        let text = err_text(&with(key, value));
        assert_mentions(&text, fragments);
        assert_mentions(&text, &["test/config.json"]);
    }
}

#[test]
fn invalid_values_are_refused_naming_key_and_value() {
    let cases: Vec<(Value, &[&str])> = vec![
        (with("hidden_size", json!(0)), &["hidden_size", "0", "greater than 0"]),
        (with("vocab_size", json!(0)), &["vocab_size", "0"]),
        (with("total_ut_steps", json!(0)), &["total_ut_steps", "0"]),
        (
            with("early_exit_threshold", json!(0.0)),
            &["early_exit_threshold", "(0, 1]"],
        ),
        (
            with("early_exit_threshold", json!(1.5)),
            &["early_exit_threshold", "1.5", "(0, 1]"],
        ),
        (
            with("num_key_value_heads", json!(3)),
            &["num_key_value_heads", "3", "multiple"],
        ),
        (with("head_dim", json!(3)), &["head_dim", "3", "even"]),
        (
            {
                let mut c = with("num_attention_heads", json!(3));
                c["num_key_value_heads"] = json!(1);
                c
            },
            &["hidden_size", "8", "divisible", "3"],
        ),
        (
            with("layer_types", json!(["full_attention", "full_attention"])),
            &["layer_types", "2 entries", "num_hidden_layers is 1"],
        ),
        (with("rms_norm_eps", json!(-1.0)), &["rms_norm_eps", "-1"]),
    ];
    for (cfg, fragments) in cases {
        assert_mentions(&err_text(&cfg), fragments);
    }
}

#[test]
fn missing_or_mistyped_keys_are_named() {
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    ] {
        let text = err_text(&without(&[key]));
        assert_mentions(&text, &[key, "missing"]);
    }
    assert_mentions(
        &err_text(&with("hidden_size", json!("8"))),
        &["hidden_size", "positive integer", "\"8\""],
    );
    assert_mentions(
        &err_text(&with("num_hidden_layers", json!(1.5))),
        &["num_hidden_layers", "1.5"],
    );
    assert_mentions(
        &err_text(&with("tie_word_embeddings", json!("yes"))),
        &["tie_word_embeddings", "boolean", "\"yes\""],
    );
    assert_mentions(
        &err_text(&with("eos_token_id", json!([0, -1]))),
        &["eos_token_id", "-1"],
    );
    assert_mentions(
        &err_text(&with("use_sliding_window", json!("no"))),
        &["use_sliding_window", "boolean"],
    );
}

#[test]
fn non_json_and_non_object_configs_are_refused() {
    let e = OuroConfig::from_json_str("{\"hidden_size\": 8,", "x/config.json").unwrap_err();
    assert_mentions(&e.to_string(), &["x/config.json", "not a valid config"]);
    let e = OuroConfig::from_json_str("[1, 2]", "x/config.json").unwrap_err();
    assert_mentions(&e.to_string(), &["x/config.json", "list"]);
}

#[test]
fn unknown_keys_are_tolerated() {
    let mut cfg = common::tiny_config();
    cfg["some_future_key"] = json!({"nested": [1, 2, 3]});
    cfg["sliding_window"] = json!(4096);
    let (_, warnings) = parse(&cfg).unwrap();
    assert!(warnings.is_empty());
}

#[test]
fn released_1_4b_shapes_match_the_published_counts() {
    let cfg = json!({
        "model_type": "ouro", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 49152, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": null, "max_position_embeddings": 65536,
        "tie_word_embeddings": false, "total_ut_steps": 4, "early_exit_threshold": 1.0,
        "use_sliding_window": false, "torch_dtype": "bfloat16"
    });
    let (c, _) = parse(&cfg).unwrap();
    let tensors = expected_tensors(&c);
    assert_eq!(tensors.len(), 269);
    let params: u64 = tensors.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    assert_eq!(params, 1_434_652_673);
    // 4 steps * 24 layers * K,V * 16 heads * 128 * 2 bytes
    assert_eq!(c.kv_bytes_per_token(2), 4 * 24 * 2 * 16 * 128 * 2);
}
