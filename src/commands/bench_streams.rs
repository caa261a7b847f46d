//! `ouroc bench --streams 1,2,4,8,16`: the serving engine's continuous
//! batching, measured in process (no HTTP): N concurrent greedy streams of
//! `--prefill-tokens` prompt tokens and `--decode-tokens` generated tokens,
//! batched by loop step or across loop depths, in alternating rounds on one
//! loaded model. Reports the aggregate decode tokens/s while all N streams
//! decode (and its ratio to one stream), time to first token and inter-token latency percentiles, rows
//! per batched call and the mean exit depth.

use super::bench::{median, random_ids};
use crate::cli::{BenchArgs, CacheFlags};
use anyhow::{Result, bail};
use ouroc_kernels::Program;
use ouroc_models::Checkpoint;
use ouroc_runtime::SamplingParams;
use ouroc_runtime::cpu::CpuOptions;
use ouroc_serve::engine::{Batching, Engine, EngineConfig, Event, Request};
use ouroc_serve::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// One run of N streams.
struct Round {
    /// Tokens generated while every stream decodes, per second (the window
    /// from the last stream's first token to the first stream's last).
    decode_tps: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    /// Rows per batched call of the loop body, and exit depth, means.
    rows: f64,
    depth: f64,
}

/// Medians over rounds of one (streams, batching).
struct Row {
    streams: usize,
    batching: Batching,
    decode_tps: f64,
    /// Median over rounds of decode_tps / one stream's in the same round.
    ratio: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    rows: f64,
    depth: f64,
}

pub fn run(args: &BenchArgs, dir: PathBuf, program: Program, opts: CpuOptions, label: &str) -> Result<()> {
    if args.streams.contains(&0) {
        bail!("--streams counts must be at least 1");
    }
    if args.decode_tokens < 2 {
        bail!("--streams measures decoding: give --decode-tokens 2 or more");
    }
    let ckpt = Checkpoint::open(&dir)?;
    let vocab = ckpt.config.vocab_size;
    drop(ckpt);
    let most = args.streams.iter().copied().max().unwrap_or(1);
    let cache: CacheFlags = args.cpu.cache.clone();
    let config = EngineConfig {
        max_seqs: most,
        max_queue: most,
        batching: Batching::CrossDepth,
        prefill_chunk: args.prefill_tokens.max(2),
    };
    let metrics = Arc::new(Metrics::new());
    eprintln!("[{label}] loading weights and JIT-compiling kernels...");
    let engine = Engine::start(config, metrics.clone(), move || {
        let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
        let m = super::prepare::cpu_forward(program, &ckpt, &opts, &cache).map_err(|e| format!("{e:#}"))?;
        Ok(m.into_driver())
    })
    .map_err(anyhow::Error::msg)?;
    // Rounds outermost: every (streams, batching) once per round, so the
    // machine's drift hits each alike; ratios are taken within a round.
    let cells: Vec<(usize, Batching)> = args
        .streams
        .iter()
        .flat_map(|&n| args.batching.iter().map(move |&b| (n, b)))
        .collect();
    let mut measured: Vec<Vec<Round>> = cells.iter().map(|_| Vec::new()).collect();
    for r in 0..args.runs {
        for (c, &(n, batching)) in cells.iter().enumerate() {
            engine.set_batching(batching);
            let round = measure(&engine, &metrics, n, args, vocab, r)?;
            eprintln!(
                "[{label}] round {}/{}: {n} stream(s), {} batching: {:.2} tokens/s, {:.2} rows per call",
                r + 1,
                args.runs,
                batching.name(),
                round.decode_tps,
                round.rows
            );
            measured[c].push(round);
        }
    }
    let mut rows = Vec::new();
    for (c, &(n, batching)) in cells.iter().enumerate() {
        let rs = &measured[c];
        let one = cells.iter().position(|&(m, b)| m == 1 && b == batching);
        let mut ratios: Vec<f64> = match one {
            Some(o) => rs
                .iter()
                .zip(&measured[o])
                .map(|(x, y)| x.decode_tps / y.decode_tps)
                .collect(),
            None => vec![f64::NAN],
        };
        let mut tps: Vec<f64> = rs.iter().map(|r| r.decode_tps).collect();
        let mut rws: Vec<f64> = rs.iter().map(|r| r.rows).collect();
        let mut dep: Vec<f64> = rs.iter().map(|r| r.depth).collect();
        rows.push(Row {
            streams: n,
            batching,
            decode_tps: median(&mut tps),
            ratio: median(&mut ratios),
            ttft: rs.iter().flat_map(|r| r.ttft.iter().copied()).collect(),
            itl: rs.iter().flat_map(|r| r.itl.iter().copied()).collect(),
            rows: median(&mut rws),
            depth: median(&mut dep),
        });
    }
    outln!(
        "{label}: {} prompt + {} generated tokens per stream, greedy, exit {}, medians of {} alternating rounds (x 1 strm: of per-round ratios)",
        args.prefill_tokens,
        args.decode_tokens,
        args.exit,
        args.runs
    );
    outln!(
        "{:>7} {:<12} {:>10} {:>9} {:>17} {:>23} {:>9} {:>6}",
        "streams",
        "batching",
        "decode/s",
        "x 1 strm",
        "TTFT p50/p90 ms",
        "ITL p50/p90/p99 ms",
        "rows/call",
        "depth"
    );
    for r in &rows {
        let (mut ttft, mut itl) = (r.ttft.clone(), r.itl.clone());
        outln!(
            "{:>7} {:<12} {:>10.2} {:>8.2}x {:>8.1}/{:<8.1} {:>7.1}/{:>7.1}/{:<7.1} {:>9.2} {:>6.2}",
            r.streams,
            r.batching.name(),
            r.decode_tps,
            r.ratio,
            1e3 * percentile(&mut ttft, 0.5),
            1e3 * percentile(&mut ttft, 0.9),
            1e3 * percentile(&mut itl, 0.5),
            1e3 * percentile(&mut itl, 0.9),
            1e3 * percentile(&mut itl, 0.99),
            r.rows,
            r.depth
        );
    }
    Ok(())
}

/// N streams at once, each its own prompt; every response complete.
fn measure(
    engine: &Engine,
    metrics: &Metrics,
    n: usize,
    args: &BenchArgs,
    vocab: usize,
    round: usize,
) -> Result<Round> {
    let (calls0, rows0) = metrics.batches();
    let t0 = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..n {
        let (tx, rx) = ouroc_serve::engine::events();
        let mut prompt = random_ids(args.prefill_tokens + n + round, vocab);
        prompt.drain(..i + round);
        prompt.truncate(args.prefill_tokens);
        engine
            .submit(Request {
                prompt,
                max_tokens: args.decode_tokens,
                sampling: SamplingParams::default(),
                exit: None,
                stop_ids: Vec::new(),
                events: tx,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rxs.push(rx);
    }
    // One receiver thread per stream, so each token is timed when it arrives.
    let streams: Vec<Result<Vec<(Instant, usize)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = rxs
            .into_iter()
            .map(|mut rx| {
                s.spawn(move || {
                    let mut times = Vec::new();
                    loop {
                        match rx.blocking_recv() {
                            Some(Event::Token { depth, .. }) => times.push((Instant::now(), depth)),
                            Some(Event::Done { .. }) => return Ok(times),
                            Some(Event::Error(e)) => return Err(e),
                            None => return Err("the engine dropped a stream".into()),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a receiver thread"))
            .collect()
    });
    let streams: Vec<Vec<(Instant, usize)>> = streams
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if let Some(short) = streams.iter().find(|s| s.len() != args.decode_tokens) {
        bail!("a stream ended after {} of {} tokens", short.len(), args.decode_tokens);
    }
    // Steady state: from when every stream has its first token to when the
    // first stream ends, every stream decodes (prefills of later arrivals
    // and the tail of the last stream are outside the window).
    let all_in = streams.iter().map(|s| s[0].0).max().expect("n >= 1");
    let first_out = streams.iter().map(|s| s[s.len() - 1].0).min().expect("n >= 1");
    let (from, to) = if first_out > all_in {
        (all_in, first_out)
    } else {
        (
            streams.iter().map(|s| s[0].0).min().expect("n >= 1"),
            streams.iter().map(|s| s[s.len() - 1].0).max().expect("n >= 1"),
        )
    };
    let decoded = streams
        .iter()
        .flat_map(|s| s.iter().filter(|t| t.0 > from && t.0 <= to))
        .count() as f64;
    let (calls1, rows1) = metrics.batches();
    let depths: Vec<usize> = streams.iter().flat_map(|s| s.iter().map(|t| t.1)).collect();
    Ok(Round {
        decode_tps: decoded / (to - from).as_secs_f64(),
        ttft: streams.iter().map(|s| (s[0].0 - t0).as_secs_f64()).collect(),
        itl: streams
            .iter()
            .flat_map(|s| s.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()))
            .collect(),
        rows: (rows1 - rows0) / (calls1 - calls0).max(1) as f64,
        depth: depths.iter().sum::<usize>() as f64 / depths.len().max(1) as f64,
    })
}

/// The q-quantile (nearest rank) of `v`.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}
