//! One experiment: a checkpoint compiled with one pipeline, what the
//! pipeline did (kernels per token, rule firings) and what the compiled
//! Program computes on the CPU engine, next to the imported graph run by
//! the reference interpreter.

use anyhow::{Context, Result, anyhow};
use ouroc_ir::{DType, Graph, OpKind};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_passes::egraph::EGraphRewrite;
use ouroc_passes::{PassManager, Stats};
use ouroc_runtime::cpu::{CpuForward, CpuOptions};
use ouroc_runtime::generate::Forward;
use ouroc_runtime::interp::InterpForward;

/// Cache positions the runs need (a prompt and a few decode steps).
const POSITIONS: usize = 64;

/// What one forward call returned: the last position's logits and its exit depth.
pub type Call = (Vec<f32>, usize);

pub struct Outcome {
    /// The pipeline's passes, in order.
    pub passes: Vec<&'static str>,
    /// `swiglu` ops (the fused silu-and-multiply) in the optimised graph.
    pub swiglu_ops: usize,
    pub kernels_per_token: usize,
    /// How often each extra e-graph rule changed the e-graph.
    pub rule_firings: Vec<(&'static str, usize)>,
    /// The CPU engine's calls: prefill of the prompt, then one per decoded token.
    pub calls: Vec<Call>,
}

/// The checkpoint imported in f32 under its reference exit policy.
pub fn import(ckpt: &Checkpoint) -> Result<Graph> {
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: BuildOptions::reference_policy(&ckpt.config, DType::F32),
        loops: None,
        unrolled: false,
    };
    ouroc_models::build_graph(ckpt, &opts).map_err(|e| anyhow!("cannot import the checkpoint: {e}"))
}

/// A prompt of `n` token ids spread over the vocabulary (deterministic).
pub fn prompt(ckpt: &Checkpoint, n: usize) -> Vec<u32> {
    let vocab = ckpt.config.vocab_size as u64;
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab) as u32)
        .collect()
}

/// Prefill `prompt`, then decode `decode` tokens greedily, each fed back.
pub fn run(m: &mut dyn Forward, prompt: &[u32], decode: usize) -> Result<Vec<Call>> {
    let mut calls = Vec::with_capacity(decode + 1);
    let mut step = m.forward(prompt).map_err(|e| anyhow!(e))?;
    for _ in 0..decode {
        let next = argmax(&step.logits);
        calls.push((step.logits, step.depth));
        step = m.forward(&[next]).map_err(|e| anyhow!(e))?;
    }
    calls.push((step.logits, step.depth));
    Ok(calls)
}

/// The imported graph in the reference interpreter.
pub fn reference(ckpt: &Checkpoint, imported: &Graph, prompt: &[u32], decode: usize) -> Result<Vec<Call>> {
    let mut interp = InterpForward::new(imported, ckpt, POSITIONS, true).map_err(|e| anyhow!(e))?;
    run(&mut interp, prompt, decode)
}

/// Compile `imported` with the example's pipeline ([`crate::pipeline`]:
/// `split` adds the pass, `rule` the rules), run it on the CPU engine.
pub fn compile_and_run(
    ckpt: &Checkpoint,
    imported: &Graph,
    split: bool,
    rule: bool,
    prompt: &[u32],
    decode: usize,
) -> Result<Outcome> {
    let pm = crate::pipeline(false, split, rule)?;
    let c = ouroc_compile::compile_with(imported.clone(), &pm).context("compiling")?;
    let opts = CpuOptions {
        early_exit: true,
        ..CpuOptions::new(POSITIONS)
    };
    let mut cpu = CpuForward::with_options(c.program, ckpt, &opts).map_err(|e| anyhow!(e))?;
    Ok(Outcome {
        swiglu_ops: crate::split_silu::count(&c.optimised, |k| matches!(k, OpKind::Swiglu)),
        kernels_per_token: Stats::of(&c.optimised).kernels_per_token,
        rule_firings: rule_firings(imported, &pm, &crate::egraph_pass(rule))?,
        passes: pm.names(),
        calls: run(&mut cpu, prompt, decode)?,
    })
}

/// How often each extra rule of `egraph` fired in pipeline `pm`: the
/// pipeline up to its e-graph pass, then that pass with its report (a
/// `PassManager` reports statistics, not rule firings).
fn rule_firings(imported: &Graph, pm: &PassManager, egraph: &EGraphRewrite) -> Result<Vec<(&'static str, usize)>> {
    let names = pm.names();
    let at = names
        .iter()
        .position(|n| *n == "egraph")
        .context("the pipeline has no egraph pass")?;
    let before = match at {
        0 => imported.clone(),
        _ => ouroc_compile::optimise_with(imported, pm, Some(names[at - 1]))?.0,
    };
    let (_, report) = egraph.optimize(&before).map_err(|e| anyhow!(e))?;
    Ok(egraph.extra.iter().map(|r| (r.name, report.applied(r.name))).collect())
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest |a - b| over the calls, relative to the largest |b| of each call.
pub fn max_rel_err(got: &[Call], want: &[Call]) -> f32 {
    got.iter()
        .zip(want)
        .map(|((g, _), (w, _))| {
            let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
            g.iter().zip(w).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        })
        .fold(0.0, f32::max)
}
