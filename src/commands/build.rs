//! `ouroc build CKPT -o APP`: compile a checkpoint ahead of time into an
//! executable that needs neither ouroc nor a compiler to run.
//!
//! 1. the graph the model flags ask for, optimised and lowered to a Program
//!    (as `ouroc run`);
//! 2. every distinct CPU kernel compiled by Cranelift for the
//!    `--cpu-features` level into one object file
//!    (`ouroc_codegen::cpu::object`), with the kernel table, the metadata
//!    blob (`ouroc_runtime::deploy::AppMeta`: Program, tokenizer, chat
//!    template, stop ids, fingerprint, PTX for GPU targets) and, with
//!    `--embed-weights`, the weights image;
//! 3. the weights encoded as the kernels read them
//!    (`ResidentWeights::encode`) and written to `APP.weights` (or
//!    embedded);
//! 4. the object linked by the system C compiler (`cc`) with the app
//!    runtime `libouroc_app.a` (package `ouroc-app`, built on its own so
//!    no JIT reaches it).

use super::{build as build_graph, open};
use crate::cli::{BuildArgs, Precision};
use anyhow::{Context, Result, bail};
use ouroc_codegen::cpu::object::{CPU_LEVELS, ObjectWriter};
use ouroc_runtime::cpu::ResidentWeights;
use ouroc_runtime::deploy::{self, AppMeta, WeightsHeader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The cargo command that builds the app runtime where `ouroc build` looks.
pub const APP_LIB_COMMAND: &str = "cargo build --release -p ouroc-app --target-dir target/app";

const TARGETS: [&str; 3] = ["cpu", "a100", "cpu+a100"];

/// Libraries the Rust standard library needs when linked from a staticlib
/// (`rustc --print native-static-libs` on x86_64-unknown-linux-gnu).
const NATIVE_LIBS: [&str; 7] = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `libouroc_app.a`: `--app-lib`, `$OUROC_APP_LIB`, or
/// `target/app/release/` of the workspace this ouroc was built in (beside
/// `target/<profile>/ouroc`).
fn app_lib(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        if !p.is_file() {
            bail!("--app-lib {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("OUROC_APP_LIB") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("OUROC_APP_LIB={}: no such file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the ouroc executable's path")?;
    let dir = exe.parent().context("the ouroc executable has no directory")?;
    let want = dir.join("../app/release/libouroc_app.a");
    if want.is_file() {
        return Ok(want);
    }
    bail!(
        "the app runtime libouroc_app.a is not built (looked for {}); build it with\n    {APP_LIB_COMMAND}\n\
         in the ouroc workspace (on its own, so no JIT is linked in), or pass --app-lib FILE",
        want.display()
    )
}

pub fn run(args: &BuildArgs) -> Result<()> {
    let t0 = Instant::now();
    if !TARGETS.contains(&args.target.as_str()) {
        bail!(
            "unknown target `{}`; valid targets: {}",
            args.target,
            TARGETS.join(", ")
        );
    }
    if !CPU_LEVELS.contains(&args.cpu_features.as_str()) {
        bail!(
            "unknown CPU level `{}`; valid levels: {}",
            args.cpu_features,
            CPU_LEVELS.join(", ")
        );
    }
    ouroc_runtime::cpu::KvMode::parse(&args.kv).map_err(anyhow::Error::msg)?;
    let lib = app_lib(args.app_lib.as_deref())?;
    let app = &args.output;
    let mut weights_path = app.clone().into_os_string();
    weights_path.push(".weights");
    let weights_path = PathBuf::from(weights_path);

    // 1. The Program.
    let ckpt = open(&args.ckpt)?;
    let graph = build_graph(&ckpt, &args.model)?;
    let steps = graph.exit_control().map_or(1, |(steps, _)| steps);
    let policy = graph.exit_control().map(|(_, p)| p.to_string()).unwrap_or_default();
    let program = ouroc_compile::compile_graph(graph, false)?.program;
    let launches = program.kernels().count();
    eprintln!(
        "[1/5] {}: {} layers x {steps} loop steps, exit policy {policy}: {launches} kernel launches ({:.1} s)",
        args.ckpt.display(),
        ckpt.config.num_hidden_layers,
        t0.elapsed().as_secs_f64()
    );

    // 2. The weights, encoded as the kernels read them.
    let t = Instant::now();
    let weights = ResidentWeights::encode(&program, &ckpt, true).map_err(anyhow::Error::msg)?;
    let (entries, data_bytes) = deploy::layout(&weights);
    let fingerprint = deploy::fingerprint(&program, &weights, &entries).map_err(anyhow::Error::msg)?;
    let header = WeightsHeader {
        fingerprint: fingerprint.clone(),
        entries,
        data_bytes,
    };
    let image_bytes = deploy::weights_head(&header).len() as u64 + data_bytes;
    eprintln!(
        "[2/5] weights: {} tensors encoded, {} (fingerprint {}, {:.1} s)",
        header.entries.len(),
        mib(image_bytes),
        fingerprint.checkpoint,
        t.elapsed().as_secs_f64()
    );

    // 3. The kernels' machine code.
    let t = Instant::now();
    let mut obj = ObjectWriter::new(&args.cpu_features)?;
    for k in program.kernels() {
        obj.add_kernel(&k.spec)?;
    }
    let kernels = obj.kernels();
    let ptx = if args.target == "cpu" {
        None
    } else {
        Some(ouroc_codegen::ptx::module(&program)?.text)
    };
    let tokenizer = match std::fs::read_to_string(args.ckpt.join("tokenizer.json")) {
        Ok(t) => Some(t),
        Err(_) => {
            eprintln!(
                "warning: {} has no tokenizer.json: the executable takes --ids only",
                args.ckpt.display()
            );
            None
        }
    };
    let (chat_template, eos_ids) = match &tokenizer {
        Some(_) => {
            let tok = ouroc_runtime::Tokenizer::load(&args.ckpt)?;
            (tok.chat_template.clone(), tok.eos_ids.clone())
        }
        None => (None, Vec::new()),
    };
    let model = std::fs::canonicalize(&args.ckpt)
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| args.ckpt.display().to_string());
    let precision = match args.model.precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    };
    // The metadata needs the kernel keys, known once every kernel is in.
    let (keys, features, triple) = obj.table();
    let object_features = features.join(" ");
    let meta = AppMeta {
        fingerprint: fingerprint.clone(),
        program: program.clone(),
        model,
        layers: ckpt.config.num_hidden_layers,
        steps,
        policy: policy.clone(),
        precision: precision.to_string(),
        max_positions: ckpt.config.max_position_embeddings,
        target: args.target.clone(),
        cpu_level: args.cpu_features.clone(),
        cpu_features: features,
        triple,
        kernel_keys: keys,
        tokenizer,
        chat_template,
        eos_ids,
        config_eos_ids: ckpt.config.eos_token_ids.clone(),
        kv: args.kv.clone(),
        ptx,
        embedded_weights: args.embed_weights,
        weights_bytes: image_bytes,
    };
    let meta = serde_json::to_vec(&meta)?;
    obj.add_data("ouroc_app_meta", deploy::blob(&meta), 8)?;
    let embedded = if args.embed_weights {
        let mut image = Vec::with_capacity(8 + image_bytes as usize);
        image.extend_from_slice(&image_bytes.to_le_bytes());
        deploy::write_weights(&mut image, &header, &weights)?;
        image
    } else {
        0u64.to_le_bytes().to_vec()
    };
    // The image's data starts at a page (DATA_ALIGN) from its header: align
    // the blob so its bytes after the length are page aligned too.
    obj.add_data("ouroc_app_weights", embedded, deploy::DATA_ALIGN as u64)?;
    let object = obj.finish("ouroc_app_kernels")?;
    eprintln!(
        "[3/5] kernels: {kernels} distinct compiled for {} ({}; {object_features}): object {} ({:.1} s)",
        args.cpu_features,
        object.triple,
        mib(object.bytes.len() as u64),
        t.elapsed().as_secs_f64()
    );

    // 4. The weights file.
    let t = Instant::now();
    if args.embed_weights {
        if weights_path.exists() {
            std::fs::remove_file(&weights_path)
                .with_context(|| format!("cannot remove the stale {}", weights_path.display()))?;
        }
        eprintln!("[4/5] weights embedded in the executable ({})", mib(image_bytes));
    } else {
        // Write beside, then rename: a running executable's map is never
        // changed in place.
        let mut tmp = weights_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        deploy::write_weights(&mut w, &header, &weights)?;
        w.into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &weights_path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), weights_path.display()))?;
        eprintln!(
            "[4/5] weights written to {} ({}, {:.1} s)",
            weights_path.display(),
            mib(image_bytes),
            t.elapsed().as_secs_f64()
        );
    }
    drop(weights);

    // 5. Link.
    let t = Instant::now();
    let tmp = std::env::temp_dir().join(format!("ouroc-build-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let obj_path = tmp.join("kernels.o");
    std::fs::write(&obj_path, &object.bytes).with_context(|| format!("cannot write {}", obj_path.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.arg("-o")
        .arg(app)
        .arg(&obj_path)
        .arg(&lib)
        .arg("-Wl,--gc-sections")
        .args(NATIVE_LIBS);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run the linker `{cc}` (a C compiler driver, e.g. gcc, is needed)"))?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !out.status.success() {
        bail!(
            "linking {} failed ({cc} {}):\n{}",
            app.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let app_bytes = std::fs::metadata(app)?.len();
    eprintln!(
        "[5/5] linked {} with {} by {cc} ({:.1} s)",
        app.display(),
        lib.display(),
        t.elapsed().as_secs_f64()
    );
    eprintln!(
        "built {}: executable {}, weights {} ({}), {kernels} kernels for {}, target {}, in {:.1} s",
        app.display(),
        mib(app_bytes),
        mib(image_bytes),
        if args.embed_weights {
            "embedded".to_string()
        } else {
            format!("beside it in {}", weights_path.display())
        },
        args.cpu_features,
        args.target,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
