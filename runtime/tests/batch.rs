//! Continuous, cross-depth batching (`ouroc_driver::Sequence`, `Driver::tick`)
//! on the compiled CPU engine: several sequences of different lengths, each
//! token at its own loop step, give every sequence the logits, exit depths and
//! greedy tokens it gets alone (`CpuForward::run`), for every exit policy, KV
//! mode, precision, with early exit on and off, whichever sequences share a
//! tick; a per-token policy override matches a Program compiled with it.

mod common;

use common::fixture;
use ouroc_driver::{Driver, Sequence};
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::Program;
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuDevice, CpuForward, CpuOptions, KvMode};
use ouroc_runtime::sampling::argmax;

fn program(ckpt: &Checkpoint, dtype: DType, policy: &str) -> Program {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(ckpt, &opts).unwrap();
    ouroc_compile::compile_graph(g, false).unwrap().program
}

fn prompt(vocab: usize, n: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 777 + salt * 97) % vocab as u64) as u32)
        .collect()
}

fn options(kv: KvMode, early_exit: bool) -> CpuOptions {
    CpuOptions {
        threads: 2,
        kv,
        early_exit,
        ..CpuOptions::new(64)
    }
}

/// (logits, depth) per generated token, greedy, the sequence alone.
type Run = Vec<(Vec<f32>, usize)>;

fn alone(p: Program, ckpt: &Checkpoint, opts: &CpuOptions, prompt: &[u32], new: usize) -> Run {
    let mut m = CpuForward::with_options(p, ckpt, opts).unwrap();
    let mut s = m.run(prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..new {
        let next = argmax(&s.logits) as u32;
        s = m.run(&[next]).unwrap();
        out.push((s.logits.clone(), s.depth));
    }
    out
}

/// The same prompts batched: sequence i joins at tick `join[i]` (its prompt
/// prefilled then), every sequence generates `new` greedy tokens; under
/// `cross_depth` a sequence starts its next token as soon as its last one
/// exited, else only when no token is in the loop.
fn batched(
    d: &mut Driver<CpuDevice>,
    prompts: &[Vec<u32>],
    join: &[usize],
    new: usize,
    cross_depth: bool,
    policy: Option<ExitPolicy>,
) -> Vec<Run> {
    let mut seqs: Vec<Option<Sequence>> = prompts.iter().map(|_| None).collect();
    let mut next: Vec<u32> = vec![0; prompts.len()];
    let mut runs: Vec<Run> = vec![Vec::new(); prompts.len()];
    let mut tick = 0;
    let mut max_rows = 0;
    while runs.iter().any(|r| r.len() < new) {
        for i in 0..prompts.len() {
            if seqs[i].is_none() && join[i] == tick {
                let mut s = d.open_sequence().unwrap();
                let st = d.prefill_sequence(&mut s, &prompts[i], policy).unwrap();
                next[i] = argmax(&st.logits) as u32;
                seqs[i] = Some(s);
            }
        }
        let idle = seqs.iter().flatten().all(|s| !s.in_flight());
        for i in 0..prompts.len() {
            if let Some(s) = seqs[i].as_mut()
                && !s.in_flight()
                && runs[i].len() < new
                && (cross_depth || idle)
            {
                d.start_token(s, next[i], policy).unwrap();
            }
        }
        let order: Vec<usize> = (0..prompts.len())
            .filter(|&i| seqs[i].as_ref().is_some_and(|s| s.in_flight()))
            .collect();
        if !order.is_empty() {
            max_rows = max_rows.max(order.len());
            let mut refs: Vec<&mut Sequence> = seqs.iter_mut().flatten().filter(|s| s.in_flight()).collect();
            let exited = d.tick(&mut refs).unwrap();
            for (&i, e) in order.iter().zip(exited) {
                if let Some(e) = e {
                    next[i] = argmax(&e.logits) as u32;
                    runs[i].push((e.logits, e.depth));
                }
            }
        }
        tick += 1;
        assert!(tick < 1000, "no progress");
    }
    assert!(max_rows > 1, "the sequences never shared a tick");
    for s in seqs.into_iter().flatten() {
        d.close_sequence(s).unwrap();
    }
    runs
}

fn same(name: &str, got: &Run, want: &Run) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (t, ((gl, gd), (wl, wd))) in got.iter().zip(want).enumerate() {
        assert_eq!(gd, wd, "{name}: exit depth of token {t}");
        assert_eq!(argmax(gl), argmax(wl), "{name}: greedy token {t}");
        let diff = gl.iter().zip(wl).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff == 0.0, "{name}: token {t}'s logits differ by {diff}");
    }
}

#[test]
fn batched_sequences_get_the_logits_they_get_alone() {
    let mut checked = 0;
    for (name, dtype, policy, kv, early) in [
        ("mha-r4", DType::F32, "threshold:0.5", KvMode::Full, true),
        ("mha-r4", DType::BF16, "threshold:0.5:bf16", KvMode::Full, true),
        ("mha-r4", DType::F32, "threshold:0.5", KvMode::Full, false),
        ("gqa-hd", DType::F32, "weighted", KvMode::Full, true),
        ("gqa-hd", DType::F32, "step:1", KvMode::Last, true),
        ("tied", DType::BF16, "threshold:0.6:bf16", KvMode::Mean, true),
        ("tied", DType::F32, "last", KvMode::Full, true),
        ("mha-r4", DType::F32, "step:0", KvMode::Full, true),
        ("mha-r4", DType::F32, "step:2", KvMode::Full, true),
        ("mha-r4", DType::BF16, "step:3", KvMode::Full, true),
        ("gqa-hd", DType::F32, "step:2", KvMode::Full, false),
    ] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let vocab = ckpt.config.vocab_size;
        let prompts: Vec<Vec<u32>> = [5, 9, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(vocab, n, i as u64))
            .collect();
        let opts = options(kv, early);
        let p = program(&ckpt, dtype, policy);
        let want: Vec<Run> = prompts.iter().map(|pr| alone(p.clone(), &ckpt, &opts, pr, 6)).collect();
        let mut d = CpuForward::with_options(p, &ckpt, &opts).unwrap().into_driver();
        for cross in [true, false] {
            let got = batched(&mut d, &prompts, &[0, 0, 2], 6, cross, None);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                same(
                    &format!("{name} {policy} kv {kv} early {early} cross {cross} seq {i}"),
                    g,
                    w,
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
}

#[test]
fn a_tokens_policy_override_matches_a_program_compiled_with_it() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let vocab = ckpt.config.vocab_size;
    let prompts: Vec<Vec<u32>> = [4, 7]
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(vocab, n, i as u64 + 5))
        .collect();
    let opts = options(KvMode::Full, true);
    let mut d = CpuForward::with_options(program(&ckpt, DType::F32, "threshold:0.5"), &ckpt, &opts)
        .unwrap()
        .into_driver();
    for policy in ["step:1", "threshold:0.3", "last"] {
        let pol = ExitPolicy::parse(policy).unwrap();
        let got = batched(&mut d, &prompts, &[0, 1], 5, true, Some(pol));
        for (i, pr) in prompts.iter().enumerate() {
            let want = alone(program(&ckpt, DType::F32, policy), &ckpt, &opts, pr, 5);
            assert_eq!(got[i].len(), want.len());
            for (t, ((gl, gd), (wl, wd))) in got[i].iter().zip(&want).enumerate() {
                assert_eq!(gd, wd, "{policy} seq {i} token {t}");
                assert_eq!(argmax(gl), argmax(wl), "{policy} seq {i} token {t}");
                let scale = wl.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let diff = gl.iter().zip(wl).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-5 * scale, "{policy} seq {i} token {t}: {diff}");
            }
        }
    }
}

#[test]
fn ticks_refuse_what_they_cannot_run() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let opts = options(KvMode::Full, true);
    let p = program(&ckpt, DType::F32, "last");
    let mut d = CpuForward::with_options(p, &ckpt, &opts).unwrap().into_driver();
    let mut s = d.open_sequence().unwrap();
    let e = d.start_token(&mut s, 1, None).unwrap_err().to_string();
    assert!(e.contains("starts with a prompt"), "{e}");
    d.prefill_sequence(&mut s, &[1, 2, 3], None).unwrap();
    let e = d.start_token(&mut s, 1_000_000, None).unwrap_err().to_string();
    assert!(e.contains("out of the vocabulary"), "{e}");
    // `last` compiles the gate away: a threshold cannot be read.
    let e = d
        .start_token(&mut s, 1, Some(ExitPolicy::parse("threshold:0.5").unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exit gate"), "{e}");
    let e = d.tick(&mut [&mut s]).unwrap_err().to_string();
    assert!(e.contains("needs a token in the loop"), "{e}");
    d.start_token(&mut s, 1, None).unwrap();
    let e = d.start_token(&mut s, 2, None).unwrap_err().to_string();
    assert!(e.contains("already has a token"), "{e}");
    let e = d.prefill_sequence(&mut s, &[4, 5], None).unwrap_err().to_string();
    assert!(e.contains("cannot take a prompt"), "{e}");
    d.close_sequence(s).unwrap();
    // A full context.
    let mut s = d.open_sequence().unwrap();
    d.prefill_sequence(&mut s, &[3; 64], None).unwrap();
    let e = d.start_token(&mut s, 1, None).unwrap_err().to_string();
    assert!(e.contains("exceed the context of 64"), "{e}");
}
