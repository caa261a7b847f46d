//! `extend-pipeline [CKPT]`: compile a checkpoint (default: the demo model)
//! with the default pipeline, with the example pass `split-silu` added, and
//! with both the pass and the example rule `silu-from-sigmoid`; run each on
//! the CPU engine and compare with the imported graph in the reference
//! interpreter. See docs/extending.md.

use anyhow::{Context, Result, bail};
use ouroc_examples::experiment;
use ouroc_models::Checkpoint;
use std::path::PathBuf;

const PROMPT: usize = 8;
const DECODE: usize = 4;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = match args.as_slice() {
        [] => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo"),
        [a] if a == "-h" || a == "--help" => {
            println!("usage: extend-pipeline [CKPT]  (default: the demo model; see docs/extending.md)");
            return Ok(());
        }
        [a] => PathBuf::from(a),
        _ => bail!("usage: extend-pipeline [CKPT]"),
    };
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let imported = experiment::import(&ckpt)?;
    let prompt = experiment::prompt(&ckpt, PROMPT);
    let want = experiment::reference(&ckpt, &imported, &prompt, DECODE)?;
    println!(
        "{}: prefill {PROMPT} tokens, decode {DECODE}, f32, CPU engine",
        dir.display()
    );
    println!(
        "{:<24} {:>10} {:>16} {:>15} {:>13} {:>12}",
        "pipeline", "swiglu ops", "kernels/token", "rule firings", "max rel err", "same tokens"
    );
    for (label, split, rule) in [
        ("default", false, false),
        ("+split-silu", true, false),
        ("+split-silu +rule", true, true),
    ] {
        let o = experiment::compile_and_run(&ckpt, &imported, split, rule, &prompt, DECODE)?;
        let fired: usize = o.rule_firings.iter().map(|r| r.1).sum();
        let tokens = |c: &[experiment::Call]| c.iter().map(|(l, _)| experiment::argmax(l)).collect::<Vec<_>>();
        println!(
            "{:<24} {:>10} {:>16} {:>15} {:>13.2e} {:>12}",
            label,
            o.swiglu_ops,
            o.kernels_per_token,
            if rule { fired.to_string() } else { "-".into() },
            experiment::max_rel_err(&o.calls, &want),
            if tokens(&o.calls) == tokens(&want) { "yes" } else { "no" },
        );
        if split {
            println!("  passes: {}", o.passes.join(", "));
        }
    }
    Ok(())
}
