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
//!    no JIT reaches it: by cargo, run from here when it is missing or
//!    older than its sources; see [`app_lib`]).

use super::{build as build_graph, open};
use crate::cli::{BuildArgs, Precision};
use anyhow::{Context, Result, bail};
use ouroc_codegen::cpu::object::{CPU_LEVELS, ObjectWriter};
use ouroc_runtime::cpu::ResidentWeights;
use ouroc_runtime::deploy::{self, AppMeta, WeightsHeader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const TARGETS: [&str; 3] = ["cpu", "a100", "cpu+a100"];

/// Libraries the Rust standard library needs when linked from a staticlib
/// (`rustc --print native-static-libs` on x86_64-unknown-linux-gnu).
const NATIVE_LIBS: [&str; 7] = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The workspace this ouroc was built from: the app runtime's sources.
const WORKSPACE: &str = env!("CARGO_MANIFEST_DIR");

/// The app runtime's file name in `<target dir>/release/`.
const APP_LIB_FILE: &str = "libouroc_app.a";

/// Minutes a first build of the app runtime takes (measured on 2 cores).
const APP_LIB_MINUTES: u32 = 3;

/// The cargo command that builds the app runtime into `target` (on its own:
/// no other package's features, such as the JIT, reach it).
fn app_lib_command(target: &Path) -> String {
    format!("cargo build --release -p ouroc-app --target-dir {}", target.display())
}

/// `libouroc_app.a`: `--app-lib FILE` or `$OUROC_APP_LIB` as given;
/// otherwise `<target>/release/libouroc_app.a`, where `<target>` is
/// `$OUROC_APP_TARGET_DIR` or [`default_app_target`], built there by cargo
/// from this ouroc's workspace when it is missing or older than its
/// sources.
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
    let target = match std::env::var_os("OUROC_APP_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => default_app_target(),
    };
    let lib = target.join("release").join(APP_LIB_FILE);
    let workspace = Path::new(WORKSPACE);
    let sources = workspace.join("runtime/app/Cargo.toml").is_file().then_some(workspace);
    match (app_lib_state(&lib, sources), sources) {
        (AppLib::Ready, _) => Ok(lib),
        (state, Some(workspace)) => {
            build_app_lib(workspace, &target, &state, &lib)?;
            if !lib.is_file() {
                bail!("cargo built the app runtime but {} is not there", lib.display());
            }
            // Cargo found it up to date although a file it was checked
            // against is newer (a Cargo.lock change that does not touch it):
            // say so on the file, so the next build does not ask again.
            if app_lib_state(&lib, sources) != AppLib::Ready {
                std::fs::File::options()
                    .write(true)
                    .open(&lib)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                    .with_context(|| format!("cannot update the time of {}", lib.display()))?;
            }
            Ok(lib)
        }
        (_, None) => bail!(
            "the app runtime {} is not built, and the ouroc sources it is built from ({WORKSPACE}) \
             are not here; in an ouroc checkout run\n    {}\n\
             and pass --app-lib <target dir>/release/{APP_LIB_FILE} (or set OUROC_APP_LIB)",
            lib.display(),
            app_lib_command(&target)
        ),
    }
}

/// `app/` beside `target/<profile>/` when this ouroc runs from a cargo
/// target directory (which cargo tags with `CACHEDIR.TAG`), so it follows
/// `CARGO_TARGET_DIR`; else `target/app` of the workspace.
fn default_app_target() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .filter(|t| t.join("CACHEDIR.TAG").is_file())
        .unwrap_or_else(|| Path::new(WORKSPACE).join("target"))
        .join("app")
}

/// The state of the app runtime library.
#[derive(Debug, PartialEq)]
enum AppLib {
    /// There, and no older than its sources (or they are not here to tell).
    Ready,
    /// Not there.
    Missing,
    /// Older than a source: why.
    Stale(String),
}

/// Whether `lib` is there and up to date with its sources: the files
/// cargo's dep-info beside it (`libouroc_app.d`) lists and the workspace's
/// `Cargo.lock` (`sources`: the workspace, if here).
fn app_lib_state(lib: &Path, sources: Option<&Path>) -> AppLib {
    let Ok(built) = std::fs::metadata(lib).and_then(|m| m.modified()) else {
        return AppLib::Missing;
    };
    let Some(workspace) = sources else {
        return AppLib::Ready;
    };
    let mut inputs = vec![workspace.join("Cargo.lock")];
    if let Ok(d) = std::fs::read_to_string(lib.with_extension("d")) {
        inputs.extend(dep_info_inputs(&d));
    }
    for input in inputs {
        match std::fs::metadata(&input).and_then(|m| m.modified()) {
            Ok(t) if t <= built => {}
            Ok(_) => {
                return AppLib::Stale(format!("{} changed since it was built", input.display()));
            }
            Err(_) => {
                return AppLib::Stale(format!("it was built from {}, which is gone", input.display()));
            }
        }
    }
    AppLib::Ready
}

/// The input files of a cargo dep-info file (`out: in1 in2 ...`, spaces in
/// names escaped as `\ `).
fn dep_info_inputs(d: &str) -> Vec<PathBuf> {
    let Some(line) = d.lines().find(|l| l.contains(": ")) else {
        return Vec::new();
    };
    let Some((_, rest)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}

/// Build the app runtime (`lib`, in `state`) into `target` with cargo
/// (`$CARGO`, else `cargo` on PATH) in `workspace`, showing cargo's output.
fn build_app_lib(workspace: &Path, target: &Path, state: &AppLib, lib: &Path) -> Result<()> {
    let command = app_lib_command(target);
    let what = match state {
        AppLib::Stale(why) => format!("rebuilding the app runtime {} ({why})", lib.display()),
        _ => format!(
            "building the app runtime {} once (about {APP_LIB_MINUTES} min on 2 cores)",
            lib.display()
        ),
    };
    eprintln!(
        "{what}, on its own so no JIT is linked in:\n    {command}\n  in {}",
        workspace.display()
    );
    let t = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "ouroc-app", "--target-dir"])
        .arg(target)
        .current_dir(workspace)
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .with_context(|| {
            format!(
                "cannot run cargo ({}) to build the app runtime: install Rust 1.95 (rustup) and run\n    \
                 {command}\n  in {}, or pass --app-lib FILE",
                Path::new(&cargo).display(),
                workspace.display()
            )
        })?;
    if !status.success() {
        bail!(
            "building the app runtime failed ({status}): the command was\n    {command}\n  in {}",
            workspace.display()
        );
    }
    eprintln!("built the app runtime in {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}

pub fn run(args: &BuildArgs) -> Result<()> {
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
    // The build's phases and total, without the app runtime's first build.
    let t0 = Instant::now();
    let app = &args.output;
    let mut weights_path = app.clone().into_os_string();
    weights_path.push(".weights");
    let weights_path = PathBuf::from(weights_path);

    // 1. The Program.
    let ckpt = open(&args.ckpt)?;
    let passes = args.model.pipeline(false).map_err(anyhow::Error::msg)?;
    let graph = build_graph(&ckpt, &args.model)?;
    super::check_memory("ouroc build", &ckpt, &graph, args.model.precision, 0)?;
    let steps = graph.exit_control().map_or(1, |(steps, _)| steps);
    let policy = graph.exit_control().map(|(_, p)| p.to_string()).unwrap_or_default();
    let program = super::lower(graph, &passes, &args.model)?;
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
        // A quantised Linear runs on the runtime's quantised microkernels.
        if matches!(&k.spec.family, ouroc_kernels::Family::Linear(l) if l.quant.is_some()) {
            continue;
        }
        obj.add_kernel(&k.spec)?;
    }
    let kernels = obj.kernels();
    let ptx = if args.target == "cpu" {
        None
    } else {
        Some(ouroc_codegen::ptx::module(&program)?)
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
    let (chat, eos_ids) = match &tokenizer {
        Some(_) => {
            let tok = ouroc_runtime::Tokenizer::load(&args.ckpt)?;
            (tok.chat(), tok.eos_ids.clone())
        }
        None => (Default::default(), Vec::new()),
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
        precision: match args.model.weights {
            crate::cli::Weights::Dense => precision.to_string(),
            w => format!("{precision}, {} weights", w.scheme().name()),
        },
        max_positions: ckpt.config.max_position_embeddings,
        target: args.target.clone(),
        cpu_level: args.cpu_features.clone(),
        cpu_features: features,
        triple,
        kernel_keys: keys,
        tokenizer,
        chat_template: chat.source,
        bos_token: chat.bos_token,
        eos_token: chat.eos_token,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn at(p: &Path, secs: u64) {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(t).unwrap();
    }

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A fake workspace and target dir: the library is built when missing or
    /// older than Cargo.lock or a file its dep-info lists (one gone too), and
    /// used as it is when the sources are not there to tell.
    #[test]
    fn the_app_runtime_is_built_when_missing_or_older_than_a_source() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let (lock, src, spaced) = (
            ws.join("Cargo.lock"),
            ws.join("runtime/src/lib.rs"),
            ws.join("runtime/src/a b.rs"),
        );
        for p in [&lock, &src, &spaced] {
            write(p, "");
            at(p, 0);
        }
        let lib = dir.path().join("target/release").join(APP_LIB_FILE);
        assert_eq!(app_lib_state(&lib, Some(&ws)), AppLib::Missing);
        assert_eq!(app_lib_state(&lib, None), AppLib::Missing);

        write(&lib, "!<arch>\n");
        at(&lib, 10);
        // No dep-info: only Cargo.lock is checked.
        assert_eq!(app_lib_state(&lib, Some(&ws)), AppLib::Ready);
        let dep_info = format!(
            "{}: {} {}\n\n{}:\n",
            lib.display(),
            src.display(),
            spaced.display().to_string().replace(' ', "\\ "),
            src.display()
        );
        write(&lib.with_extension("d"), &dep_info);
        assert_eq!(app_lib_state(&lib, Some(&ws)), AppLib::Ready);

        at(&spaced, 20);
        let AppLib::Stale(why) = app_lib_state(&lib, Some(&ws)) else {
            panic!("a newer source")
        };
        assert!(why.contains("a b.rs changed since it was built"), "{why}");
        // Without the sources there is nothing to compare with: use it.
        assert_eq!(app_lib_state(&lib, None), AppLib::Ready);

        at(&lib, 30);
        assert_eq!(app_lib_state(&lib, Some(&ws)), AppLib::Ready);
        at(&lock, 40);
        let AppLib::Stale(why) = app_lib_state(&lib, Some(&ws)) else {
            panic!("a newer Cargo.lock")
        };
        assert!(why.contains("Cargo.lock changed"), "{why}");

        at(&lib, 50);
        std::fs::remove_file(&src).unwrap();
        let AppLib::Stale(why) = app_lib_state(&lib, Some(&ws)) else {
            panic!("a source gone")
        };
        assert!(why.contains("lib.rs, which is gone"), "{why}");
    }

    #[test]
    fn dep_info_inputs_unescape_spaces() {
        let d = "/t/libx.a: /w/a.rs /w/my\\ dir/b.rs  /w/c.rs\n\n/w/a.rs:\n";
        assert_eq!(
            dep_info_inputs(d),
            ["/w/a.rs", "/w/my dir/b.rs", "/w/c.rs"].map(PathBuf::from)
        );
        assert!(dep_info_inputs("").is_empty());
    }
}
