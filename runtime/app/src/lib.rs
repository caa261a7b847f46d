//! The runtime of an executable built by `ouroc build`: a C `main` that
//! reads what the build linked in (the metadata blob with the Program and
//! tokenizer, the kernel table, optionally the weights), memory-maps
//! `APP.weights` otherwise, and generates text as `ouroc run` does, on the
//! kernels' machine code linked into the executable: no compiler, no JIT.
//!
//! Symbols the build's object file defines (see
//! `ouroc_codegen::cpu::object` and `ouroc_runtime::deploy`):
//!
//! - `ouroc_app_kernels`: `u64` count, then one kernel address each;
//! - `ouroc_app_meta`: `u64` length, then `AppMeta` as JSON;
//! - `ouroc_app_weights`: `u64` length, then the weights image (length 0
//!   when the weights are beside the executable).
//!
//! Symbols it defines for the kernels: `ouroc_expf`, `ouroc_cosf`,
//! `ouroc_sinf` (`f32::exp`, `f32::cos`, `f32::sin`, as in the JIT).

// `cargo build --all-targets` also builds a test harness of this crate, without `main`
// (the harness has its own), where the code it calls is then unused.
#![cfg_attr(test, allow(dead_code))]

use clap::{CommandFactory, FromArgMatches, Parser};
use ouroc_kernels::abi::RawKernel;
use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode, LinkedKernels, ResidentWeights};
use ouroc_runtime::deploy::{AppMeta, blob_len, check_entries, host_has, missing_features, read_weights};
use ouroc_runtime::generate::{Forward, GenLimits};
use ouroc_runtime::gpu::cuda::CudaDevice;
use ouroc_runtime::gpu::{GpuForward, GpuOptions};
use ouroc_runtime::speculate::{DraftTokens, SpecOptions};
use ouroc_runtime::tokenizer::TextStream;
use ouroc_runtime::{Sampler, SamplingParams, Tokenizer, chat, generate_with};
use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;

unsafe extern "C" {
    static ouroc_app_kernels: u64;
    static ouroc_app_meta: u64;
    static ouroc_app_weights: u64;
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
}

/// `f32::exp` for the kernels (as the JIT's helper).
#[unsafe(no_mangle)]
pub extern "C" fn ouroc_expf(x: f32) -> f32 {
    x.exp()
}

/// `f32::cos` for the kernels.
#[unsafe(no_mangle)]
pub extern "C" fn ouroc_cosf(x: f32) -> f32 {
    x.cos()
}

/// `f32::sin` for the kernels.
#[unsafe(no_mangle)]
pub extern "C" fn ouroc_sinf(x: f32) -> f32 {
    x.sin()
}

/// A linked blob: `u64` length then the bytes; `what` names it in errors.
/// The length is checked against the size of the executable's file (a
/// blob is part of it), so a corrupt one is an error, not a wild read.
///
/// # Safety
/// `head` is the first 8 bytes of such a blob, linked in (static).
unsafe fn blob(head: *const u64, what: &str) -> Result<&'static [u8], String> {
    // SAFETY: `head` points to the blob's 8-byte length.
    let len = unsafe { std::ptr::read(head) };
    // Without the file's size (no /proc), the most a slice may hold.
    let file = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map_or(isize::MAX as u64 - 8, |m| m.len());
    let len = blob_len(len, file, what)?;
    // SAFETY: the length is followed by that many bytes of the same symbol
    // (at most the executable's size, checked above).
    Ok(unsafe { std::slice::from_raw_parts((head as *const u8).add(8), len) })
}

/// The executable's entry point (the C runtime calls it).
// Not in a test build of this crate (`cargo build --all-targets`): the test
// harness defines its own `main`.
#[cfg(not(test))]
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    let code = match std::panic::catch_unwind(run) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            let _ = std::io::Write::flush(&mut std::io::stdout());
            eprintln!("{}: error: {e}", app_name());
            1
        }
        Err(_) => 101,
    };
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn app_name() -> String {
    std::env::args()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "app".into())
}

/// The flags, as `ouroc run`'s.
#[derive(Parser, Debug)]
struct Args {
    /// The prompt text
    #[arg(long, required_unless_present_any = ["ids", "serve"], conflicts_with = "ids")]
    prompt: Option<String>,
    /// Comma-separated prompt token ids instead of text (prints the generated ids);
    /// for a model built without a tokenizer
    #[arg(long, value_name = "IDS")]
    ids: Option<String>,
    /// Wrap the prompt in the model's chat template (its checkpoint's, rendered as transformers
    /// does; ChatML when it had none) and stop at <|im_end|> too
    #[arg(long, conflicts_with = "ids")]
    chat: bool,
    /// System message for --chat
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 0.7, value_name = "T", allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off)
    #[arg(long, default_value_t = 0.9, value_name = "P")]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off)
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Penalise tokens already in the context (1 = off)
    #[arg(long, default_value_t = 1.1, value_name = "X")]
    repetition_penalty: f32,
    /// Random seed for sampling (the same seed gives the same text)
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Exit policy: fixed at build time (`ouroc build --exit`); accepted only if it is the
    /// built one
    #[arg(long = "exit", value_name = "POLICY")]
    exit: Option<String>,
    /// Run every loop step even after a token's exit; by default a decoded token stops at
    /// the step its exit policy chooses
    #[arg(long)]
    no_early_exit: bool,
    /// Threads for the kernels (default: all cores); each matrix-vector product is split
    /// over them by output rows
    #[arg(long, value_name = "N", value_parser = ouroc_runtime::threads::parse_threads_flag)]
    threads: Option<u16>,
    /// KV cache in decode: full (one cache per loop step and layer), last or mean (one
    /// shared cache per layer, 1/R of the decode KV memory)
    /// [default: the one given to `ouroc build`, or full]
    #[arg(long, value_name = "MODE")]
    kv: Option<String>,
    /// Matrix products (Linear): auto runs them on the runtime's AVX-512 / AVX2 microkernels
    /// where the CPU has them, cranelift always on the linked Cranelift kernels
    #[arg(long, value_name = "IMPL", default_value = "auto")]
    linear: String,
    /// Device: auto (the GPU for a GPU target, else the CPU), cpu or gpu
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: String,
    /// The weights file (default: this executable's path + `.weights`); ignored when the
    /// weights are embedded
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Self-speculative decoding: positions per round, drafted by the first --draft-steps loop
    /// steps and verified by the rest in one pass: 2 to 8, off, or auto (adapts to the measured
    /// acceptance, off while it does not pay; only when greedy, where the output is the same
    /// token for token)
    #[arg(long, value_name = "K", default_value = "auto")]
    draft_tokens: String,
    /// Loop steps of a draft, from 1 to R-1 [default: R/2]
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    draft_steps: Option<usize>,
    /// Serve the model over HTTP in OpenAI's API on ADDR (host:port, e.g. 127.0.0.1:8080), as
    /// `ouroc serve` does (16 sequences batched, a queue of 64, 30 s to finish on SIGTERM);
    /// sampling is then per request. CPU only
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["prompt", "ids", "chat"])]
    serve: Option<String>,
}

fn run() -> Result<(), String> {
    // SAFETY: the symbol is the metadata blob `ouroc build` links in.
    let meta_json = unsafe { blob(&raw const ouroc_app_meta, "the linked metadata") }?;
    let meta: AppMeta = serde_json::from_slice(meta_json).map_err(|e| format!("corrupt metadata: {e}"))?;
    let name = app_name();
    let weights_where = if meta.embedded_weights {
        "embedded".to_string()
    } else {
        format!("beside it in {name}.weights (memory-mapped)")
    };
    let about = format!(
        "{} ({} layers x {} loop steps, {}), compiled ahead of time by ouroc {}",
        meta.model, meta.layers, meta.steps, meta.precision, meta.fingerprint.ouroc
    );
    let after = format!(
        "Built for target {} ({}, CPU features {}: {}); {} kernels linked in; weights {}.\n\
         The exit policy is fixed at build time: {} (rebuild with `ouroc build --exit POLICY` to \
         change it); so are the loop steps ({}) and the precision ({}).",
        meta.target,
        meta.triple,
        meta.cpu_level,
        meta.cpu_features.join(" "),
        meta.kernel_keys.len(),
        weights_where,
        meta.policy,
        meta.steps,
        meta.precision
    );
    let cmd = Args::command().bin_name(name.clone()).about(about).after_help(after);
    let args = Args::from_arg_matches(&cmd.get_matches()).map_err(|e| e.to_string())?;

    // Refusals first: CPU, device, flags fixed at build time.
    let missing = missing_features(&meta.cpu_features, host_has);
    if !missing.is_empty() {
        return Err(format!(
            "this CPU lacks features the executable was built for (--cpu-features {}): {}; \
             rebuild with a lower level, e.g. `ouroc build --cpu-features x86-64-v2`",
            meta.cpu_level,
            missing.join(", ")
        ));
    }
    let gpu_target = meta.target != "cpu";
    let use_gpu = match args.device.as_str() {
        "cpu" => false,
        "gpu" => true,
        "auto" => meta.target == "a100",
        d => return Err(format!("unknown device `{d}`; valid devices: auto, cpu, gpu")),
    };
    if use_gpu {
        if !gpu_target {
            return Err("this executable was built for --target cpu: it has no GPU code".into());
        }
        // SAFETY: dlopen with a NUL-terminated name; the handle is only tested.
        let driver = unsafe { dlopen(c"libcuda.so.1".as_ptr(), 1) };
        if driver.is_null() {
            return Err(format!(
                "no CUDA driver (libcuda.so.1) found: this executable was built for --target {} \
                 and runs its PTX on an NVIDIA GPU{}",
                meta.target,
                if meta.target == "cpu+a100" {
                    "; pass --device cpu to run on the CPU"
                } else {
                    ""
                }
            ));
        }
        if args.kv.as_deref().unwrap_or(&meta.kv) != "full" {
            return Err(
                "the GPU keeps one KV cache per loop step and layer: --kv last and mean run on the CPU \
                        (--device cpu)"
                    .into(),
            );
        }
    }
    if let Some(p) = &args.exit
        && p != &meta.policy
    {
        return Err(format!(
            "the exit policy is fixed at build time: this executable uses {}, not {p}; \
             rebuild with `ouroc build --exit {p}`",
            meta.policy
        ));
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    params.check()?;
    let spec = SpecOptions::from_flags(
        Some(&args.draft_tokens),
        args.draft_steps,
        DraftTokens::Auto,
        params.temperature == 0.0,
    )?;
    let kv = KvMode::parse(args.kv.as_deref().unwrap_or(&meta.kv))?;
    let microkernels = match args.linear.as_str() {
        "auto" => true,
        "cranelift" => false,
        l => return Err(format!("unknown --linear `{l}`; valid: auto, cranelift")),
    };
    let tok = match &meta.tokenizer {
        Some(json) => Some(Tokenizer::from_parts(
            json.as_bytes(),
            chat::ChatTemplate {
                source: meta.chat_template.clone(),
                bos_token: meta.bos_token.clone(),
                eos_token: meta.eos_token.clone(),
            },
            meta.eos_ids.clone(),
        )?),
        None => None,
    };
    if let Some(addr) = &args.serve {
        if use_gpu {
            return Err("--serve runs the model on the CPU: pass --device cpu".into());
        }
        let tok = tok.ok_or("--serve needs the model's tokenizer: this executable was built without tokenizer.json")?;
        let opts = CpuOptions {
            early_exit: !args.no_early_exit,
            threads: args.threads.map_or(0, usize::from),
            kv,
            microkernels,
            ..CpuOptions::new(meta.max_positions)
        };
        return serve(meta, tok, opts, args.weights.clone(), name, addr);
    }
    let prompt: Vec<u32> = match (&args.ids, &args.prompt, &tok) {
        (Some(ids), _, _) => ids
            .split(',')
            .map(|s| s.trim().parse::<u32>().map_err(|e| format!("--ids: `{s}`: {e}")))
            .collect::<Result<_, _>>()?,
        (None, Some(p), Some(tok)) => {
            let text = if args.chat {
                tok.chat().prompt(args.system.as_deref(), p)?
            } else {
                p.clone()
            };
            tok.encode(&text)?
        }
        (None, _, None) => {
            return Err("this executable was built from a checkpoint without tokenizer.json: give --ids".into());
        }
        (None, None, Some(_)) => return Err("give --prompt".into()),
    };

    let t0 = std::time::Instant::now();
    let weights = load_weights(&meta, args.weights.as_ref(), &name)?;
    let kernels = linked_kernels(&meta)?;
    let (mut model, engine): (Box<dyn Forward>, String) = if use_gpu {
        // The Program's PTX as the build stored it (no emitter in here) on
        // the CUDA device, from the same encoded weights.
        let dev = CudaDevice::new().map_err(|e| e.to_string())?;
        let mut g = GpuOptions::new(meta.max_positions);
        g.early_exit = !args.no_early_exit;
        g.kv = kv;
        let module = meta
            .ptx
            .clone()
            .ok_or("corrupt executable: a GPU target without its PTX module")?;
        let m = GpuForward::with_module(meta.program.clone(), weights, module, dev, g).map_err(|e| e.to_string())?;
        (Box::new(m), format!("PTX on the CUDA device, KV cache {kv}"))
    } else {
        let opts = CpuOptions {
            early_exit: !args.no_early_exit,
            threads: args.threads.map_or(0, usize::from),
            kv,
            microkernels,
            ..CpuOptions::new(meta.max_positions)
        };
        let m = CpuForward::from_parts(meta.program.clone(), weights, &opts, Box::new(kernels))?;
        let engine = format!(
            "kernels linked ahead of time ({}, {}), {} thread(s), KV cache {kv}",
            meta.cpu_level,
            meta.kernel_keys.len(),
            m.threads()
        );
        (Box::new(m), engine)
    };
    eprintln!(
        "{name}: {} ({} layers x {} loop steps), exit policy {}, {engine} (ready in {:.2} s)",
        meta.model,
        meta.layers,
        meta.steps,
        meta.policy,
        t0.elapsed().as_secs_f64()
    );
    let mut stop_ids = tok.as_ref().map(|t| t.eos_ids.clone()).unwrap_or_default();
    stop_ids.extend(meta.config_eos_ids.iter().copied());
    if args.chat {
        stop_ids.extend(tok.as_ref().and_then(|t| t.im_end));
    }
    let mut sampler = Sampler::new(params);
    let mut stream = TextStream::default();
    let limits = GenLimits {
        max_new_tokens: args.max_new_tokens,
        max_positions: meta.max_positions,
    };
    let mut first = true;
    let stats = match (&tok, &args.prompt) {
        (Some(tok), Some(p)) if args.ids.is_none() => {
            write_stdout(format_args!("{}", if args.chat { "" } else { p.as_str() }))?;
            generate_with(
                model.as_mut(),
                &prompt,
                &mut sampler,
                &stop_ids,
                &limits,
                spec,
                &mut |id| {
                    let piece = stream.push(tok, id)?;
                    write_stdout(format_args!("{piece}"))
                },
            )
        }
        _ => generate_with(
            model.as_mut(),
            &prompt,
            &mut sampler,
            &stop_ids,
            &limits,
            spec,
            &mut |id| {
                let sep = if first { "" } else { "," };
                first = false;
                write_stdout(format_args!("{sep}{id}"))
            },
        ),
    }
    .map_err(|e| format!("generation failed: {e}"))?;
    write_stdout(format_args!("\n"))?;
    eprint!("{}", stats.summary(meta.steps, meta.max_positions));
    Ok(())
}

/// The kernels `ouroc build` linked in.
fn linked_kernels(meta: &AppMeta) -> Result<LinkedKernels, String> {
    // SAFETY: the table `ouroc build` linked in: a count, then that many
    // kernel addresses, in the order of meta.kernel_keys, compiled for the
    // CPU features `run` checked first.
    unsafe {
        let head = &raw const ouroc_app_kernels;
        let n = std::ptr::read(head) as usize;
        if n != meta.kernel_keys.len() {
            return Err(format!(
                "corrupt executable: {n} kernels linked, {} listed",
                meta.kernel_keys.len()
            ));
        }
        let fns = std::slice::from_raw_parts(head.add(1) as *const RawKernel, n);
        Ok(LinkedKernels::new(
            meta.kernel_keys.iter().cloned().zip(fns.iter().copied()),
        ))
    }
}

/// `--serve ADDR`: the OpenAI-compatible server of `ouroc serve` on this executable's model,
/// until SIGTERM or Ctrl-C.
fn serve(
    meta: AppMeta,
    tok: Tokenizer,
    opts: CpuOptions,
    weights_flag: Option<PathBuf>,
    name: String,
    addr: &str,
) -> Result<(), String> {
    use ouroc_serve::engine::{Engine, EngineConfig};
    use ouroc_serve::http::{Served, Server, ServerOptions};
    let t0 = std::time::Instant::now();
    let mut stop_ids = tok.eos_ids.clone();
    stop_ids.extend(meta.config_eos_ids.iter().copied());
    let served = Served {
        name: meta.model.clone(),
        tokenizer: tok,
        stop_ids,
    };
    let (model, layers, steps, policy) = (meta.model.clone(), meta.layers, meta.steps, meta.policy.clone());
    let config = EngineConfig::default();
    let (max_seqs, max_queue) = (config.max_seqs, config.max_queue);
    // The CPU engine is not `Send`: it is built on the engine's thread.
    let engine = Engine::start(config, Default::default(), move || {
        let weights = load_weights(&meta, weights_flag.as_ref(), &name)?;
        let kernels = linked_kernels(&meta)?;
        Ok(CpuForward::from_parts(meta.program.clone(), weights, &opts, Box::new(kernels))?.into_driver())
    })?;
    let server = Server::new(engine, served, ServerOptions::default());
    server.run_blocking(addr, |local| {
        eprintln!(
            "{}: listening on http://{local}, model {model} ({layers} layers x {steps} loop steps, exit policy \
             {policy}), kernels linked ahead of time, KV cache {}, cross-depth batching of up to {max_seqs} \
             sequences, queue {max_queue} (ready in {:.2} s)",
            app_name(),
            opts.kv,
            t0.elapsed().as_secs_f64()
        )
    })
}

/// The weights image: embedded, or the file beside the executable
/// (`--weights` overrides), memory-mapped and checked against the
/// executable's fingerprint.
fn load_weights(meta: &AppMeta, flag: Option<&PathBuf>, name: &str) -> Result<ResidentWeights, String> {
    if meta.embedded_weights {
        // SAFETY: the weights blob `ouroc build` linked in (static).
        let image = unsafe { blob(&raw const ouroc_app_weights, "the embedded weights") }?;
        let entries = read_weights(image, &meta.fingerprint, "the embedded weights")?;
        check_entries(&meta.program, &entries, "the embedded weights")?;
        // SAFETY: static data, never written.
        return Ok(unsafe { ResidentWeights::borrowed(entries, Box::new(())) });
    }
    let path = match flag {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable's path: {e}"))?;
            let mut p = exe.into_os_string();
            p.push(".weights");
            PathBuf::from(p)
        }
    };
    let what = path.display().to_string();
    let file = std::fs::File::open(&path).map_err(|e| {
        format!(
            "cannot open the weights file {what}: {e}; `ouroc build` writes it beside the executable \
             as {name}.weights: copy it along (or pass --weights FILE)"
        )
    })?;
    // SAFETY: the file is mapped read only; ouroc never writes a weights
    // file in place (a build replaces it), so the mapping stays as read.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map {what}: {e}"))?;
    let entries = read_weights(&map, &meta.fingerprint, &what)?;
    check_entries(&meta.program, &entries, &what)?;
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(k, b)| (k, b.as_ptr() as usize, b.len()))
        .collect();
    // SAFETY: the slices point into `map`, which the owner box keeps mapped
    // (moving the Mmap does not move the mapping).
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(k, p, n)| (k, unsafe { std::slice::from_raw_parts(p as *const u8, n) }))
        .collect();
    Ok(unsafe { ResidentWeights::borrowed(entries, Box::new(map)) })
}

/// Writes to stdout, flushed (tokens stream as they come); an error names stdout instead of the
/// panic of `print!` (`> /dev/full`), and a closed pipe ends the output quietly.
fn write_stdout(args: std::fmt::Arguments) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}
