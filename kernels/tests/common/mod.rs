//! Shared test support: fixtures, graphs, and running the IR interpreter
//! and the Program executor side by side.
#![allow(dead_code)]

use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::{DType, ExitPolicy, Graph, Interpreter, Options};
use ouroc_kernels::Program;
use ouroc_models::{BuildOptions, Checkpoint};
use std::path::PathBuf;

pub const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];
pub const POLICIES: [&str; 3] = ["last", "threshold:0.5", "weighted"];

pub fn open(name: &str) -> Checkpoint {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Checkpoint::open(&dir).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The imported (unoptimised) graph of a checkpoint.
pub fn graph(ckpt: &Checkpoint, dtype: DType, policy: &str) -> Graph {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).expect("build graph")
}

/// The graph after the default pipeline.
pub fn optimised(g: &Graph) -> Graph {
    ouroc_compile::optimise(g, false, None).expect("pipeline").0
}

/// `n` token ids below `vocab`, deterministic.
pub fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab as u64) as u32)
        .collect()
}

/// Logits of every position and the exit step of every token.
pub struct Run {
    pub logits: Vec<f32>,
    pub exit_steps: Vec<usize>,
}

/// The interpreter: a prefill of `prompt[..split]`, then one token at a time.
pub fn interp(g: &Graph, ckpt: &Checkpoint, prompt: &[u32], split: usize, round: bool, skips: bool) -> Run {
    let opts = Options {
        round_low_precision: round,
        max_positions: None,
        exit_skips: skips,
    };
    let mut it = Interpreter::new(g, ckpt, opts).expect("interpreter");
    let mut run = Run {
        logits: Vec::new(),
        exit_steps: Vec::new(),
    };
    let mut chunks = vec![prompt[..split].to_vec()];
    chunks.extend(prompt[split..].iter().map(|&t| vec![t]));
    for c in chunks {
        let out = it.run_tokens(&[c]).expect("interpreter run");
        run.logits.extend(&out.outputs[0].data);
        run.exit_steps
            .extend(out.trace.map(|t| t.exit_step).unwrap_or_default());
    }
    run
}

/// The executor, the same way; also returns the kernels launched per call.
pub fn exec(p: &Program, ckpt: &Checkpoint, prompt: &[u32], split: usize, opts: ExecOptions) -> (Run, Vec<usize>) {
    let mut ex = Executor::new(p, ckpt, opts).expect("executor");
    let mut run = Run {
        logits: Vec::new(),
        exit_steps: Vec::new(),
    };
    let mut launches = Vec::new();
    let mut chunks = vec![prompt[..split].to_vec()];
    chunks.extend(prompt[split..].iter().map(|&t| vec![t]));
    for c in chunks {
        let out = ex.run_tokens(&[c]).expect("executor run");
        run.logits.extend(&out.outputs[0].data);
        run.exit_steps.extend(out.exit_steps);
        launches.push(out.launches);
    }
    (run, launches)
}

pub fn f32_exec() -> ExecOptions {
    ExecOptions {
        round_low_precision: false,
        exit_skips: false,
        ..ExecOptions::default()
    }
}

/// Largest |a - b| over the largest |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "output lengths differ");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A small deterministic generator (xorshift).
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

/// A random small Ouro model (odd sizes, GQA, tied or not, 1 to 4 steps;
/// a gate that exits tokens at different steps): graph, weights, vocab.
pub fn random_model(seed: u64, policy: &str) -> (Graph, std::collections::HashMap<String, Vec<f32>>, usize) {
    let mut rng = Rng(seed);
    let heads = rng.pick(&[1usize, 2, 4]);
    let kv_heads = rng.pick(&[1usize, 2, 4].map(|k| k.min(heads)));
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
    let (config, _) = ouroc_models::OuroConfig::from_json_str(&json, "random config").expect("random config");
    let head = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_from_config(&config, head, &opts).expect("build random model");
    let mut weights = std::collections::HashMap::new();
    for op in g.walk() {
        if let ouroc_ir::OpKind::Weight { name } = &op.kind {
            let dims = g.ty(op.result()).fixed_dims().unwrap();
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
    (g, weights, vocab)
}
