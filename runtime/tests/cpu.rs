//! The CPU backend (`CpuForward`: a lowered Program run with JIT-compiled
//! kernels) against the interpreter (`InterpForward`) and the golden
//! greedy tokens, on the fixtures and exit policies.

mod common;

use common::{fixture, golden_i32};
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::CpuForward;
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::interp::InterpForward;
use ouroc_runtime::{Sampler, SamplingParams, generate};

const FIXTURES: [&str; 2] = ["mha-r4", "gqa-hd"];
const POLICIES: [&str; 3] = ["last", "threshold:0.5", "weighted"];

fn graph(ckpt: &Checkpoint, policy: &str) -> Graph {
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).unwrap()
}

fn cpu(g: &Graph, ckpt: &Checkpoint, early_exit: bool) -> CpuForward {
    let opt = ouroc_passes::default_pipeline().run(g, None).expect("pipeline").0;
    let prog = ouroc_kernels::lower(&opt).expect("lower");
    CpuForward::new(prog, ckpt, 64, early_exit).expect("cpu forward")
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit lengths differ");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Deterministic ids below `vocab`.
fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab as u64) as u32)
        .collect()
}

fn prefill_then_decode_matches_interp(early_exit: bool) {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for policy in POLICIES {
            let g = graph(&ckpt, policy);
            let mut interp = InterpForward::new(&g, &ckpt, 64, early_exit).unwrap();
            let mut cpu = cpu(&g, &ckpt, early_exit);
            assert_eq!(cpu.loop_steps(), interp.loop_steps());
            let ids = prompt(ckpt.config.vocab_size, 12);
            let calls: Vec<&[u32]> = std::iter::once(&ids[..8]).chain(ids[8..].chunks(1)).collect();
            for (i, call) in calls.into_iter().enumerate() {
                let a = cpu.forward(call).unwrap();
                let b = interp.forward(call).unwrap();
                let err = rel_err(&a.logits, &b.logits);
                assert!(err <= 1e-4, "{name} {policy} call {i}: relative error {err}");
                assert_eq!(a.depth, b.depth, "{name} {policy} call {i}: depth");
                assert_eq!(a.steps_run, b.steps_run, "{name} {policy} call {i}: steps run");
            }
        }
    }
}

#[test]
fn prefill_and_decode_match_the_interpreter() {
    prefill_then_decode_matches_interp(false);
}

#[test]
fn early_exit_decode_matches_the_interpreter() {
    prefill_then_decode_matches_interp(true);
}

#[test]
fn greedy_generation_matches_the_reference() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for policy in POLICIES {
            let g = graph(&ckpt, policy);
            let mut model = cpu(&g, &ckpt, false);
            let prompt = golden_i32(name, "prompt_ids");
            let mut sampler = Sampler::new(SamplingParams::default());
            let limits = GenLimits {
                max_new_tokens: 16,
                max_positions: 64,
            };
            let stats = generate(&mut model, &prompt, &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap();
            assert_eq!(
                stats.tokens,
                golden_i32(name, &format!("f32/{policy}/greedy")),
                "{name} {policy}"
            );
        }
    }
}

/// Under threshold:0.5 with early exit, decode runs fewer loop steps (and
/// launches fewer kernels) than without.
#[test]
fn early_exit_skips_steps_and_launches() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let g = graph(&ckpt, "threshold:0.5");
    let run = |early: bool| {
        let mut model = cpu(&g, &ckpt, early);
        let prompt = golden_i32("mha-r4", "prompt_ids");
        let mut sampler = Sampler::new(SamplingParams::default());
        let limits = GenLimits {
            max_new_tokens: 24,
            max_positions: 64,
        };
        let stats = generate(&mut model, &prompt, &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap();
        (stats, model.launches)
    };
    let (full, full_launches) = run(false);
    let (skip, skip_launches) = run(true);
    assert_eq!(full.decode_loop_steps, 4 * full.decode_steps);
    assert!(
        skip.decode_loop_steps < 4 * skip.decode_steps,
        "{}",
        skip.decode_loop_steps
    );
    assert!(skip_launches < full_launches, "{skip_launches} vs {full_launches}");
}

#[test]
fn out_of_vocabulary_and_context_are_refused() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let g = graph(&ckpt, "last");
    let mut model = cpu(&g, &ckpt, false);
    let err = model.forward(&[ckpt.config.vocab_size as u32]).err().unwrap();
    assert!(err.contains("vocabulary"), "{err}");
    let err = model.forward(&[1; 65]).err().unwrap();
    assert!(err.contains("context"), "{err}");
    assert!(model.forward(&[]).is_err());
}
