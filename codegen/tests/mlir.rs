//! MLIR export (feature `mlir`):
//! - the module of the optimised mha-r4 fixture (f32, `last` and
//!   `threshold:0.5`) as snapshots;
//! - MLIR's verifier (run by the export) accepts the graph after every pass
//!   of the pipeline, for every kind of exit policy, f32 and bf16, rolled
//!   and unrolled imports; the loop is `scf.for`, or `scf.while` when the
//!   policy can stop early; weights are function arguments;
//! - an export failure names the IR op;
//! - `mlir-opt` (LLVM 19) parses the printed text back unchanged with
//!   `--verify-each` and canonicalizes it;
//! - lowered with `mlir-opt` to the LLVM dialect and run by
//!   `mlir-cpu-runner` on the golden prompt, the module's logits equal the
//!   interpreter's on the same graph (to the printed 6 digits) and match the
//!   PyTorch reference's (f32: 1e-4 relative, bf16: 2e-2, as `tests/golden.rs`).
//!
//! The tools are looked up in `$MLIR_SYS_190_PREFIX/bin`, else
//! `/usr/lib/llvm-19/bin` (Debian's `mlir-19-tools`). Without them those
//! checks are skipped with a message, or fail when `CI` is set.
#![cfg(feature = "mlir")]

use ouroc_codegen::mlir::{self, MlirError};
use ouroc_ir::{DType, ExitPolicy, Graph, Interpreter, OpKind, Options};
use ouroc_models::{BuildOptions, Checkpoint};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn open(name: &str) -> Checkpoint {
    Checkpoint::open(&fixture_dir(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn imported(ckpt: &Checkpoint, dtype: DType, policy: &str, unrolled: bool) -> Graph {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled,
    };
    ouroc_models::build_graph(ckpt, &opts).expect("graph")
}

fn optimised(g: &Graph) -> Graph {
    ouroc_compile::optimise(g, false, None).expect("pipeline").0
}

fn export(g: &Graph) -> String {
    mlir::export(g).unwrap_or_else(|e| panic!("export: {e}"))
}

#[test]
fn snapshot_mha_r4_f32_last() {
    let g = optimised(&imported(&open("mha-r4"), DType::F32, "last", false));
    insta::assert_snapshot!(export(&g));
}

#[test]
fn snapshot_mha_r4_f32_threshold() {
    let g = optimised(&imported(&open("mha-r4"), DType::F32, "threshold:0.5", false));
    insta::assert_snapshot!(export(&g));
}

/// The structure every export must have, whatever the graph.
fn check_structure(g: &Graph, text: &str, ctx: &str) {
    let weights: HashSet<&str> = g
        .walk()
        .into_iter()
        .filter_map(|op| match &op.kind {
            OpKind::Weight { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        text.matches("{ouroc.weight = ").count(),
        weights.len(),
        "{ctx}: one argument per weight"
    );
    assert!(!text.contains("dense<\"0x"), "{ctx}: no inlined weight data");
    match g.find_loop() {
        Some(l) => {
            let (want, other) = match l.policy {
                ExitPolicy::Threshold { .. } => ("scf.while", "scf.for"),
                _ => ("scf.for", "scf.while"),
            };
            assert_eq!(text.matches(&format!("= {want}")).count(), 1, "{ctx}: one {want}");
            assert!(!text.contains(other), "{ctx}: no {other}");
            assert!(
                text.contains(&format!("ouroc.policy = \"{}\"", l.policy)),
                "{ctx}: policy attribute"
            );
            assert!(
                text.contains(&format!("ouroc.steps = {} : i64", l.steps)),
                "{ctx}: steps attribute"
            );
        }
        None => assert!(!text.contains("scf."), "{ctx}: an unrolled graph has no loop"),
    }
    assert!(text.contains("linalg.generic"), "{ctx}");
    for dialect in ["linalg.", "tensor.", "arith.", "math.", "func."] {
        assert!(text.contains(dialect), "{ctx}: uses {dialect}");
    }
}

#[test]
fn every_pass_every_policy_verifies() {
    let ckpt = open("mha-r4");
    let pipeline = ouroc_passes::default_pipeline();
    let mut checked = 0;
    for dtype in [DType::F32, DType::BF16] {
        for policy in ["last", "step:1", "threshold:0.5", "threshold:1.0:bf16", "weighted"] {
            for unrolled in [false, true] {
                let mut g = imported(&ckpt, dtype, policy, unrolled);
                let mut stage = "imported";
                for pass in pipeline.passes().iter().map(Some).chain([None]) {
                    let ctx = format!("{dtype} {policy} unrolled={unrolled} after {stage}");
                    let text = mlir::export(&g).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    check_structure(&g, &text, &ctx);
                    checked += 1;
                    if let Some(p) = pass {
                        g = p.run(&g).unwrap_or_else(|e| panic!("{ctx}: pass {}: {e}", p.name()));
                        stage = p.name();
                    }
                }
            }
        }
    }
    assert_eq!(checked, 2 * 5 * 2 * (pipeline.passes().len() + 1));
}

#[test]
fn failures_name_the_ir_op() {
    // A norm over a symbolic last dim: the IR allows it, the export needs the row length.
    let g = ouroc_ir::parse(
        "graph @g(%0: f32[batch, seq]) {\n  %1 = rms_scale(%0) {eps = 1e-6} : f32[batch, seq]\n  return %1\n}\n",
    )
    .expect("parse");
    let err = mlir::export(&g).expect_err("a norm over seq");
    let msg = err.to_string();
    assert!(matches!(err, MlirError::Unsupported(_)), "{msg}");
    assert!(
        msg.contains("`%1 = rms_scale`") && msg.contains("symbolic last dim"),
        "{msg}"
    );
}

#[test]
fn locations_name_the_ir_ops() {
    let g = optimised(&imported(&open("mha-r4"), DType::F32, "threshold:0.5", false));
    let text = mlir::export_with(&g, mlir::PrintOptions { locations: true }).expect("export");
    for op in [
        "= add_rms_norm\")",
        "= step_end\")",
        "= attention\")",
        "= swiglu\")",
        "\"model.norm.weight\"",
    ] {
        assert!(text.contains(op), "a location names {op}");
    }
}

// ---- mlir-opt and mlir-cpu-runner ----

/// An LLVM 19 tool, or None (a message; a failure under CI).
fn tool(name: &str) -> Option<PathBuf> {
    let prefix = std::env::var("MLIR_SYS_190_PREFIX").unwrap_or_else(|_| "/usr/lib/llvm-19".into());
    let path = Path::new(&prefix).join("bin").join(name);
    if path.exists() {
        return Some(path);
    }
    let msg = format!("{} not found (apt-get install mlir-19-tools)", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

fn run_tool(cmd: &mut Command, input: Option<&Path>) -> String {
    if let Some(i) = input {
        cmd.arg(i);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn mlir_opt_parses_round_trips_and_canonicalizes() {
    let Some(opt) = tool("mlir-opt") else { return };
    let ckpt = open("mha-r4");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        optimised(&imported(&ckpt, DType::F32, "last", false)),
        optimised(&imported(&ckpt, DType::F32, "threshold:0.5", false)),
        optimised(&imported(&ckpt, DType::BF16, "weighted", false)),
        imported(&ckpt, DType::BF16, "threshold:1.0:bf16", true),
    ];
    for (i, g) in cases.iter().enumerate() {
        let text = export(g);
        let file = dir.path().join(format!("m{i}.mlir"));
        std::fs::write(&file, &text).unwrap();
        let parsed = run_tool(Command::new(&opt).arg("--verify-each"), Some(&file));
        assert_eq!(
            parsed.trim_end(),
            text.trim_end(),
            "case {i}: mlir-opt prints the module back unchanged"
        );
        let canon = run_tool(Command::new(&opt).args(["--canonicalize", "--cse"]), Some(&file));
        assert!(canon.contains("func.func @ouro"), "case {i}");
        assert!(
            canon.lines().count() < text.lines().count(),
            "case {i}: canonicalization simplifies"
        );
    }
}

/// A `main` that calls the exported function on the prompt with the
/// checkpoint's weights as constants and prints the logits.
fn runner_module(text: &str, g: &Graph, ckpt: &Checkpoint, ids: &[i32]) -> String {
    let t = ids.len();
    let mut main = String::from("  func.func @main() {\n");
    let mut args = Vec::new();
    let mut types = Vec::new();
    let weights: Vec<String> = {
        let mut seen = Vec::new();
        for op in g.walk() {
            if let OpKind::Weight { name } = &op.kind
                && !seen.contains(name)
            {
                seen.push(name.clone());
            }
        }
        seen
    };
    let weight_type = |name: &str| {
        g.walk()
            .into_iter()
            .find(|op| matches!(&op.kind, OpKind::Weight { name: n } if n == name))
            .map(|op| g.ty(op.result()).clone())
            .unwrap()
    };
    for (i, _) in g.inputs().iter().enumerate() {
        // token ids, then positions 0..t
        let vals: Vec<String> = match i {
            0 => ids.iter().map(|x| x.to_string()).collect(),
            _ => (0..t).map(|x| x.to_string()).collect(),
        };
        writeln!(
            main,
            "    %in{i} = arith.constant dense<[[{}]]> : tensor<1x{t}xi32>",
            vals.join(", ")
        )
        .unwrap();
        writeln!(
            main,
            "    %a{i} = tensor.cast %in{i} : tensor<1x{t}xi32> to tensor<?x?xi32>"
        )
        .unwrap();
        args.push(format!("%a{i}"));
        types.push("tensor<?x?xi32>".to_string());
    }
    for (w, name) in weights.iter().enumerate() {
        let ty = weight_type(name);
        let data = ckpt.read_f32(name).expect("weight");
        let mut hex = String::with_capacity(data.len() * 8);
        for x in data {
            match ty.dtype {
                DType::F32 => x.to_le_bytes().iter().for_each(|b| write!(hex, "{b:02X}").unwrap()),
                DType::BF16 => half::bf16::from_f32(x)
                    .to_le_bytes()
                    .iter()
                    .for_each(|b| write!(hex, "{b:02X}").unwrap()),
                DType::F16 => half::f16::from_f32(x)
                    .to_le_bytes()
                    .iter()
                    .for_each(|b| write!(hex, "{b:02X}").unwrap()),
                DType::I32 => panic!("integer weight {name}"),
            }
        }
        let dims: Vec<String> = ty.shape.iter().map(|d| d.to_string()).collect();
        let tt = format!("tensor<{}x{}>", dims.join("x"), ty.dtype);
        writeln!(main, "    %w{w} = arith.constant dense<\"0x{hex}\"> : {tt}").unwrap();
        args.push(format!("%w{w}"));
        types.push(tt);
    }
    let out = g.ty(g.outputs()[0]);
    let v = out.shape[2].to_string();
    let rt = format!("tensor<?x?x{v}x{}>", out.dtype);
    writeln!(
        main,
        "    %r = func.call @{}({}) : ({}) -> {rt}",
        g.name,
        args.join(", "),
        types.join(", ")
    )
    .unwrap();
    let logits = if out.dtype == DType::F32 {
        "%r".to_string()
    } else {
        // Widen to f32 for printing.
        writeln!(
            main,
            "    %c0 = arith.constant 0 : index\n    %c1 = arith.constant 1 : index"
        )
        .unwrap();
        writeln!(
            main,
            "    %d0 = tensor.dim %r, %c0 : {rt}\n    %d1 = tensor.dim %r, %c1 : {rt}"
        )
        .unwrap();
        writeln!(main, "    %e = tensor.empty(%d0, %d1) : tensor<?x?x{v}xf32>").unwrap();
        writeln!(
            main,
            "    %f = linalg.generic {{indexing_maps = [affine_map<(i, j, k) -> (i, j, k)>, affine_map<(i, j, k) -> (i, j, k)>], \
             iterator_types = [\"parallel\", \"parallel\", \"parallel\"]}} ins(%r : {rt}) outs(%e : tensor<?x?x{v}xf32>) {{\n\
             ^bb0(%x: {dt}, %y: f32):\n      %z = arith.extf %x : {dt} to f32\n      linalg.yield %z : f32\n    }} -> tensor<?x?x{v}xf32>",
            dt = out.dtype
        )
        .unwrap();
        "%f".to_string()
    };
    writeln!(
        main,
        "    %u = tensor.cast {logits} : tensor<?x?x{v}xf32> to tensor<*xf32>"
    )
    .unwrap();
    main += "    func.call @printMemrefF32(%u) : (tensor<*xf32>) -> ()\n    return\n  }\n";
    main += "  func.func private @printMemrefF32(tensor<*xf32>)\n";
    let end = text.rfind('}').expect("module end");
    format!("{}{main}}}\n", &text[..end])
}

/// The numbers of a `printMemrefF32` output.
fn printed_values(out: &str) -> Vec<f32> {
    let data = &out[out.find("data =").expect("printMemref output") + 6..];
    data.split(|c: char| c == '[' || c == ']' || c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f32>().unwrap_or_else(|_| panic!("not a number: {s}")))
        .collect()
}

#[test]
fn lowered_module_runs_and_matches_golden_logits() {
    let (Some(opt), Some(runner)) = (tool("mlir-opt"), tool("mlir-cpu-runner")) else {
        return;
    };
    let lib = runner.parent().unwrap().join("../lib");
    let libs = format!(
        "{},{}",
        lib.join("libmlir_c_runner_utils.so").display(),
        lib.join("libmlir_runner_utils.so").display()
    );
    let ckpt = open("mha-r4");
    let golden = safetensors_file(&fixture_dir("golden/mha-r4.safetensors"));
    let ids: Vec<i32> = golden.i32("prompt_ids");
    let dir = tempfile::tempdir().unwrap();
    // (precision, policy, unrolled import, optimised)
    let cases = [
        (DType::F32, "last", false, true),
        (DType::F32, "threshold:0.5", false, true),
        (DType::F32, "weighted", false, false),
        (DType::F32, "step:1", true, false),
        (DType::BF16, "threshold:1.0:bf16", false, false),
        (DType::BF16, "threshold:1.0:bf16", false, true),
    ];
    for (dtype, policy, unrolled, opt_graph) in cases {
        let ctx = format!("{dtype} {policy} unrolled={unrolled} optimised={opt_graph}");
        let mut g = imported(&ckpt, dtype, policy, unrolled);
        if opt_graph {
            g = optimised(&g);
        }
        let file = dir.path().join("run.mlir");
        std::fs::write(&file, runner_module(&export(&g), &g, &ckpt, &ids)).unwrap();
        let llvm = dir.path().join("run.llvm.mlir");
        run_tool(
            Command::new(&opt)
                .args([
                    "-one-shot-bufferize=bufferize-function-boundaries allow-return-allocs-from-loops",
                    "-buffer-deallocation-pipeline",
                    "-convert-bufferization-to-memref",
                    "-convert-linalg-to-loops",
                    "-convert-scf-to-cf",
                    "-expand-strided-metadata",
                    "-lower-affine",
                    "-convert-math-to-llvm",
                    "-convert-arith-to-llvm",
                    "-convert-cf-to-llvm",
                    "-finalize-memref-to-llvm",
                    "-convert-func-to-llvm",
                    "-reconcile-unrealized-casts",
                    "-o",
                ])
                .arg(&llvm),
            Some(&file),
        );
        let out = run_tool(
            Command::new(&runner).args([
                "-e",
                "main",
                "-entry-point-result=void",
                &format!("-shared-libs={libs}"),
            ]),
            Some(&llvm),
        );
        let got = printed_values(&out);
        // Against the interpreter on the same graph: the module computes and rounds as it
        // does, so they agree to the 6 significant digits printMemref prints (a wrong
        // rounding point alone would move bf16 logits by 1e-2).
        let mut it = Interpreter::new(&g, &ckpt, Options::default()).expect("weights");
        let ids_u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let want = it.run_tokens(&[ids_u]).expect("interpreter").outputs.remove(0).data;
        close(&got, &want, 1e-5, &format!("{ctx} vs interpreter"));
        // Against the PyTorch reference: f32 always; bf16 only as imported (folding a norm
        // weight into a linear moves one bf16 rounding, see passes/src/egraph/rules.rs).
        if dtype == DType::F32 || !opt_graph {
            let prec = if dtype == DType::F32 { "f32" } else { "bf16" };
            let golden = golden.f32(&format!("{prec}/{policy}/logits"));
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            close(&got, &golden, tol, &format!("{ctx} vs golden"));
        }
    }
}

/// max |a - b| <= tol * max |b|.
fn close(got: &[f32], want: &[f32], tol: f32, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: logits count");
    let max_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(
        max_diff <= tol * scale,
        "{ctx}: max |diff| {max_diff} > {tol} x max |reference| {scale}"
    );
}

/// A safetensors file of f32/i32 tensors (the golden outputs).
struct Tensors {
    bytes: Vec<u8>,
}

fn safetensors_file(path: &Path) -> Tensors {
    Tensors {
        bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    }
}

impl Tensors {
    fn raw(&self, name: &str) -> &[u8] {
        let n = u64::from_le_bytes(self.bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&self.bytes[8..8 + n]).expect("header");
        let off = &header[name]["data_offsets"];
        let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        &self.bytes[8 + n + a..8 + n + b]
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        self.raw(name)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i32(&self, name: &str) -> Vec<i32> {
        self.raw(name)
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}
