//! `ouroc bench`: prefill and decode speed of the compiled CPU path.
//!
//! Per precision: build, optimise, lower and JIT-compile once, then `runs`
//! times: forget the KV cache, prefill `prefill_tokens` random ids, decode
//! `decode_tokens` tokens greedily. Reports medians, the weight bytes a
//! decode token reads (from the Program) and what that is as a share of
//! the read bandwidth measured here, in this process, just before.

use super::{build, open};
use crate::cli::{BenchArgs, ModelFlags, Precision};
use anyhow::{Result, bail};
use ouroc_models::StorageDtype;
use ouroc_runtime::cpu::CpuForward;
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::speculate::{DraftTokens, SpecOptions};
use ouroc_runtime::{Sampler, SamplingParams, generate_with};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// One precision's medians.
struct Measured {
    precision: Precision,
    /// The precision, with `+q8` / `+q4` for quantised weights.
    label: String,
    prefill_tps: f64,
    decode_tps: f64,
    /// Mean loop steps a decode token ran.
    decode_steps: f64,
    decode_bytes_per_token: f64,
    setup_s: f64,
    /// Speculation's acceptance rate and tokens per round (medians).
    spec: Option<(f64, f64)>,
    mechanism: Option<Mechanism>,
}

/// The mechanism of speculation's win, measured: one verification of k
/// drafted tokens against k single-token verifications of the same steps.
struct Mechanism {
    k: usize,
    depth: usize,
    steps: usize,
    /// Seconds (medians): a plain decode pass, one token's draft, the
    /// verification of k tokens, k single-token verifications together.
    plain: f64,
    draft: f64,
    verify: f64,
    verify_singles: f64,
}

impl Mechanism {
    /// Decode speed-up over plain decoding at acceptance rate `a`: expected
    /// tokens per round over the round's time, in plain passes.
    fn speedup(&self, a: f64) -> f64 {
        let tokens: f64 = (0..self.k).map(|i| a.powi(i as i32)).sum();
        tokens * self.plain / (self.k as f64 * self.draft + self.verify)
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 || args.prefill_tokens == 0 {
        bail!("--runs and --prefill-tokens must be at least 1");
    }
    // The pass choice, checked before anything slow.
    let model_flags = |precision| ModelFlags {
        exit: Some(args.exit.clone()),
        precision,
        loops: args.loops,
        unrolled: false,
        pipeline: args.pipeline.clone(),
        weights: args.weights,
    };
    model_flags(Precision::F32)
        .pipeline(false)
        .map_err(anyhow::Error::msg)?;
    let dir = match (&args.ckpt, &args.shape) {
        (Some(d), _) => d.clone(),
        (None, Some(shape)) => random_checkpoint(shape, args.weights_dir.clone())?,
        (None, None) => bail!("give a checkpoint directory or --shape NAME"),
    };
    let ckpt = open(&dir)?;
    let cfg = &ckpt.config;
    let positions = args.prefill_tokens.saturating_add(args.decode_tokens);
    if positions > cfg.max_position_embeddings {
        bail!(
            "{positions} positions (--prefill-tokens + --decode-tokens) exceed the context of {}",
            cfg.max_position_embeddings
        );
    }
    let opts = args.cpu.options(positions, true).map_err(anyhow::Error::msg)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    eprintln!("ouroc bench: {} ({} parameters)", dir.display(), ckpt.parameter_count());
    eprintln!(
        "measuring the read bandwidth ({threads} thread{})...",
        if threads == 1 { "" } else { "s" }
    );
    let spec = args.spec.options(DraftTokens::Off, true).map_err(anyhow::Error::msg)?;
    if let DraftTokens::Fixed(k) = spec.tokens
        && args.decode_tokens < k
    {
        bail!("--draft-tokens {k} measures {k} drafted positions after the prefill: give --decode-tokens {k} or more");
    }
    let bandwidth = if args.streams.is_empty() {
        read_bandwidth(threads)
    } else {
        f64::NAN
    };
    let ids = random_ids(args.prefill_tokens, cfg.vocab_size);
    let mut results = Vec::new();
    for &precision in &args.precision {
        let flags = model_flags(precision);
        let passes = flags.pipeline(false).map_err(anyhow::Error::msg)?;
        let t0 = Instant::now();
        let name = match args.weights {
            crate::cli::Weights::Dense => format!("{precision:?}").to_lowercase(),
            w => format!("{precision:?}+{w:?}").to_lowercase(),
        };
        eprintln!("[{name}] compiling...");
        let graph = build(&ckpt, &flags)?;
        super::check_memory("ouroc bench", &ckpt, &graph, precision, positions)?;
        let program = super::lower(graph, &passes, &flags)?;
        if !args.streams.is_empty() {
            super::bench_streams::run(args, dir.clone(), program, opts, &name)?;
            continue;
        }
        let (outside, per_step) = program.weight_bytes_read();
        eprintln!("[{name}] loading weights and JIT-compiling kernels...");
        let mut model = super::prepare::cpu_forward(program, &ckpt, &opts, &args.cpu.cache)?;
        let setup_s = t0.elapsed().as_secs_f64();
        let (mut prefill, mut decode, mut steps) = (vec![], vec![], vec![]);
        let (mut accept, mut per_round) = (vec![], vec![]);
        for run in 0..args.runs {
            model.reset();
            if spec.tokens != DraftTokens::Off {
                let limits = GenLimits {
                    max_new_tokens: args.decode_tokens,
                    max_positions: positions,
                };
                let mut sampler = Sampler::new(SamplingParams::default());
                let st = generate_with(&mut model, &ids, &mut sampler, &[], &limits, spec, &mut |_| Ok(()))
                    .map_err(anyhow::Error::msg)?;
                prefill.push(st.prefill_tokens_per_s());
                decode.push(st.decode_tokens_per_s());
                steps.push(st.decode_loop_steps as f64 / st.decode_steps.max(1) as f64);
                if let Some(sp) = &st.speculation {
                    accept.push(sp.acceptance());
                    per_round.push(sp.tokens_per_round());
                    eprint!(
                        "[{name}] run {}/{}: {}",
                        run + 1,
                        args.runs,
                        sp.summary(model.loop_steps())
                    );
                }
                eprintln!(
                    "[{name}] run {}/{}: prefill {:.2} tokens/s, decode {:.2} tokens/s",
                    run + 1,
                    args.runs,
                    prefill[run],
                    decode[run]
                );
                continue;
            }
            let t = Instant::now();
            let mut step = model.run(&ids).map_err(anyhow::Error::msg)?;
            prefill.push(ids.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut ran = 0;
            for _ in 0..args.decode_tokens {
                step = model.run(&[argmax(&step.logits)]).map_err(anyhow::Error::msg)?;
                ran += step.steps_run;
            }
            if args.decode_tokens > 0 {
                decode.push(args.decode_tokens as f64 / t.elapsed().as_secs_f64());
                steps.push(ran as f64 / args.decode_tokens as f64);
            }
            eprintln!(
                "[{name}] run {}/{}: prefill {:.2} tokens/s, decode {:.2} tokens/s",
                run + 1,
                args.runs,
                prefill[run],
                decode.last().copied().unwrap_or(0.0)
            );
        }
        let decode_steps = median(&mut steps);
        let mechanism = match spec.tokens {
            DraftTokens::Fixed(k) => Some(mechanism(&mut model, &ids, k, spec, args.runs)?),
            _ => None,
        };
        results.push(Measured {
            spec: (!accept.is_empty()).then(|| (median(&mut accept), median(&mut per_round))),
            mechanism,
            precision,
            label: name.clone(),
            prefill_tps: median(&mut prefill),
            decode_tps: median(&mut decode),
            decode_steps,
            decode_bytes_per_token: outside as f64 + decode_steps * per_step as f64,
            setup_s,
        });
    }
    if !args.streams.is_empty() {
        return Ok(());
    }
    outln!(
        "{} layers x {} loop steps, exit {}, KV cache {}, Linear on {}, {} prefill + {} decode tokens, median of {} runs, \
         {threads} thread(s)",
        cfg.num_hidden_layers,
        args.loops.unwrap_or(cfg.total_ut_steps),
        args.exit,
        opts.kv,
        if opts.microkernels {
            format!("microkernels ({})", ouroc_runtime::gemm::available())
        } else {
            "Cranelift kernels".to_string()
        },
        args.prefill_tokens,
        args.decode_tokens,
        args.runs
    );
    outln!("read bandwidth measured here: {bandwidth:.1} GB/s");
    outln!(
        "{:<9} {:>10} {:>10} {:>11} {:>13} {:>12} {:>10} {:>8}",
        "precision",
        "prefill/s",
        "decode/s",
        "steps/tok",
        "GB read/tok",
        "decode GB/s",
        "% of read",
        "setup s"
    );
    for m in &results {
        let gbs = m.decode_bytes_per_token * m.decode_tps / 1e9;
        outln!(
            "{:<9} {:>10.2} {:>10.2} {:>11.2} {:>13.3} {:>12.1} {:>9.0}% {:>8.1}",
            m.label.clone(),
            m.prefill_tps,
            m.decode_tps,
            m.decode_steps,
            m.decode_bytes_per_token / 1e9,
            gbs,
            100.0 * gbs / bandwidth,
            m.setup_s
        );
    }
    for m in &results {
        if let Some((a, t)) = m.spec {
            outln!(
                "{}: speculation (--draft-tokens {}): acceptance {:.0}%, {:.2} tokens per round",
                m.label.clone(),
                spec.tokens,
                100.0 * a,
                t
            );
        }
        if let Some(x) = &m.mechanism {
            outln!(
                "{}: verifying {} drafted tokens (steps {}..{} of {}) in one pass: {:.2} ms; {} single-token passes: {:.2} ms \
                 ({:.2}x); a draft of {} steps {:.2} ms, a plain decode pass {:.2} ms",
                m.label.clone(),
                x.k,
                x.depth + 1,
                x.steps,
                x.steps,
                1e3 * x.verify,
                x.k,
                1e3 * x.verify_singles,
                x.verify_singles / x.verify,
                x.depth,
                1e3 * x.draft,
                1e3 * x.plain
            );
            outln!(
                "  decode speed-up over plain at acceptance 60%: {:.2}x, 80%: {:.2}x, 95%: {:.2}x",
                x.speedup(0.6),
                x.speedup(0.8),
                x.speedup(0.95)
            );
        }
    }
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|m| {
                json!({
                    "precision": format!("{:?}", m.precision).to_lowercase(),
                    "weights": args.weights.scheme().name(),
                    "prefill_tokens_per_s": m.prefill_tps,
                    "decode_tokens_per_s": m.decode_tps,
                    "decode_loop_steps_per_token": m.decode_steps,
                    "decode_weight_bytes_per_token": m.decode_bytes_per_token,
                    "setup_s": m.setup_s,
                    "speculation": m.spec.map(|(a, t)| json!({"acceptance": a, "tokens_per_round": t})),
                    "mechanism": m.mechanism.as_ref().map(|x| json!({
                        "draft_tokens": x.k,
                        "draft_steps": x.depth,
                        "plain_pass_s": x.plain,
                        "draft_s": x.draft,
                        "verify_s": x.verify,
                        "single_verifies_s": x.verify_singles,
                        "speedup_at_60": x.speedup(0.6),
                        "speedup_at_80": x.speedup(0.8),
                        "speedup_at_95": x.speedup(0.95),
                    })),
                })
            })
            .collect();
        let doc = json!({
            "checkpoint": dir,
            "threads": threads,
            "exit": args.exit,
            "kv": opts.kv.to_string(),
            "linear": if opts.microkernels { ouroc_runtime::gemm::available() } else { "cranelift" },
            "prefill_tokens": args.prefill_tokens,
            "decode_tokens": args.decode_tokens,
            "runs": args.runs,
            "draft_tokens": spec.tokens.to_string(),
            "read_bandwidth_gb_s": bandwidth,
            "results": rows,
        });
        super::output::write_file(path, (serde_json::to_string_pretty(&doc)? + "\n").as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// [`Mechanism`], measured in `runs` alternating rounds after a prefill
/// of `ids`: plain passes, drafts, one k-token verification, k one-token
/// verifications (the same steps, the same positions).
fn mechanism(model: &mut CpuForward, ids: &[u32], k: usize, spec: SpecOptions, runs: usize) -> Result<Mechanism> {
    let e = anyhow::Error::msg;
    let steps = model.loop_steps();
    let depth = spec.depth_for(steps).map_err(e)?;
    let toks = random_ids(k, model.program().outputs[0].len);
    let (mut plain, mut draft, mut verify, mut singles) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        model.reset();
        model.run(ids).map_err(e)?;
        let m = model.speculative().expect("the CPU engine speculates");
        let p0 = m.positions();
        // k drafts.
        let t = Instant::now();
        for &tok in &toks {
            m.draft(tok, depth, false).map_err(|x| e(x.to_string()))?;
        }
        let d = t.elapsed().as_secs_f64();
        m.rollback(p0).map_err(|x| e(x.to_string()))?;
        // Drafts, then one verification of all.
        let mut states = Vec::new();
        for &tok in &toks {
            states.push(m.draft(tok, depth, false).map_err(|x| e(x.to_string()))?.state);
        }
        let t = Instant::now();
        m.verify(&toks, &states).map_err(|x| e(x.to_string()))?;
        verify.push(t.elapsed().as_secs_f64());
        m.rollback(p0).map_err(|x| e(x.to_string()))?;
        // The same steps one token at a time.
        let mut single = 0.0;
        for &tok in &toks {
            let st = m.draft(tok, depth, false).map_err(|x| e(x.to_string()))?.state;
            let t = Instant::now();
            m.verify(&[tok], &[st]).map_err(|x| e(x.to_string()))?;
            single += t.elapsed().as_secs_f64();
        }
        singles.push(single);
        m.rollback(p0).map_err(|x| e(x.to_string()))?;
        draft.push(d / k as f64);
        let t = Instant::now();
        for &tok in &toks {
            model.run(&[tok]).map_err(e)?;
        }
        plain.push(t.elapsed().as_secs_f64() / k as f64);
    }
    Ok(Mechanism {
        k,
        depth,
        steps,
        plain: median(&mut plain),
        draft: median(&mut draft),
        verify: median(&mut verify),
        verify_singles: median(&mut singles),
    })
}

/// The random bf16 checkpoint of `shape`, written once (with progress) and reused.
pub(super) fn random_checkpoint(shape: &str, dir: Option<PathBuf>) -> Result<PathBuf> {
    ouroc_models::shapes::named_shape(shape).map_err(anyhow::Error::msg)?;
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("ouroc-shapes").join(shape));
    const SEED: u64 = 1;
    if ouroc_models::random::is_current(&dir, shape, StorageDtype::BF16, SEED) {
        eprintln!("using the random {shape} checkpoint in {}", dir.display());
        return Ok(dir);
    }
    eprintln!("writing a random {shape} checkpoint (bf16) to {}", dir.display());
    let mut last = 0;
    ouroc_models::random::write_random_checkpoint(shape, &dir, StorageDtype::BF16, SEED, &mut |done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= last + 10 || done == total {
            eprintln!("  {pct}% of {:.2} GB", total as f64 / 1e9);
            last = pct;
        }
    })
    .map_err(anyhow::Error::msg)?;
    Ok(dir)
}

/// Deterministic token ids below `vocab`.
pub(super) fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Read bandwidth in GB/s: `threads` threads each summing their share of a
/// 512 MiB buffer (far larger than any cache), best of 3.
fn read_bandwidth(threads: usize) -> f64 {
    let words = (512usize << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(words.div_ceil(threads))
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a summing thread")).sum()
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}
