//! The GPU path end to end on the PTX emulator: whole fixture models run by
//! `GpuForward<EmuDevice>` (the module of `ouroc_codegen::ptx`, its launch
//! records, the Program's buffer plan, the KV layout, loop and exit
//! control) against the golden outputs of the PyTorch reference and the
//! Program's reference executor (`ouroc_kernels::exec`).
//!
//! Tolerances (`gpu_common::tol`, the ones tests/golden.rs justifies): f32
//! 1e-4 relative to the largest golden value; bf16 2e-2. bf16 goldens are
//! compared in full (logits, every step's hidden states, lambdas, exit
//! steps) on the *unfused* Program (no pass run), whose rounding
//! points are the reference's. The optimised Program folds each RMSNorm
//! weight into the next linear (`scale_cols`: the weight product is
//! rounded into the bf16 matrix instead of into the normalised row, see
//! passes/src/egraph/rules.rs). That is not a rare flip but a systematic
//! half-ulp difference on every element of every folded matrix, which
//! through the 8 layer applications moves bf16 hidden states and logits by
//! 2-3% of their largest value on the fixtures (the CPU backend's Program
//! is the same): for it, bf16 logits are compared with the golden file at
//! [`FOLDED_BF16`] = 5e-2 (still far below the tens of percent of a
//! semantic error) with identical exit steps, and tightly against the
//! reference executor of the same Program.
//!
//! Prompts are short (the golden prompt, 12 tokens): a decode call costs
//! about half a second on the emulator at the test profile's opt-level.

mod gpu_common;

use gpu_common::*;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::DType;
use ouroc_kernels::Program;
use ouroc_models::Checkpoint;
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::gpu::{EmuDevice, GpuError, GpuForward, GpuOptions};
use ouroc_runtime::{Sampler, SamplingParams, generate};

/// bf16 logits of the optimised Program against the golden file (see the
/// module docs).
const FOLDED_BF16: f32 = 5e-2;

fn emu(p: Program, ckpt: &Checkpoint, opts: GpuOptions) -> GpuForward<EmuDevice> {
    GpuForward::emulated(p, ckpt, opts).expect("gpu forward on the emulator")
}

fn steps_of(ckpt: &Checkpoint) -> usize {
    ckpt.config.total_ut_steps
}

/// A policy whose exits differ between tokens (the fixtures' gates are
/// biased for it), or `last` for a one-step loop.
fn policy_for(ckpt: &Checkpoint) -> &'static str {
    if steps_of(ckpt) > 1 { "threshold:0.5" } else { "last" }
}

#[test]
fn every_fixture_prefill_matches_golden() {
    for name in FIXTURES {
        let ckpt = open(name);
        let golden = Golden::load(name);
        let prompt = golden.prompt();
        let pol = policy_for(&ckpt);
        let steps = steps_of(&ckpt);
        // The optimised Program in f32: everything within 1e-4.
        let mut m = emu(program(&ckpt, DType::F32, pol), &ckpt, GpuOptions::new(64));
        let t = trace_all(&mut m, &prompt, false);
        check_golden(&format!("{name} f32 {pol}"), &golden, "f32", pol, steps, &t);
        // bf16 at the reference's rounding points: everything within 2e-2.
        let mut m = emu(program_unfused(&ckpt, DType::BF16, pol), &ckpt, GpuOptions::new(64));
        let t = trace_all(&mut m, &prompt, false);
        check_golden(&format!("{name} bf16 unfused {pol}"), &golden, "bf16", pol, steps, &t);
        // The optimised bf16 Program: logits and exit steps against the
        // golden file, logits tightly against its reference executor.
        let p = program(&ckpt, DType::BF16, pol);
        let want = Executor::new(&p, &ckpt, ExecOptions::default())
            .unwrap()
            .run_tokens(std::slice::from_ref(&prompt))
            .unwrap();
        let mut m = emu(p.clone(), &ckpt, GpuOptions::new(64));
        let t = trace_all(&mut m, &prompt, false);
        let ctx = format!("{name} bf16 optimised {pol}");
        let e = rel_err(&t.logits, &golden.get(&format!("bf16/{pol}/logits")).f32);
        assert!(e <= FOLDED_BF16, "{ctx}: logits relative error {e} against golden");
        let steps_chosen: Vec<i32> = t.exit_steps.iter().map(|&s| s as i32).collect();
        assert_eq!(steps_chosen, golden.get(&format!("bf16/{pol}/exit_step")).i32, "{ctx}");
        // Against the executor only the kernels' f32 arithmetic differs
        // (fma and summation order, ex2.approx): an occasional one-ulp flip
        // of a bf16 rounding, so the bf16 bound of one flip propagated.
        let e = rel_err(&t.logits, &want.outputs[0].data);
        assert!(e <= 1e-2, "{ctx}: logits relative error {e} against the executor");
        assert_eq!(t.exit_steps, want.exit_steps, "{ctx}: exit steps against the executor");
    }
}

#[test]
fn every_exit_policy_matches_golden() {
    let ckpt = open("mha-r4");
    let golden = Golden::load("mha-r4");
    let prompt = golden.prompt();
    for pol in &golden.policies {
        let p = program(&ckpt, DType::F32, pol);
        let steps = loop_steps(&p);
        if let Some(k) = pol.strip_prefix("step:") {
            assert_eq!(
                steps,
                k.parse::<usize>().unwrap() + 1,
                "{pol}: the steps after K are peeled"
            );
        }
        let mut m = emu(p, &ckpt, GpuOptions::new(64));
        let t = trace_all(&mut m, &prompt, false);
        check_golden(&format!("mha-r4 f32 {pol}"), &golden, "f32", pol, steps, &t);
        // `last` and `step:K` never read the gate: the pipeline drops it.
        let gated = !(pol == "last" || pol.starts_with("step:"));
        assert_eq!(!t.lambdas.is_empty(), gated, "{pol}: lambdas reported iff computed");
    }
    // bf16 arithmetic exits early even at q = 1.0 (the reference's quirk).
    let pol = "threshold:1.0:bf16";
    let mut m = emu(program_unfused(&ckpt, DType::BF16, pol), &ckpt, GpuOptions::new(64));
    let t = trace_all(&mut m, &prompt, false);
    check_golden("mha-r4 bf16 unfused threshold:1.0:bf16", &golden, "bf16", pol, 4, &t);
    assert!(t.exit_steps.iter().any(|&s| s < 3), "exits early: {:?}", t.exit_steps);
}

/// The prompt's first 8 tokens in one call, then one token per call
/// through the KV cache (the decode attention entries): the same per
/// position results as the golden prefill.
#[test]
fn prefill_then_decode_matches_golden() {
    for (name, prec, pol) in [("mha-r4", "f32", "threshold:0.5"), ("gqa-hd", "bf16", "weighted")] {
        let ckpt = open(name);
        let golden = Golden::load(name);
        let prompt = golden.prompt();
        let p = match prec {
            "f32" => program(&ckpt, DType::F32, pol),
            _ => program_unfused(&ckpt, DType::BF16, pol),
        };
        let mut m = emu(p, &ckpt, GpuOptions::new(64));
        let (_, mut t) = m.run_traced(&prompt[..8]).unwrap();
        let rest = trace_all(&mut m, &prompt[8..], true);
        append(&mut t, rest);
        assert_eq!(m.past_len(), prompt.len());
        check_golden(&format!("{name} {prec} {pol} decode"), &golden, prec, pol, 4, &t);
    }
}

/// With early exit, a decode token stops at its exit step and the slots of
/// the skipped steps get that step's K/V rows: logits, exit steps and steps
/// run equal the reference executor's `exit_skips`, and some decode calls
/// really run fewer steps.
#[test]
fn early_exit_decode_skips_steps_like_the_reference() {
    for (prec, pol) in [("f32", "threshold:0.5"), ("bf16", "threshold:1.0:bf16")] {
        let ckpt = open("mha-r4");
        let mut ids = Golden::load("mha-r4").prompt();
        ids.extend([17, 5, 200, 31]);
        let p = program(&ckpt, dtype_of(prec), pol);
        let mut exec = Executor::new(
            &p,
            &ckpt,
            ExecOptions {
                round_low_precision: true,
                exit_skips: true,
                ..ExecOptions::default()
            },
        )
        .unwrap();
        let opts = GpuOptions {
            early_exit: true,
            ..GpuOptions::new(64)
        };
        let mut m = emu(p.clone(), &ckpt, opts);
        let mut skipped = 0;
        let calls: Vec<&[u32]> = std::iter::once(&ids[..8]).chain(ids[8..].chunks(1)).collect();
        for (i, call) in calls.into_iter().enumerate() {
            let want = exec.run_tokens(&[call.to_vec()]).unwrap();
            let (_, got) = m.run_traced(call).unwrap();
            let ctx = format!("{prec} {pol} call {i}");
            // f32: the kernels' f32 arithmetic differs from the executor's in
            // the last bits only; bf16: at most a rare one-ulp flip.
            let e = rel_err(&got.logits, &want.outputs[0].data);
            assert!(
                e <= if prec == "f32" { 1e-5 } else { 1e-2 },
                "{ctx}: relative error {e}"
            );
            assert_eq!(got.exit_steps, want.exit_steps, "{ctx}: exit steps");
            assert_eq!(got.steps_run, want.steps_run, "{ctx}: steps run");
            assert_eq!(
                got.step_outputs.len(),
                got.steps_run,
                "{ctx}: a hidden state per step run"
            );
            if call.len() == 1 && got.steps_run < 4 {
                skipped += 1;
                // The skipped steps' slots hold the exit step's rows of this position.
                let last = m.past_len() - 1;
                for layer in 0..2 {
                    let (k, v) = m.kv_rows(got.steps_run - 1, layer).unwrap().expect("slot");
                    let row = k.len() / m.past_len();
                    for s in got.steps_run..4 {
                        let (ks, vs) = m.kv_rows(s, layer).unwrap().expect("slot");
                        assert_eq!(ks[last * row..], k[last * row..], "{ctx}: K of step {s}, layer {layer}");
                        assert_eq!(vs[last * row..], v[last * row..], "{ctx}: V of step {s}, layer {layer}");
                    }
                }
            }
        }
        assert!(skipped > 0, "{prec} {pol}: no decode call exited early");
    }
}

/// Greedy generation through `generate` with the GPU forward gives the
/// reference's greedy tokens; the device-side argmax agrees with the
/// host's on every step.
#[test]
fn greedy_generation_matches_golden_tokens() {
    let ckpt = open("gqa-hd");
    let golden = Golden::load("gqa-hd");
    let prompt = golden.prompt();
    let want: Vec<u32> = golden.get("f32/last/greedy").i32.iter().map(|&x| x as u32).collect();
    let mut m = emu(program(&ckpt, DType::F32, "last"), &ckpt, GpuOptions::new(64));
    let mut sampler = Sampler::new(SamplingParams::default());
    let limits = GenLimits {
        max_new_tokens: 6,
        max_positions: 64,
    };
    let stats = generate(&mut m, &prompt, &mut sampler, &[], &limits, &mut |_| Ok(())).unwrap();
    assert_eq!(stats.tokens, want[..6], "greedy tokens");
    // Device argmax against the host's, after prefill and a decode step.
    let mut m = emu(program(&ckpt, DType::F32, "last"), &ckpt, GpuOptions::new(64));
    let mut step = m.forward(&prompt).unwrap();
    for _ in 0..2 {
        let host = gpu_argmax(&step.logits);
        assert_eq!(m.greedy_next().unwrap(), host);
        step = m.forward(&[host]).unwrap();
    }
}

fn gpu_argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A bf16 prefill of 24 tokens runs the Linear kernels' tensor-core GEMM
/// entries (mma.sync, ldmatrix, cp.async) and the tiled prefill attention
/// over more than one KV tile; the logits match the reference executor.
#[test]
fn tensor_core_gemm_prefill_matches_the_reference() {
    let ckpt = open("mha-r4");
    let p = program(&ckpt, DType::BF16, "last");
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 288).collect();
    let want = Executor::new(&p, &ckpt, ExecOptions::default())
        .unwrap()
        .run_tokens(std::slice::from_ref(&ids))
        .unwrap();
    let mut m = emu(p, &ckpt, GpuOptions::new(64));
    m.set_profiling(true);
    let (_, t) = m.run_traced(&ids).unwrap();
    let entries: Vec<String> = m.take_profile().into_iter().map(|r| r.entry).collect();
    assert!(
        entries.iter().any(|e| e.ends_with("_gemm")),
        "GEMM entries ran: {entries:?}"
    );
    assert!(entries.iter().any(|e| e.ends_with("_prefill")), "prefill attention ran");
    assert!(!entries.iter().any(|e| e.ends_with("_gemv")), "no GEMV at 40 tokens");
    // The mma sums exact products in one rounding, the executor in f32
    // order: a rare one-ulp flip of a bf16 rounding.
    let e = rel_err(&t.logits, &want.outputs[0].data);
    assert!(e <= 1e-2, "relative error {e}");
}

/// The KV stores start at 16 positions and double when a call needs more;
/// the rows stored before move with them.
#[test]
fn kv_cache_grows_and_keeps_its_rows() {
    let ckpt = open("gqa-hd");
    let p = program(&ckpt, DType::F32, "threshold:0.5");
    let ids: Vec<u32> = (0..20u32).map(|i| (i * 53 + 7) % 288).collect();
    let mut exec = Executor::new(&p, &ckpt, ExecOptions::default()).unwrap();
    let opts = GpuOptions {
        kv_positions: 16,
        ..GpuOptions::new(64)
    };
    let mut m = emu(p.clone(), &ckpt, opts);
    assert_eq!(m.kv_capacity(), 16);
    for call in [&ids[..14], &ids[14..15], &ids[15..16], &ids[16..17], &ids[17..]] {
        let want = exec.run_tokens(&[call.to_vec()]).unwrap();
        let (_, got) = m.run_traced(call).unwrap();
        let e = rel_err(&got.logits, &want.outputs[0].data);
        assert!(e <= 1e-5, "after {} positions: relative error {e}", m.past_len());
        assert_eq!(got.exit_steps, want.exit_steps);
    }
    assert_eq!(m.kv_capacity(), 32);
    assert_eq!(m.past_len(), 20);
}

#[test]
fn bad_calls_are_errors_not_panics() {
    let ckpt = open("mha-r4");
    let mut m = emu(program(&ckpt, DType::F32, "last"), &ckpt, GpuOptions::new(16));
    assert!(matches!(m.run(&[]), Err(GpuError::Input(_))));
    let e = m.run(&[288]).expect_err("out of the vocabulary").to_string();
    assert!(e.contains("vocabulary"), "{e}");
    let e = m.run(&[1; 17]).expect_err("beyond the context").to_string();
    assert!(e.contains("context"), "{e}");
    assert!(m.greedy_next().is_err(), "no call has run");
    // A Program the PTX backend cannot run (f16 activations) is refused.
    let mut p = program(&ckpt, DType::F32, "last");
    for k in p.before.iter_mut() {
        k.spec.act = DType::F16;
    }
    assert!(GpuForward::emulated(p, &ckpt, GpuOptions::new(16)).is_err());
}

/// The carried values are set by a parallel copy: a Program whose two
/// carried values swap each step (their nexts are each other's args, so
/// a sequential copy would lose one) runs through the staging buffer and
/// matches the reference executor.
#[test]
fn carried_values_are_a_parallel_copy() {
    let ckpt = open("mha-r4");
    let mut p = program(&ckpt, DType::F32, "threshold:0.5");
    let l = p.loop_.as_mut().expect("a loop");
    assert_eq!(l.carried.len(), 2, "the fixture Program carries two values");
    let (a0, a1) = (l.carried[0].arg, l.carried[1].arg);
    let w = l.carried[0].next.len;
    l.carried[0].next = ouroc_kernels::ActRef::whole(a1, w);
    l.carried[1].next = ouroc_kernels::ActRef::whole(a0, w);
    p.check().expect("still a valid Program");
    let ids = Golden::load("mha-r4").prompt();
    let want = Executor::new(&p, &ckpt, ExecOptions::default())
        .unwrap()
        .run_tokens(std::slice::from_ref(&ids))
        .unwrap();
    let mut m = emu(p, &ckpt, GpuOptions::new(64));
    let (_, t) = m.run_traced(&ids).unwrap();
    let e = rel_err(&t.logits, &want.outputs[0].data);
    assert!(e <= 1e-5, "relative error {e}");
    assert_eq!(t.exit_steps, want.exit_steps);
}

/// `kv last` and `kv mean` on the PTX emulator: token for token what the
/// CPU device decodes (greedy), with early exit, the same logits within f32
/// rounding, exit depths, loop steps run and KV bytes.
#[test]
fn kv_sharing_modes_on_the_emulator_match_the_cpu_device_token_for_token() {
    use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
    let ckpt = open("mha-r4");
    let prompt = Golden::load("mha-r4").prompt();
    let mut early = 0;
    for kv in [KvMode::Last, KvMode::Mean] {
        for policy in ["last", "threshold:0.5"] {
            let p = program(&ckpt, DType::F32, policy);
            let mut g = GpuOptions::new(64);
            (g.early_exit, g.kv) = (true, kv);
            let mut gpu = emu(p.clone(), &ckpt, g);
            let c = CpuOptions {
                early_exit: true,
                kv,
                threads: 1,
                ..CpuOptions::new(64)
            };
            let mut cpu = CpuForward::with_options(p, &ckpt, &c).unwrap();
            let (mut a, mut b) = (gpu.run(&prompt).unwrap(), cpu.run(&prompt).unwrap());
            for i in 0..8 {
                let ctx = format!("kv {kv} {policy} token {i}");
                assert!(rel_err(&a.logits, &b.logits) < 1e-4, "{ctx}: logits differ");
                assert_eq!((a.depth, a.steps_run), (b.depth, b.steps_run), "{ctx}: depth, steps");
                let next = gpu_argmax(&b.logits);
                assert_eq!(gpu_argmax(&a.logits), next, "{ctx}: the next token differs");
                early += (a.steps_run < 4) as usize;
                (a, b) = (gpu.run(&[next]).unwrap(), cpu.run(&[next]).unwrap());
            }
            assert_eq!(gpu.kv_bytes(), cpu.kv_bytes(), "kv {kv} {policy}: KV bytes");
        }
    }
    assert!(
        early > 0,
        "no decode token exited early: the shared modes' early exit is untested"
    );
}

/// Self-speculative decoding through the same driver on the emulator:
/// greedy tokens and exit depths are plain decoding's (early exit on, a
/// threshold policy, so drafts, verifications, rollbacks and exit fills all
/// run on the PTX kernels).
#[test]
fn speculation_on_the_emulator_is_plain_decoding() {
    use ouroc_runtime::generate::generate_with;
    use ouroc_runtime::speculate::{DraftTokens, SpecOptions};
    let ckpt = open("mha-r4");
    let pol = policy_for(&ckpt);
    let prompt = Golden::load("mha-r4").prompt();
    // A short context: generation runs into its end, where a verification
    // must not reserve KV rows beyond it.
    let limits = GenLimits {
        max_new_tokens: 16,
        max_positions: prompt.len() + 8,
    };
    let opts = GpuOptions {
        early_exit: true,
        ..GpuOptions::new(prompt.len() + 8)
    };
    let run = |spec: SpecOptions| {
        let mut m = emu(program(&ckpt, DType::F32, pol), &ckpt, opts);
        let mut sampler = Sampler::new(SamplingParams::default());
        generate_with(&mut m, &prompt, &mut sampler, &[], &limits, spec, &mut |_| Ok(())).unwrap()
    };
    let want = run(SpecOptions::OFF);
    let got = run(SpecOptions {
        tokens: DraftTokens::Fixed(3),
        depth: Some(2),
    });
    assert_eq!(want.stop, ouroc_runtime::StopReason::Context);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.depth_histogram, want.depth_histogram);
    let s = got.speculation.expect("speculation ran");
    assert!(s.rounds >= 2, "{s:?}");
}
