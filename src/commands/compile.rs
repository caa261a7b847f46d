use super::build_source;
use crate::cli::CompileArgs;
use anyhow::Result;
use ouroc_passes::memplan;

pub fn run(args: &CompileArgs) -> Result<()> {
    let graph = build_source(&args.source, &args.model)?;
    let (optimised, reports) = ouroc_compile::optimise(&graph, false, None)?;
    let (first, last) = (&reports[0].before, &reports[reports.len() - 1].after);
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
    Ok(())
}
