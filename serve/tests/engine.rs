//! The engine on a real model (a test fixture on the compiled CPU engine):
//! concurrent requests batched by loop step and across depths each get the
//! tokens they get alone; limits, cancellation, shutdown and refusals.

use ouroc_driver::Driver;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::SamplingParams;
use ouroc_runtime::cpu::{CpuDevice, CpuForward, CpuOptions};
use ouroc_serve::engine::{Batching, Engine, EngineConfig, Event, Finish, Rejected, Request};
use ouroc_serve::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn driver(name: &str, policy: &str) -> Result<Driver<CpuDevice>, String> {
    let ckpt = Checkpoint::open(&fixture(name)).map_err(|e| e.to_string())?;
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy)?,
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).map_err(|e| e.to_string())?;
    let p = ouroc_compile::compile_graph(g, false)
        .map_err(|e| e.to_string())?
        .program;
    let o = CpuOptions {
        threads: 2,
        early_exit: true,
        ..CpuOptions::new(96)
    };
    Ok(CpuForward::with_options(p, &ckpt, &o)?.into_driver())
}

fn engine(config: EngineConfig) -> Engine {
    Engine::start(config, Arc::new(Metrics::new()), || driver("mha-r4", "threshold:0.5")).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize, temperature: f32, seed: u64) -> (Request, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let r = Request {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        exit: None,
        stop_ids: Vec::new(),
        events: tx,
    };
    (r, rx)
}

/// Every event until the end: (tokens with depths, the final event).
fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<(u32, usize)>, Event) {
    let mut toks = Vec::new();
    loop {
        match rx
            .blocking_recv()
            .expect("the engine ended the stream without a final event")
        {
            Event::Token { id, depth } => toks.push((id, depth)),
            end => return (toks, end),
        }
    }
}

fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..3 + (i * 7) % 11)
                .map(|j| ((i * 131 + j * 17 + 5) % 250) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn concurrent_requests_get_what_they_get_alone() {
    let ps = prompts(10);
    let alone = engine(EngineConfig {
        max_seqs: 1,
        ..EngineConfig::default()
    });
    let want: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (r, rx) = request(p.clone(), 12, if i % 3 == 2 { 0.8 } else { 0.0 }, i as u64);
            alone.submit(r).unwrap();
            collect(rx)
        })
        .collect();
    for batching in [Batching::CrossDepth, Batching::Step] {
        let e = engine(EngineConfig {
            max_seqs: 6,
            batching,
            prefill_chunk: 4,
            ..EngineConfig::default()
        });
        let rxs: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (r, rx) = request(p.clone(), 12, if i % 3 == 2 { 0.8 } else { 0.0 }, i as u64);
                e.submit(r).unwrap();
                rx
            })
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let got = collect(rx);
            assert_eq!(got, want[i], "{batching:?}: request {i}");
            let Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } = got.1
            else {
                panic!("{:?}", got.1)
            };
            assert_eq!(
                (finish, prompt_tokens, completion_tokens),
                (Finish::Length, ps[i].len(), 12)
            );
        }
        assert!(e.wait_drained(Duration::from_secs(10)));
        let m = e.metrics().render();
        // Several sequences shared the loop's calls.
        let single = m
            .lines()
            .find(|l| l.starts_with("ouroc_batch_rows_bucket{le=\"1\"}"))
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap();
        let all = m
            .lines()
            .find(|l| l.starts_with("ouroc_batch_rows_count"))
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!(single < all, "{batching:?}: every batch had one row\n{m}");
        assert!(m.contains("ouroc_generation_tokens_total 120"), "{m}");
    }
}

#[test]
fn a_stop_token_ends_the_request_and_is_not_sent() {
    let e = engine(EngineConfig::default());
    let (r, rx) = request(vec![5, 6, 7], 10, 0.0, 0);
    e.submit(r).unwrap();
    let (toks, _) = collect(rx);
    let stop = toks[3].0;
    let (mut r, rx) = request(vec![5, 6, 7], 10, 0.0, 0);
    r.stop_ids = vec![stop];
    e.submit(r).unwrap();
    let (got, end) = collect(rx);
    let first = toks.iter().position(|t| t.0 == stop).unwrap();
    assert_eq!(got, toks[..first]);
    assert_eq!(
        end,
        Event::Done {
            finish: Finish::Stop,
            prompt_tokens: 3,
            completion_tokens: first
        }
    );
}

#[test]
fn a_dropped_receiver_cancels_and_frees_the_sequence() {
    let e = engine(EngineConfig {
        max_seqs: 1,
        max_queue: 0,
        ..EngineConfig::default()
    });
    let (r, mut rx) = request(vec![1, 2, 3], 80, 0.0, 0);
    e.submit(r).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    // The only slot is taken and nothing may queue: busy.
    let (r2, _rx2) = request(vec![1, 2], 4, 0.0, 0);
    assert!(matches!(e.submit(r2), Err(Rejected::Busy { .. })));
    drop(rx);
    assert!(e.wait_drained(Duration::from_secs(10)), "{:?}", e.load());
    assert_eq!(e.load(), (0, 0));
    assert!(e.metrics().render().contains("ouroc_requests_cancelled_total 1"));
    // The slot is free again.
    let (r3, rx3) = request(vec![1, 2], 4, 0.0, 0);
    e.submit(r3).unwrap();
    assert_eq!(collect(rx3).0.len(), 4);
}

#[test]
fn shutdown_refuses_new_requests_and_finishes_running_ones() {
    let e = engine(EngineConfig::default());
    let (r, rx) = request(vec![9, 8, 7], 20, 0.0, 0);
    e.submit(r).unwrap();
    e.begin_shutdown();
    let (r2, _rx2) = request(vec![1, 2], 4, 0.0, 0);
    assert_eq!(e.submit(r2), Err(Rejected::ShuttingDown));
    assert_eq!(collect(rx).0.len(), 20);
    assert!(e.wait_drained(Duration::from_secs(10)));
}

#[test]
fn requests_that_cannot_run_are_refused_by_name() {
    let e = engine(EngineConfig::default());
    let bad = |f: &dyn Fn(&mut Request)| {
        let (mut r, _rx) = request(vec![1, 2, 3], 4, 0.0, 0);
        f(&mut r);
        match e.submit(r) {
            Err(Rejected::Invalid(m)) => m,
            other => panic!("{other:?}"),
        }
    };
    assert!(bad(&|r| r.prompt.clear()).contains("empty"));
    assert!(bad(&|r| r.prompt.push(1 << 30)).contains("out of the vocabulary"));
    assert!(bad(&|r| r.max_tokens = 0).contains("at least 1"));
    let m = bad(&|r| r.max_tokens = 94);
    assert!(m.contains("maximum context length is 96") && m.contains("97"), "{m}");
    assert!(bad(&|r| r.sampling.top_p = 0.0).contains("top-p"));
    assert!(bad(&|r| r.exit = Some(ExitPolicy::Step(9))).contains("step"));
    // A Program compiled with `last` has no gate to read.
    let last = Engine::start(EngineConfig::default(), Arc::new(Metrics::new()), || {
        driver("mha-r4", "last")
    })
    .unwrap();
    let (mut r, _rx) = request(vec![1, 2, 3], 4, 0.0, 0);
    r.exit = Some(ExitPolicy::parse("threshold:0.5").unwrap());
    let Err(Rejected::Invalid(m)) = last.submit(r) else {
        panic!()
    };
    assert!(m.contains("exit gate"), "{m}");
    // A model that fails to load is an error, not a hang.
    let err = Engine::start(EngineConfig::default(), Arc::new(Metrics::new()), || {
        driver("no-such-fixture", "last")
    })
    .err()
    .unwrap();
    assert!(err.contains("no-such-fixture"), "{err}");
}

#[test]
fn a_per_request_exit_policy_changes_the_depths() {
    let e = engine(EngineConfig::default());
    let (mut r, rx) = request(vec![4, 5, 6, 7], 8, 0.0, 0);
    r.exit = Some(ExitPolicy::Step(1));
    e.submit(r).unwrap();
    let (toks, _) = collect(rx);
    assert!(toks.iter().all(|t| t.1 == 2), "{toks:?}");
    let (mut r, rx) = request(vec![4, 5, 6, 7], 8, 0.0, 0);
    r.exit = Some(ExitPolicy::Last);
    e.submit(r).unwrap();
    let (toks, _) = collect(rx);
    assert!(toks.iter().all(|t| t.1 == 4), "{toks:?}");
}
