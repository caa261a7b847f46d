//! Re-rolling: the unrolled import (R copies of the layer stack and an
//! `exit_select`) re-rolled is exactly the direct rolled import, computes
//! what the unrolled graph computes, and a graph whose steps differ is
//! refused with the op named.

mod common;

use common::*;
use ouroc_ir::{DType, ExitPolicy, Graph, Op, OpKind, Type, ValueId};
use ouroc_models::{BuildOptions, Checkpoint, OuroConfig};
use ouroc_passes::reroll::Reroll;
use ouroc_passes::{Pass, PassError, PassManager, Stats};

fn unrolled_from_config(config: &OuroConfig, head: &str, policy: ExitPolicy) -> Graph {
    let opts = BuildOptions {
        dtype: DType::F32,
        policy,
        loops: None,
        unrolled: true,
    };
    ouroc_models::build_from_config(config, head, &opts).expect("build unrolled")
}

fn unrolled_fixture(ckpt: &Checkpoint, policy: &str) -> Graph {
    unrolled_from_config(
        &ckpt.config,
        ckpt.head_tensor_name(),
        ExitPolicy::parse(policy).unwrap(),
    )
}

fn run_reroll(g: &Graph) -> Graph {
    Reroll.run(g).unwrap_or_else(|e| panic!("reroll: {e}"))
}

/// The reroll error on `g`, which must be `PassError::Failed`.
fn refusal(g: &Graph) -> String {
    match Reroll.run(g) {
        Err(PassError::Failed { pass: "reroll", msg }) => {
            assert!(msg.starts_with("cannot re-roll: "), "{msg}");
            msg
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(g) => panic!("expected a refusal, got\n{g}"),
    }
}

fn assert_mentions(text: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(text.contains(f), "message {text:?} should mention {f:?}");
    }
}

#[test]
fn rerolled_unrolled_import_is_the_rolled_import() {
    let mut checked = 0;
    for name in FIXTURES {
        let ckpt = open(name);
        for pol in POLICIES {
            let unrolled = unrolled_fixture(&ckpt, pol);
            assert!(unrolled.find_loop().is_none());
            let rolled = fixture_graph(&ckpt, pol);
            let back = run_reroll(&unrolled);
            assert_eq!(
                ouroc_ir::print(&back.canonicalize()),
                ouroc_ir::print(&rolled),
                "{name} {pol}: reroll(unrolled) differs from the rolled import"
            );
            assert_eq!(back, rolled, "{name} {pol}: the graphs themselves are equal");
            checked += 1;
        }
    }
    assert_eq!(checked, FIXTURES.len() * POLICIES.len());
}

#[test]
fn rerolled_bf16_import_is_the_rolled_import() {
    for name in FIXTURES {
        let ckpt = open(name);
        let p = BuildOptions::reference_policy(&ckpt.config, DType::BF16);
        let build = |unrolled| {
            let opts = BuildOptions {
                dtype: DType::BF16,
                policy: p,
                loops: None,
                unrolled,
            };
            ouroc_models::build_graph(&ckpt, &opts).unwrap()
        };
        let back = run_reroll(&build(true));
        assert_eq!(ouroc_ir::print(&back), ouroc_ir::print(&build(false)), "{name}");
    }
}

#[test]
fn rerolled_random_configs_are_the_rolled_import() {
    let mut checked = 0;
    for seed in 0..40u64 {
        let pol = POLICIES[seed as usize % POLICIES.len()];
        let rm = random_model(seed, pol);
        let head = if rm.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let policy = rm.graph.find_loop().unwrap().policy;
        let unrolled = unrolled_from_config(&rm.config, head, policy);
        let back = run_reroll(&unrolled);
        assert_eq!(
            ouroc_ir::print(&back.canonicalize()),
            ouroc_ir::print(&rm.graph),
            "seed {seed} ({pol}, L = {}, R = {})",
            rm.config.num_hidden_layers,
            rm.config.total_ut_steps
        );
        if seed < 8 {
            let what = format!("random model {seed} ({pol})");
            assert_equivalent(&unrolled, &back, &rm.weights, rm.config.vocab_size, &what);
        }
        checked += 1;
    }
    assert_eq!(checked, 40);
}

#[test]
fn rerolled_graph_computes_what_the_unrolled_graph_computes() {
    for name in FIXTURES {
        let ckpt = open(name);
        for pol in POLICIES {
            let unrolled = unrolled_fixture(&ckpt, pol);
            let back = run_reroll(&unrolled);
            let what = format!("reroll {name} {pol}");
            assert_equivalent(&unrolled, &back, &ckpt, ckpt.config.vocab_size, &what);
        }
    }
}

#[test]
fn rerolled_mha_r4_snapshot_is_the_direct_import() {
    let ckpt = open("mha-r4");
    let p = BuildOptions::reference_policy(&ckpt.config, DType::F32).to_string();
    let back = ouroc_ir::print(&run_reroll(&unrolled_fixture(&ckpt, &p)));
    assert_eq!(back, ouroc_ir::print(&fixture_graph(&ckpt, &p)));
    insta::assert_snapshot!("rerolled_mha_r4", back);
}

#[test]
fn graph_without_exit_select_is_unchanged() {
    let ckpt = open("gqa-hd");
    let rolled = fixture_graph(&ckpt, "weighted");
    assert_eq!(run_reroll(&rolled), rolled);
}

#[test]
fn reroll_in_the_pass_manager() {
    let ckpt = open("tied");
    let unrolled = unrolled_fixture(&ckpt, "threshold:0.5");
    let pm = PassManager::new(vec![Box::new(Reroll)]);
    let (g, reports) = pm.run(&unrolled, Some("reroll")).expect("pipeline");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].name, "reroll");
    assert_eq!(Stats::of(&g), Stats::of(&fixture_graph(&ckpt, "threshold:0.5")));
    let body = g.find_loop().expect("a loop").body.ops.len();
    assert_eq!(reports[0].after.ops_in_loop, body);
    assert_eq!(reports[0].before.ops_in_loop, 0);
}

/// Text of the unrolled mha-r4 graph (R = 4, L = 2) and the id of a weight.
fn unrolled_text() -> (String, Graph) {
    let ckpt = open("mha-r4");
    let g = unrolled_fixture(&ckpt, "threshold:0.5");
    (ouroc_ir::print(&g), g)
}

fn weight_id(text: &str, name: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.contains(&format!("weight \"{name}\"")))
        .unwrap_or_else(|| panic!("no weight {name}"));
    line.trim().split(' ').next().unwrap().to_string()
}

/// Replace `from` by `to` in the `nth` (0-based) line containing `pattern`.
fn edit_nth_line(text: &str, pattern: &str, nth: usize, from: &str, to: &str) -> (String, String) {
    let mut seen = 0;
    let mut edited = None;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains(pattern) {
                seen += 1;
                if seen == nth + 1 {
                    assert!(l.contains(from), "line {l:?} has no {from:?}");
                    let new = l.replacen(from, to, 1);
                    edited = Some(new.trim().to_string());
                    return new;
                }
            }
            l.to_string()
        })
        .collect();
    (lines.join("\n") + "\n", edited.expect("no such line"))
}

fn parse(text: &str) -> Graph {
    let g = ouroc_ir::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    ouroc_ir::verify(&g).unwrap_or_else(|e| panic!("edited graph does not verify: {e}"));
    g
}

/// The op as the error shows it: the printed line without its type.
fn op_text(line: &str) -> &str {
    line.rsplit_once(" : ").unwrap().0
}

#[test]
fn refuses_a_step_that_reads_a_different_weight() {
    let (text, _) = unrolled_text();
    let q = weight_id(&text, "model.layers.0.self_attn.q_proj.weight");
    let k = weight_id(&text, "model.layers.0.self_attn.k_proj.weight");
    // Step 2's q projection of layer 0 reads k_proj instead (same shape in MHA).
    let (edited, line) = edit_nth_line(&text, &format!(", {q}) :"), 2, &format!(", {q})"), &format!(", {k})"));
    let msg = refusal(&parse(&edited));
    // The parser keeps the printed numbering, so the op reads as it was written.
    assert_mentions(
        &msg,
        &[
            "steps 0 and 2 differ",
            op_text(&line),
            "operand 2",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ],
    );
}

#[test]
fn refuses_a_difference_in_step_one() {
    // Found while matching step 1 onto step 0 (before the loop body exists).
    let (text, _) = unrolled_text();
    let up = weight_id(&text, "model.layers.1.mlp.up_proj.weight");
    let gate = weight_id(&text, "model.layers.1.mlp.gate_proj.weight");
    let (edited, line) = edit_nth_line(
        &text,
        &format!(", {up}) :"),
        1,
        &format!(", {up})"),
        &format!(", {gate})"),
    );
    let msg = refusal(&parse(&edited));
    assert_mentions(
        &msg,
        &[
            "steps 0 and 1 differ",
            op_text(&line),
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ],
    );
}

#[test]
fn refuses_a_different_op_or_attribute() {
    let (text, _) = unrolled_text();
    // Step 3 (layers 6, 7): the first silu of layer 1 becomes a sigmoid.
    let (edited, line) = edit_nth_line(&text, "= silu(", 7, "silu(", "sigmoid(");
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &["steps 0 and 3 differ", op_text(&line), "not the same"]);
    // Step 1's third norm has another epsilon.
    let (edited, line) = edit_nth_line(&text, "= rms_norm(", 9 + 2, "eps = 1e-6", "eps = 1e-5");
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &["steps 0 and 1 differ", op_text(&line), "not the same"]);
}

#[test]
fn refuses_wrong_attention_layers() {
    let (text, _) = unrolled_text();
    // Step 1's layer 0 must use KV layer 1*2 + 0 = 2; make it 9 (free, so the graph verifies).
    let (edited, line) = edit_nth_line(&text, "{layer = 2,", 0, "layer = 2,", "layer = 9,");
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &["step 1", op_text(&line), "KV layer 9", "must use 1*2 + 0 = 2"]);
    // Step 0's layers must be 0..L.
    let (edited, line) = edit_nth_line(&text, "{layer = 0,", 0, "layer = 0,", "layer = 8,");
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &["step 0", op_text(&line), "KV layer 8", "0..2"]);
}

#[test]
fn refuses_a_step_value_used_outside_the_steps() {
    let (text, g) = unrolled_text();
    // The head reads step 1's output instead of the exit_select's choice.
    let sel = g
        .body
        .ops
        .iter()
        .find(|op| matches!(op.kind, OpKind::ExitSelect { .. }))
        .unwrap();
    let (sel_v, out1) = (sel.result().to_string(), sel.inputs[1].to_string());
    let (edited, line) = edit_nth_line(
        &text,
        &format!("= linear({sel_v},"),
        0,
        &format!("linear({sel_v},"),
        &format!("linear({out1},"),
    );
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &[op_text(&line), &format!("reads {out1}"), "inside step 1"]);
}

/// The unrolled text with step `r`'s first norm and first residual add
/// reading the embedding instead of step r-1's output.
fn restart_step_from_embedding(r: usize) -> (String, String) {
    let (text, g) = unrolled_text();
    let embedding = g
        .body
        .ops
        .iter()
        .find(|op| op.kind == OpKind::Embedding)
        .unwrap()
        .result();
    let sel = g
        .body
        .ops
        .iter()
        .find(|op| matches!(op.kind, OpKind::ExitSelect { .. }))
        .unwrap();
    let prev = sel.inputs[r - 1].to_string();
    let edited = text
        .lines()
        .map(|l| {
            if l.contains(&format!("= rms_norm({prev}, ")) || l.contains(&format!("= add({prev}, ")) {
                l.replacen(&format!("({prev}, "), &format!("({embedding}, "), 1)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    assert_ne!(edited, text);
    (edited, prev)
}

#[test]
fn refuses_steps_that_do_not_chain() {
    // Step 1 starts again from the embedding: it does not depend on step 0.
    let (edited, out0) = restart_step_from_embedding(1);
    let msg = refusal(&parse(&edited));
    assert_mentions(&msg, &["does not depend on", &format!("{out0} (rms_norm)")]);
    // Step 2 does: found while matching it against the loop body.
    let (edited, out1) = restart_step_from_embedding(2);
    let msg = refusal(&parse(&edited));
    assert_mentions(
        &msg,
        &[
            "steps 0 and 2 differ",
            "(embedding) where step 0 reads its input",
            &format!("step 2's input is {out1}"),
        ],
    );
}

/// A tracer that repeats every weight per use: steps 1.. read their own
/// copies (same names) of the weights, defined at the top.
fn with_weight_copies(g: &Graph) -> Graph {
    let mut g = g.clone();
    let first_step_op = g
        .body
        .ops
        .iter()
        .position(|op| matches!(op.kind, OpKind::RmsNorm { .. }))
        .unwrap();
    let step_len = g.body.ops[first_step_op..]
        .iter()
        .position(|op| op.kind == OpKind::Sigmoid)
        .unwrap()
        + 1;
    let weights: std::collections::HashMap<ValueId, String> = g
        .body
        .ops
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::Weight { name } => Some((op.result(), name.clone())),
            _ => None,
        })
        .collect();
    let mut copies = Vec::new();
    for i in first_step_op + step_len..g.body.ops.len() {
        if matches!(g.body.ops[i].kind, OpKind::ExitSelect { .. }) {
            break;
        }
        for j in 0..g.body.ops[i].inputs.len() {
            let v = g.body.ops[i].inputs[j];
            if let Some(name) = weights.get(&v) {
                let ty: Type = g.ty(v).clone();
                g.types.push(ty);
                let copy = ValueId((g.types.len() - 1) as u32);
                copies.push(Op {
                    results: vec![copy],
                    kind: OpKind::Weight { name: name.clone() },
                    inputs: vec![],
                });
                g.body.ops[i].inputs[j] = copy;
            }
        }
    }
    let n = copies.len();
    g.body.ops.splice(first_step_op..first_step_op, copies);
    assert!(n > 0);
    g.canonicalize()
}

#[test]
fn per_use_weight_copies_reroll_and_a_renamed_copy_is_refused() {
    let ckpt = open("mha-r4");
    let g = with_weight_copies(&unrolled_fixture(&ckpt, "weighted"));
    ouroc_ir::verify(&g).unwrap();
    let back = run_reroll(&g);
    assert_eq!(
        ouroc_ir::print(&back),
        ouroc_ir::print(&fixture_graph(&ckpt, "weighted"))
    );
    assert_equivalent(&g, &back, &ckpt, ckpt.config.vocab_size, "weight copies");

    // Edit one weight name in the text form: step 2's copy of layer 1's o_proj.
    let text = ouroc_ir::print(&g);
    let name = "\"model.layers.1.self_attn.o_proj.weight\"";
    let (edited, line) = edit_nth_line(&text, name, 2, name, "\"model.layers.1.self_attn.o_proj.weight.step2\"");
    let copy = line.split(' ').next().unwrap().to_string();
    let msg = refusal(&parse(&edited));
    assert_mentions(
        &msg,
        &[
            "steps 0 and 2 differ",
            &format!("{copy})"),
            "model.layers.1.self_attn.o_proj.weight.step2",
        ],
    );
}
