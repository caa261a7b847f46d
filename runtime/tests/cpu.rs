//! The CPU backend (`CpuForward`: a lowered Program run with JIT-compiled
//! kernels) against the interpreter (`InterpForward`) and the golden
//! greedy tokens, on the fixtures and exit policies; threads (bit-identical
//! results for any count) and the KV sharing modes (`last` and `mean`
//! against `full` with its caches rewritten the way each mode defines).

mod common;

use common::{fixture, golden_i32};
use ouroc_driver::codec;
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_kernels::spec::{Family, GatherSpec, LinearSpec};
use ouroc_kernels::{ActRef, ActValue, Arena, Kernel, KernelSpec, Operand, Program, Recipe, WeightEntry};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::interp::InterpForward;
use ouroc_runtime::{Sampler, SamplingParams, generate};

const FIXTURES: [&str; 2] = ["mha-r4", "gqa-hd"];
const POLICIES: [&str; 3] = ["last", "threshold:0.5", "weighted"];

fn graph(ckpt: &Checkpoint, policy: &str) -> Graph {
    graph_in(ckpt, policy, DType::F32)
}

fn graph_in(ckpt: &Checkpoint, policy: &str, dtype: DType) -> Graph {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).unwrap()
}

fn program(g: &Graph) -> Program {
    ouroc_compile::compile_graph(g.clone(), false).expect("compile").program
}

fn cpu(g: &Graph, ckpt: &Checkpoint, early_exit: bool) -> CpuForward {
    CpuForward::new(program(g), ckpt, 64, early_exit).expect("cpu forward")
}

fn cpu_with(p: &Program, ckpt: &Checkpoint, early_exit: bool, threads: usize, kv: KvMode) -> CpuForward {
    cpu_linear(p, ckpt, early_exit, threads, kv, true)
}

/// As `cpu_with`; `microkernels`: Linear on the std::arch microkernels
/// (where this CPU has them) or always on the Cranelift kernels.
fn cpu_linear(
    p: &Program,
    ckpt: &Checkpoint,
    early_exit: bool,
    threads: usize,
    kv: KvMode,
    microkernels: bool,
) -> CpuForward {
    let opts = CpuOptions {
        early_exit,
        threads,
        kv,
        microkernels,
        ..CpuOptions::new(64)
    };
    CpuForward::with_options(p.clone(), ckpt, &opts).expect("cpu forward")
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

/// The loop body's attention layers of a program.
fn loop_layers(p: &Program) -> Vec<usize> {
    p.loop_
        .iter()
        .flat_map(|l| &l.body)
        .filter_map(|k| match &k.spec.family {
            Family::Attention(a) => Some(a.layer),
            _ => None,
        })
        .collect()
}

/// Logits as bits (bit-identical comparisons), exit depth, steps run.
type Outcome = (Vec<u32>, usize, usize);

fn outcome(s: &ouroc_runtime::Step) -> Outcome {
    (s.logits.iter().map(|x| x.to_bits()).collect(), s.depth, s.steps_run)
}

/// A prefill of `prefill` tokens then single-token decode calls.
fn calls(vocab: usize, prefill: usize, decode: usize) -> Vec<Vec<u32>> {
    let ids = prompt(vocab, prefill + decode);
    std::iter::once(ids[..prefill].to_vec())
        .chain(ids[prefill..].iter().map(|&t| vec![t]))
        .collect()
}

/// Past 128 positions a decode token's attention is split over the
/// threads by query heads: decode after a 140-token prompt gives the same
/// logits, bit for bit, on one thread and on two, in f32 and bf16.
#[test]
fn long_context_decode_is_bit_identical_across_threads() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let p = program(&graph_in(&ckpt, "last", dtype));
            let ids = prompt(ckpt.config.vocab_size, 144);
            let runs: Vec<Vec<Outcome>> = [1, 2]
                .iter()
                .map(|&threads| {
                    let opts = CpuOptions {
                        threads,
                        ..CpuOptions::new(160)
                    };
                    let mut m = CpuForward::with_options(p.clone(), &ckpt, &opts).expect("cpu forward");
                    let mut outs = vec![outcome(&m.run(&ids[..140]).unwrap())];
                    outs.extend(ids[140..].iter().map(|&t| outcome(&m.run(&[t]).unwrap())));
                    outs
                })
                .collect();
            assert!(runs[0] == runs[1], "{name} {dtype}: two threads differ from one");
        }
    }
}

/// A prompt whose logits are read only at its last position runs the
/// kernels after the loop (final norm, lm_head) on that row alone, with
/// the same last-position logits, bit for bit, as a call that computes and
/// reads every position; decode and traced calls run them on every row.
#[test]
fn prompt_runs_the_head_on_its_last_row_only() {
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for policy in POLICIES {
                let p = program(&graph_in(&ckpt, policy, dtype));
                let after = p.after.len();
                for (threads, micro) in [(1, true), (2, true), (2, false)] {
                    let what = format!("{name} {dtype} {policy} threads {threads} microkernels {micro}");
                    let ids = prompt(ckpt.config.vocab_size, 23);
                    let mut m = cpu_linear(&p, &ckpt, false, threads, KvMode::Full, micro);
                    let (full, trace) = m.run_traced(&ids).unwrap();
                    assert_eq!(m.row_launches(), 0, "{what}: a traced call reads every row");
                    let vocab = ckpt.config.vocab_size;
                    assert_eq!(trace.logits.len(), ids.len() * vocab, "{what}");
                    m.reset();
                    let last = m.run(&ids).unwrap();
                    assert_eq!(
                        m.row_launches(),
                        after,
                        "{what}: one row launch per kernel after the loop"
                    );
                    assert_eq!(outcome(&last), outcome(&full), "{what}: last-position logits");
                    let next = m.run(&[ids[0]]).unwrap();
                    assert_eq!(m.row_launches(), after, "{what}: a decode call has one row");
                    assert!(next.logits.iter().all(|x| x.is_finite()), "{what}");
                }
            }
        }
    }
}

/// Threads 1, 2 and 3 give bit-identical logits, exit depths and steps (and
/// the same kernel count) in f32 and bf16, for every KV mode, with Linear on
/// the microkernels and on the Cranelift kernels; with more than one thread,
/// Cranelift Linear kernels really are split, and so are the other
/// per-token kernels of the 27-token prompt (by tokens: 14 + 13 on two
/// threads, 9 + 9 + 9 on three), never those of a decode token.
#[test]
fn threads_give_bit_identical_results() {
    for (name, micro) in FIXTURES.iter().flat_map(|n| [(n, false), (n, true)]) {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for (policy, kv) in [
                ("last", KvMode::Full),
                ("weighted", KvMode::Full),
                ("threshold:0.5", KvMode::Full),
                ("threshold:0.5", KvMode::Last),
                ("threshold:0.5", KvMode::Mean),
            ] {
                let p = program(&graph_in(&ckpt, policy, dtype));
                let mut runs = Vec::new();
                for threads in [1, 2, 3] {
                    let mut m = cpu_linear(&p, &ckpt, true, threads, kv, micro);
                    assert_eq!(m.threads(), threads);
                    if !micro {
                        assert_eq!(m.split_kernels() > 0, threads > 1, "{name} {dtype} threads {threads}");
                    }
                    // Every Linear goes to a microkernel where this CPU has one.
                    let has = ouroc_runtime::gemm::microkernel(dtype, dtype);
                    assert_eq!(m.microkernel_kernels() > 0, micro && has, "{name} {dtype} microkernels");
                    let outs: Vec<Outcome> = calls(ckpt.config.vocab_size, 27, 6)
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let before = m.token_split_launches();
                            let out = outcome(&m.forward(c).unwrap());
                            let split = m.token_split_launches() > before;
                            assert_eq!(
                                split,
                                i == 0 && threads > 1,
                                "{name} {dtype} threads {threads} call {i}"
                            );
                            out
                        })
                        .collect();
                    runs.push((outs, m.launches, m.kv_bytes()));
                }
                for (i, r) in runs.iter().enumerate().skip(1) {
                    assert!(
                        r == &runs[0],
                        "{name} {dtype} {policy} kv {kv} microkernels {micro}: {} threads differ from 1",
                        i + 1
                    );
                }
            }
        }
    }
}

/// Zero threads means every core.
#[test]
fn default_threads_are_all_cores() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let m = cpu(&graph(&ckpt, "last"), &ckpt, false);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(m.threads(), cores);
}

/// A program of one embedding lookup and one in-place Linear (the result
/// buffer is the input's): split over threads it must still read every
/// input row whole, as the single-threaded kernel does.
#[test]
fn split_in_place_linear_reads_its_input_whole() {
    let (vocab, k) = (40usize, 24usize);
    let value = |id, dtype, width, offset| ActValue {
        id,
        dtype,
        width,
        offset,
    };
    let p = Program {
        name: "in_place".into(),
        inputs: vec![0, 1],
        outputs: vec![ActRef::whole(2, k)],
        weights: vec![
            WeightEntry {
                id: 10,
                dtype: DType::F32,
                shape: vec![vocab, k],
                recipe: Recipe::Checkpoint { tensor: "table".into() },
                resident: true,
            },
            WeightEntry {
                id: 11,
                dtype: DType::F32,
                shape: vec![k, k],
                recipe: Recipe::Checkpoint { tensor: "w".into() },
                resident: true,
            },
        ],
        arena: Arena {
            bytes_per_token: 128,
            align: 8,
            values: vec![
                value(0, DType::I32, 1, 0),
                value(1, DType::I32, 1, 8),
                value(2, DType::F32, k, 16),
            ],
        },
        kv: vec![],
        before: vec![
            Kernel {
                spec: KernelSpec {
                    name: "embed".into(),
                    act: DType::F32,
                    family: Family::Gather(GatherSpec {
                        rows: vocab,
                        width: k,
                        table: DType::F32,
                    }),
                },
                inputs: vec![Operand::Weight(10), Operand::Act(ActRef::whole(0, 1))],
                outputs: vec![2],
            },
            Kernel {
                spec: KernelSpec {
                    name: "proj".into(),
                    act: DType::F32,
                    family: Family::Linear(LinearSpec {
                        n: k,
                        k,
                        weight: DType::F32,
                        bias: false,
                        quant: None,
                    }),
                },
                inputs: vec![Operand::Act(ActRef::whole(2, k)), Operand::Weight(11)],
                outputs: vec![2],
            },
        ],
        loop_: None,
        after: vec![],
    };
    p.check().unwrap();
    let val = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 8.0;
    let table: Vec<f32> = (0..vocab * k).map(val).collect();
    let w: Vec<f32> = (0..k * k).map(|i| val(i + 5) / 4.0).collect();
    let weights: std::collections::HashMap<String, Vec<f32>> =
        [("table".to_string(), table.clone()), ("w".to_string(), w.clone())].into();
    let ids: Vec<u32> = (0..32).map(|i| (i * 7 % vocab) as u32).collect();
    let mut outs = Vec::new();
    for (threads, microkernels) in [(1, false), (2, false), (3, false), (3, true)] {
        let opts = CpuOptions {
            threads,
            microkernels,
            ..CpuOptions::new(64)
        };
        let mut m = CpuForward::with_options(p.clone(), &weights, &opts).unwrap();
        if !microkernels {
            assert_eq!(m.split_kernels(), (threads > 1) as usize);
        }
        // The prompt as one call: every row computed in place.
        let out = m.forward(&ids).unwrap().logits;
        let x = &table[*ids.last().unwrap() as usize * k..][..k];
        let want: Vec<f32> = (0..k)
            .map(|o| x.iter().zip(&w[o * k..(o + 1) * k]).map(|(a, b)| a * b).sum())
            .collect();
        assert!(rel_err(&out, &want) < 1e-5, "threads {threads}: {out:?} vs {want:?}");
        outs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // The microkernel sums in another order: equal within rounding (checked above).
    assert_eq!(outs.len(), 4);
}

/// `kv last`: decode equals a `full` decode in which, before every token,
/// the caches of steps 0..R-2 are replaced by step R-1's; the shared cache
/// then equals full's step R-1 cache (the last step that ran, the exit step
/// for an early exit, which `full` copies forward).
#[test]
fn kv_last_equals_full_with_every_step_reading_the_last_steps_cache() {
    let mut early = 0;
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for policy in ["last", "threshold:0.5"] {
                let p = program(&graph_in(&ckpt, policy, dtype));
                let layers = loop_layers(&p);
                let r = p.loop_.as_ref().unwrap().steps;
                let mut full = cpu_with(&p, &ckpt, true, 1, KvMode::Full);
                let mut last = cpu_with(&p, &ckpt, true, 1, KvMode::Last);
                for (i, call) in calls(ckpt.config.vocab_size, 8, 8).iter().enumerate() {
                    if i > 0 {
                        for &layer in &layers {
                            let (k, v) = full
                                .kv_rows(r - 1, layer)
                                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                                .unwrap();
                            for s in 0..r - 1 {
                                full.set_kv_rows(s, layer, &k, &v).unwrap();
                            }
                        }
                    }
                    let a = outcome(&full.forward(call).unwrap());
                    let b = outcome(&last.forward(call).unwrap());
                    assert!(a == b, "{name} {dtype} {policy} call {i}: last differs from full");
                    early += (a.2 < r) as usize;
                    if i > 0 {
                        for &layer in &layers {
                            let want = full.kv_rows(r - 1, layer).unwrap();
                            for s in 0..r {
                                assert!(last.kv_rows(s, layer).unwrap() == want, "{name} call {i} layer {layer}");
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        early > 0,
        "no decode token exited early: early exit under kv last is untested"
    );
}

/// `kv mean`: decode equals a `full` decode in which, before every token,
/// every step's cache is replaced by the mean cache: for the prompt's
/// positions the mean over the R steps' K/V, for each decoded position the
/// mean over the steps that token ran (f32 sum in step order, divided by
/// the count, rounded to the activation dtype); the shared cache equals it.
#[test]
fn kv_mean_equals_full_with_every_step_reading_the_mean_cache() {
    let mut early = 0;
    for name in FIXTURES {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            for policy in ["last", "threshold:0.5"] {
                let p = program(&graph_in(&ckpt, policy, dtype));
                let layers = loop_layers(&p);
                let r = p.loop_.as_ref().unwrap().steps;
                let mut full = cpu_with(&p, &ckpt, true, 1, KvMode::Full);
                let mut mean = cpu_with(&p, &ckpt, true, 1, KvMode::Mean);
                // Per layer, the mean cache's K and V values.
                let mut shared: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
                // The mean over `steps` steps of rows `from..` of full's caches.
                let mean_rows = |full: &mut CpuForward, layer: usize, steps: usize, from: usize| {
                    let mut out = (Vec::new(), Vec::new());
                    for (h, dst) in [&mut out.0, &mut out.1].into_iter().enumerate() {
                        let caches: Vec<Vec<f32>> = (0..steps)
                            .map(|s| {
                                let (k, v) = full.kv_rows(s, layer).unwrap();
                                codec::decode(if h == 0 { &k } else { &v }, dtype)
                            })
                            .collect();
                        for j in from..caches[0].len() {
                            let mut sum = 0.0f32;
                            for c in &caches {
                                sum += c[j];
                            }
                            dst.push(dtype.round(sum / steps as f32));
                        }
                    }
                    out
                };
                for (i, call) in calls(ckpt.config.vocab_size, 8, 8).iter().enumerate() {
                    if i == 1 {
                        shared = layers.iter().map(|&l| mean_rows(&mut full, l, r, 0)).collect();
                    }
                    if i > 0 {
                        for (li, &layer) in layers.iter().enumerate() {
                            let (k, v) = (codec::encode(&shared[li].0, dtype), codec::encode(&shared[li].1, dtype));
                            for s in 0..r {
                                full.set_kv_rows(s, layer, &k, &v).unwrap();
                            }
                        }
                    }
                    let a = outcome(&full.forward(call).unwrap());
                    let b = outcome(&mean.forward(call).unwrap());
                    assert!(a == b, "{name} {dtype} {policy} call {i}: mean differs from full");
                    early += (a.2 < r) as usize;
                    if i > 0 {
                        let row = full.past_len() - 1;
                        for (li, &layer) in layers.iter().enumerate() {
                            let e = shared[li].0.len() / row;
                            let (k, v) = mean_rows(&mut full, layer, a.2, row * e);
                            shared[li].0.extend(k);
                            shared[li].1.extend(v);
                            let want = (codec::encode(&shared[li].0, dtype), codec::encode(&shared[li].1, dtype));
                            for s in 0..r {
                                let (gk, gv) = mean.kv_rows(s, layer).unwrap();
                                assert!(
                                    gk == want.0 && gv == want.1,
                                    "{name} {dtype} {policy} call {i} layer {layer}: the mean cache differs"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        early > 0,
        "no decode token exited early: early exit under kv mean is untested"
    );
}

/// KV bytes: every mode holds R caches after prefill; at the first decode
/// call `last` and `mean` collapse them to one per layer, and decode grows
/// them by one K and one V row per layer and token, 1/R of `full`'s growth.
/// `reset` returns to one cache per (step, layer) for the next prefill.
#[test]
fn kv_bytes_of_last_and_mean_are_one_rth_of_full_in_decode() {
    let ckpt = Checkpoint::open(&fixture("gqa-hd")).unwrap();
    let c = &ckpt.config;
    let p = program(&graph(&ckpt, "threshold:0.5"));
    let r = p.loop_.as_ref().unwrap().steps;
    let row = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4;
    let mut growth = Vec::new();
    for kv in KvMode::ALL {
        let mut m = cpu_with(&p, &ckpt, true, 2, kv);
        assert_eq!(m.kv_mode(), kv);
        let cs = calls(c.vocab_size, 8, 5);
        let first = m.forward(&cs[0]).unwrap().logits;
        assert_eq!(m.kv_bytes(), r * 8 * row, "{kv} after prefill");
        let mut sizes = vec![m.kv_bytes()];
        for call in &cs[1..] {
            m.forward(call).unwrap();
            sizes.push(m.kv_bytes());
        }
        let per_token = if kv == KvMode::Full { r * row } else { row };
        for (d, &s) in sizes.iter().enumerate().skip(1) {
            let base = if kv == KvMode::Full { r * 8 * row } else { 8 * row };
            assert_eq!(s, base + d * per_token, "{kv} after {d} decode tokens");
        }
        assert!(m.kv_reserved_bytes() >= m.kv_bytes());
        growth.push(sizes[5] - sizes[1]);
        m.reset();
        assert_eq!(m.kv_bytes(), 0);
        let again = m.forward(&cs[0]).unwrap().logits;
        assert_eq!(again, first, "{kv}: prefill after reset");
        assert_eq!(m.kv_bytes(), r * 8 * row, "{kv}: R caches again after reset");
    }
    assert_eq!(growth[0], r * growth[1]);
    assert_eq!(growth[0], r * growth[2]);
}

/// Under every KV mode (and with the Linear kernels split over threads) a
/// decode token runs exactly before + steps_run x body + after kernels: the
/// steps after its exit launch nothing. Some tokens do exit early.
#[test]
fn skipped_steps_launch_no_kernels_under_every_kv_mode() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let p = program(&graph(&ckpt, "threshold:0.5"));
    let l = p.loop_.as_ref().unwrap();
    let (outside, body) = (p.before.len() + p.after.len(), l.body.len());
    for kv in KvMode::ALL {
        for threads in [1, 2] {
            let mut m = cpu_with(&p, &ckpt, true, threads, kv);
            let mut early = 0;
            for (i, call) in calls(ckpt.config.vocab_size, 8, 12).iter().enumerate() {
                let before = m.launches;
                let s = m.forward(call).unwrap();
                assert_eq!(
                    m.launches - before,
                    outside + s.steps_run * body,
                    "{kv} threads {threads} call {i}"
                );
                if i == 0 {
                    assert_eq!(s.steps_run, l.steps);
                }
                early += (s.steps_run < l.steps) as usize;
            }
            assert!(early > 0, "{kv}: no token exited early");
        }
    }
}

#[test]
fn kv_modes_parse_and_print() {
    for m in KvMode::ALL {
        assert_eq!(KvMode::parse(&m.to_string()).unwrap(), m);
        assert_eq!(m.to_string().parse::<KvMode>().unwrap(), m);
    }
    assert_eq!(KvMode::default(), KvMode::Full);
    let err = KvMode::parse("first").unwrap_err();
    assert!(err.contains("`first`") && err.contains("full, last, mean"), "{err}");
}
