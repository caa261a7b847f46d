//! Loop passes (hoist, rotate, policy-dce, peel), CSE, DCE and memory
//! planning: every pass computes what its input computes (fixtures x
//! policies, random small models), does not raise the per-token kernel
//! count, and does what its name says.

mod common;

use common::*;
use ouroc_ir::graph::NextNorm;
use ouroc_ir::{
    DType, Dim, ExitPolicy, Graph, GraphBuilder, Op, OpKind, Terminator, Type, ValueId, WeightSource, parse, print,
};
use ouroc_passes::cse::Cse;
use ouroc_passes::dce::{Dce, dce};
use ouroc_passes::hoist::Hoist;
use ouroc_passes::memplan::{MemoryPlan, plan};
use ouroc_passes::peel::Peel;
use ouroc_passes::policy_dce::PolicyDce;
use ouroc_passes::rotate::Rotate;
use ouroc_passes::{Pass, PassManager, Stats};
use std::collections::HashMap;

// ---------------------------------------------------------------- helpers

fn the_loop(g: &Graph) -> &ouroc_ir::Loop {
    g.find_loop().expect("graph has a loop")
}

fn yield_of(g: &Graph) -> (Vec<ValueId>, ValueId, Option<ValueId>) {
    match &the_loop(g).body.term {
        Terminator::Yield { next, out, exit } => (next.clone(), *out, *exit),
        Terminator::Return(_) => unreachable!(),
    }
}

fn loop_op(g: &Graph) -> &Op {
    g.body.ops.iter().find(|o| matches!(o.kind, OpKind::Loop(_))).unwrap()
}

fn count(ops: &[Op], name: &str) -> usize {
    ops.iter().filter(|o| o.kind.name() == name).count()
}

fn kernels(g: &Graph) -> usize {
    Stats::of(g).kernels_per_token
}

fn def_op(ops: &[Op], v: ValueId) -> Option<&Op> {
    ops.iter().find(|o| o.results.contains(&v))
}

fn weight_name(g: &Graph, v: ValueId) -> Option<String> {
    g.walk().into_iter().find_map(|o| match &o.kind {
        OpKind::Weight { name } if o.result() == v => Some(name.clone()),
        _ => None,
    })
}

fn fresh(g: &mut Graph, ty: Type) -> ValueId {
    g.types.push(ty);
    ValueId((g.types.len() - 1) as u32)
}

/// The end of each step as one op, as the e-graph pass produces it:
/// `rms_norm + linear + sigmoid` -> `step_end {next = "none"}`.
fn with_step_end(g: &Graph) -> Graph {
    let mut g = g.clone();
    for op in &mut g.body.ops {
        let OpKind::Loop(l) = &mut op.kind else { continue };
        let Terminator::Yield { exit: Some(lam), .. } = l.body.term.clone() else {
            continue;
        };
        let b = &mut l.body;
        let si = b.ops.iter().position(|o| o.results == [lam]).unwrap();
        assert!(matches!(b.ops[si].kind, OpKind::Sigmoid));
        let gate = b.ops[si].inputs[0];
        let li = b.ops.iter().position(|o| o.results == [gate]).unwrap();
        let (hn, gw, gb) = (b.ops[li].inputs[0], b.ops[li].inputs[1], b.ops[li].inputs[2]);
        let ni = b.ops.iter().position(|o| o.results == [hn]).unwrap();
        let OpKind::RmsNorm { eps } = b.ops[ni].kind else {
            panic!("end of step is not rms_norm")
        };
        let (x, nw) = (b.ops[ni].inputs[0], b.ops[ni].inputs[1]);
        b.ops[ni] = Op {
            results: vec![hn, lam],
            kind: OpKind::StepEnd {
                eps,
                next: NextNorm::None,
                gate: true,
            },
            inputs: vec![x, nw, gw, gb],
        };
        b.ops.remove(si.max(li));
        b.ops.remove(si.min(li));
    }
    let g = g.canonicalize();
    ouroc_ir::verify(&g).unwrap();
    g
}

/// Fold layer 0's input norm weight into the q/k/v projections:
/// `rms_norm(c, w)` -> `rms_scale(c)` and `linear(n, W)` ->
/// `linear(n, scale_cols(W, w))`, the transforms before the loop or (to
/// test hoisting) in the body.
fn fold_input_norm(g: &Graph, transforms_in_body: bool) -> Graph {
    let mut g = g.clone();
    let li = g
        .body
        .ops
        .iter()
        .position(|o| matches!(o.kind, OpKind::Loop(_)))
        .unwrap();
    let mut loop_op = g.body.ops[li].clone();
    let OpKind::Loop(l) = &mut loop_op.kind else {
        unreachable!()
    };
    let c = l.body.args[1];
    let k = l
        .body
        .ops
        .iter()
        .position(|o| matches!(o.kind, OpKind::RmsNorm { .. }) && o.inputs[0] == c)
        .unwrap();
    let OpKind::RmsNorm { eps } = l.body.ops[k].kind else {
        unreachable!()
    };
    let (n, w) = (l.body.ops[k].result(), l.body.ops[k].inputs[1]);
    l.body.ops[k].kind = OpKind::RmsScale { eps };
    l.body.ops[k].inputs = vec![c];
    let mut transforms = Vec::new();
    for i in 0..l.body.ops.len() {
        if matches!(l.body.ops[i].kind, OpKind::Linear) && l.body.ops[i].inputs[0] == n {
            let wt = l.body.ops[i].inputs[1];
            let ty = g.ty(wt).clone();
            let ws = fresh(&mut g, ty);
            transforms.push(Op {
                results: vec![ws],
                kind: OpKind::ScaleCols,
                inputs: vec![wt, w],
            });
            l.body.ops[i].inputs[1] = ws;
        }
    }
    if transforms_in_body {
        for (j, t) in transforms.into_iter().enumerate() {
            l.body.ops.insert(j, t);
        }
        g.body.ops[li] = loop_op;
    } else {
        g.body.ops[li] = loop_op;
        for t in transforms.into_iter().rev() {
            g.body.ops.insert(li, t);
        }
    }
    let g = g.canonicalize();
    ouroc_ir::verify(&g).unwrap_or_else(|e| panic!("{e}\n{g}"));
    g
}

/// The RoPE tables moved into the loop body (text edit, parsed back).
fn rope_tables_in_body(g: &Graph) -> Graph {
    let text = print(g);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut moved = Vec::new();
    lines.retain(|l| {
        let is_table = l.starts_with("  %") && (l.contains("= rope_cos(") || l.contains("= rope_sin("));
        if is_table {
            moved.push(format!("  {l}"));
        }
        !is_table
    });
    assert_eq!(moved.len(), 2);
    let at = lines.iter().position(|l| l.trim_start().starts_with("^body(")).unwrap() + 1;
    for (j, l) in moved.into_iter().enumerate() {
        lines.insert(at + j, l);
    }
    let g = parse(&lines.join("\n")).unwrap_or_else(|e| panic!("{e}"));
    ouroc_ir::verify(&g).unwrap();
    g
}

/// The forms a pass meets: as imported, with `step_end`, and with
/// `step_end` plus the folded input norm (`rms_scale`).
fn forms(g: &Graph) -> Vec<(&'static str, Graph)> {
    let fused = with_step_end(g);
    let folded = fold_input_norm(&fused, false);
    vec![("imported", g.clone()), ("step_end", fused), ("folded", folded)]
}

/// Every pass, and whether it must not raise the kernels per token.
fn all_passes() -> Vec<(Box<dyn Pass>, bool)> {
    vec![
        (Box::new(Hoist), true),
        (Box::new(Rotate::new()), true),
        (Box::new(Rotate::always()), false),
        (Box::new(PolicyDce), true),
        (Box::new(Peel::new()), true),
        (Box::new(Peel::forced()), false),
        (Box::new(Cse), true),
        (Box::new(Dce), true),
    ]
}

/// The loop-pass pipeline in its intended order.
fn pipeline() -> PassManager {
    PassManager::new(vec![
        Box::new(Hoist),
        Box::new(Rotate::new()),
        Box::new(PolicyDce),
        Box::new(Peel::new()),
        Box::new(Cse),
        Box::new(Dce),
    ])
}

/// Every pass (and the pipeline) on `g`: equivalent, verified, kernels per
/// token not raised, memory plan sound.
fn check_every_pass(g: &Graph, weights: &dyn WeightSource, vocab: usize, what: &str) {
    let p = prompt(vocab, 10, 7);
    let want = run(g, weights, &p, 6);
    let check = |after: &Graph, name: &str| {
        ouroc_ir::verify(after).unwrap_or_else(|e| panic!("{what} {name}: does not verify: {e}\n{after}"));
        let got = run(after, weights, &p, 6);
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "{what} {name}: relative error {e}");
        check_plan(after, &plan(after, 1, 6), 6);
        check_plan(after, &plan(after, 2, 1), 1);
    };
    for (pass, no_worse) in all_passes() {
        let after = pass.run(g).unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&after, pass.name());
        if no_worse {
            assert!(
                kernels(&after) <= kernels(g),
                "{what} {}: kernels/token {} -> {}",
                pass.name(),
                kernels(g),
                kernels(&after)
            );
        }
    }
    let (after, reports) = pipeline().run(g, None).unwrap_or_else(|e| panic!("{what}: {e}"));
    check(&after, "pipeline");
    for r in &reports {
        assert!(
            r.after.kernels_per_token <= r.before.kernels_per_token,
            "{what} pipeline {}: kernels/token rose",
            r.name
        );
    }
    // Passes composed where they meet each other's output: rotated loops
    // peeled (recomputing the carried norm), hoisted and merged.
    let chains: [(&str, Vec<Box<dyn Pass>>); 2] = [
        (
            "rotate-always, peel-forced, cse, dce",
            vec![
                Box::new(Rotate::always()),
                Box::new(Peel::forced()),
                Box::new(Cse),
                Box::new(Dce),
            ],
        ),
        (
            "rotate, policy-dce, peel-forced, hoist, cse",
            vec![
                Box::new(Rotate::new()),
                Box::new(PolicyDce),
                Box::new(Peel::forced()),
                Box::new(Hoist),
                Box::new(Cse),
            ],
        ),
    ];
    for (name, passes) in chains {
        let (after, _) = PassManager::new(passes)
            .run(g, None)
            .unwrap_or_else(|e| panic!("{what} {name}: {e}"));
        check(&after, name);
    }
}

// ------------------------------------------------------ memory plan check

/// A plan is sound: no two buffers whose lifetimes overlap share bytes, and
/// replaying the schedule finds every value intact when it is read.
fn check_plan(g: &Graph, plan: &MemoryPlan, seq: usize) {
    for (i, a) in plan.buffers.iter().enumerate() {
        for b in &plan.buffers[i + 1..] {
            let live = a.start <= b.end && b.start <= a.end;
            let mem = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            assert!(!(live && mem), "buffers {a:?} and {b:?} overlap in time and memory");
        }
        assert!(a.offset + a.bytes <= plan.arena_bytes);
    }
    assert!(plan.arena_bytes <= plan.naive_bytes);
    assert_eq!(
        plan.offsets.len(),
        plan.buffers.iter().map(|b| b.values.len()).sum::<usize>() + plan.views.len()
    );
    replay(g, plan, seq);
}

/// Replay the graph's schedule (loop steps repeated, yielded next values
/// copied into the carried buffers) against the plan's offsets: every value
/// read must still be intact in its buffer, i.e. nothing written since its
/// definition overlapped it. Independent of the plan's own lifetimes.
fn replay(g: &Graph, plan: &MemoryPlan, seq: usize) {
    let size = |v: ValueId| ouroc_passes::memplan::value_bytes(g.ty(v), plan.batch, seq);
    let views: HashMap<ValueId, ValueId> = plan.views.iter().copied().collect();
    // Memory contents: (lo, hi, value), disjoint.
    struct Mem(Vec<(u64, u64, ValueId)>);
    impl Mem {
        fn write(&mut self, lo: u64, hi: u64, v: ValueId) {
            let mut next = Vec::new();
            for &(a, b, w) in &self.0 {
                if b <= lo || hi <= a {
                    next.push((a, b, w));
                } else {
                    if a < lo {
                        next.push((a, lo, w));
                    }
                    if hi < b {
                        next.push((hi, b, w));
                    }
                }
            }
            next.push((lo, hi, v));
            self.0 = next;
        }
        fn holds(&self, lo: u64, hi: u64, v: ValueId) -> bool {
            self.0.contains(&(lo, hi, v))
        }
    }
    let mut mem = Mem(Vec::new());
    let planned = |v: ValueId| plan.offsets.contains_key(&v) && !views.contains_key(&v);
    let read = |mem: &Mem, v: ValueId, at: &str| {
        let v = *views.get(&v).unwrap_or(&v);
        if planned(v) {
            let o = plan.offsets[&v];
            assert!(mem.holds(o, o + size(v), v), "{v} was overwritten before {at}");
        }
    };
    let write = |mem: &mut Mem, v: ValueId| {
        if planned(v) {
            let o = plan.offsets[&v];
            mem.write(o, o + size(v), v);
        }
    };
    for &a in g.inputs() {
        write(&mut mem, a);
    }
    for op in &g.body.ops {
        let at = op.kind.name().to_string();
        for &i in &op.inputs {
            read(&mem, i, &at);
        }
        if let OpKind::Loop(l) = &op.kind {
            // The initial values were read above; now they are the carried values.
            for &arg in &l.body.args[1..] {
                write(&mut mem, arg);
            }
            for _ in 0..l.steps {
                for bop in &l.body.ops {
                    for &i in &bop.inputs {
                        read(&mem, i, &format!("body {}", bop.kind.name()));
                    }
                    for &r in &bop.results {
                        write(&mut mem, r);
                    }
                }
                let Terminator::Yield { next, out, exit } = &l.body.term else {
                    unreachable!()
                };
                for &v in next.iter().chain([out]).chain(exit) {
                    read(&mem, v, "yield");
                }
                write(&mut mem, op.result());
                for &arg in &l.body.args[1..] {
                    write(&mut mem, arg);
                }
            }
        } else {
            for &r in &op.results {
                write(&mut mem, r);
            }
        }
    }
    for &v in g.outputs() {
        read(&mem, v, "return");
    }
}

// ------------------------------------------------------- equivalence

#[test]
fn every_pass_is_equivalent_on_every_fixture_and_policy() {
    for name in FIXTURES {
        let ckpt = open(name);
        let vocab = ckpt.config.vocab_size;
        for policy in POLICIES {
            let g = fixture_graph(&ckpt, policy);
            for (form, g) in forms(&g) {
                check_every_pass(&g, &ckpt, vocab, &format!("{name} {policy} {form}"));
            }
        }
    }
}

#[test]
fn every_pass_is_equivalent_on_random_models() {
    for seed in 0..30u64 {
        let policy = POLICIES[seed as usize % POLICIES.len()];
        let m = random_model(seed, policy);
        let g = if seed % 2 == 0 {
            m.graph.clone()
        } else {
            with_step_end(&m.graph)
        };
        let g = if seed % 4 == 1 {
            fold_input_norm(&g, seed % 8 == 1)
        } else {
            g
        };
        check_every_pass(&g, &m.weights, m.config.vocab_size, &format!("random {seed} {policy}"));
    }
}

// -------------------------------------------------------------- hoist

#[test]
fn hoist_moves_weight_transforms_out_of_the_loop() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    let g = rope_tables_in_body(&fold_input_norm(&g, true));
    let body = &the_loop(&g).body.ops;
    assert_eq!(count(body, "scale_cols"), 3);
    assert_eq!(count(body, "rope_cos") + count(body, "rope_sin"), 2);

    let after = Hoist.run(&g).unwrap();
    let body = &the_loop(&after).body.ops;
    for moved in ["scale_cols", "rope_cos", "rope_sin"] {
        assert_eq!(count(body, moved), 0, "{moved} is still in the body");
    }
    assert_eq!(count(&after.body.ops, "scale_cols"), 3);
    assert_eq!(count(&after.body.ops, "rope_cos"), 1);
    // Nothing else moved: attention and everything reading the carried value stay.
    assert_eq!(body.len(), the_loop(&g).body.ops.len() - 5);
    assert_eq!(count(body, "attention"), 2);
    // The tables ran once per step; now once per token.
    assert_eq!(kernels(&after), kernels(&g) - 2 * 3);
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "hoist");
    // Already hoisted: nothing to do.
    assert_eq!(Hoist.run(&after).unwrap(), after);
}

#[test]
fn hoist_never_moves_attention_or_step_dependent_work() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "last");
    let after = Hoist.run(&g).unwrap();
    assert_eq!(after, g.canonicalize());
}

// ------------------------------------------------------------- rotate

#[test]
fn rotate_carries_the_next_input_norm() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    let after = Rotate::always().run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "rotate");
    let lop = loop_op(&after);
    let l = the_loop(&after);
    assert_eq!(lop.inputs.len(), 2, "the norm is carried too");
    // Its initial value is layer 0's input norm of the embedding, computed before the loop.
    let init = def_op(&after.body.ops, lop.inputs[1]).unwrap();
    assert!(matches!(init.kind, OpKind::RmsNorm { .. }));
    assert_eq!(init.inputs[0], lop.inputs[0]);
    assert_eq!(
        weight_name(&after, init.inputs[1]).as_deref(),
        Some("model.layers.0.input_layernorm.weight")
    );
    // In the body, layer 0's projections read the carried norm; no op normalises the carried h first.
    let (h, n) = (l.body.args[1], l.body.args[2]);
    assert_eq!(
        l.body.ops.iter().filter(|o| o.inputs.first() == Some(&n)).count(),
        3,
        "q, k and v read it"
    );
    assert!(
        l.body
            .ops
            .iter()
            .all(|o| !(o.kind.name() == "rms_norm" && o.inputs[0] == h))
    );
    // The next step's norm is computed from the yielded next value, at the end of the step.
    let (next, out, _) = yield_of(&after);
    assert_eq!(next[0], out);
    let nn = def_op(&l.body.ops, next[1]).unwrap();
    assert!(matches!(nn.kind, OpKind::RmsNorm { .. }));
    assert_eq!((nn.inputs[0], nn.inputs[1]), (next[0], init.inputs[1]));
    // On the imported form that costs the initial norm (one kernel per token).
    assert_eq!(kernels(&after), kernels(&g) + 1);
    // The default pass rotates only where it fuses: not here.
    assert_eq!(Rotate::new().run(&g).unwrap(), g.canonicalize());
}

#[test]
fn rotate_upgrades_step_end() {
    let ckpt = open("mha-r4");
    let steps = 4;
    let vocab = ckpt.config.vocab_size;
    for (form, next_kind, operands) in [("step_end", NextNorm::Norm, 5), ("folded", NextNorm::Scale, 4)] {
        let g = fixture_graph(&ckpt, "threshold:0.5");
        let g = if form == "folded" {
            fold_input_norm(&with_step_end(&g), false)
        } else {
            with_step_end(&g)
        };
        let after = Rotate::new().run(&g).unwrap();
        assert_equivalent(&g, &after, &ckpt, vocab, form);
        let l = the_loop(&after);
        let se: Vec<&Op> = l.body.ops.iter().filter(|o| o.kind.name() == "step_end").collect();
        assert_eq!(se.len(), 1);
        let se = se[0];
        assert!(
            matches!(se.kind, OpKind::StepEnd { next, .. } if next == next_kind),
            "{form}"
        );
        assert_eq!(se.inputs.len(), operands);
        assert_eq!(se.results.len(), 3);
        let (next, out, exit) = yield_of(&after);
        assert_eq!(next, vec![se.results[0], se.results[2]]);
        assert_eq!((out, exit), (se.results[0], Some(se.results[1])));
        if next_kind == NextNorm::Norm {
            assert_eq!(
                weight_name(&after, se.inputs[4]).as_deref(),
                Some("model.layers.0.input_layernorm.weight")
            );
        }
        // The body lost its separate input norm; one norm before the loop instead of one per step.
        let norm = if form == "folded" { "rms_scale" } else { "rms_norm" };
        assert_eq!(count(&l.body.ops, norm), count(&the_loop(&g).body.ops, norm) - 1);
        assert_eq!(kernels(&after), kernels(&g) - (steps - 1), "{form}");
        // Rotating again finds nothing more to do.
        assert_eq!(Rotate::new().run(&after).unwrap(), after);
    }
}

// --------------------------------------------------------- policy-dce

#[test]
fn policy_dce_drops_the_gate_under_last() {
    let ckpt = open("mha-r4");
    let vocab = ckpt.config.vocab_size;
    let g = fixture_graph(&ckpt, "last");
    let after = PolicyDce.run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, vocab, "policy-dce last");
    assert_eq!(yield_of(&after).2, None);
    assert_eq!(count(&the_loop(&after).body.ops, "sigmoid"), 0);
    assert!(after.walk().iter().all(|o| match &o.kind {
        OpKind::Weight { name } => !name.contains("early_exit_gate"),
        _ => true,
    }));
    assert_eq!(the_loop(&after).steps, 4);
    // linear + sigmoid per step.
    assert_eq!(kernels(&after), kernels(&g) - 2 * 4);

    // With step_end the gate lives inside it: step_end becomes the plain final norm.
    let fused = with_step_end(&g);
    let after = PolicyDce.run(&fused).unwrap();
    assert_equivalent(&fused, &after, &ckpt, vocab, "policy-dce last step_end");
    let body = &the_loop(&after).body.ops;
    assert_eq!(count(body, "step_end"), 0);
    assert_eq!(
        count(body, "rms_norm"),
        count(&the_loop(&fused).body.ops, "rms_norm") + 1
    );
    assert!(Stats::of(&after).weight_bytes_per_token < Stats::of(&fused).weight_bytes_per_token);
}

#[test]
fn policy_dce_keeps_the_gate_when_the_policy_reads_it() {
    let ckpt = open("mha-r4");
    for policy in ["threshold:0.5", "threshold:1.0:bf16", "weighted"] {
        let g = fixture_graph(&ckpt, policy);
        assert_eq!(PolicyDce.run(&g).unwrap(), g.canonicalize(), "{policy}");
    }
}

#[test]
fn step_policy_truncates_the_loop() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "step:1");
    let after = PolicyDce.run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "step:1");
    let l = the_loop(&after);
    assert_eq!((l.steps, l.policy), (2, ExitPolicy::Last));
    assert_eq!(yield_of(&after).2, None);
    // Two of four steps, and no gate.
    let body = the_loop(&g).body.ops.len() as i64;
    let outside = kernels(&g) as i64 - 4 * body;
    assert_eq!(kernels(&after) as i64, outside + 2 * (body - 2));
}

// -------------------------------------------------------------- peel

#[test]
fn peel_removes_the_last_steps_dead_gate() {
    // Under `last` before policy-dce, the exit is still yielded but the
    // last step's gate decides nothing: peeling that step drops it.
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "last");
    let after = Peel::new().run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "peel");
    let l = the_loop(&after);
    assert_eq!((l.steps, l.policy), (3, ExitPolicy::Last));
    // The peeled step follows the loop, with its own KV layers (R-1)*L + i.
    let li = after
        .body
        .ops
        .iter()
        .position(|o| matches!(o.kind, OpKind::Loop(_)))
        .unwrap();
    let tail = &after.body.ops[li + 1..];
    let layers: Vec<usize> = tail
        .iter()
        .filter_map(|o| match &o.kind {
            OpKind::Attention(a) => Some(a.layer),
            _ => None,
        })
        .collect();
    assert_eq!(layers, vec![6, 7]);
    assert_eq!(count(tail, "sigmoid"), 0);
    assert_eq!(kernels(&after), kernels(&g) - 2);
    // The head reads the peeled step's output.
    let head = def_op(&after.body.ops, after.outputs()[0]).unwrap();
    assert!(tail.iter().any(|o| o.results.contains(&head.inputs[0])));
}

#[test]
fn peel_declines_when_it_removes_nothing() {
    let ckpt = open("mha-r4");
    let vocab = ckpt.config.vocab_size;
    // After rotate + policy-dce the last step's next-input norm is dead, but
    // the peeled copy must recompute its own input norm from the loop's
    // result (a loop returns only its output): no kernel is saved.
    let g = with_step_end(&fixture_graph(&ckpt, "last"));
    let g = PolicyDce.run(&Rotate::new().run(&g).unwrap()).unwrap();
    assert_eq!(Peel::new().run(&g).unwrap(), g);
    let forced = Peel::forced().run(&g).unwrap();
    assert_equivalent(&g, &forced, &ckpt, vocab, "forced peel");
    assert_eq!(the_loop(&forced).steps, 3);
    assert!(kernels(&forced) >= kernels(&g));
    // Policies that need every step's output or exit cannot be peeled at all.
    for policy in ["threshold:0.5", "weighted", "step:1"] {
        let g = fixture_graph(&ckpt, policy);
        assert_eq!(Peel::forced().run(&g).unwrap(), g.canonicalize(), "{policy}");
    }
}

// --------------------------------------------------------------- CSE

#[test]
fn cse_merges_duplicate_rope_tables() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "weighted");
    // Duplicate the tables and the embedding table's weight op; layer 1 reads the copies.
    let text = print(&g);
    let mut out = Vec::new();
    for l in text.lines() {
        out.push(l.to_string());
        if l.contains("= rope_cos(") || l.contains("= rope_sin(") || l.contains("= weight \"model.norm.weight\"") {
            let name = l.trim().split(' ').next().unwrap();
            out.push(l.replacen(name, &format!("{name}dup"), 1));
        }
    }
    // %4/%5 are the tables; switch layer 1's rope ops (the second pair in the body) to the copies.
    let mut seen = 0;
    for l in out.iter_mut() {
        if l.contains("= rope(") {
            seen += 1;
            if seen > 2 {
                *l = l.replace("%4,", "%4dup,").replace("%5)", "%5dup)");
            }
        }
        if l.contains("= rms_norm(") && l.contains(", %28)") {
            *l = l.replace(", %28)", ", %28dup)");
        }
    }
    let g = parse(&out.join("\n")).unwrap();
    ouroc_ir::verify(&g).unwrap();
    assert_eq!(count(&g.body.ops, "rope_cos"), 2);

    let after = Cse.run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "cse");
    assert_eq!(count(&after.body.ops, "rope_cos"), 1);
    assert_eq!(count(&after.body.ops, "rope_sin"), 1);
    assert_eq!(count(&after.body.ops, "weight"), count(&g.body.ops, "weight") - 1);
    let ropes: Vec<&Op> = the_loop(&after)
        .body
        .ops
        .iter()
        .filter(|o| o.kind.name() == "rope")
        .collect();
    assert!(ropes.iter().all(|o| o.inputs[1..] == ropes[0].inputs[1..]));
    assert_eq!(kernels(&after), kernels(&g) - 2);
}

#[test]
fn cse_merges_in_the_body_and_reuses_outer_values_but_never_attention() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    // A second copy of layer 0's q projection and of a RoPE table inside the body.
    let mut g = rope_tables_in_body(&g);
    let text = print(&g);
    // Put a copy of the tables back before the loop too: the body's then reuse them.
    let tables: Vec<String> = text
        .lines()
        .filter(|l| l.contains("= rope_cos(") || l.contains("= rope_sin("))
        .map(|l| l.trim().replacen('%', "%outer", 1))
        .collect();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let at = lines.iter().position(|l| l.contains("= loop(")).unwrap();
    for t in tables.iter().rev() {
        lines.insert(at, format!("  {t}"));
    }
    g = parse(&lines.join("\n")).unwrap();
    let body = &the_loop(&g).body;
    let q = body.ops.iter().find(|o| o.kind.name() == "linear").unwrap().clone();
    let mut g2 = g.clone();
    let qd = fresh(&mut g2, g.ty(q.result()).clone());
    let OpKind::Loop(l) = &mut g2
        .body
        .ops
        .iter_mut()
        .find(|o| matches!(o.kind, OpKind::Loop(_)))
        .unwrap()
        .kind
    else {
        unreachable!()
    };
    let qi = l.body.ops.iter().position(|o| o.results == q.results).unwrap();
    l.body.ops.insert(
        qi + 1,
        Op {
            results: vec![qd],
            kind: OpKind::Linear,
            inputs: q.inputs.clone(),
        },
    );
    // The first rope reads the duplicate.
    let ri = l.body.ops.iter().position(|o| o.kind.name() == "rope").unwrap();
    l.body.ops[ri].inputs[0] = qd;
    let g = g2.canonicalize();
    ouroc_ir::verify(&g).unwrap();

    let after = Cse.run(&g).unwrap();
    assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, "cse body");
    let body = &the_loop(&after).body.ops;
    assert_eq!(count(body, "linear"), count(&the_loop(&g).body.ops, "linear") - 1);
    assert_eq!(
        count(body, "rope_cos") + count(body, "rope_sin"),
        0,
        "the outer tables are reused"
    );
    assert_eq!(count(body, "attention"), 2);
    assert!(kernels(&after) < kernels(&g));
}

// --------------------------------------------------------------- DCE

#[test]
fn dce_removes_unused_ops_weights_and_carried_values() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    // Add an unused weight, an unused op and a carried value nothing reads.
    let mut g2 = g.clone();
    let x0 = loop_op(&g).inputs[0];
    let wty = Type::fixed(DType::F32, &[7]);
    let w = fresh(&mut g2, wty);
    let ty = g.ty(x0).clone();
    let dead = fresh(&mut g2, ty.clone());
    let arg = fresh(&mut g2, ty.clone());
    let nxt = fresh(&mut g2, ty.clone());
    let li = g2
        .body
        .ops
        .iter()
        .position(|o| matches!(o.kind, OpKind::Loop(_)))
        .unwrap();
    g2.body.ops.insert(
        li,
        Op {
            results: vec![dead],
            kind: OpKind::Silu,
            inputs: vec![x0],
        },
    );
    g2.body.ops.insert(
        0,
        Op {
            results: vec![w],
            kind: OpKind::Weight {
                name: "unused.weight".into(),
            },
            inputs: vec![],
        },
    );
    let lop = g2
        .body
        .ops
        .iter_mut()
        .find(|o| matches!(o.kind, OpKind::Loop(_)))
        .unwrap();
    lop.inputs.push(dead);
    let OpKind::Loop(l) = &mut lop.kind else { unreachable!() };
    l.body.args.push(arg);
    l.body.ops.push(Op {
        results: vec![nxt],
        kind: OpKind::Add,
        inputs: vec![arg, arg],
    });
    if let Terminator::Yield { next, .. } = &mut l.body.term {
        next.push(nxt);
    }
    let g2 = g2.canonicalize();
    ouroc_ir::verify(&g2).unwrap();
    // Stats does not know weights/carried values are dead; the interpreter needs the weight.
    let after = Dce.run(&g2).unwrap();
    assert_eq!(after, g.canonicalize(), "exactly the added dead code is gone");
    assert_eq!(kernels(&after), kernels(&g2) - 1 - 4);
}

#[test]
fn dce_keeps_attention_even_when_its_result_is_unused() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "last");
    // Return the embedding instead of the logits: the loop's result is dead,
    // but its attention ops write KV slots, so the loop stays (the head goes).
    let mut g2 = g.clone();
    g2.body.term = Terminator::Return(vec![loop_op(&g).inputs[0]]);
    let after = dce(&g2);
    ouroc_ir::verify(&after).unwrap();
    assert_eq!(count(&the_loop(&after).body.ops, "attention"), 2);
    assert_eq!(count(&after.body.ops, "linear"), 0, "the head is gone: {after}");
    // The loop keeps what its attention reads: layer 1 needs layer 0's output.
    assert!(count(&the_loop(&after).body.ops, "linear") >= 6);
}

// ------------------------------------------------------------ memplan

/// Ouro-1.4B's shape (spec §2), no weights needed.
fn ouro_1_4b(policy: &str) -> Graph {
    let json = r#"{"model_type": "ouro", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 49152, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 65536, "tie_word_embeddings": false, "total_ut_steps": 4,
        "early_exit_threshold": 1.0, "hidden_act": "silu", "torch_dtype": "bfloat16"}"#;
    let (cfg, _) = ouroc_models::OuroConfig::from_json_str(json, "1.4B").unwrap();
    ouroc_models::build_from_config(
        &cfg,
        "lm_head.weight",
        &ouroc_models::BuildOptions {
            dtype: DType::BF16,
            policy: ExitPolicy::parse(policy).unwrap(),
            loops: None,
            unrolled: false,
        },
    )
    .unwrap()
}

#[test]
fn memplan_reuses_buffers_and_reports_arena() {
    // A hand-built graph whose plan is known: ids -> embedding x [1, s, 8]
    // f32; loop(2 steps) { a = silu(c); b = add(a, c); yield next(b) out(b) };
    // logits = linear(h, head) [1, s, 4].
    let mut b = GraphBuilder::new("tiny");
    let tok = Type::new(DType::I32, vec![Dim::sym("batch"), Dim::sym("seq")]);
    let ids = b.input(tok.clone());
    let _pos = b.input(tok);
    let table = b.weight("table", Type::fixed(DType::F32, &[16, 8]));
    let head = b.weight("head", Type::fixed(DType::F32, &[4, 8]));
    let x = b.op(OpKind::Embedding, &[table, ids], DType::F32).unwrap();
    let (_s, c) = b.begin_loop(&[x]);
    let a = b.op(OpKind::Silu, &[c[0]], DType::F32).unwrap();
    let s = b.op(OpKind::Add, &[a, c[0]], DType::F32).unwrap();
    let h = b.end_loop(2, ExitPolicy::Last, &[s], s, None);
    let logits = b.op(OpKind::Linear, &[h, head], DType::F32).unwrap();
    let g = b.finish(&[logits]);
    ouroc_ir::verify(&g).unwrap();

    let p = plan(&g, 1, 32);
    check_plan(&g, &p, 32);
    // Activations: ids, pos (128 B each), x, loop result, carried c, a, s (1 KiB each), logits (512 B).
    assert_eq!(p.naive_bytes, 2 * 128 + 5 * 1024 + 512);
    // c takes x's buffer (x dies at the loop); s takes a's (a dies at the add, c lives on).
    assert_eq!(p.in_place, vec![(c[0], x), (s, a)]);
    // Live together at the peak (inside the loop): loop result, c, a/s; ids
    // died at the embedding, pos is never read.
    assert_eq!(p.arena_bytes, 3 * 1024);
    assert_eq!(p.offsets[&c[0]], p.offsets[&x]);
    assert_ne!(p.offsets[&h], p.offsets[&c[0]]);
    // Logits reuse freed memory.
    assert!(p.offsets[&logits] + 512 <= p.arena_bytes);
    assert_eq!(plan(&g, 2, 32).arena_bytes, 2 * p.arena_bytes);

    // The fixture: real reuse, sound at every size.
    let ckpt = open("mha-r4");
    for policy in POLICIES {
        for (form, g) in forms(&fixture_graph(&ckpt, policy)) {
            for (batch, seq) in [(1, 1), (1, 128), (3, 5)] {
                let p = plan(&g, batch, seq);
                check_plan(&g, &p, seq);
                assert!(p.arena_bytes * 2 < p.naive_bytes, "{policy} {form}: {}", p.summary());
                assert!(!p.in_place.is_empty());
            }
        }
    }
    let g = fixture_graph(&ckpt, "threshold:1.0:bf16");
    for seq in [1, 128] {
        println!("mha-r4 seq {seq}: {}", plan(&g, 1, seq).summary());
    }
    let g = with_step_end(&g);
    for seq in [1, 128] {
        println!("mha-r4 (step_end) seq {seq}: {}", plan(&g, 1, seq).summary());
    }
}

#[test]
fn memplan_replay_catches_a_clobbered_value() {
    // The replay is what the soundness checks rest on: give a body value the
    // carried value's offset and it must notice.
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    let mut p = plan(&g, 1, 4);
    replay(&g, &p, 4);
    let l = the_loop(&g);
    let (c, first) = (l.body.args[1], l.body.ops[0].result());
    p.offsets.insert(first, p.offsets[&c]);
    let caught = std::panic::catch_unwind(|| replay(&g, &p, 4));
    assert!(caught.is_err(), "overwriting the carried value went unnoticed");
}

#[test]
fn memplan_plans_the_ouro_1_4b_shape() {
    let g = ouro_1_4b("threshold:1.0:bf16");
    for seq in [1, 128] {
        let p = plan(&g, 1, seq);
        check_plan(&g, &p, seq);
        println!("Ouro-1.4B bf16 seq {seq}: {}", p.summary());
        // The largest activation is the logits [1, seq, 49152] bf16; the arena
        // holds it plus what lives with it, far below one buffer per value.
        let logits = 49152 * 2 * seq as u64;
        assert!(p.arena_bytes >= logits);
        assert!(p.arena_bytes * 10 < p.naive_bytes);
    }
    let (after, reports) = pipeline().run(&g, None).unwrap();
    println!("{}", ouroc_passes::table(&reports));
    for seq in [1, 128] {
        println!(
            "Ouro-1.4B after the loop passes, seq {seq}: {}",
            plan(&after, 1, seq).summary()
        );
    }
}

#[test]
fn passes_handle_the_unrolled_form() {
    // CSE, DCE and memory planning work on graphs without a loop too; the
    // loop passes leave them alone.
    let ckpt = open("mha-r4");
    let g = ouroc_models::build_graph(
        &ckpt,
        &ouroc_models::BuildOptions {
            dtype: DType::F32,
            policy: ExitPolicy::parse("threshold:0.5").unwrap(),
            loops: None,
            unrolled: true,
        },
    )
    .unwrap();
    for (pass, _) in all_passes() {
        let after = pass.run(&g).unwrap();
        assert_equivalent(&g, &after, &ckpt, ckpt.config.vocab_size, pass.name());
        assert!(kernels(&after) <= kernels(&g));
    }
    let p = plan(&g, 1, 8);
    check_plan(&g, &p, 8);
}
