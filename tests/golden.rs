//! The interpreter against the PyTorch reference's golden outputs, for every
//! fixture, both precisions and every exit policy.
//!
//! Tolerances. f32: relative error (max |diff| / max |golden|) at most 1e-4
//! for logits, hidden states and gate values; exit steps and greedy tokens
//! identical. bf16: the interpreter rounds at exactly the reference's
//! rounding points, so results are normally bit-identical; what can differ
//! is a rare tie-breaking flip where an f32 intermediate computed by a
//! different libm (cos, exp: 1 ulp) lands on the other side of a bf16
//! rounding boundary. Such a flip moves a value by one bf16 ulp (2^-8
//! relative) and a few such flips propagated through the 8 layer
//! applications stay well under 2% of the largest logit, while any semantic
//! error (a wrong rounding point, a misplaced norm) moves logits by tens of
//! percent. So bf16: relative error at most 2e-2 and exit steps identical.
//! Where those flips come from: torch sums dot products in its own
//! (vectorised) order, the interpreter left to right, so the f32 results
//! differ in the last bits and a bf16 rounding occasionally goes the other
//! way (the gqa-hd fixture, head_dim 16, shows it; the others are
//! bit-identical). Greedy tokens are therefore compared exactly up to the
//! they must be identical, except that a bf16 divergence may begin at a
//! step where the reference's own top-2 margin is under two bf16 ulps of
//! the logits (there the reference's choice is decided below bf16
//! resolution, in some fixtures by an exact tie); f32 greedy tokens must be
//! identical in full.

mod common;

use common::*;
use ouroc_ir::ExitPolicy;

fn tol(prec: &str) -> f32 {
    if prec == "f32" { 1e-4 } else { 2e-2 }
}

fn check_fixture(name: &str) {
    let ckpt = open(name);
    let golden = Golden::load(name);
    let prompt = golden.prompt();
    assert!(prompt.len() >= 12, "golden prompt has at least 12 tokens");
    let (steps, t, h, v) = (
        ckpt.config.total_ut_steps,
        prompt.len(),
        ckpt.config.hidden_size,
        ckpt.config.vocab_size,
    );
    let mut compared = vec![];
    let mut compared_logits = 0;
    for prec in ["f32", "bf16"] {
        let dtype = dtype_of(prec);
        for pol in &golden.policies {
            let policy = ExitPolicy::parse(pol).unwrap();
            let g = build(&ckpt, dtype, policy);
            let out = interp(&g, &ckpt)
                .run_tokens(std::slice::from_ref(&prompt))
                .expect("run");
            let trace = out.trace.expect("trace");
            let ctx = format!("{name} {prec} {pol}");

            let logits = &out.outputs[0];
            assert_eq!(logits.shape, vec![1, t, v], "{ctx}");
            if let Some(want) = golden.try_get(&format!("{prec}/{pol}/logits")) {
                let e = rel_err(&logits.data, &want.f32);
                assert!(e <= tol(prec), "{ctx}: logits relative error {e}");
                compared_logits += 1;
            }

            let steps_chosen: Vec<i32> = trace.exit_step.iter().map(|&s| s as i32).collect();
            assert_eq!(
                steps_chosen,
                golden.get(&format!("{prec}/{pol}/exit_step")).i32,
                "{ctx}: exit steps"
            );

            let hidden: Vec<f32> = trace.step_outputs.iter().flat_map(|s| s.data.clone()).collect();
            let gh = golden.get(&format!("{prec}/hidden_states"));
            assert_eq!(gh.shape, vec![steps, t, h]);
            let e = rel_err(&hidden, &gh.f32);
            assert!(e <= tol(prec), "{ctx}: hidden states relative error {e}");

            let lambda: Vec<f32> = trace.exit_signals.iter().flat_map(|s| s.data.clone()).collect();
            let e = rel_err(&lambda, &golden.get(&format!("{prec}/exit_lambda")).f32);
            assert!(e <= tol(prec), "{ctx}: exit lambda relative error {e}");

            let want: Vec<u32> = golden
                .get(&format!("{prec}/{pol}/greedy"))
                .i32
                .iter()
                .map(|&x| x as u32)
                .collect();
            let margins = &golden.get(&format!("{prec}/{pol}/greedy_margin")).f32;
            let got = greedy(&g, &ckpt, &prompt, want.len());
            // Identical, except that a divergence may begin at a near-tie of the reference.
            let decided = match got.iter().zip(&want).position(|(a, b)| a != b) {
                None => want.len(),
                Some(i) => {
                    let scale = logits.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let near_tie = prec == "bf16" && margins[i] < 2.0 * bf16_ulp(scale);
                    assert!(
                        near_tie,
                        "{ctx}: greedy tokens differ at step {i} (reference margin {}):\n ours {got:?}\n want {want:?}",
                        margins[i]
                    );
                    i
                }
            };
            compared.push(decided);
        }
    }
    // Most greedy comparisons are decided in full; a fixture whose every
    // bf16 run is a near-tie would test nothing.
    assert!(
        compared_logits >= 4,
        "{name}: logits compared for only {compared_logits} runs"
    );
    let full = compared.iter().filter(|&&n| n == 16).count();
    assert!(
        full * 2 > compared.len(),
        "{name}: only {full} of {} greedy runs compared in full: {compared:?}",
        compared.len()
    );
}

/// Distance between adjacent bf16 values near `x`.
fn bf16_ulp(x: f32) -> f32 {
    2f32.powi(x.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - 7)
}

#[test]
fn mha_r4_matches_reference() {
    check_fixture("mha-r4");
}

#[test]
fn gqa_with_explicit_head_dim_matches_reference() {
    check_fixture("gqa-hd");
}

#[test]
fn tied_embeddings_match_reference() {
    check_fixture("tied");
}

#[test]
fn single_step_loop_matches_reference() {
    check_fixture("r1");
}

#[test]
fn sharded_checkpoint_matches_reference() {
    check_fixture("sharded");
}

#[test]
fn f16_storage_matches_reference() {
    check_fixture("f16");
}

/// The built-in demo model (models/demo) against its golden file.
#[test]
fn demo_model_matches_reference() {
    check_fixture("demo");
}

#[test]
fn golden_policies_cover_every_exit_kind() {
    let golden = Golden::load("mha-r4");
    for want in [
        "last",
        "step:0",
        "step:3",
        "threshold:0.5",
        "threshold:0.5:bf16",
        "threshold:1.0:bf16",
        "weighted",
    ] {
        assert!(golden.policies.iter().any(|p| p == want), "golden lacks policy {want}");
    }
}

/// The fixtures' gates are biased so tokens exit at different steps, and the
/// bf16 arithmetic really exits early at threshold 1.0 where f32 does not.
#[test]
fn fixtures_exercise_early_exit() {
    let golden = Golden::load("mha-r4");
    let t05 = &golden.get("f32/threshold:0.5/exit_step").i32;
    assert!(
        t05.iter().any(|&s| s != t05[0]),
        "tokens exit at different steps: {t05:?}"
    );
    let bf = &golden.get("bf16/threshold:1.0:bf16/exit_step").i32;
    assert!(
        bf.iter().any(|&s| s < 3),
        "bf16 arithmetic exits early at q = 1.0: {bf:?}"
    );
    let f = &golden.get("f32/threshold:1.0:bf16/exit_step").i32;
    assert!(f.len() == 12);
}

/// Feeding the prompt one token at a time through the KV cache gives the
/// same logits, states and exit steps as one prefill.
#[test]
fn decode_through_cache_equals_prefill() {
    for name in ["mha-r4", "gqa-hd"] {
        let ckpt = open(name);
        let prompt = Golden::load(name).prompt();
        for dtype in [ouroc_ir::DType::F32, ouroc_ir::DType::BF16] {
            let g = build(&ckpt, dtype, ExitPolicy::parse("threshold:0.5").unwrap());
            let pre = interp(&g, &ckpt).run_tokens(std::slice::from_ref(&prompt)).unwrap();
            let mut it = interp(&g, &ckpt);
            let (mut logits, mut steps) = (vec![], vec![]);
            for &tok in &prompt {
                let o = it.run_tokens(&[vec![tok]]).unwrap();
                logits.extend(o.outputs[0].data.clone());
                steps.extend(o.trace.unwrap().exit_step);
            }
            assert_eq!(it.past_len(), prompt.len());
            let e = rel_err(&logits, &pre.outputs[0].data);
            assert!(e <= 1e-5, "{name} {dtype}: decode vs prefill relative error {e}");
            assert_eq!(steps, pre.trace.unwrap().exit_step, "{name} {dtype}");
        }
    }
}

/// A batch of two different sequences gives each sequence's own results.
#[test]
fn batch_rows_are_independent() {
    let ckpt = open("gqa-hd");
    let prompt = Golden::load("gqa-hd").prompt();
    let other: Vec<u32> = prompt.iter().rev().copied().collect();
    let g = build(&ckpt, ouroc_ir::DType::F32, ExitPolicy::Last);
    let both = interp(&g, &ckpt).run_tokens(&[prompt.clone(), other.clone()]).unwrap();
    let one = interp(&g, &ckpt).run_tokens(std::slice::from_ref(&prompt)).unwrap();
    let two = interp(&g, &ckpt).run_tokens(&[other]).unwrap();
    let n = one.outputs[0].numel();
    assert_eq!(both.outputs[0].shape[0], 2);
    assert!(rel_err(&both.outputs[0].data[..n], &one.outputs[0].data) <= 1e-6);
    assert!(rel_err(&both.outputs[0].data[n..], &two.outputs[0].data) <= 1e-6);
}
