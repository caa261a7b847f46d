//! `ouroc eval`: a model's quality over text, in the conventions of llama.cpp's
//! `llama-perplexity` (with `--kl-divergence`). The token stream is cut into non-overlapping
//! windows of `--ctx` tokens; each window runs from an empty KV cache, one token per call (the
//! decode path, with real early exit), and the next-token predictions of its second half are
//! scored (the first half is their context): cross-entropy, and against a base run of the same
//! checkpoint (f32, `--exit last`, dense weights) the KL divergence KL(base || model) and
//! whether the two argmaxes agree.

use super::{build, open};
use crate::cli::{Backend, EvalArgs, ModelFlags, Precision};
use anyhow::{Context, Result, bail};
use ouroc_ir::{ExitPolicy, Graph};
use ouroc_models::Checkpoint;
use ouroc_runtime::Tokenizer;
use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
use ouroc_runtime::generate::{Forward, Step};
use ouroc_runtime::interp::InterpForward;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CPython 3.11.7 modules held out from the demo model's training (models/demo/README.md),
/// in the order training concatenated them.
const HELD_OUT: [&str; 11] = [
    "_markupbase.py",
    "asyncore.py",
    "configparser.py",
    "fnmatch.py",
    "imp.py",
    "numbers.py",
    "profile.py",
    "shlex.py",
    "stringprep.py",
    "trace.py",
    "zipimport.py",
];

/// `--ctx` when not given (or the model's context, if smaller).
const DEFAULT_CTX: usize = 256;

/// The shortest window with a scored position: positions ctx/2 .. ctx-2.
const MIN_CTX: usize = 3;

pub fn run(args: &EvalArgs) -> Result<()> {
    // Flags are checked before the (slow) load.
    if args.max_tokens == 0 {
        bail!("--max-tokens 0 reads no text: give a positive number of tokens");
    }
    if let Some(ctx) = args.ctx
        && ctx < MIN_CTX
    {
        bail!(
            "--ctx {ctx} leaves no position to score: a window needs at least {MIN_CTX} tokens \
             (its first half is context, positions ctx/2 to ctx-2 are scored)"
        );
    }
    let passes = args.model.pipeline(false).map_err(anyhow::Error::msg)?;
    if !args.no_base {
        ExitPolicy::parse(&args.base_exit)
            .map_err(anyhow::Error::msg)
            .context("--base-exit")?;
    }
    let cpu_opts = match args.backend {
        Backend::Cpu => Some(args.cpu.options(0, !args.no_early_exit).map_err(anyhow::Error::msg)?),
        Backend::Interp => {
            if args.cpu.threads.is_some() || args.cpu.kv != "full" {
                bail!("--threads and --kv apply to --backend cpu only");
            }
            super::refuse_quantised_interp(&args.model)?;
            None
        }
    };
    let demo = super::run::builtin_model();
    let dir = match &args.ckpt {
        Some(d) => d.clone(),
        None => {
            if !demo.join("config.json").is_file() {
                bail!(
                    "no checkpoint given and the built-in demo model is missing at {}",
                    demo.display()
                );
            }
            demo.clone()
        }
    };
    let is_demo = args.ckpt.is_none() || same_dir(&dir, &demo);
    let ckpt = open(&dir)?;
    let context = ckpt.config.max_position_embeddings;
    let ctx = match args.ctx {
        Some(n) if n > context => {
            bail!("--ctx {n} exceeds the model's context of {context} positions (max_position_embeddings)")
        }
        Some(n) => n,
        None => DEFAULT_CTX.min(context),
    };
    if ctx < MIN_CTX {
        bail!(
            "the model's context of {context} positions is too short to score: a window needs at least {MIN_CTX} tokens"
        );
    }
    if args.max_tokens < ctx {
        bail!(
            "--max-tokens {} is less than one window of --ctx {ctx} tokens: raise it or lower --ctx",
            args.max_tokens
        );
    }

    // The text.
    let text = read_text(args, &dir, is_demo, &demo)?;
    let vocab = ckpt.config.vocab_size;
    if let Some((i, bad)) = text.ids.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
        bail!("token {i} of the input is id {bad}, out of the vocabulary: ids must be below vocab_size = {vocab}");
    }
    let n = text.ids.len();
    if n < ctx {
        if n < MIN_CTX {
            bail!(
                "{} gives {n} token(s), too few to score: a window needs at least {MIN_CTX}",
                text.what
            );
        }
        bail!(
            "{} gives {n} tokens, fewer than one window of --ctx {ctx}: give more text, or --ctx {n} or less",
            text.what
        );
    }
    let windows = n / ctx;
    let first = ctx / 2;
    let per_window = ctx - 1 - first;

    // The model and its base.
    let graph = build(&ckpt, &args.model)?;
    super::check_memory("ouroc eval", &ckpt, &graph, args.model.precision, ctx)?;
    let base_flags = (!args.no_base).then(|| base_flags(&args.model, args.base_precision, &args.base_exit));
    let base_graph = match &base_flags {
        Some(f) => {
            let g = build(&ckpt, f).context("the base model")?;
            super::check_memory("ouroc eval (base model)", &ckpt, &g, f.precision, ctx)?;
            Some(g)
        }
        None => None,
    };
    let cpu_opts = cpu_opts.map(|o| CpuOptions {
        max_positions: ctx,
        ..o
    });
    let t0 = Instant::now();
    let mut model = Engine::new(&graph, &ckpt, &passes, &args.model, cpu_opts.as_ref(), args, ctx)?;
    let mut base = match &base_graph {
        Some(g) => {
            // The base is the reference: every slot of the KV cache its own.
            let opts = cpu_opts.as_ref().map(|o| CpuOptions { kv: KvMode::Full, ..*o });
            let flags = base_flags.as_ref().expect("a base graph has base flags");
            Some(Engine::new(g, &ckpt, &passes, flags, opts.as_ref(), args, ctx).context("the base model")?)
        }
        None => None,
    };
    let model_label = Label::new(&graph, &args.model);
    let base_label = base_graph
        .as_ref()
        .zip(base_flags.as_ref())
        .map(|(g, f)| Label::new(g, f));
    let engine = super::run::engine_name(cpu_opts.as_ref());
    eprintln!(
        "ouroc eval: {} ({} layers x {} loop steps), model {model_label}{}, {engine} (ready in {:.2} s)",
        dir.display(),
        ckpt.config.num_hidden_layers,
        loop_steps(&graph),
        match &base_label {
            Some(b) => format!(", base {b}"),
            None => String::new(),
        },
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "text: {}; {n} tokens read{}; {windows} window(s) of {ctx}, {per_window} positions scored in each{}",
        text.what,
        if text.truncated {
            format!(" (--max-tokens {})", args.max_tokens)
        } else {
            String::new()
        },
        match n - windows * ctx {
            0 => String::new(),
            rest => format!(" (the last {rest} tokens, less than a window, are not scored)"),
        }
    );

    let mut m = Side::new(loop_steps(&graph));
    let mut b = base_graph.as_ref().map(|g| Side::new(loop_steps(g)));
    let mut kld: Vec<f64> = Vec::with_capacity(windows * per_window);
    let mut agree = 0usize;
    let mut progress = Progress::new(windows);
    for w in 0..windows {
        let window = &text.ids[w * ctx..(w + 1) * ctx];
        // The base's log-probabilities of the scored positions, then the model's against them.
        let mut base_lp: Vec<Vec<f64>> = Vec::with_capacity(per_window);
        if let (Some(engine), Some(side)) = (base.as_mut(), b.as_mut()) {
            side.run(engine, window, first, |_, lp| {
                base_lp.push(lp);
            })
            .with_context(|| format!("the base model, window {w}"))?;
        }
        m.run(&mut model, window, first, |k, lp| {
            if let Some(blp) = base_lp.get(k) {
                kld.push(kl_divergence(blp, &lp));
                if argmax(blp) == argmax(&lp) {
                    agree += 1;
                }
            }
        })
        .with_context(|| format!("window {w}"))?;
        progress.update(w + 1, &m, &kld);
    }
    progress.finish();

    let report = Report {
        scored: m.ce.len(),
        model: m.summary(),
        base: b.as_ref().map(Side::summary),
        kld: (!kld.is_empty()).then(|| Kld::of(&mut kld)),
        agree: b.as_ref().map(|_| agree),
        ln_ratio: b.as_ref().map(|b| {
            let d: Vec<f64> = m.ce.iter().zip(&b.ce).map(|(x, y)| x - y).collect();
            mean_sem(&d)
        }),
    };
    print_report(&report, &model_label, base_label.as_ref())?;
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "checkpoint": dir.display().to_string(),
            "text": text.what,
            "files": text.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "tokens_read": n,
            "ctx": ctx,
            "windows": windows,
            "positions_scored_per_window": per_window,
            "tokens_scored": report.scored,
            "backend": format!("{:?}", args.backend).to_lowercase(),
            "early_exit": !args.no_early_exit,
            "model": report.model.json(&model_label),
            "base": match (&report.base, &base_label) {
                (Some(s), Some(l)) => s.json(l),
                _ => serde_json::Value::Null,
            },
            "kld": report.kld.as_ref().map(|k| serde_json::json!({
                "mean": k.mean,
                "mean_sem": k.sem,
                "p99": k.p99,
                "max": k.max,
            })),
            "top1_agreement": report.agree.map(|a| a as f64 / report.scored as f64),
            "top1_agreement_sem": report.agree.map(|a| proportion_sem(a, report.scored)),
            "ln_ppl_ratio": report.ln_ratio.map(|(x, _)| x),
            "ln_ppl_ratio_sem": report.ln_ratio.map(|(_, s)| s),
        });
        let bytes = serde_json::to_vec_pretty(&json).context("cannot serialise the results")?;
        super::output::write_file(path, &bytes)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The base model's flags: the model's with the precision and exit policy replaced. Every field
/// is named on purpose: a new field of `ModelFlags` (a weights format) must be decided here, and
/// the base's weights are the checkpoint's own, dense.
fn base_flags(model: &ModelFlags, precision: Precision, exit: &str) -> ModelFlags {
    ModelFlags {
        exit: Some(exit.to_string()),
        precision,
        loops: model.loops,
        unrolled: model.unrolled,
        pipeline: model.pipeline.clone(),
        weights: crate::cli::Weights::Dense,
    }
}

/// A model's precision, weights format and exit policy.
struct Label {
    precision: String,
    /// `dense`, `q8`, `q4`.
    weights: &'static str,
    exit: String,
}

impl Label {
    fn new(graph: &Graph, flags: &ModelFlags) -> Label {
        Label {
            precision: format!("{:?}", flags.precision).to_lowercase(),
            weights: flags.weights.scheme().name(),
            exit: graph.exit_control().map(|(_, p)| p.to_string()).unwrap_or_default(),
        }
    }
}

/// "f32, threshold:0.5"; "bf16 q8, last" with quantised weights.
impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.weights {
            "dense" => write!(f, "{}, {}", self.precision, self.exit),
            w => write!(f, "{} {w}, {}", self.precision, self.exit),
        }
    }
}

fn loop_steps(g: &Graph) -> usize {
    g.exit_control().map_or(1, |(steps, _)| steps)
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The token stream to score.
struct Text {
    ids: Vec<u32>,
    /// Where it came from, for messages.
    what: String,
    /// The files read (up to --max-tokens).
    files: Vec<PathBuf>,
    /// --max-tokens cut it.
    truncated: bool,
}

fn read_text(args: &EvalArgs, dir: &Path, is_demo: bool, demo: &Path) -> Result<Text> {
    if !args.ids_file.is_empty() {
        return read_ids(&args.ids_file, args.max_tokens);
    }
    let (files, what) = if !args.file.is_empty() {
        let what = match args.file.as_slice() {
            [one] => format!("--file {}", one.display()),
            many => format!("{} files (--file)", many.len()),
        };
        (args.file.clone(), what)
    } else if is_demo {
        demo_files(demo)?
    } else {
        bail!(
            "no text to score: give --file PATH (text, tokenised with the checkpoint's tokenizer) or \
             --ids-file PATH (token ids); only the built-in demo model has default text"
        );
    };
    // Every file is read (and checked) before any is tokenised.
    let texts = files
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(p).with_context(|| format!("cannot read the text file {}", p.display()))?;
            if s.is_empty() {
                bail!("the text file {} is empty", p.display());
            }
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let tok = Tokenizer::load(dir)
        .context("ouroc eval tokenises --file with the checkpoint's tokenizer (--ids-file takes token ids)")?;
    let eot = tok.token_to_id("<|endoftext|>");
    let mut ids = vec![];
    let mut read = vec![];
    for (p, s) in files.iter().zip(&texts) {
        if ids.len() >= args.max_tokens {
            break;
        }
        ids.extend(
            tok.encode(s)
                .map_err(anyhow::Error::msg)
                .with_context(|| p.display().to_string())?,
        );
        ids.extend(eot);
        read.push(p.clone());
    }
    let truncated = ids.len() > args.max_tokens || read.len() < files.len();
    ids.truncate(args.max_tokens);
    let what = if read.len() < files.len() {
        format!("{what}, the first {} of them read", read.len())
    } else {
        what
    };
    Ok(Text {
        ids,
        what,
        files: read,
        truncated,
    })
}

/// Token ids from files of ids separated by whitespace or commas.
fn read_ids(paths: &[PathBuf], max_tokens: usize) -> Result<Text> {
    let mut ids = vec![];
    for p in paths {
        let s = std::fs::read_to_string(p).with_context(|| format!("cannot read the ids file {}", p.display()))?;
        let before = ids.len();
        for item in s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let id = item
                .parse::<u32>()
                .with_context(|| format!("{}: `{item}` is not a token id (a non-negative integer)", p.display()))?;
            ids.push(id);
        }
        if ids.len() == before {
            bail!("the ids file {} holds no token ids", p.display());
        }
    }
    let truncated = ids.len() > max_tokens;
    ids.truncate(max_tokens);
    let what = match paths {
        [one] => format!("--ids-file {}", one.display()),
        many => format!("{} files (--ids-file)", many.len()),
    };
    Ok(Text {
        ids,
        what,
        files: paths.to_vec(),
        truncated,
    })
}

/// The demo model's held-out files: the copy shipped in models/demo/heldout, else the local
/// Python's standard library.
fn demo_files(demo: &Path) -> Result<(Vec<PathBuf>, String)> {
    let shipped = demo.join("heldout");
    let in_dir = |d: &Path| -> Vec<PathBuf> { HELD_OUT.iter().map(|f| d.join(f)).filter(|p| p.is_file()).collect() };
    let files = in_dir(&shipped);
    if files.len() == HELD_OUT.len() {
        let what = format!(
            "the demo model's {} held-out files (CPython 3.11.7) in {}",
            files.len(),
            shipped.display()
        );
        return Ok((files, what));
    }
    eprintln!(
        "note: the held-out files are not all in {}; looking for them in the local Python's standard library",
        shipped.display()
    );
    let mut tried = vec![];
    for d in python_stdlib_dirs() {
        let files = in_dir(&d);
        if files.is_empty() {
            tried.push(d.display().to_string());
            continue;
        }
        if files.len() < HELD_OUT.len() {
            let missing: Vec<&str> = HELD_OUT.iter().copied().filter(|f| !d.join(f).is_file()).collect();
            eprintln!(
                "warning: {} lacks {} (another Python version?): scoring the other {}; the numbers are not \
                 comparable with the full set",
                d.display(),
                missing.join(", "),
                files.len()
            );
        }
        let what = format!(
            "{} of the demo model's held-out files from the local Python's standard library {}",
            files.len(),
            d.display()
        );
        return Ok((files, what));
    }
    bail!(
        "the demo model's held-out files ({}) are neither in {} nor in a local Python standard library{}: \
         give the text to score with --file PATH",
        HELD_OUT.join(" "),
        shipped.display(),
        if tried.is_empty() {
            String::new()
        } else {
            format!(" (looked in {})", tried.join(", "))
        }
    )
}

/// The standard library directories to look in: what python3 says
/// (`sysconfig.get_paths()["stdlib"]`), then the usual places of Python 3.11.
fn python_stdlib_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    let asked = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(o) = asked
        && o.status.success()
    {
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !s.is_empty() {
            dirs.push(PathBuf::from(s));
        }
    }
    for d in ["/usr/lib/python3.11", "/usr/local/lib/python3.11"] {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// A model run on one backend, reset per window.
enum Engine<'g> {
    Cpu(Box<CpuForward>),
    Interp(InterpForward<'g>),
}

impl<'g> Engine<'g> {
    fn new(
        graph: &'g Graph,
        ckpt: &Checkpoint,
        passes: &ouroc_passes::PassManager,
        flags: &ModelFlags,
        cpu: Option<&CpuOptions>,
        args: &EvalArgs,
        ctx: usize,
    ) -> Result<Engine<'g>> {
        Ok(match cpu {
            Some(opts) => {
                let program = super::lower(graph.clone(), passes, flags)?;
                Engine::Cpu(Box::new(super::prepare::cpu_forward(
                    program,
                    ckpt,
                    opts,
                    &args.cpu.cache,
                )?))
            }
            None => {
                Engine::Interp(InterpForward::new(graph, ckpt, ctx, !args.no_early_exit).map_err(anyhow::Error::msg)?)
            }
        })
    }

    fn reset(&mut self) {
        match self {
            Engine::Cpu(m) => m.reset(),
            Engine::Interp(m) => m.reset(),
        }
    }

    fn forward(&mut self, id: u32) -> Result<Step> {
        match self {
            Engine::Cpu(m) => m.run(&[id]),
            Engine::Interp(m) => m.forward(&[id]),
        }
        .map_err(anyhow::Error::msg)
    }
}

/// One model's numbers over the scored positions.
struct Side {
    /// Cross-entropy of each scored position (nats).
    ce: Vec<f64>,
    /// `depth_hist[d-1]`: scored positions whose logits came from exit depth d.
    depth_hist: Vec<usize>,
    /// Time in the model's forward calls, and the tokens they ran.
    time: Duration,
    fed: usize,
}

impl Side {
    fn new(steps: usize) -> Side {
        Side {
            ce: vec![],
            depth_hist: vec![0; steps],
            time: Duration::ZERO,
            fed: 0,
        }
    }

    /// Feeds `window` one token per call from an empty cache and scores positions
    /// `first..len-1`: their cross-entropy against the next token, and `each(k, log_probs)` for
    /// the k-th scored position.
    fn run(
        &mut self,
        engine: &mut Engine,
        window: &[u32],
        first: usize,
        mut each: impl FnMut(usize, Vec<f64>),
    ) -> Result<()> {
        engine.reset();
        for (j, &id) in window[..window.len() - 1].iter().enumerate() {
            let t = Instant::now();
            let step = engine.forward(id)?;
            self.time += t.elapsed();
            self.fed += 1;
            if j < first {
                continue;
            }
            let lp = log_softmax(&step.logits);
            let next = window[j + 1] as usize;
            let Some(&p) = lp.get(next) else {
                bail!("the model returned {} logits, token {next} needs more", lp.len());
            };
            self.ce.push(-p);
            if self.depth_hist.len() < step.depth {
                self.depth_hist.resize(step.depth, 0);
            }
            self.depth_hist[step.depth.max(1) - 1] += 1;
            each(j - first, lp);
        }
        Ok(())
    }

    fn summary(&self) -> Summary {
        let (ce, ce_sem) = mean_sem(&self.ce);
        let n: usize = self.depth_hist.iter().sum();
        let depth = self
            .depth_hist
            .iter()
            .enumerate()
            .map(|(d, &k)| (d + 1) as f64 * k as f64)
            .sum::<f64>()
            / n.max(1) as f64;
        Summary {
            ce,
            ce_sem,
            depth,
            steps: self.depth_hist.len(),
            depth_hist: self.depth_hist.clone(),
            tokens_per_s: self.fed as f64 / self.time.as_secs_f64().max(1e-9),
        }
    }
}

struct Summary {
    ce: f64,
    ce_sem: f64,
    depth: f64,
    steps: usize,
    depth_hist: Vec<usize>,
    tokens_per_s: f64,
}

impl Summary {
    fn ppl(&self) -> f64 {
        self.ce.exp()
    }

    /// ± of the perplexity as llama-perplexity gives it: the standard error of the mean CE,
    /// carried through exp (ppl * SEM).
    fn ppl_sem(&self) -> f64 {
        self.ppl() * self.ce_sem
    }

    fn json(&self, label: &Label) -> serde_json::Value {
        serde_json::json!({
            "model": label.to_string(),
            "precision": label.precision,
            "weights": label.weights,
            "exit": label.exit,
            "perplexity": self.ppl(),
            "perplexity_sem": self.ppl_sem(),
            "mean_ce": self.ce,
            "mean_ce_sem": self.ce_sem,
            "mean_exit_depth": self.depth,
            "loop_steps": self.steps,
            "depth_histogram": self.depth_hist,
            "tokens_per_s": self.tokens_per_s,
        })
    }
}

/// KL divergence statistics over the scored positions.
struct Kld {
    mean: f64,
    sem: f64,
    p99: f64,
    max: f64,
}

impl Kld {
    /// (Sorts `v`.)
    fn of(v: &mut [f64]) -> Kld {
        let (mean, sem) = mean_sem(v);
        v.sort_by(f64::total_cmp);
        Kld {
            mean,
            sem,
            p99: percentile(v, 0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

struct Report {
    scored: usize,
    model: Summary,
    base: Option<Summary>,
    kld: Option<Kld>,
    /// Scored positions whose argmax agrees with the base's.
    agree: Option<usize>,
    /// Mean and SEM of CE(model) - CE(base) = ln(PPL(model) / PPL(base)).
    ln_ratio: Option<(f64, f64)>,
}

fn print_report(r: &Report, model_label: &Label, base_label: Option<&Label>) -> Result<()> {
    let cols = |name: &str, m: String, b: Option<String>| -> String {
        match b {
            Some(b) => format!("{name:<22} {m:<26} {b}"),
            None => format!("{name:<22} {m}"),
        }
    };
    let base = r.base.as_ref();
    outln!("{} positions scored", r.scored);
    outln!("{}", cols("", "model".into(), base_label.map(|_| "base".to_string())));
    outln!(
        "{}",
        cols(
            "precision, exit",
            model_label.to_string(),
            base_label.map(Label::to_string)
        )
    );
    outln!(
        "{}",
        cols(
            "perplexity",
            format!("{:.4} ± {:.4}", r.model.ppl(), r.model.ppl_sem()),
            base.map(|s| format!("{:.4} ± {:.4}", s.ppl(), s.ppl_sem()))
        )
    );
    outln!(
        "{}",
        cols(
            "mean CE (nats)",
            format!("{:.5} ± {:.5}", r.model.ce, r.model.ce_sem),
            base.map(|s| format!("{:.5} ± {:.5}", s.ce, s.ce_sem))
        )
    );
    outln!(
        "{}",
        cols(
            "mean exit depth",
            format!("{:.3} of {}", r.model.depth, r.model.steps),
            base.map(|s| format!("{:.3} of {}", s.depth, s.steps))
        )
    );
    outln!(
        "{}",
        cols(
            "tokens/s",
            format!("{:.1}", r.model.tokens_per_s),
            base.map(|s| format!("{:.1}", s.tokens_per_s))
        )
    );
    if let Some((x, s)) = r.ln_ratio {
        outln!("{:<22} {x:.5} ± {s:.5}", "ln(PPL / PPL base)");
    }
    if let Some(k) = &r.kld {
        outln!(
            "{:<22} mean {:.6} ± {:.6}, 99th percentile {:.6}, max {:.6}",
            "KLD (base || model)",
            k.mean,
            k.sem,
            k.p99,
            k.max
        );
    }
    if let Some(a) = r.agree {
        outln!(
            "{:<22} {:.3} % ± {:.3} % ({a} of {})",
            "top-1 agreement",
            100.0 * a as f64 / r.scored.max(1) as f64,
            100.0 * proportion_sem(a, r.scored),
            r.scored
        );
    }
    Ok(())
}

/// Progress on stderr: one line rewritten on a terminal, else about ten lines.
struct Progress {
    total: usize,
    tty: bool,
    start: Instant,
    every: usize,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            every: total.div_ceil(10).max(1),
        }
    }

    fn update(&mut self, done: usize, m: &Side, kld: &[f64]) {
        if !self.tty && !done.is_multiple_of(self.every) && done != self.total {
            return;
        }
        let s = self.start.elapsed().as_secs_f64();
        let eta = s * (self.total - done) as f64 / done as f64;
        let (ce, _) = mean_sem(&m.ce);
        let kld = if kld.is_empty() {
            String::new()
        } else {
            format!(", mean KLD {:.5}", kld.iter().sum::<f64>() / kld.len() as f64)
        };
        let line = format!(
            "window {done}/{}: perplexity {:.3}{kld}, {s:.0} s, about {eta:.0} s left",
            self.total,
            ce.exp()
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// log softmax of `logits` in f64, stably (the maximum subtracted first).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

/// KL(p || q) = sum_i p_i (log p_i - log q_i), from log-probabilities.
fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            if lp == f64::NEG_INFINITY {
                0.0
            } else {
                lp.exp() * (lp - lq)
            }
        })
        .sum()
}

/// The first index of the largest value.
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The mean and its standard error, sqrt(sample variance / n) (NaN for fewer than 2 values).
fn mean_sem(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Standard error of a proportion `k` of `n`, sqrt(p (1 - p) / (n - 1)), as llama-perplexity
/// gives it.
fn proportion_sem(k: usize, n: usize) -> f64 {
    if n < 2 {
        return f64::NAN;
    }
    let p = k as f64 / n as f64;
    (p * (1.0 - p) / (n - 1) as f64).sqrt()
}

/// The `q` quantile of sorted `v`, linearly interpolated between ranks.
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_stable_and_normalised() {
        let lp = log_softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
        assert!((lp[0] - (0.5f64).ln()).abs() < 1e-12 && (lp[1] - lp[0]).abs() == 0.0);
        assert_eq!(lp[2], f64::NEG_INFINITY);
        let lp = log_softmax(&[0.0, 1.0, 2.0]);
        let z = 1.0 + 1f64.exp() + 2f64.exp();
        assert!((lp[2] - (2.0 - z.ln())).abs() < 1e-12);
    }

    #[test]
    fn kl_divergence_of_known_distributions() {
        let p = [0.5f64.ln(), 0.5f64.ln()];
        let q = [0.25f64.ln(), 0.75f64.ln()];
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-15);
        assert_eq!(kl_divergence(&p, &p), 0.0);
        // A zero-probability token of p adds nothing, even where q gives it none either.
        assert_eq!(kl_divergence(&[0.0, f64::NEG_INFINITY], &[0.0, f64::NEG_INFINITY]), 0.0);
    }

    #[test]
    fn statistics() {
        let (m, s) = mean_sem(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-15);
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[0.0, 10.0], 0.99), 9.9);
        assert!((proportion_sem(3, 4) - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-15);
    }
}
