use super::build_source;
use crate::cli::{CompileArgs, SourceArgs};
use anyhow::Result;
use ouroc_passes::{Stats, memplan};

pub fn run(args: &CompileArgs) -> Result<()> {
    if args.list {
        outln!("the optimisation pipeline, in order (--passes A,B runs only those, --skip A,B all but those):");
        for (name, what) in ouroc_passes::pass_list() {
            outln!("  {name:<11} {what}");
        }
        outln!("the rewrite rules of egraph, all on by default (--rules -NAME turns one off, +NAME on):");
        for (name, what) in ouroc_passes::rule_list() {
            outln!("  {name:<27} {what}");
        }
        return Ok(());
    }
    let passes = args.model.pipeline(false).map_err(anyhow::Error::msg)?;
    let source = SourceArgs {
        ckpt: args.ckpt.clone(),
        shape: args.shape.clone(),
    };
    let graph = build_source(&source, &args.model)?;
    let (optimised, reports) = ouroc_compile::optimise_with(&graph, &passes, None)?;
    let imported = Stats::of(&graph);
    let first = reports.first().map_or(&imported, |r| &r.before);
    let last = reports.last().map_or(&imported, |r| &r.after);
    if args.stats {
        out!("{}", ouroc_passes::table(&reports));
        outln!();
        for seq in [1, 128] {
            outln!("{}", memplan::plan(&optimised, 1, seq).summary());
        }
    }
    outln!(
        "{} passes: kernels/token {} -> {}, weight bytes/token {} -> {}, activation bytes/token {} -> {}",
        reports.len(),
        first.kernels_per_token,
        last.kernels_per_token,
        first.weight_bytes_per_token,
        last.weight_bytes_per_token,
        first.activation_bytes_per_token,
        last.activation_bytes_per_token
    );
    if args.model.weights != crate::cli::Weights::Dense {
        // The weight format is a property of the Program's Linears: lower
        // and count the bytes its kernels read per token, every step run.
        let mut program = ouroc_kernels::lower(&optimised).map_err(|e| anyhow::anyhow!("{e}"))?;
        let per_token = |p: &ouroc_kernels::Program| {
            let (outside, step) = p.weight_bytes_read();
            outside + step * p.loop_.as_ref().map_or(0, |l| l.steps as u64)
        };
        let dense = per_token(&program);
        let scheme = args.model.weights.scheme();
        let n = scheme.apply(&mut program);
        let quant = per_token(&program);
        outln!(
            "--weights {}: {n} Linears quantised; weight bytes read per token {dense} -> {quant} ({:.1}% saved)",
            scheme.name(),
            100.0 * (dense - quant) as f64 / dense.max(1) as f64
        );
    }
    Ok(())
}
