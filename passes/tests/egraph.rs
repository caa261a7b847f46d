//! The e-graph rewriting pass: numerically equivalent on every fixture and
//! policy and on random small models; every rule fires; the optimised body
//! has the fused forms; statistics improve; a snapshot of the result.

mod common;

use common::*;
use ouroc_ir::{DType, ExitPolicy, Graph, Op, OpKind, ValueId};
use ouroc_models::BuildOptions;
use ouroc_passes::egraph::{EGraphRewrite, Report, optimize, rules::rules};
use ouroc_passes::{Pass, PassManager, Stats};
use std::collections::HashMap;

fn optimized(fixture: &str, policy: &str) -> (Graph, Graph, Report) {
    let ckpt = open(fixture);
    let g = fixture_graph(&ckpt, policy);
    let (out, report) = optimize(&g).unwrap_or_else(|e| panic!("{fixture} {policy}: {e}"));
    (g, out, report)
}

#[test]
fn equivalent_on_every_fixture_and_policy() {
    for fixture in FIXTURES {
        let ckpt = open(fixture);
        for policy in POLICIES {
            let g = fixture_graph(&ckpt, policy);
            let out = EGraphRewrite::default()
                .run(&g)
                .unwrap_or_else(|e| panic!("{fixture} {policy}: {e}"));
            assert_equivalent(&g, &out, &ckpt, ckpt.config.vocab_size, &format!("{fixture} {policy}"));
        }
    }
}

#[test]
fn equivalent_on_random_models() {
    for seed in 0..30u64 {
        let policy = POLICIES[seed as usize % POLICIES.len()];
        let m = random_model(seed, policy);
        let (out, report) = optimize(&m.graph).unwrap_or_else(|e| panic!("seed {seed} {policy}: {e}"));
        let what = format!("random model seed {seed} policy {policy}");
        assert_equivalent(&m.graph, &out, &m.weights, m.config.vocab_size, &what);
        let (before, after) = (Stats::of(&m.graph), Stats::of(&out));
        assert!(
            after.kernels_per_token < before.kernels_per_token,
            "{what}: {before:?} -> {after:?}"
        );
        let r = &report.regions[0];
        assert!(r.cost_after < r.cost_before, "{what}: {r:?}");
    }
}

#[test]
fn equivalent_on_unrolled_graphs() {
    // A graph without a loop (R copies of the layer stack, as a tracer
    // produces) is rewritten as one region: the top block.
    for fixture in ["mha-r4", "gqa-hd"] {
        let ckpt = open(fixture);
        for policy in ["threshold:0.5", "weighted"] {
            let opts = BuildOptions {
                dtype: DType::F32,
                policy: ExitPolicy::parse(policy).unwrap(),
                loops: None,
                unrolled: true,
            };
            let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
            assert!(g.find_loop().is_none());
            let (out, _) = optimize(&g).unwrap();
            let what = format!("unrolled {fixture} {policy}");
            assert_equivalent(&g, &out, &ckpt, ckpt.config.vocab_size, &what);
            let count = |g: &Graph, name: &str| g.walk().iter().filter(|op| op.kind.name() == name).count();
            let steps = ckpt.config.total_ut_steps;
            assert_eq!(count(&out, "step_end"), steps, "{what}");
            assert_eq!(count(&out, "rope"), 0, "{what}");
            assert!(
                Stats::of(&out).kernels_per_token < Stats::of(&g).kernels_per_token,
                "{what}"
            );
        }
    }
}

#[test]
fn runs_in_the_pass_manager_and_is_idempotent() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "weighted");
    let pm = PassManager::new(vec![
        Box::new(EGraphRewrite::default()),
        Box::new(EGraphRewrite::default()),
    ]);
    let (out, reports) = pm.run(&g, None).unwrap();
    assert_eq!(pm.names(), ["egraph", "egraph"]);
    // The second run finds nothing better.
    assert_eq!(reports[1].before, reports[1].after);
    let once = EGraphRewrite::default().run(&g).unwrap();
    assert_eq!(out, once, "a second run changes the graph");
    assert_equivalent(&g, &out, &ckpt, ckpt.config.vocab_size, "twice");
}

// ---- each rule fires ----

/// Rule firings on mha-r4 (under a policy that reads the exit signal).
fn fired(rule: &str) -> usize {
    let (_, _, report) = optimized("mha-r4", "threshold:0.5");
    report.applied(rule)
}

macro_rules! fires {
    ($($test:ident: $rule:literal,)*) => {
        $(
            #[test]
            fn $test() {
                assert!(fired($rule) > 0, "rule {} never fired on mha-r4", $rule);
            }
        )*

        #[test]
        fn every_rule_in_the_table_has_a_firing_test() {
            let tested = [$($rule),*];
            for r in rules() {
                assert!(tested.contains(&r.name), "rule {} has no firing test", r.name);
            }
            assert_eq!(tested.len(), rules().len());
        }
    };
}

fires! {
    fires_fold_norm_into_linear: "fold-norm-into-linear",
    fires_fold_norm_into_linear_bias: "fold-norm-into-linear-bias",
    fires_merge_linears: "merge-linears",
    fires_scale_cols_of_concat: "scale-cols-of-concat",
    fires_swiglu: "swiglu",
    fires_swiglu_merged: "swiglu-merged",
    fires_add_rms_norm: "add-rms-norm",
    fires_add_rms_scale: "add-rms-scale",
    fires_rope_into_attention: "rope-into-attention",
    fires_step_end: "step-end",
    fires_mul_commute: "mul-commute",
    fires_add_commute: "add-commute",
}

#[test]
fn rule_names_are_unique() {
    let mut names: Vec<&str> = rules().iter().map(|r| r.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), rules().len());
}

// ---- the optimised body has the fused forms ----

fn body_ops(g: &Graph) -> &[Op] {
    &g.find_loop().expect("a loop").body.ops
}

fn count(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    ops.iter().filter(|op| f(op)).count()
}

fn is(op: &Op, name: &str) -> bool {
    op.kind.name() == name
}

#[test]
fn optimised_body_has_every_fused_form() {
    for fixture in ["mha-r4", "gqa-hd"] {
        let (_, out, _) = optimized(fixture, "threshold:0.5");
        let ckpt = open(fixture);
        let c = &ckpt.config;
        let layers = c.num_hidden_layers;
        let body = body_ops(&out);
        let def: HashMap<ValueId, &Op> = out
            .walk()
            .into_iter()
            .flat_map(|op| op.results.iter().map(move |r| (*r, op)))
            .collect();
        // Norm weights are folded: no rms_norm feeds a linear.
        for op in body.iter().filter(|op| is(op, "linear")) {
            let x = def.get(&op.inputs[0]).map(|d| d.kind.name());
            assert_ne!(x, Some("rms_norm"), "{fixture}: a linear reads an rms_norm");
        }
        // One merged q/k/v and one merged gate/up linear per layer, read
        // through slices (q/k/v) or the one-operand swiglu (gate/up).
        let width = |op: &Op| out.ty(op.result()).last().and_then(|d| d.fixed()).unwrap();
        let qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
        let gu = 2 * c.intermediate_size;
        let linears: Vec<&Op> = body.iter().filter(|op| is(op, "linear")).collect();
        assert_eq!(
            linears.iter().filter(|op| width(op) == qkv).count(),
            layers,
            "{fixture}"
        );
        assert_eq!(linears.iter().filter(|op| width(op) == gu).count(), layers, "{fixture}");
        // q/k/v merged, o, gate/up merged, down: four per layer, and no exit-gate linear.
        assert_eq!(linears.len(), 4 * layers, "{fixture}");
        for op in &linears {
            let w = def[&op.inputs[1]];
            if width(op) == qkv || width(op) == gu {
                assert!(
                    is(w, "scale_cols") || is(w, "concat"),
                    "{fixture}: merged weight is {}",
                    w.kind.name()
                );
            }
        }
        assert_eq!(count(body, |op| is(op, "slice")), 3 * layers, "{fixture}");
        // swiglu of the merged gate/up result; no silu or mul left.
        assert_eq!(
            count(body, |op| is(op, "swiglu") && op.inputs.len() == 1),
            layers,
            "{fixture}"
        );
        assert_eq!(count(body, |op| is(op, "silu") || is(op, "mul")), 0, "{fixture}");
        // Residual add + norm: both adds of every layer but the last one's second.
        assert_eq!(count(body, |op| is(op, "add_rms_norm")), 2 * layers - 1, "{fixture}");
        assert_eq!(count(body, |op| is(op, "add")), 1, "{fixture}");
        // RoPE inside attention.
        assert_eq!(
            count(body, |op| is(op, "attention") && op.inputs.len() == 5),
            layers,
            "{fixture}"
        );
        assert_eq!(
            count(body, |op| is(op, "rope") || is(op, "attention") && op.inputs.len() == 3),
            0
        );
        // The end of the step.
        assert_eq!(count(body, |op| is(op, "step_end")), 1, "{fixture}");
        assert_eq!(count(body, |op| is(op, "sigmoid")), 0, "{fixture}");
        // Weight transforms are outside the loop.
        for op in body {
            assert!(
                !is(op, "scale_cols") && !is(op, "concat"),
                "{fixture}: weight transform in the body"
            );
        }
        // The attention layers stay distinct.
        let mut layers_seen: Vec<usize> = body
            .iter()
            .filter_map(|op| match &op.kind {
                OpKind::Attention(a) => Some(a.layer),
                _ => None,
            })
            .collect();
        layers_seen.sort();
        assert_eq!(layers_seen, (0..layers).collect::<Vec<_>>());
    }
}

/// A one-layer toy loop whose body is `body` (reading `%9`, the carried
/// value, and the weights `%4: w[8]`, `%5: W[8, 8]`), with random weights.
fn toy(body: &str, result: &str) -> (Graph, HashMap<String, Vec<f32>>) {
    let text = format!(
        r#"graph @toy(%0: i32[batch, seq], %1: i32[batch, seq]) {{
  %2 = weight "emb" : f32[16, 8]
  %3 = embedding(%2, %0) : f32[batch, seq, 8]
  %4 = weight "w" : f32[8]
  %5 = weight "W" : f32[8, 8]
  %6 = weight "head" : f32[16, 8]
  %7 = loop(%3) {{steps = 2, policy = "last"}} : f32[batch, seq, 8] {{
  ^body(%8: i32[], %9: f32[batch, seq, 8]):
{body}
    yield next({result}) out({result})
  }}
  %30 = linear(%7, %6) : f32[batch, seq, 16]
  return %30
}}
"#
    );
    let g = ouroc_ir::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut rng = Rng(5);
    let mut weights = HashMap::new();
    for (name, n) in [("emb", 128), ("w", 8), ("W", 64), ("head", 128)] {
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if name == "w" {
                    1.0 + 0.3 * rng.unit()
                } else {
                    rng.unit()
                }
            })
            .collect();
        weights.insert(name.to_string(), v);
    }
    (g, weights)
}

#[test]
fn a_norm_with_a_non_linear_user_stays_available() {
    // The norm feeds a linear and an add: folding its weight into the
    // linear would need an extra rms_scale kernel, so the norm stays and
    // the linear keeps reading it.
    let (g, w) = toy(
        "    %10 = rms_norm(%9, %4) {eps = 1e-6} : f32[batch, seq, 8]
    %11 = linear(%10, %5) : f32[batch, seq, 8]
    %12 = add(%10, %11) : f32[batch, seq, 8]",
        "%12",
    );
    let (out, report) = optimize(&g).unwrap();
    assert!(report.applied("fold-norm-into-linear") > 0);
    assert_equivalent(&g, &out, &w, 16, "norm with a non-linear user");
    let body = body_ops(&out);
    assert_eq!(count(body, |op| is(op, "rms_norm")), 1, "{out}");
    assert_eq!(count(body, |op| is(op, "rms_scale")), 0, "{out}");
    let norm = body.iter().find(|op| is(op, "rms_norm")).unwrap().result();
    let lin = body.iter().find(|op| is(op, "linear")).unwrap();
    assert_eq!(lin.inputs[0], norm, "{out}");
}

#[test]
fn a_norm_read_only_by_linears_is_folded() {
    let (g, w) = toy(
        "    %10 = rms_norm(%9, %4) {eps = 1e-6} : f32[batch, seq, 8]
    %11 = linear(%10, %5) : f32[batch, seq, 8]
    %12 = silu(%11) : f32[batch, seq, 8]",
        "%12",
    );
    let (out, _) = optimize(&g).unwrap();
    assert_equivalent(&g, &out, &w, 16, "norm read only by a linear");
    let body = body_ops(&out);
    assert_eq!(count(body, |op| is(op, "rms_norm")), 0, "{out}");
    assert_eq!(count(body, |op| is(op, "rms_scale")), 1, "{out}");
    // The folded weight is computed once, before the loop.
    let top = &out.body.ops;
    let lp = top.iter().position(|op| is(op, "loop")).unwrap();
    assert!(top[..lp].iter().any(|op| is(op, "scale_cols")), "{out}");
}

#[test]
fn swiglu_matches_either_factor_order() {
    // mul(u, silu(g)): matching needs mul's commutativity.
    let (g, w) = toy(
        "    %10 = linear(%9, %5) : f32[batch, seq, 8]
    %11 = silu(%10) : f32[batch, seq, 8]
    %12 = mul(%9, %11) : f32[batch, seq, 8]",
        "%12",
    );
    let (out, _) = optimize(&g).unwrap();
    assert_equivalent(&g, &out, &w, 16, "mul(u, silu(g))");
    let body = body_ops(&out);
    assert_eq!(count(body, |op| is(op, "swiglu")), 1, "{out}");
    assert_eq!(count(body, |op| is(op, "mul") || is(op, "silu")), 0, "{out}");
}

// ---- statistics ----

#[test]
fn fewer_kernels_and_no_more_bytes_per_token() {
    for fixture in ["mha-r4", "gqa-hd"] {
        let (g, out, report) = optimized(fixture, "threshold:0.5");
        let (before, after) = (Stats::of(&g), Stats::of(&out));
        assert!(
            after.kernels_per_token < before.kernels_per_token,
            "{fixture}: {before:?} -> {after:?}"
        );
        let bytes = |s: &Stats| s.weight_bytes_per_token + s.activation_bytes_per_token;
        assert!(bytes(&after) <= bytes(&before), "{fixture}: {before:?} -> {after:?}");
        assert!(
            after.weight_bytes_per_token <= before.weight_bytes_per_token,
            "{fixture}"
        );
        assert!(after.ops_in_loop < before.ops_in_loop, "{fixture}");
        let r = &report.regions[0];
        assert!(r.cost_after < r.cost_before, "{fixture}: {r:?}");
        assert!(r.stop_reason.contains("Saturated"), "{fixture}: {}", r.stop_reason);
    }
}

#[test]
fn mha_r4_stats_before_and_after() {
    let (g, out, _) = optimized("mha-r4", "threshold:0.5");
    let (before, after) = (Stats::of(&g), Stats::of(&out));
    // Per layer and step: 19 ops -> 11 kernels (rms_scale or add_rms_norm, qkv, attention, o,
    // rms_norm, add_rms_norm, gate/up, swiglu, down, rms_norm; the last layer's add + step_end).
    assert_eq!(before.kernels_per_token, 4 + 4 * 39);
    assert_eq!(after.kernels_per_token, 4 + 4 * 22);
}

#[test]
fn a_release_sized_layer_stack_is_fully_fused() {
    // Ouro-1.4B's structure (24 layers, 4 steps) with small widths: the
    // extraction scales and still finds every fusion, rolled and unrolled.
    let json = r#"{"model_type": "ouro", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "vocab_size": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": false, "total_ut_steps": 4,
        "early_exit_threshold": 1.0, "hidden_act": "silu"}"#;
    let (config, _) = ouroc_models::OuroConfig::from_json_str(json, "24 layers").unwrap();
    for unrolled in [false, true] {
        let opts = BuildOptions {
            dtype: DType::F32,
            policy: ExitPolicy::Weighted,
            loops: None,
            unrolled,
        };
        let g = ouroc_models::build_from_config(&config, "lm_head.weight", &opts).unwrap();
        let (out, _) = optimize(&g).unwrap();
        // Per step: 10 kernels per layer, then the last add and step_end;
        // outside: embedding, rope_cos, rope_sin, lm_head (and exit_select).
        let outside = if unrolled { 5 } else { 4 };
        assert_eq!(
            Stats::of(&out).kernels_per_token,
            outside + 4 * (10 * 24 + 2),
            "unrolled: {unrolled}"
        );
    }
}

// ---- snapshot ----

#[test]
fn snapshot_mha_r4() {
    let (_, out, _) = optimized("mha-r4", "threshold:0.5");
    insta::assert_snapshot!("egraph_mha_r4", ouroc_ir::print(&out));
}
