//! Shared test support: fixture paths, the golden files written by
//! tests/reference/gen_fixtures.py, and comparisons.
#![allow(dead_code)]

pub mod cli;

use ouroc_ir::{DType, ExitPolicy, Graph, Interpreter, Options};
use ouroc_models::{BuildOptions, Checkpoint};
use std::path::PathBuf;

pub const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A checkpoint directory: a fixture, or `demo` for the built-in demo model.
pub fn checkpoint_dir(name: &str) -> PathBuf {
    match name {
        "demo" => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo"),
        _ => fixture(name),
    }
}

pub fn open(name: &str) -> Checkpoint {
    Checkpoint::open(&checkpoint_dir(name)).unwrap_or_else(|e| panic!("checkpoint {name}: {e}"))
}

pub fn build(ckpt: &Checkpoint, dtype: DType, policy: ExitPolicy) -> Graph {
    ouroc_models::build_graph(
        ckpt,
        &BuildOptions {
            dtype,
            policy,
            loops: None,
            unrolled: false,
        },
    )
    .expect("build graph")
}

pub fn interp<'g>(g: &'g Graph, ckpt: &Checkpoint) -> Interpreter<'g> {
    let opts = Options {
        round_low_precision: true,
        max_positions: Some(ckpt.config.max_position_embeddings),
        exit_skips: false,
    };
    Interpreter::new(g, ckpt, opts).expect("load weights")
}

mod golden;
#[allow(unused_imports)] // not every test binary reads golden files
pub use golden::Golden;

/// Largest |a - b| divided by the largest |b| (a relative error robust to
/// elements near zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy generation through the interpreter's KV cache: prefill the
/// prompt, then feed each chosen token back one at a time.
pub fn greedy(g: &Graph, ckpt: &Checkpoint, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut it = interp(g, ckpt);
    let vocab = ckpt.config.vocab_size;
    let out = it.run_tokens(&[prompt.to_vec()]).expect("prefill");
    let logits = &out.outputs[0].data;
    let mut next = argmax(&logits[logits.len() - vocab..]);
    let mut tokens = vec![next];
    while tokens.len() < n {
        let out = it.run_tokens(&[vec![next]]).expect("decode");
        next = argmax(&out.outputs[0].data);
        tokens.push(next);
    }
    tokens
}

pub fn dtype_of(prec: &str) -> DType {
    match prec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        p => panic!("unknown precision {p}"),
    }
}
