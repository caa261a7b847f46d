//! Support shared by the GPU tests (gpu_emu.rs, cuda.rs): fixture
//! Programs, the golden files of tests/reference/gen_fixtures.py, and
//! comparisons.
#![allow(dead_code)]

use ouroc_compile::CompileOptions;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::Program;
use ouroc_models::Checkpoint;
use ouroc_runtime::gpu::{Gpu, GpuForward, Trace};
use std::path::PathBuf;

/// Every fixture with a golden file.
pub const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];

/// A fixture directory (`golden` for the golden files): under
/// `$OUROC_FIXTURES` when set (the test executables of the GPU package,
/// run on a machine without this source tree: scripts/gpu-check.sh),
/// else the source tree's tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("OUROC_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name),
    }
}

pub fn open(name: &str) -> Checkpoint {
    Checkpoint::open(&fixture(name)).unwrap_or_else(|e| panic!("checkpoint {name}: {e}"))
}

pub fn dtype_of(prec: &str) -> DType {
    match prec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        p => panic!("unknown precision {p}"),
    }
}

/// The optimised, lowered Program of a fixture.
pub fn program(ckpt: &Checkpoint, dtype: DType, policy: &str) -> Program {
    ouroc_compile::compile(ckpt, &options(ckpt, dtype, policy))
        .expect("compile")
        .program
}

/// The Program of the imported graph, no pass run (lowering plans its
/// memory): every rounding point where the reference has it, so bf16
/// results are comparable with the golden tolerance.
pub fn program_unfused(ckpt: &Checkpoint, dtype: DType, policy: &str) -> Program {
    let g = ouroc_models::build_graph(ckpt, &options(ckpt, dtype, policy).build).expect("build graph");
    let no_passes = ouroc_passes::PassManager::new(vec![]);
    ouroc_compile::compile_with(g, &no_passes).expect("compile").program
}

fn options(ckpt: &Checkpoint, dtype: DType, policy: &str) -> CompileOptions {
    CompileOptions::reference(ckpt, dtype).with_policy(ExitPolicy::parse(policy).unwrap())
}

/// The project's golden tolerance (tests/golden.rs): f32 1e-4 relative;
/// bf16 2e-2 (a rare one-ulp flip of a bf16 rounding, where an f32
/// intermediate computed in another order lands on the other side of a
/// rounding boundary, propagates through the layers to well under 2% of
/// the largest logit; a semantic error moves logits by tens of percent).
pub fn tol(prec: &str) -> f32 {
    if prec == "f32" { 1e-4 } else { 2e-2 }
}

#[path = "../../../tests/common/golden.rs"]
mod golden;
pub use golden::Golden;

/// Largest |a - b| divided by the largest |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The loop steps a Program runs (1 without a loop).
pub fn loop_steps(p: &Program) -> usize {
    p.loop_.as_ref().map_or(1, |l| l.steps)
}

/// A whole prompt through `model` (prefill: one call; decode: one call per
/// token), the per-call traces concatenated like `ouroc logits` does.
pub fn trace_all<D: Gpu>(model: &mut GpuForward<D>, ids: &[u32], decode: bool) -> Trace {
    let calls: Vec<&[u32]> = if decode { ids.chunks(1).collect() } else { vec![ids] };
    let mut all: Option<Trace> = None;
    for call in calls {
        let (_, t) = model.run_traced(call).expect("gpu run");
        match all.as_mut() {
            None => all = Some(t),
            Some(a) => append(a, t),
        }
    }
    all.expect("at least one call")
}

/// `b`'s positions after `a`'s (both of every loop step).
pub fn append(a: &mut Trace, b: Trace) {
    assert_eq!(a.step_outputs.len(), b.step_outputs.len(), "steps of both calls");
    a.logits.extend(b.logits);
    for (h, x) in a.step_outputs.iter_mut().zip(b.step_outputs) {
        h.extend(x);
    }
    for (l, x) in a.lambdas.iter_mut().zip(b.lambdas) {
        l.extend(x);
    }
    a.exit_steps.extend(b.exit_steps);
}

/// A fixture's golden outputs of one precision and policy against a
/// trace of its prompt: logits, the hidden states of the `steps` loop
/// steps the Program runs (the first ones of the reference's; the
/// pipeline peels the steps after K off `step:K`), the exit gate's
/// lambdas (when the Program computes them), exit steps.
pub fn check_golden(ctx: &str, golden: &Golden, prec: &str, policy: &str, steps: usize, t: &Trace) {
    let want = golden.get(&format!("{prec}/{policy}/logits"));
    let e = rel_err(&t.logits, &want.f32);
    assert!(e <= tol(prec), "{ctx}: logits relative error {e}");
    let steps_chosen: Vec<i32> = t.exit_steps.iter().map(|&s| s as i32).collect();
    assert_eq!(
        steps_chosen,
        golden.get(&format!("{prec}/{policy}/exit_step")).i32,
        "{ctx}: exit steps"
    );
    assert_eq!(t.step_outputs.len(), steps, "{ctx}: hidden states of every step");
    let hidden: Vec<f32> = t.step_outputs.concat();
    let gh = golden.get(&format!("{prec}/hidden_states"));
    assert!(steps <= gh.shape[0], "{ctx}: more steps than the reference");
    let e = rel_err(&hidden, &gh.f32[..hidden.len()]);
    assert!(e <= tol(prec), "{ctx}: hidden states relative error {e}");
    if !t.lambdas.is_empty() {
        let l = t.lambdas.concat();
        let e = rel_err(&l, &golden.get(&format!("{prec}/exit_lambda")).f32[..l.len()]);
        assert!(e <= tol(prec), "{ctx}: exit lambda relative error {e}");
    }
}
