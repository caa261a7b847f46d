//! Generation through the interpreter backend on the fixtures: greedy
//! output equals the PyTorch reference's greedy tokens, and early exit
//! really skips loop steps.

mod common;

use common::{fixture, golden_i32};
use ouroc_ir::{DType, ExitPolicy};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::interp::InterpForward;
use ouroc_runtime::{Sampler, SamplingParams, Tokenizer, generate};
use std::path::PathBuf;

fn greedy_run(name: &str, policy: &str, early_exit: bool, n: usize) -> (Vec<u32>, ouroc_runtime::GenStats) {
    let ckpt = Checkpoint::open(&fixture(name)).unwrap();
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
    let mut model = InterpForward::new(&g, &ckpt, 64, early_exit).unwrap();
    let prompt = golden_i32(name, "prompt_ids");
    let mut sampler = Sampler::new(SamplingParams::default());
    let limits = GenLimits {
        max_new_tokens: n,
        max_positions: 64,
    };
    let stats = generate(&mut model, &prompt, &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap();
    (stats.tokens.clone(), stats)
}

#[test]
fn greedy_generation_matches_the_reference() {
    for name in ["mha-r4", "gqa-hd", "tied"] {
        for policy in ["last", "threshold:0.5", "weighted"] {
            let (tokens, _) = greedy_run(name, policy, false, 16);
            assert_eq!(
                tokens,
                golden_i32(name, &format!("f32/{policy}/greedy")),
                "{name} {policy}"
            );
        }
    }
}

/// Under step:K a token exits at K and skips the later steps; no step <= K
/// ever reads a later step's KV slot, so skipping changes nothing.
#[test]
fn early_exit_at_a_fixed_step_skips_later_steps_without_changing_tokens() {
    let (tokens, stats) = greedy_run("mha-r4", "step:1", true, 16);
    assert_eq!(tokens, golden_i32("mha-r4", "f32/step:1/greedy"));
    assert_eq!(
        stats.decode_loop_steps,
        2 * stats.decode_steps,
        "each decode token runs steps 0 and 1 only"
    );
    assert_eq!(stats.depth_histogram, vec![0, 16, 0, 0]);
}

#[test]
fn threshold_policy_runs_fewer_loop_steps_in_decode() {
    let (_, skip) = greedy_run("mha-r4", "threshold:0.5", true, 24);
    let (_, full) = greedy_run("mha-r4", "threshold:0.5", false, 24);
    assert_eq!(full.decode_loop_steps, 4 * full.decode_steps);
    assert!(
        skip.decode_loop_steps < 4 * skip.decode_steps,
        "threshold:0.5 ran {} of {} steps",
        skip.decode_loop_steps,
        4 * skip.decode_steps
    );
    // Under `last` nothing can exit early.
    let (_, last) = greedy_run("mha-r4", "last", true, 8);
    assert_eq!(last.decode_loop_steps, 4 * last.decode_steps);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let ckpt = Checkpoint::open(&fixture("r1")).unwrap();
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::Last,
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
    let mut model = InterpForward::new(&g, &ckpt, 8, true).unwrap();
    assert_eq!(model.loop_steps(), 1);
    let limits = GenLimits {
        max_new_tokens: 4,
        max_positions: 8,
    };
    let mut sampler = Sampler::new(SamplingParams::default());
    let err = generate(&mut model, &[5; 8], &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap_err();
    assert!(err.contains("8 tokens") && err.contains("8 positions"), "{err}");
    let err = generate(&mut model, &[], &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap_err();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn tokenizer_round_trips_the_golden_prompt() {
    let tok = Tokenizer::load(&fixture("mha-r4")).unwrap();
    let ids = golden_i32("mha-r4", "prompt_ids");
    let text = tok.decode(&ids).unwrap();
    assert_eq!(text, "The hidden model is ready.");
    assert_eq!(tok.encode(&text).unwrap(), ids);
    assert_eq!(tok.eos_ids, vec![0, 2]);
    assert_eq!(tok.im_end, Some(2));
}

/// The built-in demo model was trained with the Ouro objective: under
/// threshold:0.5 its tokens exit at different depths, on average well
/// before the last step, and the skipped steps do not run.
#[test]
fn demo_model_exits_early_at_varying_depths() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse("threshold:0.5").unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
    let mut model = InterpForward::new(&g, &ckpt, ckpt.config.max_position_embeddings, true).unwrap();
    let prompt = tok.encode("def parse(self, text):\n").unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    let limits = GenLimits {
        max_new_tokens: 32,
        max_positions: ckpt.config.max_position_embeddings,
    };
    let stats = generate(&mut model, &prompt, &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap();
    let depths_used = stats.depth_histogram.iter().filter(|&&n| n > 0).count();
    assert!(depths_used >= 2, "exit depths vary: {:?}", stats.depth_histogram);
    assert!(stats.mean_depth() < 3.5, "mean depth {} of 4", stats.mean_depth());
    assert!(
        stats.decode_loop_steps < 4 * stats.decode_steps,
        "{} of {}",
        stats.decode_loop_steps,
        4 * stats.decode_steps
    );
    let text = tok.decode(&stats.tokens).unwrap();
    assert!(!text.trim().is_empty());
}
