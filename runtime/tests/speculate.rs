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
/// Every policy kind, and `step:K` for every K of the fixtures' 4 steps
/// (policy-dce cuts the loop after step K; `step:0` leaves one step, where
/// speculation is refused).
const POLICIES: [&str; 7] = [
    "last",
    "step:0",
    "step:1",
    "step:2",
    "step:3",
    "threshold:0.5",
    "weighted",
];

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
                    if plain.loop_steps() < 2 {
                        // Nothing to draft from: a count is refused, auto steps aside.
                        let mut m = cpu(&g, &ckpt, early_exit, KvMode::Full);
                        let mut sampler = Sampler::new(SamplingParams::default());
                        let limits = GenLimits {
                            max_new_tokens: 4,
                            max_positions: 64,
                        };
                        let s = spec(DraftTokens::Fixed(2), 1);
                        let err = generate_with(&mut m, &p, &mut sampler, &[], &limits, s, &mut |_| Ok(()));
                        assert!(
                            err.unwrap_err().contains("no loop of two or more steps"),
                            "{name} {policy}"
                        );
                        let auto = SpecOptions {
                            tokens: DraftTokens::Auto,
                            depth: None,
                        };
                        let mut m = cpu(&g, &ckpt, early_exit, KvMode::Full);
                        let got = generate(&mut m, &p, 40, SamplingParams::default(), auto);
                        assert_eq!(got.tokens, want.tokens);
                        assert!(got.speculation.is_none());
                        continue;
                    }
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
                            if std::env::var_os("SPEC_DEBUG").is_some() {
                                eprintln!("{what}: {}", s.summary(m.loop_steps()).trim());
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(rounds > 100, "speculation ran only {rounds} rounds");
}

/// Total variation distance between two distributions over the same ids.
fn tv(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
}

/// Speculative sampling draws from the model's distribution, not the
/// draft's: the second generated token (the first one a round decides)
/// over many seeds follows the exact marginal `sum_x1 p(x1) p(x2 | x1)`,
/// computed from the plain model, within sampling noise. The draft (3 of 4
/// steps) is close enough to the model for rejections and acceptances
/// both to be common and its own marginal several tolerances away:
/// accepting drafts unchecked fails (TV 0.2), and so does drawing a
/// rejected position's token from p instead of the residual (TV 0.13,
/// against about 0.02 for the right rule).
#[test]
fn speculative_sampling_keeps_the_models_distribution() {
    sampling_matches_the_exact_marginal("last");
}

/// As above under a threshold policy with early exit, where drafts stop
/// at tokens whose exit is decided inside them (their value then stays the
/// candidate of the position before).
#[test]
fn speculative_sampling_keeps_the_distribution_under_early_exit() {
    sampling_matches_the_exact_marginal("threshold:0.5");
}

fn sampling_matches_the_exact_marginal(policy: &str) {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let vocab = ckpt.config.vocab_size;
    let g = graph(&ckpt, policy, DType::F32);
    let mut m = cpu(&g, &ckpt, true, KvMode::Full);
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_k: 4,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed,
    };
    let p = prompt(vocab, 6);
    let depth = 3;
    // Exact marginals of x2 under the model (P) and under the draft (Q).
    let s = Sampler::new(params(0));
    m.reset();
    let l0 = m.forward(&p).unwrap().logits;
    let p1 = s.probs(&l0, &p);
    let (mut exact, mut draft) = (vec![0.0f64; vocab], vec![0.0f64; vocab]);
    for (x1, &px1) in p1.iter().enumerate() {
        if px1 == 0.0 {
            continue;
        }
        let ctx: Vec<u32> = p.iter().copied().chain([x1 as u32]).collect();
        m.reset();
        m.forward(&p).unwrap();
        let full = m.forward(&[x1 as u32]).unwrap().logits;
        m.reset();
        m.forward(&p).unwrap();
        let d = m.speculative().unwrap().draft(x1 as u32, depth, false).unwrap().logits;
        for (x2, (a, b)) in s.probs(&full, &ctx).iter().zip(s.probs(&d, &ctx)).enumerate() {
            exact[x2] += (px1 * a) as f64;
            draft[x2] += (px1 * b) as f64;
        }
    }
    let tol = 0.06;
    assert!(
        tv(&exact, &draft) > 2.5 * tol,
        "the draft is too close to the model for the test to tell them apart: TV {}",
        tv(&exact, &draft)
    );
    let n = 2000;
    let mut counts = [vec![0.0f64; vocab], vec![0.0f64; vocab]];
    let mut rounds = 0;
    for seed in 0..n {
        for (c, on) in counts.iter_mut().zip([false, true]) {
            m.reset();
            let opts = if on {
                spec(DraftTokens::Fixed(2), depth)
            } else {
                SpecOptions::OFF
            };
            let st = generate(&mut m, &p, 3, params(seed), opts);
            c[st.tokens[1] as usize] += 1.0 / n as f64;
            rounds += st.speculation.map_or(0, |s| s.rounds);
        }
    }
    assert!(
        rounds > n as usize / 4,
        "only {rounds} of {n} speculative runs decided x2 in a round"
    );
    let (plain, specd) = (tv(&counts[0], &exact), tv(&counts[1], &exact));
    assert!(
        plain < tol,
        "{policy}: plain sampling: TV {plain} from the exact marginal"
    );
    assert!(
        specd < tol,
        "{policy}: speculative sampling: TV {specd} from the exact marginal"
    );
}

#[test]
fn bad_speculation_settings_are_refused_by_name() {
    use ouroc_runtime::speculate::SpecOptions as S;
    let e = |t: Option<&str>, d| S::from_flags(t, d, DraftTokens::Auto, true).unwrap_err();
    assert!(e(Some("1"), None).contains("--draft-tokens"));
    assert!(e(Some("9"), None).contains("--draft-tokens"));
    assert!(e(Some("lots"), None).contains("--draft-tokens"));
    assert!(e(None, Some(0)).contains("--draft-steps"));
    // auto speculates only when greedy; a count is kept either way.
    assert_eq!(
        S::from_flags(None, None, DraftTokens::Auto, false).unwrap().tokens,
        DraftTokens::Off
    );
    assert_eq!(
        S::from_flags(Some("3"), None, DraftTokens::Auto, false).unwrap().tokens,
        DraftTokens::Fixed(3)
    );
    // A depth beyond the loop, a shared KV cache, the interpreter: refused
    // when asked for, auto steps aside.
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let g = graph(&ckpt, "last", DType::F32);
    let limits = GenLimits {
        max_new_tokens: 4,
        max_positions: 64,
    };
    let p = prompt(ckpt.config.vocab_size, 4);
    let try_gen = |m: &mut dyn Forward, s: SpecOptions| {
        let mut sampler = Sampler::new(SamplingParams::default());
        generate_with(m, &p, &mut sampler, &[], &limits, s, &mut |_| Ok(()))
    };
    let mut m = cpu(&g, &ckpt, true, KvMode::Full);
    let err = try_gen(&mut m, spec(DraftTokens::Fixed(2), 4)).unwrap_err();
    assert!(err.contains("--draft-steps") && err.contains("4 loop steps"), "{err}");
    let mut m = cpu(&g, &ckpt, true, KvMode::Last);
    let err = try_gen(&mut m, spec(DraftTokens::Fixed(2), 2)).unwrap_err();
    assert!(err.contains("--kv full"), "{err}");
    let auto = try_gen(
        &mut m,
        SpecOptions {
            tokens: DraftTokens::Auto,
            depth: None,
        },
    )
    .unwrap();
    assert!(auto.speculation.is_none());
    // A verification of states that do not fit (a draft that exited, a
    // wrong depth) is an error, not a panic.
    let mut m = cpu(&g, &ckpt, true, KvMode::Full);
    m.forward(&p).unwrap();
    let sp = m.speculative().unwrap();
    let d = sp.draft(p[0], 2, false).unwrap();
    let mut exited = d.state.clone();
    exited.carried.clear();
    let err = sp.verify(&[p[0]], &[exited]).unwrap_err().to_string();
    assert!(err.contains("states of drafts"), "{err}");
    let err = sp
        .verify(&[p[0], p[1]], std::slice::from_ref(&d.state))
        .unwrap_err()
        .to_string();
    assert!(err.contains("states of drafts"), "{err}");
    assert!(sp.draft(p[0], 0, false).is_err());
    let mut interp = ouroc_runtime::interp::InterpForward::new(&g, &ckpt, 64, true).unwrap();
    let err = try_gen(&mut interp, spec(DraftTokens::Fixed(2), 2)).unwrap_err();
    assert!(err.contains("interpreter"), "{err}");
}

/// Up to the last position of the context: the same tokens and stop.
#[test]
fn speculation_runs_to_the_end_of_the_context() {
    let ckpt = Checkpoint::open(&fixture("gqa-hd")).unwrap();
    let g = graph(&ckpt, "threshold:0.5", DType::BF16);
    let p = prompt(ckpt.config.vocab_size, 5);
    let run = |s: SpecOptions| {
        let mut m = cpu(&g, &ckpt, true, KvMode::Full);
        generate(&mut m, &p, 200, SamplingParams::default(), s)
    };
    let want = run(SpecOptions::OFF);
    assert_eq!(want.stop, ouroc_runtime::StopReason::Context);
    for k in [2, 8] {
        let got = run(spec(DraftTokens::Fixed(k), 2));
        assert_eq!(got.tokens, want.tokens, "k={k}");
        assert_eq!(got.stop, want.stop);
    }
}

/// The demo model (trained, so drafts are mostly accepted): greedy tokens
/// and exit depths equal plain decoding's in f32 and bf16 under every
/// exit policy, with early exit.
#[test]
fn greedy_speculation_on_the_demo_model_is_plain_decoding() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let p = prompt(ckpt.config.vocab_size, 8);
    let mut accepted = 0;
    for dtype in [DType::F32, DType::BF16] {
        for policy in POLICIES {
            let g = graph(&ckpt, policy, dtype);
            let mut plain = cpu(&g, &ckpt, true, KvMode::Full);
            let want = generate(&mut plain, &p, 24, SamplingParams::default(), SpecOptions::OFF);
            if plain.loop_steps() < 2 {
                // step:0 (one step): refused, tested on the fixtures.
                continue;
            }
            let depth = (plain.loop_steps() / 2).max(1);
            let mut m = cpu(&g, &ckpt, true, KvMode::Full);
            let got = generate(
                &mut m,
                &p,
                24,
                SamplingParams::default(),
                spec(DraftTokens::Fixed(4), depth),
            );
            assert_eq!(got.tokens, want.tokens, "demo {dtype} {policy}");
            assert_eq!(got.depth_histogram, want.depth_histogram, "demo {dtype} {policy}");
            accepted += got.speculation.expect("speculation ran").accepted;
        }
    }
    assert!(accepted > 0);
}
