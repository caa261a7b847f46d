//! Named model shapes without weights, for statistics and benchmarks:
//! the released Ouro sizes (spec §2) and a small one.

use crate::config::OuroConfig;

/// The shapes `--shape` accepts.
pub const SHAPES: [&str; 3] = ["1.4b", "2.6b", "small"];

/// The config of a named shape: `1.4b` and `2.6b` as released
/// (bf16, R = 4), `small` = hidden 512, 8 layers, intermediate 1408,
/// 8 heads, vocab 49152, R = 4.
pub fn named_shape(name: &str) -> Result<OuroConfig, String> {
    let json = shape_config_json(name)?;
    OuroConfig::from_json_str(&json, &format!("shape {name}"))
        .map(|(c, _)| c)
        .map_err(|e| e.to_string())
}

/// The `config.json` text of a named shape (what a random checkpoint of it holds).
pub fn shape_config_json(name: &str) -> Result<String, String> {
    let (hidden, inter, layers, heads) = match name {
        "1.4b" => (2048, 5632, 24, 16),
        "2.6b" => (2048, 5632, 48, 16),
        "small" => (512, 1408, 8, 8),
        other => return Err(format!("unknown shape `{other}`; known shapes: {}", SHAPES.join(", "))),
    };
    let json = format!(
        r#"{{"model_type": "ouro", "architectures": ["OuroForCausalLM"], "hidden_size": {hidden},
        "intermediate_size": {inter}, "num_hidden_layers": {layers}, "num_attention_heads": {heads},
        "num_key_value_heads": {heads}, "vocab_size": 49152, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": null, "max_position_embeddings": 65536,
        "tie_word_embeddings": false, "total_ut_steps": 4, "early_exit_threshold": 1.0,
        "use_sliding_window": false, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}}"#
    );
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_shapes_have_the_published_sizes() {
        let c = named_shape("1.4b").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim, c.total_ut_steps),
            (2048, 24, 128, 4)
        );
        assert_eq!(named_shape("2.6b").unwrap().num_hidden_layers, 48);
        assert_eq!(named_shape("small").unwrap().hidden_size, 512);
        assert!(named_shape("7b").unwrap_err().contains("1.4b, 2.6b, small"));
    }
}
