//! One module per subcommand.

mod ablate;
mod bench;
mod bench_streams;
mod build;
mod compile;
mod emit;
mod eval;
mod inspect;
mod logits;
mod output;
mod prepare;
mod run;
mod serve;

use crate::cli::{Cli, Command, Emit, ModelFlags, Precision, SourceArgs};
use anyhow::{Context, Result};
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_models::{BuildOptions, Checkpoint, OuroConfig};
use std::path::Path;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { ckpt } => inspect::run(&ckpt),
        Command::Emit {
            what: Emit::Ir { source, model, after },
        } => emit::ir(&source, &model, after.as_deref()),
        Command::Emit {
            what: Emit::Program { source, model },
        } => {
            outln!("{}", emit::program(&source, &model)?);
            Ok(())
        }
        Command::Emit {
            what: Emit::Clif { source, model, kernel },
        } => emit::clif(&source, &model, kernel.as_deref()),
        Command::Emit {
            what:
                Emit::Mlir {
                    source,
                    model,
                    after,
                    locations,
                },
        } => emit::mlir(&source, &model, after.as_deref(), locations),
        Command::Emit {
            what: Emit::Ptx { source, model, kernel },
        } => emit::ptx(&source, &model, kernel.as_deref()),
        Command::Compile(args) => compile::run(&args),
        Command::Logits(args) => logits::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Ablate(args) => ablate::run(&args),
        Command::Build(args) => build::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Serve(args) => serve::run(&args),
    }
}

/// Write to stdout (the `out!` and `outln!` macros): an error names stdout, except a closed
/// pipe, which ends the output quietly as `print_out` does.
pub fn write_stdout(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

/// Write generated text to stdout; a closed pipe (`ouroc emit ... | head`)
/// ends the output quietly instead of failing.
pub fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

/// Open a checkpoint, printing its warnings to stderr.
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(dir).with_context(|| format!("cannot load checkpoint {}", dir.display()))?;
    for w in &ckpt.warnings {
        eprintln!("warning: {w}");
    }
    Ok(ckpt)
}

/// Refuses, naming the numbers, a command whose weights and KV cache cannot fit in this
/// machine's memory, before anything large is allocated. Weights are their encoding plus, while
/// they are prepared, the f32 values of the few tensors a recipe combines (three of the largest:
/// a merged projection and its parts); the KV cache is one slot per loop step and layer for
/// `positions` tokens.
pub fn check_memory(
    command: &str,
    ckpt: &Checkpoint,
    graph: &Graph,
    precision: Precision,
    positions: usize,
) -> Result<()> {
    let encoded: u64 = match precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    };
    let params = ckpt.parameter_count();
    let largest = ckpt.tensors().map(|t| t.numel() as u64).max().unwrap_or(0);
    // The loop count of the graph (`--loops` may differ from the config's).
    let steps = graph
        .exit_control()
        .map_or(ckpt.config.total_ut_steps, |(steps, _)| steps);
    let config = OuroConfig {
        total_ut_steps: steps,
        ..ckpt.config.clone()
    };
    let kv = config.kv_bytes_per_token(encoded as usize);
    let mut need = ouroc_runtime::memory::Footprint::default();
    need.add("weights", params.checked_mul(encoded))
        .add("f32 tensors while preparing", largest.checked_mul(3 * 4))
        .add(
            format!("KV cache for {positions} positions"),
            kv.checked_mul(positions as u64),
        );
    need.check(command).map_err(anyhow::Error::msg)
}

/// `graph` optimised by `passes` and lowered to a Program whose Linears
/// read their weights in the `--weights` format.
pub fn lower(graph: Graph, passes: &ouroc_passes::PassManager, flags: &ModelFlags) -> Result<ouroc_kernels::Program> {
    let mut program = ouroc_compile::compile_with(graph, passes)?.program;
    flags.weights.scheme().apply(&mut program);
    Ok(program)
}

/// Quantised weights are a property of the compiled Program: the IR
/// interpreter, which runs the graph, has none.
pub fn refuse_quantised_interp(flags: &ModelFlags) -> Result<()> {
    if flags.weights != crate::cli::Weights::Dense {
        anyhow::bail!(
            "--weights {} needs a compiled backend (the IR interpreter runs the graph's dense weights): \
             use --backend cpu",
            flags.weights.scheme().name()
        );
    }
    Ok(())
}

/// Build the graph the flags ask for.
pub fn build(ckpt: &Checkpoint, flags: &ModelFlags) -> Result<Graph> {
    build_from(&ckpt.config, ckpt.head_tensor_name(), flags)
}

fn build_from(config: &OuroConfig, head: &str, flags: &ModelFlags) -> Result<Graph> {
    let dtype = match flags.precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    };
    let policy = match &flags.exit {
        Some(s) => ExitPolicy::parse(s).map_err(anyhow::Error::msg)?,
        None => BuildOptions::reference_policy(config, dtype),
    };
    let opts = BuildOptions {
        dtype,
        policy,
        loops: flags.loops,
        unrolled: flags.unrolled,
    };
    ouroc_models::build_from_config(config, head, &opts).map_err(anyhow::Error::msg)
}

/// The graph of a checkpoint or of a named shape (weights named, not loaded).
pub fn build_source(source: &SourceArgs, flags: &ModelFlags) -> Result<Graph> {
    match (&source.ckpt, &source.shape) {
        (Some(dir), _) => build(&open(dir)?, flags),
        (None, Some(name)) => {
            let config = ouroc_models::shapes::named_shape(name).map_err(anyhow::Error::msg)?;
            build_from(&config, "lm_head.weight", flags)
        }
        (None, None) => anyhow::bail!("give a checkpoint directory or --shape NAME"),
    }
}
