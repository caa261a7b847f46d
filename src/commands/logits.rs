use super::{build, open};
use crate::cli::{LogitsArgs, LogitsBackend, Mode};
use anyhow::{Context, Result, bail};
use ouroc_ir::{Interpreter, LoopTrace, Options, Tensor};
use ouroc_runtime::Trace;
use ouroc_runtime::cpu::CpuOptions;
use ouroc_runtime::gpu::{GpuForward, GpuOptions};
use safetensors::{Dtype, tensor::TensorView};
use std::collections::BTreeMap;

/// Per-position results of a whole run, concatenated over decode steps.
struct Collected {
    logits: Vec<f32>,
    /// [R][T*H]
    hidden: Vec<Vec<f32>>,
    /// [R][T]
    lambda: Vec<Vec<f32>>,
    exit_step: Vec<usize>,
}

pub fn run(args: &LogitsArgs) -> Result<()> {
    let ids = parse_ids(&args.ids)?;
    // Checked whatever the backend (the interpreter runs the imported graph).
    let passes = args.model.pipeline(true).map_err(anyhow::Error::msg)?;
    let ckpt = open(&args.ckpt)?;
    let graph = build(&ckpt, &args.model)?;
    let cfg = &ckpt.config;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "token id {bad} is out of the vocabulary: ids must be below vocab_size = {}",
            cfg.vocab_size
        );
    }
    if ids.len() > cfg.max_position_embeddings {
        bail!(
            "{} tokens exceed the context of {} positions (max_position_embeddings)",
            ids.len(),
            cfg.max_position_embeddings
        );
    }
    super::check_memory("ouroc logits", &ckpt, &graph, args.model.precision, ids.len())?;
    let (steps, policy) = graph
        .exit_control()
        .context("the graph has no loop and no exit_select")?;
    let chunks: Vec<Vec<u32>> = match args.mode {
        Mode::Prefill => vec![ids.clone()],
        Mode::Decode => ids.iter().map(|&t| vec![t]).collect(),
    };
    let mut c = Collected {
        logits: vec![],
        hidden: vec![vec![]; steps],
        lambda: vec![vec![]; steps],
        exit_step: vec![],
    };
    match args.backend {
        LogitsBackend::Interp => {
            super::refuse_quantised_interp(&args.model)?;
            let opts = Options {
                round_low_precision: true,
                max_positions: Some(cfg.max_position_embeddings),
                exit_skips: false,
            };
            let mut interp = Interpreter::new(&graph, &ckpt, opts)?;
            for chunk in chunks {
                let out = interp.run_tokens(&[chunk])?;
                let trace: LoopTrace = out.trace.context("the loop left no trace")?;
                c.logits.extend(&out.outputs[0].data);
                for r in 0..steps {
                    c.hidden[r].extend(&trace.step_outputs[r].data);
                    c.lambda[r].extend(&trace.exit_signals[r].data);
                }
                c.exit_step.extend(trace.exit_step);
            }
        }
        backend => {
            // The research interface traces every step and gate under every
            // policy: the Program keeps them (no policy-dce), and, like the
            // reference, every step runs for every token.
            let program = super::lower(graph.clone(), &passes, &args.model)?;
            let max = cfg.max_position_embeddings;
            let mut model: TraceFn = match backend {
                LogitsBackend::Cpu => {
                    let opts = CpuOptions {
                        threads: args.threads.map_or(0, usize::from),
                        ..CpuOptions::new(max)
                    };
                    let mut m = super::prepare::cpu_forward(program, &ckpt, &opts, &args.cache)?;
                    Box::new(move |ids| Ok(m.run_traced(ids).map_err(anyhow::Error::msg)?.1))
                }
                LogitsBackend::PtxEmu => {
                    let mut m = GpuForward::emulated(program, &ckpt, GpuOptions::new(max))?;
                    Box::new(move |ids| Ok(m.run_traced(ids)?.1))
                }
                _ => cuda_model(program, &ckpt, GpuOptions::new(max), &args.cache)?,
            };
            for chunk in &chunks {
                c.add(&model(chunk)?, steps)?;
            }
        }
    }
    let t = ids.len();
    let v = cfg.vocab_size;
    outln!(
        "policy {policy}, {steps} loop steps, {:?} mode, {t} tokens, {} backend",
        args.mode,
        match args.backend {
            LogitsBackend::PtxEmu => "ptx-emu".to_string(),
            b => format!("{b:?}").to_lowercase(),
        }
    );
    // depth = exit step + 1: how many loop steps the chosen output went through.
    outln!(
        "{:>4} {:>6} {:>5}  {:<width$}  argmax",
        "pos",
        "id",
        "depth",
        "exit gate lambda per step",
        width = 7 * steps
    );
    for (p, &id) in ids.iter().enumerate() {
        let row = &c.logits[p * v..(p + 1) * v];
        let lam: Vec<String> = (0..steps)
            .map(|r| match c.lambda[r][p] {
                l if l.is_nan() => "-".to_string(),
                l => format!("{l:.3}"),
            })
            .collect();
        outln!(
            "{:>4} {:>6} {:>5}  {:<width$}  {}",
            p,
            id,
            c.exit_step[p] + 1,
            lam.join(" "),
            argmax(row),
            width = 7 * steps
        );
    }
    let mut hist = vec![0usize; steps];
    c.exit_step.iter().for_each(|&s| hist[s] += 1);
    let hist: Vec<String> = hist
        .iter()
        .enumerate()
        .map(|(s, n)| format!("depth {}: {n}", s + 1))
        .collect();
    outln!("tokens per exit depth: {}", hist.join(", "));
    if let Some(path) = &args.out {
        let h = cfg.hidden_size;
        let hidden: Vec<f32> = c.hidden.concat();
        let lambda: Vec<f32> = c.lambda.concat();
        let exit_i32: Vec<i32> = c.exit_step.iter().map(|&s| s as i32).collect();
        let mut tensors = vec![
            ("logits", Tensor::new(vec![t, v], c.logits.clone())),
            ("hidden_states", Tensor::new(vec![steps, t, h], hidden)),
        ];
        tensors.push(("exit_lambda", Tensor::new(vec![steps, t], lambda)));
        let mut bytes: BTreeMap<&str, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (name, tensor) in &tensors {
            bytes.insert(
                name,
                (
                    Dtype::F32,
                    tensor.shape.clone(),
                    tensor.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            );
        }
        bytes.insert(
            "exit_step",
            (
                Dtype::I32,
                vec![t],
                exit_i32.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        );
        let views: Vec<(&str, TensorView)> = bytes
            .iter()
            .map(|(n, (d, s, b))| Ok((*n, TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("policy".to_string(), policy.to_string());
        meta.insert(
            "precision".to_string(),
            format!("{:?}", args.model.precision).to_lowercase(),
        );
        meta.insert("mode".to_string(), format!("{:?}", args.mode).to_lowercase());
        let bytes = safetensors::serialize(views, Some(meta)).context("cannot serialise the output tensors")?;
        super::output::write_file(path, &bytes)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

impl Collected {
    /// Append one call's trace; every backend's Program keeps all `steps`
    /// steps and the exit gate (compiled with `keep_exit_trace`).
    fn add(&mut self, t: &Trace, steps: usize) -> Result<()> {
        if t.step_outputs.len() != steps || t.lambdas.len() != steps {
            bail!(
                "the backend traced {} steps and {} gates, the model has {steps} steps",
                t.step_outputs.len(),
                t.lambdas.len()
            );
        }
        self.logits.extend(&t.logits);
        for r in 0..steps {
            self.hidden[r].extend(&t.step_outputs[r]);
            self.lambda[r].extend(&t.lambdas[r]);
        }
        self.exit_step.extend(&t.exit_steps);
        Ok(())
    }
}

type TraceFn = Box<dyn FnMut(&[u32]) -> Result<Trace>>;

#[cfg(feature = "cuda")]
fn cuda_model(
    program: ouroc_kernels::Program,
    ckpt: &ouroc_models::Checkpoint,
    opts: GpuOptions,
    cache: &crate::cli::CacheFlags,
) -> Result<TraceFn> {
    let dev = ouroc_runtime::gpu::cuda::CudaDevice::new()?;
    let weights = super::prepare::weights(&program, ckpt, cache)?;
    let mut m = GpuForward::from_encoded(program, weights, dev, opts)?;
    Ok(Box::new(move |ids| Ok(m.run_traced(ids)?.1)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_model(
    _: ouroc_kernels::Program,
    _: &ouroc_models::Checkpoint,
    _: GpuOptions,
    _: &crate::cli::CacheFlags,
) -> Result<TraceFn> {
    bail!("{}", super::run::NO_CUDA)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// "5,17,42" -> [5, 17, 42]; empty or malformed lists are errors naming the item.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let s = s.trim();
    if s.is_empty() {
        bail!("--ids is empty: give at least one token id, e.g. --ids 5,17,42");
    }
    s.split(',')
        .map(|item| {
            let item = item.trim();
            item.parse::<u32>()
                .with_context(|| format!("--ids: `{item}` is not a token id (a non-negative integer)"))
        })
        .collect()
}
