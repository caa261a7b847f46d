//! The Program contract beyond the single-sequence f32 check: decode with real early exit,
//! batches of sequences, bf16 rounding points, and lowering errors.

mod common;

use common::*;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::{DType, Interpreter, Options};
use ouroc_kernels::{LowerError, lower};
use ouroc_models::BuildOptions;

/// With `exit_skips`, a decode token that exits at step r runs r + 1 body
/// copies, and the KV slots it skipped are filled as the interpreter fills
/// them: later tokens' logits still match.
#[test]
fn early_exit_in_decode_skips_steps_and_matches_the_interpreter() {
    for name in ["gqa-hd", "tied"] {
        let ckpt = open(name);
        let p = prompt(ckpt.config.vocab_size, 12);
        let g = optimised(&graph(&ckpt, DType::F32, "threshold:0.5"));
        let prog = lower(&g).unwrap();
        let opts = ExecOptions {
            round_low_precision: false,
            exit_skips: true,
            ..ExecOptions::default()
        };
        let (got, launches) = exec(&prog, &ckpt, &p, 8, opts);
        let want = interp(&g, &ckpt, &p, 8, false, true);
        let e = rel_err(&got.logits, &want.logits);
        assert!(e <= 1e-5, "{name}: relative error {e}");
        assert_eq!(got.exit_steps, want.exit_steps, "{name}");

        let l = prog.loop_.as_ref().unwrap();
        let outside = prog.before.len() + prog.after.len();
        // Prefill runs every step; each decode call stops at its token's exit step.
        assert_eq!(launches[0], prog.kernels_per_token(), "{name}: prefill");
        for (i, &n) in launches[1..].iter().enumerate() {
            let exit = got.exit_steps[8 + i];
            assert_eq!(
                n,
                outside + (exit + 1) * l.body.len(),
                "{name}: decode token {i} exits at {exit}"
            );
        }
        assert!(
            launches[1..].iter().any(|&n| n < prog.kernels_per_token()),
            "{name}: no decode token exited early ({:?})",
            got.exit_steps
        );
    }
}

/// Two sequences at once: the arena scales with batch x seq tokens and
/// each sequence has its own KV cache rows.
#[test]
fn batched_prefill_and_decode_match_the_interpreter() {
    for name in ["mha-r4", "gqa-hd"] {
        let ckpt = open(name);
        let vocab = ckpt.config.vocab_size;
        let (a, b) = (prompt(vocab, 9), prompt(vocab, 13)[4..].to_vec());
        for policy in POLICIES {
            let g = optimised(&graph(&ckpt, DType::F32, policy));
            let prog = lower(&g).unwrap();
            let mut ex = Executor::new(&prog, &ckpt, f32_exec()).unwrap();
            let opts = Options {
                round_low_precision: false,
                max_positions: None,
                exit_skips: false,
            };
            let mut it = Interpreter::new(&g, &ckpt, opts).unwrap();
            let mut calls = vec![vec![a[..6].to_vec(), b[..6].to_vec()]];
            calls.extend((6..9).map(|i| vec![vec![a[i]], vec![b[i]]]));
            for (i, call) in calls.iter().enumerate() {
                let got = ex.run_tokens(call).unwrap();
                let want = it.run_tokens(call).unwrap();
                let e = rel_err(&got.outputs[0].data, &want.outputs[0].data);
                assert!(e <= 1e-5, "{name} {policy} call {i}: relative error {e}");
                assert_eq!(got.outputs[0].shape, want.outputs[0].shape);
                assert_eq!(
                    got.exit_steps,
                    want.trace.unwrap().exit_step,
                    "{name} {policy} call {i}"
                );
            }
            assert_eq!(ex.past_len(), 9);
            assert!(ex.run_tokens(&[vec![1]]).is_err(), "a different batch size is refused");
        }
    }
}

/// bf16 programs: the kernels round where the interpreter rounds, so the
/// executor reproduces the bf16 reference, not just the f32 one.
#[test]
fn bf16_rounding_points_match_the_interpreter() {
    for name in ["mha-r4", "gqa-hd"] {
        let ckpt = open(name);
        let p = prompt(ckpt.config.vocab_size, 12);
        for policy in ["last", "threshold:1.0:bf16", "weighted"] {
            let imported = graph(&ckpt, DType::BF16, policy);
            let want = interp(&imported, &ckpt, &p, 8, true, false);
            for (stage, g) in [("imported", imported.clone()), ("optimised", optimised(&imported))] {
                let prog = lower(&g).unwrap();
                assert!(prog.kernels().all(|k| k.spec.act == DType::BF16));
                let want = if stage == "imported" {
                    &want
                } else {
                    // The pipeline's folds round differently in bf16; compare with
                    // the interpreter on the same graph.
                    &interp(&g, &ckpt, &p, 8, true, false)
                };
                let (got, _) = exec(&prog, &ckpt, &p, 8, ExecOptions::default());
                let e = rel_err(&got.logits, &want.logits);
                assert!(e <= 1e-5, "{name} {policy} {stage}: relative error {e}");
                assert_eq!(got.exit_steps, want.exit_steps, "{name} {policy} {stage}");
            }
        }
    }
}

#[test]
fn an_unrolled_graph_is_refused_with_the_pass_to_run() {
    let ckpt = open("mha-r4");
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ouroc_ir::ExitPolicy::Last,
        loops: None,
        unrolled: true,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
    let err = lower(&g).unwrap_err();
    assert!(
        matches!(err, LowerError::Unsupported { op: "exit_select", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("reroll"), "{err}");
    // After the reroll pass it lowers.
    let rerolled = ouroc_compile::optimise(&g, false, Some("reroll")).unwrap().0;
    assert!(lower(&rerolled).is_ok());
}

#[test]
fn concat_of_activations_is_refused_naming_the_op() {
    let text = r#"graph @t(%0: i32[batch, seq], %1: i32[batch, seq]) {
  %2 = weight "e" : f32[10, 4]
  %3 = embedding(%2, %0) : f32[batch, seq, 4]
  %4 = concat(%3, %3) {axis = 2} : f32[batch, seq, 8]
  return %4
}
"#;
    let g = ouroc_ir::parse(text).expect("parse");
    let err = lower(&g).unwrap_err();
    assert!(matches!(err, LowerError::Unsupported { op: "concat", .. }), "{err}");
    assert!(err.to_string().contains("%4"), "{err}");
}

#[test]
fn a_graph_without_a_loop_lowers_to_before_kernels_only() {
    let text = r#"graph @t(%0: i32[batch, seq], %1: i32[batch, seq]) {
  %2 = weight "e" : f32[10, 4]
  %3 = weight "w" : f32[6, 4]
  %4 = embedding(%2, %0) : f32[batch, seq, 4]
  %5 = silu(%4) : f32[batch, seq, 4]
  %6 = linear(%5, %3) : f32[batch, seq, 6]
  %7 = slice(%6) {start = 2, len = 4} : f32[batch, seq, 4]
  %8 = mul(%7, %4) : f32[batch, seq, 4]
  return %8
}
"#;
    let g = ouroc_ir::parse(text).expect("parse");
    let prog = lower(&g).unwrap();
    assert!(prog.loop_.is_none() && prog.after.is_empty());
    assert_eq!(prog.before.len(), 4);
    assert_eq!(prog.kernel("mul").unwrap().inputs.len(), 2);
    let mut weights = std::collections::HashMap::new();
    weights.insert(
        "e".to_string(),
        (0..40).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
    );
    weights.insert(
        "w".to_string(),
        (0..24).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
    );
    let mut ex = Executor::new(&prog, &weights, f32_exec()).unwrap();
    let opts = Options {
        round_low_precision: false,
        max_positions: None,
        exit_skips: false,
    };
    let mut it = Interpreter::new(&g, &weights, opts).unwrap();
    let ids = [vec![3, 9, 0], vec![7, 7, 1]];
    let got = ex.run_tokens(&ids).unwrap();
    let want = it.run_tokens(&ids).unwrap();
    assert_eq!(got.outputs[0].data, want.outputs[0].data);
    assert!(got.exit_steps.is_empty() && got.steps_run == 0 && got.launches == 4);
    let err = ex.run_tokens(&[vec![10], vec![1]]).unwrap_err();
    assert!(err.to_string().contains("out of the vocabulary"), "{err}");
}

/// At one token 64-byte alignment makes `swiglu(gu[16])` and its result
/// `[8]` the same size, so the memory plan reuses gu's buffer; the rows do
/// not line up at more tokens, so the lowering gives the result its own
/// region (the executor refuses results that overlap operands other than
/// row for row).
#[test]
fn in_place_reuse_with_a_different_row_layout_gets_its_own_region() {
    let text = r#"graph @t(%0: i32[batch, seq], %1: i32[batch, seq]) {
  %2 = weight "e" : f32[10, 4]
  %3 = weight "w" : f32[16, 4]
  %4 = embedding(%2, %0) : f32[batch, seq, 4]
  %5 = linear(%4, %3) : f32[batch, seq, 16]
  %6 = swiglu(%5) : f32[batch, seq, 8]
  return %6
}
"#;
    let g = ouroc_ir::parse(text).expect("parse");
    let plan = ouroc_passes::memplan::plan(&g, 1, 1);
    assert!(
        plan.in_place.iter().any(|(r, x)| (r.0, x.0) == (6, 5)),
        "the plan reuses in place: {:?}",
        plan.in_place
    );
    let prog = lower(&g).unwrap();
    let (gu, out) = (prog.value(5).unwrap(), prog.value(6).unwrap());
    assert_ne!(gu.offset, out.offset);
    assert_eq!(prog.arena.bytes_per_token, plan.arena_bytes + 64);
    let mut weights = std::collections::HashMap::new();
    weights.insert(
        "e".to_string(),
        (0..40).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
    );
    weights.insert(
        "w".to_string(),
        (0..64).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
    );
    let got = Executor::new(&prog, &weights, f32_exec())
        .unwrap()
        .run_tokens(&[vec![1, 2, 3, 4, 5]])
        .unwrap();
    let opts = Options {
        round_low_precision: false,
        max_positions: None,
        exit_skips: false,
    };
    let want = Interpreter::new(&g, &weights, opts)
        .unwrap()
        .run_tokens(&[vec![1, 2, 3, 4, 5]])
        .unwrap();
    assert_eq!(got.outputs[0].data, want.outputs[0].data);
}

/// The decode weight traffic: each loop step reads every layer's matrices
/// once (merged and folded, the same bytes as the checkpoint's), the top
/// block one embedding row and the whole head.
#[test]
fn weight_bytes_read_counts_layers_per_step_and_one_embedding_row() {
    let ckpt = open("mha-r4");
    let c = &ckpt.config;
    let prog = lower(&optimised(&graph(&ckpt, DType::F32, "last"))).unwrap();
    let (outside, per_step) = prog.weight_bytes_read();
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let matrices = c.num_hidden_layers * (c.q_dim() * h + 2 * c.kv_dim() * h + h * c.q_dim() + 3 * i * h);
    // Besides the matrices a step reads only vectors of width h (norm weights, the exit gate).
    let vectors = (per_step as usize / 4 - matrices) / h;
    assert!(
        per_step as usize >= 4 * matrices && vectors <= 6 * c.num_hidden_layers + 2,
        "{per_step}"
    );
    assert_eq!(outside as usize, 4 * (h + v * h), "one embedding row and the head");
}

/// The Program's arena is `memplan::plan` of the graph it lowers, at one
/// token: every activation at the offset the plan gives it, in an arena of
/// the plan's size (memory planning is an analysis lowering runs, not a
/// pass of the pipeline). The fixtures need no relocation (the case above).
#[test]
fn the_arena_is_the_memory_plan_of_the_lowered_graph() {
    for (name, policy) in [("mha-r4", "threshold:0.5"), ("gqa-hd", "last"), ("tied", "weighted")] {
        let ckpt = open(name);
        for g in [
            graph(&ckpt, DType::F32, policy),
            optimised(&graph(&ckpt, DType::BF16, policy)),
        ] {
            let plan = ouroc_passes::memplan::plan(&g, 1, 1);
            let prog = lower(&g).unwrap();
            assert_eq!(prog.arena.bytes_per_token, plan.arena_bytes, "{name}");
            assert!(!prog.arena.values.is_empty());
            for v in &prog.arena.values {
                let id = ouroc_ir::ValueId(v.id);
                assert_eq!(Some(&v.offset), plan.offsets.get(&id), "{name}: %{}", v.id);
            }
            // Views have no buffer of their own; every other planned value has one.
            let views: std::collections::HashSet<_> = plan.views.iter().map(|(v, _)| v.0).collect();
            let planned = plan.offsets.keys().filter(|v| !views.contains(&v.0)).count();
            assert_eq!(prog.arena.values.len(), planned, "{name}");
        }
    }
}
