//! The PTX backend: the text of every kernel family as a snapshot, at the
//! fixture shapes (the mha-r4 Program in bf16 and f32, the gqa-hd
//! attention) and at the Ouro-1.4B shape (its lowered bf16 Program); the
//! launch / parameter ABI; and `ptxas -arch=sm_80 -v` on every kernel
//! (registers, shared memory and spills as a snapshot, no spills in GEMM
//! or attention, HMMA and LDGSTS in the GEMM's SASS).
//!
//! ptxas is found via `OUROC_PTXAS`, else `PATH`, else the venv
//! `/work/venv` (`pip install nvidia-cuda-nvcc-cu12==12.9.86`); nvdisasm via
//! `OUROC_NVDISASM`, `PATH`, or that venv (`pip install nvidia-cuda-nvdisasm`).
//! Without them the checks are skipped with a message, or fail when `CI`
//! is set (`.ci/run` installs both).

use ouroc_codegen::ptx::{self, Dim, KernelAbi, PtxError, PtxKernel, When};
use ouroc_compile::compile_graph;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::quant::WeightScheme;
use ouroc_kernels::spec::{AttentionSpec, Family, LinearSpec};
use ouroc_kernels::{KernelSpec, Program};
use ouroc_models::{BuildOptions, Checkpoint};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn opts(dtype: DType, policy: &str) -> BuildOptions {
    BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    }
}

/// The lowered Program of a fixture checkpoint after the default pipeline.
fn fixture(name: &str, dtype: DType) -> Program {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let g = ouroc_models::build_graph(&ckpt, &opts(dtype, "threshold:0.5")).expect("graph");
    compile_graph(g, false).expect("compile").program
}

/// The Ouro-1.4B shape (no weights needed), bf16.
fn ouro_1_4b() -> Program {
    let cfg = ouroc_models::shapes::named_shape("1.4b").unwrap();
    let g = ouroc_models::build_from_config(&cfg, "lm_head.weight", &opts(DType::BF16, "threshold:1.0:bf16"));
    compile_graph(g.unwrap(), false).unwrap().program
}

/// `p` with its Linears quantised as `--weights` `scheme` does.
fn quantised(mut p: Program, scheme: WeightScheme) -> Program {
    assert!(scheme.apply(&mut p) > 0, "no Linear quantised");
    p
}

/// The distinct quantised Linears of `p`.
fn quantised_linears(p: &Program) -> Vec<KernelSpec> {
    distinct(p)
        .into_iter()
        .filter(|s| matches!(&s.family, Family::Linear(l) if l.quant.is_some()))
        .collect()
}

/// One spec per distinct code.
fn distinct(p: &Program) -> Vec<KernelSpec> {
    let mut seen = HashSet::new();
    p.kernels()
        .filter(|k| seen.insert(k.spec.code_key()))
        .map(|k| k.spec.clone())
        .collect()
}

fn emit(spec: &KernelSpec) -> PtxKernel {
    ptx::emit(spec).unwrap_or_else(|e| panic!("{}: {e}", spec.name))
}

/// Every kernel the tests assemble: (label, kernel).
fn all_kernels() -> Vec<(String, PtxKernel)> {
    let mut v = Vec::new();
    for (label, p) in [
        ("mha_r4_bf16", fixture("mha-r4", DType::BF16)),
        ("mha_r4_f32", fixture("mha-r4", DType::F32)),
        ("gqa_hd_bf16", fixture("gqa-hd", DType::BF16)),
        ("ouro_1_4b", ouro_1_4b()),
    ] {
        for s in distinct(&p) {
            v.push((format!("{label}__{}", s.name), emit(&s)));
        }
        let vocab = p.outputs[0].len;
        v.push((
            format!("{label}__argmax"),
            ptx::argmax(vocab, p.kernels().next().unwrap().spec.act).unwrap(),
        ));
    }
    // The quantised Linears at the fixture and the 1.4B shapes.
    for (label, p) in [
        (
            "mha_r4_bf16_q8",
            quantised(fixture("mha-r4", DType::BF16), WeightScheme::Q8),
        ),
        (
            "mha_r4_f32_q4",
            quantised(fixture("mha-r4", DType::F32), WeightScheme::Q4),
        ),
        ("ouro_1_4b_q4", quantised(ouro_1_4b(), WeightScheme::Q4)),
    ] {
        for s in quantised_linears(&p) {
            v.push((format!("{label}__{}", s.name), emit(&s)));
        }
    }
    v
}

fn snapshot_program(label: &str, p: &Program) {
    for s in distinct(p) {
        insta::assert_snapshot!(format!("{label}__{}", s.name), emit(&s).text);
    }
}

#[test]
fn every_kernel_of_the_mha_r4_bf16_program() {
    snapshot_program("mha_r4_bf16", &fixture("mha-r4", DType::BF16));
}

#[test]
fn every_kernel_of_the_mha_r4_f32_program() {
    snapshot_program("mha_r4_f32", &fixture("mha-r4", DType::F32));
}

/// The quantised Linears (`--weights q8`: every Linear q8_0; `q4`: the
/// layers' q4_0, the LM head q8_0) in bf16 and f32.
#[test]
fn quantised_linears_of_the_mha_r4_program() {
    for (label, p) in [
        (
            "mha_r4_bf16_q8",
            quantised(fixture("mha-r4", DType::BF16), WeightScheme::Q8),
        ),
        (
            "mha_r4_bf16_q4",
            quantised(fixture("mha-r4", DType::BF16), WeightScheme::Q4),
        ),
        (
            "mha_r4_f32_q4",
            quantised(fixture("mha-r4", DType::F32), WeightScheme::Q4),
        ),
    ] {
        let specs = quantised_linears(&p);
        assert!(specs.len() >= 4, "{label}: {} quantised Linears", specs.len());
        for s in specs {
            insta::assert_snapshot!(format!("{label}__{}", s.name), emit(&s).text);
        }
    }
}

#[test]
fn grouped_query_attention_of_gqa_hd() {
    let p = fixture("gqa-hd", DType::BF16);
    let attn = distinct(&p)
        .into_iter()
        .find(|s| matches!(&s.family, Family::Attention(a) if a.kv_heads < a.heads))
        .expect("a GQA attention kernel");
    insta::assert_snapshot!("gqa_hd_bf16__attention", emit(&attn).text);
}

#[test]
fn every_kernel_of_the_ouro_1_4b_program() {
    snapshot_program("ouro_1_4b", &ouro_1_4b());
}

#[test]
fn argmax_kernels() {
    insta::assert_snapshot!("argmax_bf16_49152", ptx::argmax(49152, DType::BF16).unwrap().text);
    insta::assert_snapshot!("argmax_f32_288", ptx::argmax(288, DType::F32).unwrap().text);
}

/// The ABI of one kernel as a table row: entries with when / grid / block / shared.
fn abi_text(k: &KernelAbi) -> String {
    let params: Vec<&str> = k.params.iter().map(|p| p.name.as_str()).collect();
    let mut s = format!("{} ({})\n", k.name, params.join(", "));
    for e in &k.entries {
        s += &format!(
            "  {:<40} {:<22} grid {:?} block {} shared {}\n",
            e.entry,
            format!("{:?}", e.when),
            e.launch.grid,
            e.launch.block,
            e.launch.shared_bytes
        );
    }
    s
}

#[test]
fn module_of_the_1_4b_program_shares_code_and_records_launches() {
    let p = ouro_1_4b();
    let m = ptx::module(&p).unwrap();
    assert_eq!(m.kernels.len(), p.kernels().count() + 1, "every kernel and argmax");
    let entries = m.text.matches(".visible .entry").count();
    let distinct_entries: HashSet<&str> = m
        .kernels
        .iter()
        .flat_map(|k| k.entries.iter().map(|e| e.entry.as_str()))
        .collect();
    assert_eq!(entries, distinct_entries.len(), "one copy per distinct code");
    assert_eq!(m.text.matches(".version").count(), 1);
    // Kernels of equal code share entries: l1.qkv launches l0.qkv's code.
    let find = |n: &str| m.kernels.iter().find(|k| k.name == n).unwrap();
    assert_eq!(find("l1.qkv").entries, find("l0.qkv").entries);
    // The launch records survive a JSON round trip (what a Program stores).
    let json = serde_json::to_string(&m.kernels).unwrap();
    let back: Vec<KernelAbi> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m.kernels);
    let mut table = String::new();
    let mut seen = HashSet::new();
    for k in &m.kernels {
        if seen.insert(k.entries[0].entry.clone()) {
            table += &abi_text(k);
        }
    }
    insta::assert_snapshot!("ouro_1_4b__abi", table);
}

#[test]
fn linear_picks_gemv_or_gemm_by_token_count() {
    let spec = |act, weight, n, k| KernelSpec {
        name: "l0.o".into(),
        act,
        family: Family::Linear(LinearSpec {
            n,
            k,
            weight,
            bias: false,
            quant: None,
        }),
    };
    let k = emit(&spec(DType::BF16, DType::BF16, 2048, 2048));
    let run = |t: u32| -> Vec<&str> {
        k.abi
            .entries
            .iter()
            .filter(|e| e.when.holds(t, t))
            .map(|e| e.entry.as_str())
            .collect()
    };
    assert_eq!(run(1), ["ouroc_l0_o_gemv"]);
    assert_eq!(run(ptx::GEMM_MIN_TOKENS - 1), ["ouroc_l0_o_gemv"]);
    assert_eq!(run(ptx::GEMM_MIN_TOKENS), ["ouroc_l0_o_gemm"]);
    let gemm = &k.abi.entries[1].launch;
    assert_eq!(gemm.grid(300, 300), [16, 3, 1]);
    assert_eq!(gemm.shared_bytes, 3 * 256 * 32 * 2);
    assert_eq!(k.abi.entries[0].launch.grid(5, 5), [5, 128, 1]);
    // No tensor cores for f32 activations or an odd k: the GEMV for every count.
    for s in [
        spec(DType::F32, DType::F32, 64, 64),
        spec(DType::BF16, DType::BF16, 64, 36),
    ] {
        let e = emit(&s).abi.entries;
        assert_eq!((e.len(), e[0].when), (1, When::Always));
        assert!(!emit(&s).text.contains("mma.sync"));
    }
}

#[test]
fn attention_runs_split_decode_or_tiled_prefill() {
    let a = AttentionSpec {
        layer: 0,
        heads: 16,
        kv_heads: 16,
        head_dim: 128,
        rope: true,
    };
    let spec = KernelSpec {
        name: "l0.attn".into(),
        act: DType::BF16,
        family: Family::Attention(a.clone()),
    };
    let k = emit(&spec);
    let names = |tokens: u32, seq: u32| -> Vec<String> {
        k.abi
            .entries
            .iter()
            .filter(|e| e.when.holds(tokens, seq))
            .map(|e| e.entry.trim_start_matches("ouroc_l0_attn_").to_string())
            .collect()
    };
    assert_eq!(names(4, 1), ["append", "scores", "pv", "combine"]);
    assert_eq!(names(2 * 37, 37), ["append", "prefill"]);
    let prefill = &k.abi.entries[4].launch;
    assert_eq!(prefill.grid, [Dim::Seq { per: 16 }, Dim::Fixed(16), Dim::Batch]);
    assert_eq!(prefill.grid(2 * 37, 37), [3, 16, 2]);
    assert_eq!(ptx::decode_splits(&a), 8);
    // Per (sequence, head): kv_cap scores, then 8 x (max, sum), then 8 partial rows.
    assert_eq!(ptx::attention_scratch_bytes(&a, 2, 100), 2 * 16 * (100 + 8 * 130) * 4);
    let roles: Vec<String> = k
        .abi
        .params
        .iter()
        .map(|p| format!("{}:{:?}", p.name, p.role))
        .collect();
    assert_eq!(
        roles.join(" "),
        "q:Operand(0) k:Operand(1) v:Operand(2) cos:Operand(3) sin:Operand(4) out:Result(0) \
         q_stride:OperandStride(0) k_stride:OperandStride(1) v_stride:OperandStride(2) \
         cos_stride:OperandStride(3) sin_stride:OperandStride(4) out_stride:ResultStride(0) \
         tokens:Tokens kv:Kv seq:Seq kv_cap:KvCap scratch:Scratch"
    );
}

#[test]
fn unsupported_specs_are_errors() {
    let f16 = KernelSpec {
        name: "x".into(),
        act: DType::F16,
        family: Family::Linear(LinearSpec {
            n: 8,
            k: 8,
            weight: DType::F16,
            bias: false,
            quant: None,
        }),
    };
    assert!(matches!(ptx::emit(&f16), Err(PtxError::Unsupported { .. })));
    let odd = KernelSpec {
        name: "a".into(),
        act: DType::F32,
        family: Family::Attention(AttentionSpec {
            layer: 0,
            heads: 3,
            kv_heads: 2,
            head_dim: 8,
            rope: false,
        }),
    };
    let e = ptx::emit(&odd).unwrap_err().to_string();
    assert!(e.contains("multiple of kv_heads"), "{e}");
}

// ---- ptxas ----

/// A tool from `env`, else `PATH`, else the venv path (a glob on python3.*).
fn find_tool(env: &str, name: &str, venv_rel: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let on_path = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Some(PathBuf::from(name));
    }
    let lib = Path::new("/work/venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages").join(venv_rel))
        .find(|p| p.exists())
}

/// The tool, or None after a skip message (a failure when `CI` is set).
fn require(env: &str, name: &str, venv_rel: &str) -> Option<PathBuf> {
    let t = find_tool(env, name, venv_rel);
    if t.is_none() {
        let msg = format!("{name} not found (set {env}, put it on PATH, or pip install it into /work/venv)");
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    t
}

/// Per entry: registers, shared bytes (static; dynamic is in the ABI), spill stores, spill loads.
#[derive(Debug, Default, Clone)]
struct Usage {
    regs: u32,
    smem: u32,
    spill_st: u32,
    spill_ld: u32,
}

/// Parse `ptxas -v` output into (entry, usage) in order.
fn parse_ptxas(out: &str) -> Vec<(String, Usage)> {
    let num_before = |line: &str, what: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(0)
    };
    let mut v: Vec<(String, Usage)> = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            v.push((rest.split('\'').next().unwrap().to_string(), Usage::default()));
        } else if let Some((_, u)) = v.last_mut() {
            if line.contains("spill stores") {
                u.spill_st = num_before(line, "spill stores");
                u.spill_ld = num_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                u.regs = num_before(line, "registers");
                u.smem = num_before(line, "smem");
            }
        }
    }
    v
}

#[test]
fn ptxas_accepts_every_kernel_for_sm_80_without_spills_in_gemm_or_attention() {
    let Some(ptxas) = require("OUROC_PTXAS", "ptxas", "nvidia/cuda_nvcc/bin/ptxas") else {
        return;
    };
    let version = Command::new(&ptxas).arg("--version").output().expect("ptxas runs");
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let dir = std::env::temp_dir().join(format!("ouroc-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut table = format!(
        "{:<58} {:>5} {:>6} {:>8} {:>8}\n",
        "kernel / entry", "regs", "smem", "spill_st", "spill_ld"
    );
    let mut bad = Vec::new();
    for (label, k) in all_kernels() {
        let src = dir.join(format!("{label}.ptx"));
        let cubin = dir.join(format!("{label}.cubin"));
        std::fs::write(&src, &k.text).unwrap();
        let log = run_ptxas(&ptxas, &src, &cubin);
        let usage = parse_ptxas(&log);
        assert_eq!(usage.len(), k.abi.entries.len(), "{label}: one report per entry\n{log}");
        for (entry, u) in usage {
            // Every entry of a quantised Linear (GEMV and GEMM) must not spill either.
            let quant = label
                .split("__")
                .next()
                .is_some_and(|l| l.ends_with("_q8") || l.ends_with("_q4"));
            let heavy = entry.ends_with("_gemm") || label.contains("attn") || quant;
            if heavy && (u.spill_st > 0 || u.spill_ld > 0) {
                bad.push(format!("{entry}: {u:?}"));
            }
            table += &format!(
                "{:<58} {:>5} {:>6} {:>8} {:>8}\n",
                entry.trim_start_matches("ouroc_").to_string() + &format!(" ({})", label.split("__").next().unwrap()),
                u.regs,
                u.smem,
                u.spill_st,
                u.spill_ld
            );
        }
    }
    assert!(
        bad.is_empty(),
        "GEMM / attention / quantised Linear entries spill:\n{}",
        bad.join("\n")
    );
    eprintln!("{table}");
    // Register counts are those of the pinned ptxas (CUDA 12.9.86).
    if version.contains("V12.9.86") {
        insta::assert_snapshot!("ptxas_usage", table);
    } else {
        eprintln!("ptxas is not 12.9.86 ({version}): usage table not compared");
    }

    let Some(nvdisasm) = require("OUROC_NVDISASM", "nvdisasm", "nvidia/cu13/bin/nvdisasm") else {
        return;
    };
    let cubin = dir.join("ouro_1_4b__l0.qkv.cubin");
    let out = Command::new(&nvdisasm).arg(&cubin).output().expect("nvdisasm runs");
    let sass = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nvdisasm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gemm = sass
        .split("//---------------------")
        .find(|s| s.trim_start().starts_with(".text.ouroc_l0_qkv_gemm "))
        .expect("the gemm's SASS");
    assert!(gemm.contains("HMMA.16816.F32.BF16"), "no HMMA in the GEMM");
    assert!(gemm.contains("LDGSTS"), "no LDGSTS (cp.async) in the GEMM");
    assert!(gemm.contains("LDSM"), "no LDSM (ldmatrix) in the GEMM");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ptxas -arch=sm_80 -v` on `src`: its log (it must accept the module).
fn run_ptxas(ptxas: &Path, src: &Path, cubin: &Path) -> String {
    let out = Command::new(ptxas)
        .args(["-arch=sm_80", "-v", "-o"])
        .arg(cubin)
        .arg(src)
        .output()
        .expect("ptxas runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ptxas rejects {}:\n{log}", src.display());
    log
}

/// The runtime's own kernel (the KV copy, in every module's
/// `runtime_text`) is accepted by ptxas for sm_80 like the Program's.
#[test]
fn ptxas_accepts_the_runtime_kv_copy_kernel() {
    let Some(ptxas) = require("OUROC_PTXAS", "ptxas", "nvidia/cuda_nvcc/bin/ptxas") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("kv_copy.ptx");
    std::fs::write(&src, ptx::KV_COPY_PTX).unwrap();
    let log = run_ptxas(&ptxas, &src, &dir.path().join("kv_copy.cubin"));
    assert!(log.contains(ptx::KV_COPY_ENTRY), "{log}");
    let m = ptx::module(&fixture("mha-r4", DType::F32)).unwrap();
    assert_eq!(m.runtime_text, ptx::KV_COPY_PTX);
}
