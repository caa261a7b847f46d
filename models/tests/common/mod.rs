//! Builders for tiny Ouro checkpoints in a temporary directory.
//!
//! The tensor list below is written out by hand from the spec (not taken from
//! `expected_tensors`) so that the loader's expectations are checked, not echoed.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, serialize_to_file};
use serde_json::{Value, json};

pub const H: usize = 8;
pub const I: usize = 16;
pub const V: usize = 16;

/// config.json of the tiny model: hidden 8, intermediate 16, 1 layer, 2 heads (head_dim 4),
/// vocab 16, untied head, R = 4.
pub fn tiny_config() -> Value {
    json!({
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": null,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": 1,
        "layer_types": ["full_attention"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.55.0",
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig"}
    })
}

/// Tensor names and shapes for a config with `layers` layers, q width `q`, kv width `kv`.
pub fn tensor_list(layers: usize, q: usize, kv: usize, with_head: bool) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![V, H])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, H]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, H]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, H]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![H, q]));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![I, H]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![I, H]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![H, I]));
        for n in [
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ] {
            t.push((format!("{p}.{n}.weight"), vec![H]));
        }
    }
    t.push(("model.norm.weight".to_string(), vec![H]));
    t.push(("model.early_exit_gate.weight".to_string(), vec![1, H]));
    t.push(("model.early_exit_gate.bias".to_string(), vec![1]));
    if with_head {
        t.push(("lm_head.weight".to_string(), vec![V, H]));
    }
    t
}

/// The tiny model's tensors (1 layer, q = kv = 8, with lm_head).
pub fn tiny_tensors() -> Vec<(String, Vec<usize>)> {
    tensor_list(1, H, H, true)
}

/// Deterministic values, multiples of 1/8 in [-1.75, 1.75]: exact in bf16, f16 and f32, and
/// different for every tensor (seeded by its name).
pub fn values_for(name: &str, n: usize) -> Vec<f32> {
    let seed = name
        .bytes()
        .fold(7usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
    (0..n)
        .map(|k| (seed.wrapping_add(k * 7) % 29) as f32 * 0.125 - 1.75)
        .collect()
}

pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => panic!("test helper: no encoder for {other:?}"),
    }
}

/// One tensor to write: name, dtype, shape, raw bytes.
pub type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// Tensors with `values_for` data in `dtype`.
pub fn make_tensors(list: &[(String, Vec<usize>)], dtype: Dtype) -> Vec<Raw> {
    list.iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            (name.clone(), dtype, shape.clone(), encode(&values_for(name, n), dtype))
        })
        .collect()
}

/// Writes a safetensors file with the `safetensors` crate.
pub fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).expect("valid view"),
            )
        })
        .collect();
    serialize_to_file(views, None, path).expect("write safetensors");
}

/// Writes a safetensors file by hand: length field, header text as given, data.
pub fn write_raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("write file");
}

pub fn write_config(dir: &Path, config: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).expect("write config.json");
}

/// A complete tiny checkpoint (config + model.safetensors) in `dtype`.
pub fn tiny_checkpoint(dtype: Dtype) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &tiny_config());
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &make_tensors(&tiny_tensors(), dtype),
    );
    dir
}
