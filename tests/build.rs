//! `ouroc build`: checkpoints compiled ahead of time into executables, run
//! in an empty directory with no ouroc on PATH; greedy output identical to
//! `ouroc run`; the refusals (weights missing, truncated, from another
//! build; exit policy; GPU target without a driver); no Cranelift, egg,
//! melior, PTX emitter or PTX emulator code inside.
//!
//! The app runtime is found (or built, when missing or stale) by `ouroc
//! build` itself, as for a user: once, by the first build of a test run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// libouroc_app.a where `ouroc build` finds it by default, made ready (built
/// by ouroc if missing or stale) by one build per test run, before the tests'
/// builds use it concurrently.
fn app_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("first");
        let ckpt = root().join("tests/fixtures/r1");
        let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
            .args(["build", ckpt.to_str().unwrap(), "-o", app.to_str().unwrap()])
            .env_remove("OUROC_APP_LIB")
            .env_remove("OUROC_APP_TARGET_DIR")
            .output()
            .expect("run ouroc");
        let err = text(&o.stderr);
        assert!(o.status.success(), "the first ouroc build failed:\n{err}");
        // "[5/5] linked APP with LIB by cc (...)"
        let lib = err
            .lines()
            .find_map(|l| {
                l.strip_prefix("[5/5] linked ")?
                    .split_once(" with ")?
                    .1
                    .split_once(" by ")
                    .map(|x| x.0)
            })
            .unwrap_or_else(|| panic!("no link line:\n{err}"));
        PathBuf::from(lib)
    })
}

fn ouroc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(args)
        .output()
        .expect("run ouroc")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ouroc build FIXTURE -o DIR/NAME FLAGS` with the app runtime it finds
/// by default; returns the executable.
fn build(dir: &Path, name: &str, ckpt: &str, flags: &[&str]) -> PathBuf {
    let app = dir.join(name);
    let ckpt = root().join(ckpt);
    app_lib();
    let mut args = vec!["build", ckpt.to_str().unwrap(), "-o", app.to_str().unwrap()];
    args.extend_from_slice(flags);
    let o = ouroc(&args);
    let err = text(&o.stderr);
    assert!(o.status.success(), "ouroc build {name} failed:\n{err}");
    for phase in [
        "[1/5]",
        "[2/5]",
        "[3/5]",
        "[4/5]",
        "[5/5]",
        "built ",
        "executable",
        "kernels",
    ] {
        assert!(err.contains(phase), "build progress lacks `{phase}`:\n{err}");
    }
    app
}

/// Run `app` in an empty directory, with an environment holding only a PATH
/// without ouroc (so nothing it needs can come from the workspace).
fn run_app(app: &Path, args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    Command::new(app)
        .args(args)
        .current_dir(empty.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run the built executable")
}

/// The app refuses with a message containing every needle (no panic).
fn refuses(app: &Path, args: &[&str], needles: &[&str]) {
    let o = run_app(app, args);
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "{args:?} should fail; stdout:\n{}",
        text(&o.stdout)
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: the error should mention `{n}`:\n{err}");
    }
}

/// Greedy runs of the built executable print exactly what `ouroc run`
/// prints for the same checkpoint and flags.
fn same_as_ouroc_run(app: &Path, ckpt: &str, model_flags: &[&str], runs: &[&[&str]]) {
    let ckpt = root().join(ckpt);
    for flags in runs {
        let mut run_args = vec!["run", ckpt.to_str().unwrap()];
        run_args.extend_from_slice(model_flags);
        run_args.extend_from_slice(flags);
        let want = ouroc(&run_args);
        assert!(want.status.success(), "ouroc run {flags:?}:\n{}", text(&want.stderr));
        let got = run_app(app, flags);
        assert!(
            got.status.success(),
            "{} {flags:?}:\n{}",
            app.display(),
            text(&got.stderr)
        );
        assert!(!text(&want.stdout).trim().is_empty());
        assert_eq!(
            text(&got.stdout),
            text(&want.stdout),
            "{} {flags:?} differs from ouroc run",
            app.display()
        );
        let err = text(&got.stderr);
        assert!(err.contains("kernels linked ahead of time"), "{err}");
        // The same generation statistics line (tokens and stop reason).
        let stats = |e: &str| e.lines().find(|l| l.starts_with("prompt ")).map(String::from);
        assert_eq!(stats(&err), stats(&text(&want.stderr)), "{flags:?}");
    }
}

const GREEDY: [&str; 3] = ["--temperature", "0", "--max-new-tokens"];

#[test]
fn built_executables_generate_what_ouroc_run_does_and_refuse_bad_weights() {
    let dir = tempfile::tempdir().unwrap();
    // mha-r4 in f32; gqa-hd (grouped-query attention) in bf16.
    let mha_flags = ["--precision", "f32"];
    let gqa_flags = ["--precision", "bf16", "--exit", "last"];
    let mha = build(dir.path(), "mha", "tests/fixtures/mha-r4", &mha_flags);
    let gqa = build(dir.path(), "gqa", "tests/fixtures/gqa-hd", &gqa_flags);
    let g = |n: &'static str, rest: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["--prompt", "The loop", GREEDY[0], GREEDY[1], GREEDY[2], n];
        v.extend_from_slice(rest);
        v
    };
    // `--linear cranelift`: the linked Linear kernels themselves (auto may
    // take the runtime's microkernels), whole and split over threads.
    let runs_mha = [
        g("24", &["--threads", "1", "--linear", "cranelift"]),
        g("24", &["--threads", "3", "--linear", "cranelift"]),
        g("24", &["--threads", "3", "--kv", "last"]),
        g("16", &["--threads", "2", "--no-early-exit", "--kv", "mean"]),
        g("24", &["--threads", "2", "--draft-tokens", "3", "--draft-steps", "1"]),
        g("24", &["--threads", "2", "--draft-tokens", "off"]),
    ];
    let runs_mha: Vec<&[&str]> = runs_mha.iter().map(|v| v.as_slice()).collect();
    same_as_ouroc_run(&mha, "tests/fixtures/mha-r4", &mha_flags, &runs_mha);
    let runs_gqa = [
        g("24", &["--threads", "2"]),
        g("24", &["--threads", "2", "--linear", "cranelift"]),
        g("12", &["--threads", "1", "--kv", "last"]),
    ];
    let runs_gqa: Vec<&[&str]> = runs_gqa.iter().map(|v| v.as_slice()).collect();
    same_as_ouroc_run(&gqa, "tests/fixtures/gqa-hd", &gqa_flags, &runs_gqa);
    // Quantised weights: the built executable reads the q4 weights file and
    // computes what `ouroc run --weights q4` does.
    let q4_flags = ["--precision", "bf16", "--weights", "q4"];
    let q4 = build(dir.path(), "q4", "tests/fixtures/mha-r4", &q4_flags);
    let runs_q4 = [
        g("16", &["--threads", "2"]),
        g("12", &["--threads", "1", "--linear", "cranelift"]),
    ];
    let runs_q4: Vec<&[&str]> = runs_q4.iter().map(|v| v.as_slice()).collect();
    same_as_ouroc_run(&q4, "tests/fixtures/mha-r4", &q4_flags, &runs_q4);
    let help = text(&run_app(&q4, &["--help"]).stdout);
    assert!(help.contains("bf16, q4 weights"), "{help}");
    // Speculation changes no greedy token.
    let spec = run_app(&mha, &g("24", &["--draft-tokens", "4", "--draft-steps", "2"]));
    let plain = run_app(&mha, &g("24", &["--draft-tokens", "off"]));
    assert!(spec.status.success() && plain.status.success());
    assert_eq!(text(&spec.stdout), text(&plain.stdout));
    assert!(
        text(&spec.stderr).contains("speculation: draft 2 of 4 steps"),
        "{}",
        text(&spec.stderr)
    );

    // --help lists the generation flags and the fixed exit policy.
    let help = run_app(&mha, &["--help"]);
    assert!(help.status.success());
    let h = text(&help.stdout);
    for flag in [
        "--prompt",
        "--chat",
        "--system",
        "--temperature",
        "--top-p",
        "--top-k",
        "--repetition-penalty",
        "--seed",
        "--max-new-tokens",
        "--exit",
        "--kv",
        "--threads",
        "--device",
        "--linear",
        "--draft-tokens",
        "--draft-steps",
        "fixed at build time: threshold:1.0",
    ] {
        assert!(h.contains(flag), "--help lacks `{flag}`:\n{h}");
    }

    let args = ["--prompt", "hi", "--max-new-tokens", "2"];
    refuses(
        &mha,
        &["--prompt", "hi", "--exit", "last"],
        &["fixed at build time", "threshold:1.0"],
    );

    refuses(&mha, &["--prompt", "hi", "--draft-tokens", "1"], &["--draft-tokens"]);
    refuses(
        &mha,
        &["--prompt", "hi", "--kv", "last", "--draft-tokens", "3"],
        &["--kv full"],
    );

    // Thread counts far above the cores are refused at once, not run (they made no progress).
    refuses(
        &mha,
        &["--prompt", "hi", "--threads", "10000"],
        &["--threads 10000", "core"],
    );
    // A full stdout is an error naming it, not a panic.
    let full = std::fs::File::options().write(true).open("/dev/full");
    if let Ok(full) = full {
        let o = Command::new(&mha).args(args).stdout(full).output().unwrap();
        assert!(!o.status.success(), "wrote to /dev/full and exited 0");
        let err = text(&o.stderr);
        assert!(
            err.contains("cannot write to stdout") && !err.contains("panicked"),
            "{err}"
        );
    }

    // The weights file: missing, truncated, from another build.
    let weights = dir.path().join("mha.weights");
    let keep = dir.path().join("mha.weights.keep");
    std::fs::rename(&weights, &keep).unwrap();
    refuses(
        &mha,
        &args,
        &["cannot open the weights file", "mha.weights", "copy it along"],
    );
    let bytes = std::fs::read(&keep).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    refuses(&mha, &args, &["truncated"]);
    std::fs::write(&weights, &bytes[..20]).unwrap();
    refuses(&mha, &args, &["truncated"]);
    std::fs::copy(dir.path().join("gqa.weights"), &weights).unwrap();
    refuses(
        &mha,
        &args,
        &["does not belong to this executable", "checkpoint fingerprint"],
    );
    // --weights names another file: the same checks.
    refuses(
        &gqa,
        &["--prompt", "hi", "--weights", keep.to_str().unwrap()],
        &["does not belong to this executable"],
    );
    std::fs::rename(&keep, &weights).unwrap();
    assert!(run_app(&mha, &args).status.success());

    // Embedded weights: no file beside it, the same text.
    let emb = build(
        dir.path(),
        "mha-embedded",
        "tests/fixtures/mha-r4",
        &["--embed-weights"],
    );
    assert!(!dir.path().join("mha-embedded.weights").exists());
    same_as_ouroc_run(&emb, "tests/fixtures/mha-r4", &[], &[runs_mha[0]]);
}

/// Symbols (demangled) of an executable.
fn symbols(app: &Path) -> String {
    let o = Command::new("nm").arg("-C").arg(app).output().expect("run nm");
    assert!(o.status.success(), "nm {}: {}", app.display(), text(&o.stderr));
    text(&o.stdout)
}

#[test]
fn executables_contain_no_compiler_and_gpu_targets_need_a_driver() {
    let dir = tempfile::tempdir().unwrap();
    let app = build(dir.path(), "r1", "tests/fixtures/r1", &["--cpu-features", "x86-64-v3"]);
    let syms = symbols(&app);
    // nm sees the linked kernels and the runtime ...
    for s in [
        "ouroc_app_kernels",
        "ouroc_kernel_0",
        "ouroc_expf",
        "ouroc_runtime::cpu::CpuForward",
    ] {
        assert!(syms.contains(s), "nm lacks {s}");
    }
    // ... and none of the compilers, nor the PTX emitter or emulator (a GPU
    // target loads the PTX module the build stored).
    for line in syms.lines() {
        let l = line.to_lowercase();
        for bad in [
            "cranelift",
            "egg::",
            "melior",
            "regalloc2",
            "ouroc_codegen",
            "ouroc_ptx_emu",
        ] {
            assert!(!l.contains(bad), "{} links {bad}: {line}", app.display());
        }
    }
    let help = text(&run_app(&app, &["--help"]).stdout);
    assert!(help.contains("x86-64-v3"), "{help}");

    // A GPU target embeds the PTX and runs it through the CUDA driver; without
    // a driver (or a GPU) it refuses to start, naming what is missing.
    let gpu = build(dir.path(), "r1-gpu", "tests/fixtures/r1", &["--target", "a100"]);
    let o = run_app(&gpu, &["--prompt", "hi", "--max-new-tokens", "2"]);
    let err = text(&o.stderr);
    if o.status.success() {
        assert!(err.contains("PTX on the CUDA device"), "{err}");
    } else {
        assert!(
            err.contains("no CUDA driver") || err.contains("no CUDA device"),
            "{err}"
        );
    }
    assert!(symbols(&gpu).contains("ouroc_app_meta"));
    let meta = std::fs::read(&gpu).unwrap();
    assert!(
        meta.windows(b".target sm_80".len()).any(|w| w == b".target sm_80"),
        "the PTX is embedded"
    );
    // --device cpu on a cpu+a100 build runs on the CPU.
    let both = build(dir.path(), "r1-both", "tests/fixtures/r1", &["--target", "cpu+a100"]);
    let o = run_app(&both, &["--prompt", "hi", "--device", "cpu", "--max-new-tokens", "3"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn build_explains_a_missing_app_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("x");
    let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(["build", "tests/fixtures/r1", "-o", app.to_str().unwrap()])
        .env("OUROC_APP_LIB", dir.path().join("nowhere.a"))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("nowhere.a"), "{}", text(&o.stderr));
    let o = ouroc(&[
        "build",
        root().join("tests/fixtures/r1").to_str().unwrap(),
        "-o",
        app.to_str().unwrap(),
        "--cpu-features",
        "pentium",
        "--app-lib",
        app_lib().to_str().unwrap(),
    ]);
    assert!(
        text(&o.stderr).contains("valid levels: native, x86-64-v2"),
        "{}",
        text(&o.stderr)
    );
}

/// With the app runtime missing from its target directory
/// (`$OUROC_APP_TARGET_DIR`), `ouroc build` runs cargo (`$CARGO`; a stand-in
/// here, which records its arguments and puts the real library where cargo
/// would) in its own workspace, says so, and links what it built; then it
/// uses the library as it is, rebuilds it once it is older than Cargo.lock,
/// and explains a cargo that fails or is not there.
#[test]
fn build_builds_a_missing_app_runtime_with_cargo() {
    let real = app_lib();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("app target");
    let lib = target.join("release/libouroc_app.a");
    let log = dir.path().join("cargo.log");
    let cargo = dir.path().join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\necho \"cargo $* (in $(pwd))\" >> '{log}'\necho '   Compiling ouroc-app (stand-in)' >&2\n\
             mkdir -p '{rel}' && cp '{real}' '{rel}/'\n",
            log = log.display(),
            rel = target.join("release").display(),
            real = real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ckpt = root().join("tests/fixtures/r1");
    let app = dir.path().join("x");
    let run = |cargo: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ouroc"))
            .args(["build", ckpt.to_str().unwrap(), "-o", app.to_str().unwrap()])
            .env_remove("OUROC_APP_LIB")
            .env("OUROC_APP_TARGET_DIR", &target)
            .env("CARGO", cargo)
            .output()
            .unwrap()
    };
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    // A build that succeeds: its progress output.
    let built = |cargo: &Path| {
        let o = run(cargo);
        let err = text(&o.stderr);
        assert!(o.status.success(), "{err}");
        err
    };

    let err = built(&cargo);
    assert!(
        err.contains("building the app runtime") && err.contains(" once (about "),
        "no progress line:\n{err}"
    );
    assert!(
        err.contains("Compiling ouroc-app (stand-in)"),
        "cargo's output is shown:\n{err}"
    );
    let want = format!(
        "cargo build --release -p ouroc-app --target-dir {} (in {})\n",
        target.display(),
        root().display()
    );
    assert_eq!(calls(), want);
    assert!(err.contains(&format!("with {} by", lib.display())), "{err}");
    let o = run_app(&app, &["--ids", "1,2", "--max-new-tokens", "2", "--temperature", "0"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Up to date: no cargo.
    assert!(!built(&cargo).contains("the app runtime"));
    assert_eq!(calls(), want, "cargo ran for an up-to-date library");

    // Older than the workspace's Cargo.lock: rebuilt, saying why.
    std::fs::File::options()
        .write(true)
        .open(&lib)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    let err = built(&cargo);
    assert!(
        err.contains("rebuilding the app runtime") && err.contains("Cargo.lock changed since it was built"),
        "{err}"
    );
    assert_eq!(calls(), want.repeat(2));

    // cargo fails, or is not there: the command to run, no panic.
    std::fs::remove_file(&lib).unwrap();
    for (cargo, needle) in [
        (Path::new("/bin/false"), "building the app runtime failed"),
        (&dir.path().join("no-cargo"), "cannot run cargo"),
    ] {
        let o = run(cargo);
        let err = text(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        assert!(
            err.contains(needle) && err.contains("cargo build --release -p ouroc-app --target-dir"),
            "{err}"
        );
    }
}
