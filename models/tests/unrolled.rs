//! The unrolled import (R explicit copies of the layer stack and an
//! `exit_select`, as a tracer produces) computes exactly what the rolled
//! `loop` computes: the same logits, bit for bit, and the same trace (step
//! outputs, exit signals, exit steps), on every fixture and policy, for a
//! prefill followed by decode steps through the KV cache.

use ouroc_ir::{DType, ExitPolicy, Graph, Interpreter, LoopTrace, OpKind, Options};
use ouroc_models::{BuildOptions, Checkpoint};
use std::path::PathBuf;

const FIXTURES: [&str; 6] = ["mha-r4", "gqa-hd", "tied", "r1", "sharded", "f16"];
const POLICIES: [&str; 7] = [
    "last",
    "step:0",
    "step:1",
    "threshold:0.5",
    "threshold:1.0",
    "threshold:1.0:bf16",
    "weighted",
];

fn open(name: &str) -> Checkpoint {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Checkpoint::open(&dir).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The policy clamped to the fixture's loop (step:1 of a one-step loop is step:0).
fn policy(ckpt: &Checkpoint, s: &str) -> ExitPolicy {
    match ExitPolicy::parse(s).unwrap() {
        ExitPolicy::Step(k) => ExitPolicy::Step(k.min(ckpt.config.total_ut_steps - 1)),
        p => p,
    }
}

fn build(ckpt: &Checkpoint, dtype: DType, policy: ExitPolicy, unrolled: bool) -> Graph {
    let opts = BuildOptions {
        dtype,
        policy,
        loops: None,
        unrolled,
    };
    ouroc_models::build_graph(ckpt, &opts).unwrap_or_else(|e| panic!("build (unrolled: {unrolled}): {e}"))
}

/// Logits of every position and the trace of every run: a prefill of 5
/// tokens, then 3 decode steps.
fn run(g: &Graph, ckpt: &Checkpoint) -> (Vec<Vec<f32>>, Vec<LoopTrace>) {
    let mut it = Interpreter::new(g, ckpt, Options::default()).expect("load weights");
    let v = ckpt.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..8u32).map(|i| (i * 37 + 11) % v).collect();
    let mut runs = vec![prompt[..5].to_vec()];
    runs.extend(prompt[5..].iter().map(|&t| vec![t]));
    let (mut logits, mut traces) = (Vec::new(), Vec::new());
    for ids in runs {
        let out = it.run_tokens(&[ids]).expect("run");
        logits.push(out.outputs[0].data.clone());
        traces.push(out.trace.expect("a run of a looped model records a trace"));
    }
    (logits, traces)
}

fn bits(t: &[f32]) -> Vec<u32> {
    t.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_trace(a: &LoopTrace, b: &LoopTrace, what: &str) {
    assert_eq!(a.exit_step, b.exit_step, "{what}: exit steps");
    assert_eq!(
        a.step_outputs.len(),
        b.step_outputs.len(),
        "{what}: number of step outputs"
    );
    assert_eq!(
        a.exit_signals.len(),
        b.exit_signals.len(),
        "{what}: number of exit signals"
    );
    for (r, (x, y)) in a.step_outputs.iter().zip(&b.step_outputs).enumerate() {
        assert_eq!(x.shape, y.shape, "{what}: step {r} output shape");
        assert_eq!(bits(&x.data), bits(&y.data), "{what}: step {r} output");
    }
    for (r, (x, y)) in a.exit_signals.iter().zip(&b.exit_signals).enumerate() {
        assert_eq!(x.shape, y.shape, "{what}: step {r} exit signal shape");
        assert_eq!(bits(&x.data), bits(&y.data), "{what}: step {r} exit signal");
    }
}

#[test]
fn unrolled_computes_exactly_what_the_loop_computes() {
    let mut checked = 0;
    for name in FIXTURES {
        let ckpt = open(name);
        for dtype in [DType::F32, DType::BF16] {
            for pol in POLICIES {
                let p = policy(&ckpt, pol);
                let what = format!("{name} {dtype:?} {p}");
                let rolled = build(&ckpt, dtype, p, false);
                let unrolled = build(&ckpt, dtype, p, true);
                let (la, ta) = run(&rolled, &ckpt);
                let (lb, tb) = run(&unrolled, &ckpt);
                for (i, (a, b)) in la.iter().zip(&lb).enumerate() {
                    assert_eq!(bits(a), bits(b), "{what}: logits of run {i}");
                }
                for (i, (a, b)) in ta.iter().zip(&tb).enumerate() {
                    assert_same_trace(a, b, &format!("{what}, run {i}"));
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, FIXTURES.len() * 2 * POLICIES.len());
}

#[test]
fn unrolled_graph_has_the_shape_of_a_trace() {
    for name in FIXTURES {
        let ckpt = open(name);
        let c = &ckpt.config;
        let (l, r) = (c.num_hidden_layers, c.total_ut_steps);
        let p = BuildOptions::reference_policy(c, DType::F32);
        let rolled = build(&ckpt, DType::F32, p, false);
        let g = build(&ckpt, DType::F32, p, true);
        assert!(g.find_loop().is_none(), "{name}: the unrolled graph has no loop");
        assert_eq!(g.inputs().len(), rolled.inputs().len(), "{name}: inputs");
        for (a, b) in g.inputs().iter().zip(rolled.inputs()) {
            assert_eq!(g.ty(*a), rolled.ty(*b), "{name}: input types");
        }
        // The same weights in the same order, all at the top.
        let weights = |g: &Graph| -> Vec<(String, String)> {
            g.walk()
                .iter()
                .filter_map(|op| match &op.kind {
                    OpKind::Weight { name } => Some((name.clone(), g.ty(op.result()).to_string())),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(weights(&g), weights(&rolled), "{name}: weights");
        let first_layer_op = g
            .body
            .ops
            .iter()
            .position(|op| matches!(op.kind, OpKind::RmsNorm { .. }));
        let last_weight = g
            .body
            .ops
            .iter()
            .rposition(|op| matches!(op.kind, OpKind::Weight { .. }));
        assert!(
            last_weight < first_layer_op,
            "{name}: weights come before the first step"
        );
        // R copies of the step: attention layers r*L + i in order, one exit_select of R outs + R lambdas.
        let layers: Vec<usize> = g
            .walk()
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Attention(a) => Some(a.layer),
                _ => None,
            })
            .collect();
        assert_eq!(layers, (0..r * l).collect::<Vec<_>>(), "{name}: attention layers");
        let body_ops = rolled.find_loop().unwrap().body.ops.len();
        let sel: Vec<_> = g
            .body
            .ops
            .iter()
            .filter(|op| matches!(op.kind, OpKind::ExitSelect { .. }))
            .collect();
        assert_eq!(sel.len(), 1, "{name}: one exit_select");
        assert_eq!(sel[0].kind, OpKind::ExitSelect { policy: p }, "{name}: the policy");
        assert_eq!(sel[0].inputs.len(), 2 * r, "{name}: R outputs and R exit signals");
        assert_eq!(
            g.body.ops.len(),
            rolled.body.ops.len() - 1 + r * body_ops + 1,
            "{name}: top ops = rolled top ops - loop + R steps + exit_select"
        );
        // The text form round-trips.
        let text = ouroc_ir::print(&g);
        let back = ouroc_ir::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, g.canonicalize(), "{name}: parse(print(g))");
    }
}

#[test]
fn unrolled_rejects_an_out_of_range_step_policy() {
    let ckpt = open("tied");
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::Step(3),
        loops: None,
        unrolled: true,
    };
    let e = ouroc_models::build_graph(&ckpt, &opts).unwrap_err();
    assert!(e.contains("out of range"), "{e}");
}
