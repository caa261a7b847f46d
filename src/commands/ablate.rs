//! `ouroc ablate`: what each pass and each rewrite rule buys, measured.
//!
//! The default pipeline and each variant (one pass or one rule removed, or
//! the variants given) are compiled from the same imported graph; each
//! variant's static costs come from the pass statistics and the memory
//! plan, its speed from the CPU engine, measured in rounds that alternate
//! the default and the variant (the machine drifts; a ratio within a round
//! does not). A variant the pipeline refuses (a missing prerequisite) is a
//! row with the reason; one whose Program is the default's is not measured
//! again (the pass or rule changes nothing on this model).

use super::bench::{median, random_checkpoint, random_ids};
use super::{build, open};
use crate::cli::{AblateArgs, CacheFlags, ModelFlags, PipelineFlags};
use anyhow::{Result, bail};
use ouroc_passes::{Stats, memplan};
use ouroc_runtime::cpu::CpuForward;
use serde_json::json;
use std::time::Instant;

/// One pipeline to compare.
struct Variant {
    label: String,
    passes: Option<Vec<String>>,
    skip: Vec<String>,
    rules: Vec<String>,
}

/// What a variant measured.
struct Row {
    label: String,
    /// Why it did not run, if it did not.
    refused: Option<String>,
    stats: Stats,
    arena_1: u64,
    arena_prefill: u64,
    compile_s: f64,
    prefill: f64,
    decode: f64,
    /// Variant / default, medians over the rounds (1 for the default).
    prefill_ratio: f64,
    decode_ratio: f64,
    /// The variant's Program is the default's (not measured again).
    same: bool,
}

pub fn run(args: &AblateArgs) -> Result<()> {
    if args.rounds == 0 || args.prefill_tokens == 0 {
        bail!("--rounds and --prefill-tokens must be at least 1");
    }
    let variants = match &args.variants {
        Some(v) => parse_variants(v)?,
        None => default_variants(),
    };
    let dir = match (&args.ckpt, &args.shape) {
        (Some(d), _) => d.clone(),
        (None, Some(shape)) => random_checkpoint(shape, None)?,
        (None, None) => bail!("give a checkpoint directory or --shape NAME"),
    };
    let ckpt = open(&dir)?;
    let positions = args.prefill_tokens.saturating_add(args.decode_tokens);
    if positions > ckpt.config.max_position_embeddings {
        bail!(
            "{positions} positions (--prefill-tokens + --decode-tokens) exceed the context of {}",
            ckpt.config.max_position_embeddings
        );
    }
    let opts = args.cpu.options(positions, true).map_err(anyhow::Error::msg)?;
    let flags = ModelFlags {
        exit: Some(args.exit.clone()),
        precision: args.precision,
        loops: None,
        unrolled: false,
        pipeline: PipelineFlags::default(),
        weights: crate::cli::Weights::Dense,
    };
    let graph = build(&ckpt, &flags)?;
    let ids = random_ids(args.prefill_tokens, ckpt.config.vocab_size);
    eprintln!(
        "ouroc ablate: {} ({} variants, {} rounds)",
        dir.display(),
        variants.len(),
        args.rounds
    );
    let compile = |v: &Variant| -> Result<(ouroc_compile::Compiled, f64), String> {
        let passes = ouroc_passes::pipeline_with(false, v.passes.as_deref(), &v.skip, &v.rules)?;
        let t = Instant::now();
        let c = ouroc_compile::compile_with(graph.clone(), &passes).map_err(|e| e.to_string())?;
        Ok((c, t.elapsed().as_secs_f64()))
    };
    let row_of = |label: &str, c: &ouroc_compile::Compiled, compile_s: f64| Row {
        label: label.to_string(),
        refused: None,
        stats: c
            .reports
            .last()
            .map_or_else(|| Stats::of(&c.imported), |r| r.after.clone()),
        arena_1: memplan::plan(&c.optimised, 1, 1).arena_bytes,
        arena_prefill: memplan::plan(&c.optimised, 1, args.prefill_tokens).arena_bytes,
        compile_s,
        prefill: 0.0,
        decode: 0.0,
        prefill_ratio: 1.0,
        decode_ratio: 1.0,
        same: false,
    };
    let default = Variant {
        label: "default".into(),
        passes: None,
        skip: Vec::new(),
        rules: Vec::new(),
    };
    let (c, secs) = compile(&default).map_err(anyhow::Error::msg)?;
    let mut base_row = row_of("default", &c, secs);
    eprintln!("[default] loading weights and JIT-compiling kernels...");
    let base_program = c.program.clone();
    // Every model's weights are prepared the same way, without the cache:
    // memory-mapped cached weights measured about 5% slower in prefill on
    // the 1.4B shape than freshly prepared ones, which would favour every
    // variant over the default (and one cache entry per variant's Program
    // would fill the disk with copies of the model).
    let no_cache = CacheFlags {
        no_cache: true,
        ..CacheFlags::default()
    };
    let mut base = super::prepare::cpu_forward(c.program, &ckpt, &opts, &no_cache)?;
    // Warm-up: the first call touches the weights (memory-mapped from the
    // cache, or freshly written) and the arena.
    let warm = &ids[..ids.len().min(4)];
    measure(&mut base, warm, 1)?;
    let (mut base_pre, mut base_dec) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for v in &variants {
        let (c, secs) = match compile(v) {
            Ok(x) => x,
            Err(why) => {
                eprintln!("[{}] refused: {why}", v.label);
                rows.push(Row {
                    label: v.label.clone(),
                    refused: Some(why),
                    stats: Stats::default(),
                    arena_1: 0,
                    arena_prefill: 0,
                    compile_s: 0.0,
                    prefill: 0.0,
                    decode: 0.0,
                    prefill_ratio: 0.0,
                    decode_ratio: 0.0,
                    same: false,
                });
                continue;
            }
        };
        let mut row = row_of(&v.label, &c, secs);
        if c.program == base_program {
            // Nothing to measure: the pass or rule changed nothing here.
            eprintln!("[{}] the same Program as the default", v.label);
            row.same = true;
            rows.push(row);
            continue;
        }
        eprintln!("[{}] loading weights and JIT-compiling kernels...", v.label);
        let mut model = match super::prepare::cpu_forward(c.program, &ckpt, &opts, &no_cache) {
            Ok(m) => m,
            Err(e) => {
                row.refused = Some(format!("{e:#}"));
                rows.push(row);
                continue;
            }
        };
        measure(&mut model, warm, 1)?;
        let (mut pre, mut dec, mut rp, mut rd) = (vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            // ABBA: which runs first alternates, so neither gains from
            // the order (a warm cache, a quieter second).
            let ((bp, bd), (p, d)) = if round % 2 == 0 {
                let b = measure(&mut base, &ids, args.decode_tokens)?;
                (b, measure(&mut model, &ids, args.decode_tokens)?)
            } else {
                let v = measure(&mut model, &ids, args.decode_tokens)?;
                (measure(&mut base, &ids, args.decode_tokens)?, v)
            };
            base_pre.push(bp);
            base_dec.push(bd);
            pre.push(p);
            dec.push(d);
            rp.push(p / bp);
            rd.push(d / bd.max(1e-9));
        }
        row.prefill = median(&mut pre);
        row.decode = median(&mut dec);
        row.prefill_ratio = median(&mut rp);
        row.decode_ratio = median(&mut rd);
        eprintln!(
            "[{}] prefill {:.2}x, decode {:.2}x the default",
            v.label, row.prefill_ratio, row.decode_ratio
        );
        rows.push(row);
    }
    if base_pre.is_empty() {
        for _ in 0..args.rounds {
            let (p, d) = measure(&mut base, &ids, args.decode_tokens)?;
            base_pre.push(p);
            base_dec.push(d);
        }
    }
    base_row.prefill = median(&mut base_pre);
    base_row.decode = median(&mut base_dec);
    rows.insert(0, base_row);
    print_table(args, &rows)?;
    if let Some(path) = &args.json {
        let doc = json!({
            "checkpoint": dir,
            "precision": format!("{:?}", args.precision).to_lowercase(),
            "exit": args.exit,
            "prefill_tokens": args.prefill_tokens,
            "decode_tokens": args.decode_tokens,
            "rounds": args.rounds,
            "variants": rows.iter().map(|r| json!({
                "variant": r.label,
                "refused": r.refused,
                "same_program_as_default": r.same,
                "kernels_per_token": r.stats.kernels_per_token,
                "weight_bytes_per_token": r.stats.weight_bytes_per_token,
                "activation_bytes_per_token": r.stats.activation_bytes_per_token,
                "arena_bytes_1": r.arena_1,
                "arena_bytes_prefill": r.arena_prefill,
                "compile_s": r.compile_s,
                "prefill_tokens_per_s": r.prefill,
                "decode_tokens_per_s": r.decode,
                "prefill_ratio": r.prefill_ratio,
                "decode_ratio": r.decode_ratio,
            })).collect::<Vec<_>>(),
        });
        super::output::write_file(path, (serde_json::to_string_pretty(&doc)? + "\n").as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Prefill `ids` after a reset, then decode greedily: tokens/s of each.
fn measure(m: &mut CpuForward, ids: &[u32], decode: usize) -> Result<(f64, f64)> {
    m.reset();
    let t = Instant::now();
    let mut step = m.run(ids).map_err(anyhow::Error::msg)?;
    let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let next = ouroc_runtime::sampling::argmax(&step.logits) as u32;
        step = m.run(&[next]).map_err(anyhow::Error::msg)?;
    }
    let decode = decode as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok((prefill, decode))
}

/// Each pass removed alone, then each rule.
fn default_variants() -> Vec<Variant> {
    let passes = ouroc_passes::pass_list().into_iter().map(|(p, _)| Variant {
        label: format!("--skip {p}"),
        passes: None,
        skip: vec![p.to_string()],
        rules: Vec::new(),
    });
    let rules = ouroc_passes::rule_list().into_iter().map(|(r, _)| Variant {
        label: format!("--rules -{r}"),
        passes: None,
        skip: Vec::new(),
        rules: vec![format!("-{r}")],
    });
    passes.chain(rules).collect()
}

/// `--skip a,b --rules -r; --passes x,y`: one variant per `;`.
fn parse_variants(s: &str) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let mut v = Variant {
            label: part.to_string(),
            passes: None,
            skip: Vec::new(),
            rules: Vec::new(),
        };
        let words: Vec<&str> = part.split_whitespace().collect();
        let mut i = 0;
        while i < words.len() {
            let (flag, value) = match words[i].split_once('=') {
                Some((f, val)) => (f, Some(val)),
                None => (words[i], words.get(i + 1).copied()),
            };
            let Some(value) = value else {
                bail!("variant `{part}`: {flag} needs a value");
            };
            let list = || {
                value
                    .split(',')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            };
            match flag {
                "--skip" => v.skip.extend(list()),
                "--passes" => v.passes = Some(list()),
                "--rules" => v.rules.extend(list()),
                _ => bail!("variant `{part}`: unknown flag `{flag}` (a variant takes --skip, --passes and --rules)"),
            }
            i += if words[i].contains('=') { 1 } else { 2 };
        }
        out.push(v);
    }
    if out.is_empty() {
        bail!("--variants names no variant");
    }
    Ok(out)
}

fn print_table(args: &AblateArgs, rows: &[Row]) -> Result<()> {
    outln!(
        "{} precision, exit {}, {} prefill + {} decode tokens, medians of {} alternating rounds",
        format!("{:?}", args.precision).to_lowercase(),
        args.exit,
        args.prefill_tokens,
        args.decode_tokens,
        args.rounds
    );
    outln!(
        "{:<36} {:>8} {:>14} {:>12} {:>10} {:>12} {:>10} {:>10} {:>7} {:>10} {:>7}",
        "variant",
        "kernels",
        "weight B/tok",
        "act B/tok",
        "arena 1",
        "arena pre",
        "compile ms",
        "prefill/s",
        "ratio",
        "decode/s",
        "ratio"
    );
    for r in rows {
        let costs = format!(
            "{:<36} {:>8} {:>14} {:>12} {:>10} {:>12} {:>10.1}",
            r.label,
            r.stats.kernels_per_token,
            r.stats.weight_bytes_per_token,
            r.stats.activation_bytes_per_token,
            r.arena_1,
            r.arena_prefill,
            1e3 * r.compile_s
        );
        match &r.refused {
            Some(why) => outln!("{:<36} refused: {why}", r.label),
            None if r.same => outln!("{costs}   the same Program as the default"),
            None => outln!(
                "{costs} {:>10.2} {:>6.2}x {:>10.2} {:>6.2}x",
                r.prefill,
                r.prefill_ratio,
                r.decode,
                r.decode_ratio
            ),
        }
    }
    Ok(())
}
