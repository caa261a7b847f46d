//! `ouroc serve`: the checkpoint compiled as `ouroc run` compiles it, its CPU engine owned by
//! the batching engine's thread, and the OpenAI-compatible HTTP server in front
//! (`ouroc_serve::http`).

use super::{build, open};
use crate::cli::ServeArgs;
use anyhow::{Context, Result, bail};
use ouroc_runtime::Tokenizer;
use ouroc_runtime::cpu::CpuOptions;
use ouroc_serve::engine::{Batching, Engine, EngineConfig};
use ouroc_serve::http::{Served, Server, ServerOptions};
use ouroc_serve::metrics::Metrics;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(args: &ServeArgs) -> Result<()> {
    let dir = match &args.ckpt {
        Some(d) => d.clone(),
        None => {
            let d = super::run::builtin_model();
            if !d.join("config.json").is_file() {
                bail!(
                    "no checkpoint given and the built-in demo model is missing at {}",
                    d.display()
                );
            }
            d
        }
    };
    // Flags are checked before the (slow) load.
    let batching = Batching::parse(&args.batching).map_err(anyhow::Error::msg)?;
    let grace = Duration::try_from_secs_f64(args.shutdown_grace).map_err(|_| {
        anyhow::anyhow!(
            "--shutdown-grace must be a number of seconds >= 0, got {}",
            args.shutdown_grace
        )
    })?;
    if args.max_seqs == 0 {
        bail!("--max-seqs must be at least 1");
    }
    let passes = args.model.pipeline(false).map_err(anyhow::Error::msg)?;
    let cpu_opts = args.cpu.options(0, !args.no_early_exit).map_err(anyhow::Error::msg)?;
    let name = match &args.served_model_name {
        Some(n) if n.trim().is_empty() => bail!("--served-model-name must not be empty"),
        Some(n) => n.clone(),
        None => model_name(&dir),
    };

    let t0 = Instant::now();
    let ckpt = open(&dir)?;
    let tok = Tokenizer::load(&dir)?;
    let graph = build(&ckpt, &args.model)?;
    let max_positions = ckpt.config.max_position_embeddings;
    // Every sequence may hold a whole context.
    let positions = max_positions.saturating_mul(args.max_seqs);
    super::check_memory("ouroc serve", &ckpt, &graph, args.model.precision, positions)?;
    let mut stop_ids = tok.eos_ids.clone();
    stop_ids.extend(ckpt.config.eos_token_ids.iter().copied());
    let (layers, steps) = (
        ckpt.config.num_hidden_layers,
        graph.exit_control().map_or(1, |(steps, _)| steps),
    );
    let policy = graph.exit_control().map(|(_, p)| p.to_string()).unwrap_or_default();
    let program = super::lower(graph, &passes, &args.model)?;
    let opts = CpuOptions {
        max_positions,
        ..cpu_opts
    };
    let engine_desc = super::run::engine_name(Some(&opts));
    let config = EngineConfig {
        max_seqs: args.max_seqs,
        max_queue: args.max_queue,
        batching,
        ..EngineConfig::default()
    };
    let cache = args.cpu.cache.clone();
    // The CPU engine is not `Send`: it is built on the engine's thread.
    let engine = Engine::start(config, Arc::new(Metrics::new()), move || {
        super::prepare::cpu_forward(program, &ckpt, &opts, &cache)
            .map(|f| f.into_driver())
            .map_err(|e| format!("{e:#}"))
    })
    .map_err(anyhow::Error::msg)
    .context("cannot start the engine")?;
    let served = Served {
        name: name.clone(),
        tokenizer: tok,
        stop_ids,
    };
    let server = Server::new(
        engine,
        served,
        ServerOptions {
            shutdown_grace: grace,
            ..ServerOptions::default()
        },
    );
    let addr = listen_addr(&args.host, args.port);
    server
        .run_blocking(&addr, |local| {
            eprintln!(
                "ouroc serve: listening on http://{local}, model {name} ({}, {layers} layers x {steps} loop steps, \
                 exit policy {policy}), {engine_desc}, {} batching of up to {} sequences, queue {} (ready in {:.2} s)",
                dir.display(),
                batching.name(),
                args.max_seqs,
                args.max_queue,
                t0.elapsed().as_secs_f64()
            );
        })
        .map_err(anyhow::Error::msg)?;
    eprintln!("ouroc serve: stopped");
    Ok(())
}

/// The checkpoint directory's name (of its full path, so `.` names the directory).
fn model_name(dir: &Path) -> String {
    let full = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    full.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// `host:port`, an IPv6 host in brackets.
fn listen_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
