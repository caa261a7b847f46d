//! One module per subcommand.

mod emit;
mod inspect;
mod logits;
mod run;

use crate::cli::{Cli, Command, Emit, ModelFlags, Precision};
use anyhow::{Context, Result};
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_models::{BuildOptions, Checkpoint};
use std::path::Path;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { ckpt } => inspect::run(&ckpt),
        Command::Emit {
            what: Emit::Ir { ckpt, model },
        } => emit::ir(&ckpt, &model),
        Command::Logits(args) => logits::run(&args),
        Command::Run(args) => run::run(&args),
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

/// Build the graph the flags ask for.
pub fn build(ckpt: &Checkpoint, flags: &ModelFlags) -> Result<Graph> {
    let dtype = match flags.precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    };
    let policy = match &flags.exit {
        Some(s) => ExitPolicy::parse(s).map_err(anyhow::Error::msg)?,
        None => BuildOptions::reference_policy(&ckpt.config, dtype),
    };
    let opts = BuildOptions {
        dtype,
        policy,
        loops: flags.loops,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).map_err(anyhow::Error::msg)
}
