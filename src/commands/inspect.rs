use super::open;
use anyhow::Result;
use ouroc_ir::DType;
use ouroc_models::BuildOptions;
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    let ckpt = open(dir)?;
    let c = &ckpt.config;
    let dtypes: Vec<String> = ckpt.dtypes().iter().map(|(d, n)| format!("{d} x{n}")).collect();
    let kv = c.kv_bytes_per_token(2);
    outln!("checkpoint        {}", dir.display());
    outln!("model_type        {}", c.model_type);
    outln!(
        "shape             hidden {}, intermediate {}, layers {}, heads {} (kv {}), head_dim {}{}, vocab {}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        if c.head_dim_explicit { " (explicit)" } else { "" },
        c.vocab_size
    );
    outln!(
        "loop              {} steps over the {} layers = {} layer applications per token",
        c.total_ut_steps,
        c.num_hidden_layers,
        c.total_ut_steps * c.num_hidden_layers
    );
    outln!(
        "exit              early_exit_threshold {} (default policy: {} in bf16, {} in f32)",
        c.early_exit_threshold,
        BuildOptions::reference_policy(c, DType::BF16),
        BuildOptions::reference_policy(c, DType::F32)
    );
    outln!("parameters        {}", group(ckpt.parameter_count()));
    outln!(
        "weights           {} bytes stored ({})",
        group(ckpt.weight_bytes()),
        dtypes.join(", ")
    );
    outln!(
        "lm_head           {}{}",
        ckpt.head_tensor_name(),
        if c.tie_word_embeddings { " (tied)" } else { "" }
    );
    outln!(
        "KV cache          {} bytes per token in bf16 ({} slots = {} steps x {} layers); {} bytes at {} positions",
        group(kv),
        c.total_ut_steps * c.num_hidden_layers,
        c.total_ut_steps,
        c.num_hidden_layers,
        kv.checked_mul(c.max_position_embeddings as u64)
            .map_or("more than 2^64".to_string(), group),
        c.max_position_embeddings
    );
    outln!(
        "context           {} positions (rope_theta {})",
        c.max_position_embeddings,
        c.rope_theta
    );
    let mut warnings = ckpt.warnings.clone();
    let full_context = kv.checked_mul(c.max_position_embeddings as u64);
    if let Some(available) = ouroc_runtime::memory::available_bytes()
        && full_context.is_none_or(|b| b > available)
    {
        warnings.push(format!(
            "the bf16 KV cache of a full {}-position context ({}) is more than this machine's {} available: \
             runs here must stay shorter (or use --kv last|mean)",
            c.max_position_embeddings,
            full_context.map_or("more than 2^64 bytes".to_string(), ouroc_runtime::memory::bytes),
            ouroc_runtime::memory::bytes(available)
        ));
    }
    if warnings.is_empty() {
        outln!("warnings          none");
    } else {
        outln!("warnings          {}", warnings.len());
        for w in &warnings {
            outln!("  - {w}");
        }
    }
    Ok(())
}

/// 1434652673 -> "1,434,652,673".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
