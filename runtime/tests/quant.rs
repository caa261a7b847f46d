//! Quantised weights (`--weights q8|q4`) end to end: the compiled CPU engine
//! against the reference device running the same Program (the arithmetic of
//! `ouroc_kernels::quant`: the same quantised weights and activations), on
//! the fixtures, f32 and bf16, several exit policies, prefill then decode;
//! the dense model against its quantised self (close, not equal); what the
//! Program says about its bytes (the GPU path: tests/gpu_emu_quant.rs).

mod common;

use common::fixture;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::Program;
use ouroc_kernels::quant::WeightScheme;
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuForward, CpuOptions};
use ouroc_runtime::generate::Forward;

fn program(ckpt: &Checkpoint, dtype: DType, policy: &str, scheme: WeightScheme) -> Program {
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(ckpt, &opts).unwrap();
    let mut p = ouroc_compile::compile_graph(g, false).unwrap().program;
    scheme.apply(&mut p);
    p
}

fn ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 777) % vocab as u64) as u32)
        .collect()
}

/// Max |a - b| relative to max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The CPU engine's calls (prefill of 7, then 4 decode tokens): logits and depth.
fn cpu_calls(p: Program, ckpt: &Checkpoint, prompt: &[u32], threads: usize) -> Vec<(Vec<f32>, usize)> {
    let opts = CpuOptions {
        threads,
        ..CpuOptions::new(64)
    };
    let mut m = CpuForward::with_options(p, ckpt, &opts).unwrap();
    std::iter::once(&prompt[..7])
        .chain(prompt[7..].chunks(1))
        .map(|c| {
            let s = m.forward(c).unwrap();
            (s.logits, s.depth)
        })
        .collect()
}

/// The reference device's last-position logits and exit depth for the same calls.
fn reference_calls(p: &Program, ckpt: &Checkpoint, prompt: &[u32]) -> Vec<(Vec<f32>, usize)> {
    let mut exec = Executor::new(p, ckpt, ExecOptions::default()).unwrap();
    std::iter::once(&prompt[..7])
        .chain(prompt[7..].chunks(1))
        .map(|c| {
            let out = exec.run_tokens(&[c.to_vec()]).unwrap();
            let t = &out.outputs[0];
            let v = t.shape[2];
            let last = t.data[t.data.len() - v..].to_vec();
            (last, out.exit_steps.last().map_or(0, |s| s + 1))
        })
        .collect()
}

#[test]
fn the_cpu_engine_computes_the_reference_devices_quantised_program() {
    let mut checked = 0;
    for name in ["mha-r4", "gqa-hd", "tied"] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let prompt = ids(ckpt.config.vocab_size, 11);
        for scheme in [WeightScheme::Q8, WeightScheme::Q4] {
            for (dtype, policy) in [
                (DType::F32, "last"),
                (DType::F32, "threshold:0.5"),
                (DType::F32, "weighted"),
                (DType::BF16, "step:1"),
                (DType::BF16, "threshold:1.0:bf16"),
                (DType::F32, "step:0"),
                (DType::BF16, "step:2"),
            ] {
                let what = format!("{name} {dtype} {policy} {}", scheme.name());
                let p = program(&ckpt, dtype, policy, scheme);
                let want = reference_calls(&p, &ckpt, &prompt);
                // Linears are bit-exact; the other kernels reorder sums
                // (bf16: a rounding point can then flip by one unit).
                let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
                for threads in [1, 2] {
                    let got = cpu_calls(p.clone(), &ckpt, &prompt, threads);
                    for (i, ((g, gd), (w, wd))) in got.iter().zip(&want).enumerate() {
                        let e = rel_err(g, w);
                        assert!(e <= tol, "{what} threads {threads} call {i}: relative error {e}");
                        if dtype == DType::F32 {
                            assert_eq!(gd, wd, "{what} call {i}: exit depth");
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 42);
}

/// Quantisation changes the answer a little, not much, on a trained model
/// (the demo model; the fixtures' random weights amplify every rounding):
/// the logits differ from the dense f32 model's, q8 less than q4.
#[test]
fn quantised_models_stay_close_to_the_dense_one() {
    let ckpt = Checkpoint::open(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo")).unwrap();
    let prompt = ids(ckpt.config.vocab_size, 11);
    let dense = cpu_calls(
        program(&ckpt, DType::F32, "last", WeightScheme::Dense),
        &ckpt,
        &prompt,
        2,
    );
    let err = |scheme| {
        let q = cpu_calls(program(&ckpt, DType::F32, "last", scheme), &ckpt, &prompt, 2);
        q.iter()
            .zip(&dense)
            .map(|((g, _), (w, _))| rel_err(g, w))
            .fold(0.0f32, f32::max)
    };
    // Measured: 0.0076 and 0.037.
    let (e8, e4) = (err(WeightScheme::Q8), err(WeightScheme::Q4));
    assert!(e8 > 0.0 && e8 < 0.02, "q8: {e8}");
    assert!(e4 > e8 && e4 < 0.1, "q4: {e4} (q8 {e8})");
}

/// The Program shows the format and counts its bytes: every Linear but
/// the gate in the format, the weight bytes read per token those of the
/// format (32 weights in 34 or 18 bytes).
#[test]
fn the_program_reads_fewer_weight_bytes_and_says_so() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let dense = program(&ckpt, DType::BF16, "last", WeightScheme::Dense);
    let (o, s) = dense.weight_bytes_read();
    let mut sizes = vec![(o, s)];
    for scheme in [WeightScheme::Q8, WeightScheme::Q4] {
        let p = program(&ckpt, DType::BF16, "last", scheme);
        let text = p.to_string();
        let fmt = if scheme == WeightScheme::Q8 { "q8_0" } else { "q4_0" };
        assert!(text.contains(&format!("weight = {fmt} (from bf16)")), "{text}");
        assert!(text.contains("(read as q8_0)"), "the LM head: {text}");
        sizes.push(p.weight_bytes_read());
        // Through JSON and back: the format is part of the Program.
        assert_eq!(Program::from_json(&p.to_json()).unwrap(), p);
    }
    // Per loop step only Linears read weights besides norms: bf16 is 16
    // bits, q8_0 8.5, q4_0 4.5 (k = 32 and 88: 88 pads to 96).
    let (d, q8, q4) = (sizes[0].1 as f64, sizes[1].1 as f64, sizes[2].1 as f64);
    assert!(q8 < d * 0.6 && q8 > d * 0.5, "{q8} vs {d}");
    assert!(q4 < d * 0.35 && q4 > d * 0.25, "{q4} vs {d}");
}

/// A Program read from a file whose quantised Linear does not match its
/// weight's shape is refused before any kernel could read past the weight.
#[test]
fn a_program_whose_linear_and_weight_disagree_is_refused() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let p = program(&ckpt, DType::F32, "last", WeightScheme::Q4);
    let mut bad = p.clone();
    let head = bad.after.iter_mut().find(|k| k.spec.name == "lm_head").unwrap();
    if let ouroc_kernels::Family::Linear(l) = &mut head.spec.family {
        l.k *= 2;
    }
    let e = Program::from_json(&bad.to_json()).unwrap_err();
    assert!(
        e.contains("lm_head") && (e.contains("weight") || e.contains("columns")),
        "{e}"
    );
}
