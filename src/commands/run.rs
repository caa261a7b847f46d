use super::{build, open};
use crate::cli::{Backend, Device, RunArgs};
use anyhow::{Context, Result, bail};
use ouroc_runtime::generate::Forward;
use ouroc_runtime::generate::GenLimits;
use ouroc_runtime::interp::InterpForward;
use ouroc_runtime::speculate::DraftTokens;
use ouroc_runtime::tokenizer::TextStream;
use ouroc_runtime::{Sampler, SamplingParams, Tokenizer, generate_with};
use std::path::PathBuf;

/// The built-in demo model (see models/demo/README.md).
pub(super) fn builtin_model() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"))
}

pub fn run(args: &RunArgs) -> Result<()> {
    let dir = match &args.ckpt {
        Some(d) => d.clone(),
        None => {
            let d = builtin_model();
            if !d.join("config.json").is_file() {
                bail!(
                    "no checkpoint given and the built-in demo model is missing at {}",
                    d.display()
                );
            }
            d
        }
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    params.check().map_err(anyhow::Error::msg)?;
    let passes = args.model.pipeline(false).map_err(anyhow::Error::msg)?;
    let spec = args
        .spec
        .options(DraftTokens::Auto, params.temperature == 0.0)
        .map_err(anyhow::Error::msg)?;
    if args.device == Device::Cuda && (args.backend != Backend::Cpu || args.cpu.threads.is_some()) {
        bail!("--device cuda runs the compiled Program on the GPU: --backend interp and --threads do not apply");
    }
    // Flags are checked before the (slow) load.
    let cpu_opts = match args.backend {
        Backend::Cpu => Some(args.cpu.options(0, !args.no_early_exit).map_err(anyhow::Error::msg)?),
        Backend::Interp => {
            if args.cpu.threads.is_some() || args.cpu.kv != "full" {
                bail!("--threads and --kv apply to --backend cpu only");
            }
            None
        }
    };
    let ckpt = open(&dir)?;
    let tok = Tokenizer::load(&dir)?;
    let graph = build(&ckpt, &args.model)?;
    let text = if args.chat {
        tok.chat()
            .prompt(args.system.as_deref(), &args.prompt)
            .map_err(anyhow::Error::msg)?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode(&text).map_err(anyhow::Error::msg)?;
    let max_positions = ckpt.config.max_position_embeddings;
    let positions = prompt.len().saturating_add(args.max_new_tokens).min(max_positions);
    super::check_memory("ouroc run", &ckpt, &graph, args.model.precision, positions)?;
    let mut stop_ids = tok.eos_ids.clone();
    stop_ids.extend(ckpt.config.eos_token_ids.iter().copied());
    if args.chat {
        stop_ids.extend(tok.im_end);
    }
    let early_exit = !args.no_early_exit;
    let cpu_opts = cpu_opts.map(|o| ouroc_runtime::cpu::CpuOptions { max_positions, ..o });
    let t0 = std::time::Instant::now();
    let mut model: Box<dyn Forward + '_> = match args.backend {
        Backend::Interp => {
            super::refuse_quantised_interp(&args.model)?;
            Box::new(InterpForward::new(&graph, &ckpt, max_positions, early_exit).map_err(anyhow::Error::msg)?)
        }
        Backend::Cpu => {
            let program = super::lower(graph.clone(), &passes, &args.model)?;
            let opts = cpu_opts.expect("parsed for the cpu backend");
            if args.device == Device::Cuda {
                let mut g = ouroc_runtime::gpu::GpuOptions::new(max_positions);
                (g.early_exit, g.kv) = (early_exit, opts.kv);
                cuda_forward(program, &ckpt, g, &args.cpu.cache)?
            } else {
                Box::new(super::prepare::cpu_forward(program, &ckpt, &opts, &args.cpu.cache)?)
            }
        }
    };
    let policy = graph.exit_control().map(|(_, p)| p.to_string()).unwrap_or_default();
    let engine = match &cpu_opts {
        Some(o) if args.device == Device::Cuda => format!("PTX on the CUDA device, KV cache {}", o.kv),
        o => engine_name(o.as_ref()),
    };
    eprintln!(
        "ouroc: {} ({} layers x {} loop steps), exit policy {policy}, {engine} (ready in {:.2} s)",
        dir.display(),
        ckpt.config.num_hidden_layers,
        model_steps(&graph),
        t0.elapsed().as_secs_f64()
    );
    let mut sampler = Sampler::new(params);
    let mut stream = TextStream::default();
    out!("{}", if args.chat { "" } else { args.prompt.as_str() });
    let limits = GenLimits {
        max_new_tokens: args.max_new_tokens,
        max_positions,
    };
    let stats = generate_with(
        model.as_mut(),
        &prompt,
        &mut sampler,
        &stop_ids,
        &limits,
        spec,
        &mut |id| {
            let piece = stream.push(&tok, id)?;
            super::write_stdout(format_args!("{piece}")).map_err(|e| format!("{e:#}"))
        },
    )
    .map_err(anyhow::Error::msg)
    .context("generation failed")?;
    outln!();
    eprint!("{}", stats.summary(model_steps(&graph), max_positions));
    Ok(())
}

/// What a build without the `cuda` feature says to `--device cuda` / `--backend cuda`.
#[cfg(not(feature = "cuda"))]
pub const NO_CUDA: &str =
    "this ouroc was built without CUDA support: rebuild with `cargo build --release --features cuda`";

/// The Program on the CUDA device, or a clear error (no driver, no GPU, or
/// a build without the `cuda` feature).
#[cfg(feature = "cuda")]
fn cuda_forward<'a>(
    program: ouroc_kernels::Program,
    ckpt: &ouroc_models::Checkpoint,
    opts: ouroc_runtime::gpu::GpuOptions,
    cache: &crate::cli::CacheFlags,
) -> Result<Box<dyn Forward + 'a>> {
    let dev = ouroc_runtime::gpu::cuda::CudaDevice::new()?;
    let weights = super::prepare::weights(&program, ckpt, cache)?;
    Ok(Box::new(ouroc_runtime::gpu::GpuForward::from_encoded(
        program, weights, dev, opts,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_forward<'a>(
    _: ouroc_kernels::Program,
    _: &ouroc_models::Checkpoint,
    _: ouroc_runtime::gpu::GpuOptions,
    _: &crate::cli::CacheFlags,
) -> Result<Box<dyn Forward + 'a>> {
    bail!("{NO_CUDA}")
}

/// What runs the model, for the start-up line: the CPU engine and its
/// threads, or the interpreter.
pub fn engine_name(cpu: Option<&ouroc_runtime::cpu::CpuOptions>) -> String {
    match cpu {
        Some(o) => {
            let threads = if o.threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                o.threads
            };
            format!("Cranelift JIT kernels, {threads} thread(s), KV cache {}", o.kv)
        }
        None => "reference interpreter".to_string(),
    }
}

fn model_steps(g: &ouroc_ir::Graph) -> usize {
    g.exit_control().map_or(1, |(steps, _)| steps)
}
