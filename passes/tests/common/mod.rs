//! Shared support for pass tests: fixture graphs, random small models, and
//! the numerical equivalence check every pass must pass.
#![allow(dead_code)]

use ouroc_ir::{DType, ExitPolicy, Graph, Interpreter, Options, WeightSource};
use ouroc_models::{BuildOptions, Checkpoint, OuroConfig};
use std::collections::HashMap;
use std::path::PathBuf;

pub const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];
pub const POLICIES: [&str; 5] = ["last", "step:0", "threshold:0.5", "threshold:1.0:bf16", "weighted"];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub fn open(name: &str) -> Checkpoint {
    Checkpoint::open(&fixture_dir(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The imported f32 graph of a fixture under a policy.
pub fn fixture_graph(ckpt: &Checkpoint, policy: &str) -> Graph {
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).expect("build")
}

/// A prompt of `n` token ids below `vocab`, deterministic.
pub fn prompt(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| (rng.next() % vocab as u64) as u32).collect()
}

/// Run a graph: a prefill of `prompt[..split]`, then the rest one token at
/// a time through the KV cache; returns every position's logits.
pub fn run(g: &Graph, weights: &dyn WeightSource, prompt: &[u32], split: usize) -> Vec<f32> {
    let opts = Options {
        round_low_precision: false,
        max_positions: None,
        exit_skips: false,
    };
    let mut it = Interpreter::new(g, weights, opts).unwrap_or_else(|e| panic!("load: {e}"));
    let mut logits = it.run_tokens(&[prompt[..split].to_vec()]).expect("prefill").outputs[0]
        .data
        .clone();
    for &t in &prompt[split..] {
        logits.extend(it.run_tokens(&[vec![t]]).expect("decode").outputs[0].data.clone());
    }
    logits
}

/// Largest |a - b| over the largest |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "output lengths differ");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `after` computes what `before` computes: f32 logits within 1e-5 relative
/// error, for a prefill followed by decode steps.
pub fn assert_equivalent(before: &Graph, after: &Graph, weights: &dyn WeightSource, vocab: usize, what: &str) {
    ouroc_ir::verify(after).unwrap_or_else(|e| panic!("{what}: result does not verify: {e}\n{after}"));
    let p = prompt(vocab, 10, 7);
    let a = run(before, weights, &p, 6);
    let b = run(after, weights, &p, 6);
    let e = rel_err(&b, &a);
    assert!(e <= 1e-5, "{what}: relative error {e} after the pass");
}

/// A small deterministic generator (xorshift), so tests need no crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// A random small Ouro model: config, graph and weights (random values,
/// norm weights around 1, a gate that exits tokens at different steps).
pub struct RandomModel {
    pub config: OuroConfig,
    pub graph: Graph,
    pub weights: HashMap<String, Vec<f32>>,
}

pub fn random_model(seed: u64, policy: &str) -> RandomModel {
    let mut rng = Rng(seed);
    let heads = rng.pick(&[1usize, 2, 4]);
    let kv_heads = rng.pick(&[1usize, 2, 4].map(|k| k.min(heads)));
    let kv_heads = if heads.is_multiple_of(kv_heads) { kv_heads } else { 1 };
    let head_dim = rng.pick(&[2usize, 4, 8]);
    let hidden = rng.pick(&[8usize, 12, 16]);
    let layers = rng.pick(&[1usize, 2, 3]);
    let steps = rng.pick(&[1usize, 2, 3, 4]);
    let inter = rng.pick(&[8usize, 20, 24]);
    let vocab = rng.pick(&[16usize, 37]);
    let tied = rng.next().is_multiple_of(2);
    let json = format!(
        r#"{{"model_type": "ouro", "hidden_size": {hidden}, "intermediate_size": {inter},
        "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "num_key_value_heads": {kv_heads},
        "head_dim": {head_dim}, "vocab_size": {vocab}, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": {tied}, "total_ut_steps": {steps},
        "early_exit_threshold": 1.0, "hidden_act": "silu"}}"#
    );
    let (config, _) = OuroConfig::from_json_str(&json, "random config").expect("random config");
    let head = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let pol = ExitPolicy::parse(policy).unwrap();
    let pol = match pol {
        ExitPolicy::Step(k) => ExitPolicy::Step(k.min(steps - 1)),
        p => p,
    };
    let graph = ouroc_models::build_from_config(
        &config,
        head,
        &BuildOptions {
            dtype: DType::F32,
            policy: pol,
            loops: None,
            unrolled: false,
        },
    )
    .expect("build random model");
    let mut weights = HashMap::new();
    for op in graph.walk() {
        if let ouroc_ir::OpKind::Weight { name } = &op.kind {
            let t = graph.ty(op.result());
            let dims = t.fixed_dims().unwrap();
            let n: usize = dims.iter().product();
            let fan_in = *dims.last().unwrap() as f32;
            let v: Vec<f32> = if dims.len() == 1 && name.ends_with("bias") {
                vec![rng.unit() * 2.0]
            } else if dims.len() == 1 {
                (0..n).map(|_| 1.0 + 0.3 * rng.unit()).collect()
            } else if name.contains("early_exit_gate") {
                (0..n).map(|_| 3.0 * rng.unit() / fan_in.sqrt()).collect()
            } else {
                (0..n).map(|_| rng.unit() * (3.0 / fan_in).sqrt()).collect()
            };
            weights.insert(name.clone(), v);
        }
    }
    RandomModel { config, graph, weights }
}
