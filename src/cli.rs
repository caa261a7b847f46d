//! Flags and subcommands (clap derive). Help text explains each flag.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "ouroc",
    version,
    about = "Ahead-of-time compiler for looped language models (Ouro)",
    long_about = "ouroc turns an Ouro checkpoint directory (config.json + safetensors + tokenizer.json) \
into an IR in which the loop over the shared layer stack and its early exit are explicit, optimises it, \
and runs it.\n\n\
A CKPT argument is a checkpoint directory in the Hugging Face layout; tests/fixtures/ holds small ones, \
and `ouroc run --prompt \"def \"` without a CKPT uses the built-in demo model (models/demo)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a checkpoint's architecture, sizes, loop and exit settings, and warnings
    Inspect {
        /// Checkpoint directory
        ckpt: PathBuf,
    },
    /// Print generated code
    Emit {
        #[command(subcommand)]
        what: Emit,
    },
    /// Run the model on token ids (reference interpreter, or --backend cpu / ptx-emu / cuda)
    /// and write logits, per-step hidden states, exit gate values and exit steps (the research
    /// interface)
    Logits(LogitsArgs),
    /// Run the optimisation pipeline (e-graph rewrites, fusion, loop passes,
    /// re-rolling, CSE/DCE) and report what it did and the memory plan
    Compile(CompileArgs),
    /// Generate text from a prompt, streaming it, then print speed and the
    /// distribution of exit depths (how many loop steps each token used)
    Run(RunArgs),
    /// Measure prefill and decode speed on the compiled CPU path (median of several runs),
    /// per precision, with the weight bytes a decode token reads against the machine's
    /// measured read bandwidth
    Bench(BenchArgs),
    /// Ablation of the optimisation pipeline: the default pipeline and each variant with one
    /// pass or one rewrite rule removed (or the variants given), compiled and measured in
    /// alternating rounds: kernel launches, weight and activation bytes per token, activation
    /// arena, compile time, prefill and decode tokens/s and their ratio to the default
    Ablate(AblateArgs),
    /// Compile a checkpoint ahead of time into an executable that needs neither ouroc nor a
    /// compiler: the kernels' machine code (linked by the system linker), the Program,
    /// tokenizer and chat template, and its weights beside it (APP.weights) or embedded
    Build(BuildArgs),
    /// Measure quality over text, as llama.cpp's llama-perplexity does: perplexity over
    /// non-overlapping windows (the second half of each scored, the first half its context),
    /// and against a base run of the same checkpoint (f32, every loop step) the KL divergence,
    /// its 99th percentile and maximum, and top-1 agreement; with the mean exit depth and
    /// tokens/s. Each window is fed one token at a time (the decode path, real early exit)
    Eval(EvalArgs),
    /// Serve the model over HTTP in OpenAI's API (chat and text completions, streaming, model
    /// list, health, Prometheus metrics), every request batched into one engine with continuous,
    /// cross-depth batching; SIGTERM or Ctrl-C stop admitting and let running requests finish
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory (default: the built-in demo model in models/demo)
    pub ckpt: Option<PathBuf>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the start-up line names it)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model name clients give as `model` and /v1/models lists (default: the checkpoint
    /// directory's name)
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Sequences prefilled or decoded at once (each holds a KV cache for the whole context)
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_seqs: usize,
    /// Requests waiting for a sequence beyond those; more are answered 503 with Retry-After
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// How tokens in the loop share its batched calls: cross-depth (a sequence whose token
    /// exited starts its next one at the next loop step) or step (new tokens start only when
    /// every token in the loop has exited)
    #[arg(long, default_value = "cross-depth", value_name = "MODE")]
    pub batching: String,
    /// Seconds running requests get to finish after SIGTERM or Ctrl-C
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub shutdown_grace: f64,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Run every loop step even after a token's exit (by default a token stops at the step its
    /// exit policy chooses)
    #[arg(long)]
    pub no_early_exit: bool,
    #[command(flatten)]
    pub cpu: CpuFlags,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory
    #[arg(required_unless_present = "shape", conflicts_with = "shape")]
    pub ckpt: Option<PathBuf>,
    /// Benchmark random bf16 weights of a named shape instead (1.4b, 2.6b, small); they are
    /// written once as a checkpoint directory (see --weights-dir) and reused
    #[arg(long, value_name = "NAME")]
    pub shape: Option<String>,
    /// Where --shape's random checkpoint lives (default: <temp dir>/ouroc-shapes/NAME)
    #[arg(long, value_name = "DIR", requires = "shape")]
    pub weights_dir: Option<PathBuf>,
    /// Precisions to measure, in order (repeat the flag or separate with commas)
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Precision::Bf16, Precision::F32])]
    pub precision: Vec<Precision>,
    /// Linear weights of every precision measured: dense, q8 (q8_0) or q4 (q4_0, q8_0 LM head)
    #[arg(long, value_enum, default_value_t = Weights::Dense)]
    pub weights: Weights,
    /// Prompt length of the prefill measurement (random token ids)
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub prefill_tokens: usize,
    /// Tokens decoded (greedily, one at a time) after the prefill
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub decode_tokens: usize,
    /// Runs per precision; the median is reported
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub runs: usize,
    /// Exit policy (as for `run`); default `last`, every loop step, as PyTorch runs them
    #[arg(long = "exit", value_name = "POLICY", default_value = "last")]
    pub exit: String,
    /// Number of loop steps R (default: the config's total_ut_steps)
    #[arg(long, value_name = "R", value_parser = ouroc_models::limits::parse_loops_flag)]
    pub loops: Option<usize>,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    /// Measure the server's engine instead: this many concurrent greedy streams (e.g.
    /// 1,2,4,8,16), each prompt --prefill-tokens long generating --decode-tokens, batched as
    /// --batching says; reports aggregate decode tokens/s, time to first token and inter-token
    /// latency percentiles (no HTTP: the engine in process)
    #[arg(long, value_delimiter = ',', value_name = "N,N")]
    pub streams: Vec<usize>,
    /// With --streams: the batchings to compare in alternating rounds: cross-depth (a sequence
    /// starts its next token as soon as its last one exited) and step (new tokens start only
    /// when every token in the loop has finished)
    #[arg(long, value_delimiter = ',', value_name = "MODE", default_value = "cross-depth,step", value_parser = parse_batching, requires = "streams")]
    pub batching: Vec<ouroc_serve::engine::Batching>,
    #[command(flatten)]
    pub pipeline: PipelineFlags,
    #[command(flatten)]
    pub cpu: CpuFlags,
    #[command(flatten)]
    pub spec: SpecFlags,
}

fn parse_batching(s: &str) -> Result<ouroc_serve::engine::Batching, String> {
    ouroc_serve::engine::Batching::parse(s)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Checkpoint directory (default: the built-in demo model in models/demo)
    pub ckpt: Option<PathBuf>,
    /// The prompt text
    #[arg(long, required = true)]
    pub prompt: String,
    /// Wrap the prompt in the checkpoint's chat template (tokenizer_config.json's chat_template,
    /// rendered as transformers' apply_chat_template does; ChatML when there is none) and stop
    /// at <|im_end|> too
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 0.7, value_name = "T", allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off)
    #[arg(long, default_value_t = 0.9, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off)
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Penalise tokens already in the context (1 = off)
    #[arg(long, default_value_t = 1.1, value_name = "X")]
    pub repetition_penalty: f32,
    /// Random seed for sampling (the same seed gives the same text)
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Run every loop step even after a token's exit (as the reference does);
    /// by default a decoded token stops at the step its exit policy chooses
    #[arg(long)]
    pub no_early_exit: bool,
    /// Engine: cpu (the optimised graph lowered to a Program and run on Cranelift
    /// JIT-compiled kernels) or interp (the reference interpreter, slow, for checking)
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    #[command(flatten)]
    pub cpu: CpuFlags,
    #[command(flatten)]
    pub spec: SpecFlags,
    /// Where the optimised Program runs: cpu, or cuda (its PTX on an NVIDIA GPU through the
    /// CUDA driver; needs a build with `--features cuda` and a GPU of compute capability 8.0+)
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// Tokens `ouroc eval` reads by default (`--max-tokens`).
pub const EVAL_MAX_TOKENS: usize = 8192;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (default: the built-in demo model in models/demo)
    pub ckpt: Option<PathBuf>,
    /// Text to score, tokenised with the checkpoint's tokenizer, each file followed by
    /// <|endoftext|> when the vocabulary has it, the files concatenated in the order given
    /// (repeat the flag for several). Default on the demo model: the 11 CPython 3.11.7 files
    /// held out from its training, from models/demo/heldout, or, when that copy is missing,
    /// from the local python3's standard library; other checkpoints need --file or --ids-file
    #[arg(long, value_name = "PATH")]
    pub file: Vec<PathBuf>,
    /// Token ids to score instead of text: files of ids separated by whitespace or commas,
    /// taken as they are (for checkpoints without tokenizer.json; repeat for several)
    #[arg(long, value_name = "PATH", conflicts_with = "file")]
    pub ids_file: Vec<PathBuf>,
    /// Window length in tokens: the token stream is cut into non-overlapping windows of N
    /// (a shorter rest is dropped), each run from an empty KV cache; in each, the
    /// next-token predictions of positions N/2 to N-2 are scored. At least 3, at most the
    /// model's context [default: 256, or the context if smaller]
    #[arg(long, value_name = "N")]
    pub ctx: Option<usize>,
    /// Most tokens to read from the text (a bound on the run time: the default scores the
    /// demo model and its base in 15 to 60 s on 2 cores in a release build)
    #[arg(long, value_name = "N", default_value_t = EVAL_MAX_TOKENS)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Do not run the base model (no KL divergence or top-1 agreement; twice as fast)
    #[arg(long)]
    pub no_base: bool,
    /// The base model's precision (it shares the checkpoint, --loops, --unrolled, the pipeline
    /// flags, the backend and the threads; its KV cache is always full, its weights dense)
    #[arg(long, value_enum, default_value_t = Precision::F32, conflicts_with = "no_base")]
    pub base_precision: Precision,
    /// The base model's exit policy
    #[arg(long, value_name = "POLICY", default_value = "last", conflicts_with = "no_base")]
    pub base_exit: String,
    /// Run every loop step even after a token's exit (by default a token stops at the step its
    /// exit policy chooses, as in `run`)
    #[arg(long)]
    pub no_early_exit: bool,
    /// Engine: cpu (the optimised graph on Cranelift JIT-compiled kernels) or interp (the
    /// reference interpreter, slow)
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    #[command(flatten)]
    pub cpu: CpuFlags,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Checkpoint directory
    pub ckpt: PathBuf,
    /// The executable to write (its weights go to APP.weights unless --embed-weights)
    #[arg(short = 'o', long = "output", value_name = "APP", required = true)]
    pub output: PathBuf,
    /// Target: cpu, a100 (the PTX embedded; the executable refuses a machine without a CUDA
    /// driver) or cpu+a100
    #[arg(long, value_name = "TARGET", default_value = "cpu")]
    pub target: String,
    /// CPU features the kernels may use: native (this machine's), x86-64-v2, x86-64-v3 or
    /// x86-64-v4; the executable refuses a CPU without them
    #[arg(long, value_name = "LEVEL", default_value = "native")]
    pub cpu_features: String,
    #[command(flatten)]
    pub model: ModelFlags,
    /// The executable's default KV-cache mode (full, last, mean; --kv overrides it at run time)
    #[arg(long, value_name = "MODE", default_value = "full")]
    pub kv: String,
    /// Link the weights into the executable instead of writing APP.weights
    #[arg(long)]
    pub embed_weights: bool,
    /// The app runtime static library (default: $OUROC_APP_LIB, else app/release/libouroc_app.a
    /// beside this ouroc's target/<profile>/ or in $OUROC_APP_TARGET_DIR, built there by cargo
    /// from this ouroc's workspace when missing or older than its sources)
    #[arg(long, value_name = "FILE")]
    pub app_lib: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AblateArgs {
    /// Checkpoint directory
    #[arg(required_unless_present = "shape", conflicts_with = "shape")]
    pub ckpt: Option<PathBuf>,
    /// Random bf16 weights of a named shape instead (1.4b, 2.6b, small), as for `bench`
    #[arg(long, value_name = "NAME")]
    pub shape: Option<String>,
    /// The variants, separated by `;`, each a set of flags as `run` takes them: `--skip A,B`,
    /// `--passes A,B`, `--rules -R` (default: each pass, then each rule, removed alone)
    #[arg(long, value_name = "FLAGS;FLAGS", allow_hyphen_values = true)]
    pub variants: Option<String>,
    /// Model precision
    #[arg(long, value_enum, default_value_t = Precision::Bf16)]
    pub precision: Precision,
    /// Exit policy (default `last`: every loop step)
    #[arg(long = "exit", value_name = "POLICY", default_value = "last")]
    pub exit: String,
    /// Prompt length of the prefill measurement (random token ids)
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub prefill_tokens: usize,
    /// Tokens decoded greedily after the prefill
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub decode_tokens: usize,
    /// Rounds; each measures the default and the variant one after the other
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: usize,
    /// Also write the table as JSON to this file
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub cpu: CpuFlags,
}

/// Self-speculative decoding (docs/speculative.md).
#[derive(Args, Debug, Clone, Default)]
pub struct SpecFlags {
    /// Self-speculative decoding: positions per round, drafted by the first --draft-steps loop
    /// steps and verified by the rest in one pass: a count from 2 to 8, off, or auto (adapts
    /// the count to the measured acceptance and turns speculation off while it does not pay).
    /// Greedy output is the same token for token; sampled output has the same distribution
    /// but another text for a seed, so auto speculates only when greedy (--temperature 0)
    /// [default: auto for run, off for bench]
    #[arg(long, value_name = "K")]
    pub draft_tokens: Option<String>,
    /// Loop steps of a draft, from 1 to R-1 [default: R/2]
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    pub draft_steps: Option<usize>,
}

impl SpecFlags {
    /// The options, `default` when --draft-tokens is not given; `greedy`:
    /// temperature 0.
    pub fn options(
        &self,
        default: ouroc_runtime::speculate::DraftTokens,
        greedy: bool,
    ) -> Result<ouroc_runtime::speculate::SpecOptions, String> {
        ouroc_runtime::speculate::SpecOptions::from_flags(
            self.draft_tokens.as_deref(),
            self.draft_steps,
            default,
            greedy,
        )
    }
}

/// How the compiled CPU engine runs.
#[derive(Args, Debug, Clone)]
pub struct CpuFlags {
    /// Threads for the compiled kernels (default: all cores); each matrix-vector product is
    /// split over them by output rows
    #[arg(long, value_name = "N", value_parser = ouroc_runtime::threads::parse_threads_flag)]
    pub threads: Option<u16>,
    /// KV cache in decode: full (one cache per loop step and layer, as trained), last (every
    /// step reads and writes one shared cache per layer, seeded from the last step's), mean
    /// (one shared cache seeded with the mean of the steps' caches); last and mean use 1/R of
    /// the decode KV memory. Prefill always fills every step's cache
    #[arg(long, value_name = "MODE", default_value = "full")]
    pub kv: String,
    /// Matrix products (Linear) and attention: auto runs them on the runtime's AVX-512 / AVX2
    /// microkernels where this CPU has them (much faster for prompts and long contexts),
    /// cranelift always on the generated Cranelift kernels
    #[arg(long, value_enum, default_value_t = LinearImpl::Auto)]
    pub linear: LinearImpl,
    #[command(flatten)]
    pub cache: CacheFlags,
}

/// Where the compiled CPU engine's prepared weights are cached between runs.
#[derive(Args, Debug, Clone, Default)]
pub struct CacheFlags {
    /// Keep the prepared weights of a checkpoint + options here and memory-map them on the next
    /// start (default: $OUROC_CACHE_DIR, else $XDG_CACHE_HOME/ouroc, else ~/.cache/ouroc); only
    /// models of at least $OUROC_CACHE_MIN_BYTES (default 64 MiB) of weights are cached
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Prepare the weights from the checkpoint and neither read nor write the cache
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearImpl {
    Auto,
    Cranelift,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Cranelift JIT-compiled kernels of the optimised graph
    Cpu,
    /// The reference interpreter on the imported graph
    Interp,
}

#[derive(Subcommand, Debug)]
pub enum Emit {
    /// The IR text of the model (the rolled loop with its exit policy), as
    /// imported or after any pass of the optimisation pipeline
    Ir {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        model: ModelFlags,
        /// Print the IR after this pass of the pipeline (see `ouroc compile --stats` for the list);
        /// without it, the imported IR
        #[arg(long, value_name = "PASS")]
        after: Option<String>,
    },
    /// The Program the optimised model lowers to: its kernels in launch order with their specs
    /// (a quantised Linear shows `weight = q4_0 (from bf16)`), the loop, the weight table with
    /// its load-time recipes and the encodings the kernels read, the activation arena and the
    /// KV slots
    Program {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        model: ModelFlags,
    },
    /// The Cranelift IR (CLIF) of the CPU kernels of the optimised model, before
    /// Cranelift's own optimisations, one function per distinct kernel
    Clif {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        model: ModelFlags,
        /// Print only this kernel (a name such as `l0.qkv`, `step_end`, `lm_head`;
        /// `ouroc emit clif CKPT` lists them all)
        #[arg(long, value_name = "NAME")]
        kernel: Option<String>,
    },
    /// The model as an MLIR module (func, scf, linalg, tensor, arith, math), verified by MLIR:
    /// weights as function arguments, the loop as scf.for (scf.while under a threshold policy),
    /// prefill from an empty KV cache. Needs a build with `--features mlir` (LLVM/MLIR 19)
    Mlir {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        model: ModelFlags,
        /// Export the IR after this pass of the pipeline (`--after dce`, the last pass: fully
        /// optimised, with the fused ops); without it, the imported IR
        #[arg(long, value_name = "PASS")]
        after: Option<String>,
        /// Print each op's location: the IR op it comes from (`loc("%50 = add_rms_norm")`)
        #[arg(long)]
        locations: bool,
    },
    /// The PTX (ISA 8.0, sm_80 / A100) of the optimised model: one module with an entry per
    /// distinct kernel and variant, preceded by each kernel's launch records (when each entry
    /// runs, grid, block, shared memory) as comments
    Ptx {
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        model: ModelFlags,
        /// Print only this kernel, as a module of its own (a name such as `l0.qkv`)
        #[arg(long, value_name = "NAME")]
        kernel: Option<String>,
    },
}

/// Where the model comes from: a checkpoint, or a named shape without weights.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Checkpoint directory
    #[arg(required_unless_present = "shape")]
    pub ckpt: Option<PathBuf>,
    /// A named shape instead of a checkpoint (no weights needed): 1.4b, 2.6b, small
    #[arg(long, value_name = "NAME", conflicts_with = "ckpt")]
    pub shape: Option<String>,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Checkpoint directory
    #[arg(required_unless_present_any = ["shape", "list"])]
    pub ckpt: Option<PathBuf>,
    /// A named shape instead of a checkpoint (no weights needed): 1.4b, 2.6b, small
    #[arg(long, value_name = "NAME", conflicts_with = "ckpt")]
    pub shape: Option<String>,
    /// List the optimisation pipeline's passes, in order, with what each does (the names
    /// --passes and --skip take), and exit
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Print per-pass statistics: ops, ops in the loop, kernels launched per token,
    /// weight and activation bytes moved per token; and the activation memory plan of the
    /// optimised graph (an analysis, not a pass: the one lowering uses)
    #[arg(long)]
    pub stats: bool,
}

/// Flags that choose the graph built from a checkpoint.
#[derive(Args, Debug, Clone)]
pub struct ModelFlags {
    /// Exit policy: last | step:K (0-based) | threshold:Q (f32 sum) | threshold:Q:bf16
    /// (bf16 sum, as the reference code) | weighted (expected logits over the exit distribution).
    /// Default: the reference's, threshold at the config's early_exit_threshold with the
    /// precision's arithmetic (threshold:1.0:bf16 for bf16, threshold:1.0 for f32)
    #[arg(long = "exit", value_name = "POLICY")]
    pub exit: Option<String>,
    /// Model precision: f32 (exact reference) or bf16 (rounds where the bf16 reference rounds)
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Linear weights: dense (the precision's dtype), q8 (q8_0: 8-bit blocks of 32 with an
    /// f16 scale, 8.5 bits per weight) or q4 (q4_0 layers, 4.5 bits, with a q8_0 LM head);
    /// embeddings, norms and the exit gate stay dense. CPU and CUDA backends (not the interpreter)
    #[arg(long, value_enum, default_value_t = Weights::Dense)]
    pub weights: Weights,
    /// Number of loop steps R (default: the config's total_ut_steps)
    #[arg(long, value_name = "R", value_parser = ouroc_models::limits::parse_loops_flag)]
    pub loops: Option<usize>,
    /// Import R explicit copies of the layer stack, as a tracer would (the `reroll`
    /// pass recovers the loop)
    #[arg(long)]
    pub unrolled: bool,
    #[command(flatten)]
    pub pipeline: PipelineFlags,
}

/// The optimisation pipeline's passes and rewrite rules.
#[derive(Args, Debug, Clone, Default)]
pub struct PipelineFlags {
    /// Run only these passes of the optimisation pipeline, in the pipeline's order
    /// (comma-separated; `ouroc compile --list` names them; `--passes ""` runs none)
    #[arg(long, value_name = "PASS,...", value_delimiter = ',', conflicts_with = "skip")]
    pub passes: Option<Vec<String>>,
    /// Run the optimisation pipeline without these passes (comma-separated)
    #[arg(long, value_name = "PASS,...", value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Rewrite rules of the egraph pass: -NAME turns one off, +NAME back on, in order
    /// (comma-separated; `ouroc compile --list` names them)
    #[arg(long, value_name = "-RULE,+RULE", value_delimiter = ',', allow_hyphen_values = true)]
    pub rules: Vec<String>,
}

impl ModelFlags {
    /// The pass pipeline these flags choose (`keep_exit_trace`: without
    /// `policy-dce`, for traces of every step).
    pub fn pipeline(&self, keep_exit_trace: bool) -> Result<ouroc_passes::PassManager, String> {
        self.pipeline.passes(keep_exit_trace)
    }
}

impl PipelineFlags {
    /// The pass pipeline these flags choose.
    pub fn passes(&self, keep_exit_trace: bool) -> Result<ouroc_passes::PassManager, String> {
        let clean = |v: &[String]| -> Vec<String> { v.iter().filter(|s| !s.is_empty()).cloned().collect() };
        let only = self.passes.as_deref().map(clean);
        ouroc_passes::pipeline_with(
            keep_exit_trace,
            only.as_deref(),
            &clean(&self.skip),
            &clean(&self.rules),
        )
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// `--weights`: [`ouroc_kernels::quant::WeightScheme`].
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Every weight in the model precision's dtype
    Dense,
    /// Every Linear in q8_0 (8.5 bits per weight)
    #[value(alias = "q8_0")]
    Q8,
    /// The layers' Linears in q4_0 (4.5 bits per weight), the LM head in q8_0
    #[value(alias = "q4_0")]
    Q4,
}

impl Weights {
    pub fn scheme(self) -> ouroc_kernels::quant::WeightScheme {
        use ouroc_kernels::quant::WeightScheme;
        match self {
            Weights::Dense => WeightScheme::Dense,
            Weights::Q8 => WeightScheme::Q8,
            Weights::Q4 => WeightScheme::Q4,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All tokens in one pass
    Prefill,
    /// One token at a time through the KV cache
    Decode,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Checkpoint directory
    pub ckpt: PathBuf,
    /// Comma-separated token ids, e.g. 5,17,42
    #[arg(long, value_name = "IDS", required = true)]
    pub ids: String,
    #[command(flatten)]
    pub model: ModelFlags,
    /// prefill: all tokens in one pass; decode: one by one through the KV cache
    #[arg(long, value_enum, default_value_t = Mode::Prefill)]
    pub mode: Mode,
    /// Write f32 `logits` [T, V], `hidden_states` [R, T, H], `exit_lambda` [R, T]
    /// and i32 `exit_step` [T] to this safetensors file (it is replaced); `exit_lambda`
    /// is left out when the backend's program has no exit gate (cpu under last / step:K)
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: Option<PathBuf>,
    /// interp: the reference interpreter on the imported graph; cpu: the optimised graph's
    /// Program on Cranelift-compiled kernels; ptx-emu / cuda: its PTX on the emulator / a GPU
    /// (every loop step runs, as in the reference)
    #[arg(long, value_enum, default_value_t = LogitsBackend::Interp)]
    pub backend: LogitsBackend,
    #[command(flatten)]
    pub cache: CacheFlags,
    /// Threads for --backend cpu (default: all cores)
    #[arg(long, value_name = "N", value_parser = ouroc_runtime::threads::parse_threads_flag)]
    pub threads: Option<u16>,
}

impl CpuFlags {
    /// The runtime options these flags ask for.
    pub fn options(&self, max_positions: usize, early_exit: bool) -> Result<ouroc_runtime::cpu::CpuOptions, String> {
        Ok(ouroc_runtime::cpu::CpuOptions {
            max_positions,
            early_exit,
            threads: self.threads.map_or(0, usize::from),
            kv: ouroc_runtime::cpu::KvMode::parse(&self.kv)?,
            microkernels: self.linear == LinearImpl::Auto,
        })
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsBackend {
    /// The reference interpreter
    Interp,
    /// Cranelift JIT-compiled kernels of the optimised graph
    Cpu,
    /// The optimised graph's PTX (sm_80) run on ouroc's PTX emulator: checks the GPU
    /// kernels without a GPU (slow: small models only)
    PtxEmu,
    /// The optimised graph's PTX on an NVIDIA GPU through the CUDA driver (a build with
    /// `--features cuda`)
    Cuda,
}
