//! The IR of real fixtures: snapshots of the text form, and the text form
//! round-trips (print -> parse -> verify -> print) for every fixture.

mod common;

use common::*;
use ouroc_ir::{DType, ExitPolicy};
use ouroc_models::BuildOptions;

#[test]
fn mha_r4_ir_snapshot() {
    let ckpt = open("mha-r4");
    let g = build(
        &ckpt,
        DType::BF16,
        BuildOptions::reference_policy(&ckpt.config, DType::BF16),
    );
    insta::assert_snapshot!("mha_r4_bf16", ouroc_ir::print(&g));
}

#[test]
fn gqa_hd_ir_snapshot() {
    let ckpt = open("gqa-hd");
    let g = build(&ckpt, DType::F32, ExitPolicy::Weighted);
    insta::assert_snapshot!("gqa_hd_f32_weighted", ouroc_ir::print(&g));
}

#[test]
fn ir_text_round_trips_for_every_fixture() {
    for name in FIXTURES {
        let ckpt = open(name);
        for (dtype, policy) in [
            (DType::F32, "last"),
            (DType::BF16, "threshold:1.0:bf16"),
            (DType::F32, "weighted"),
        ] {
            let g = build(&ckpt, dtype, ExitPolicy::parse(policy).unwrap());
            let text = ouroc_ir::print(&g);
            let parsed = ouroc_ir::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            ouroc_ir::verify(&parsed).unwrap_or_else(|e| panic!("{name}: parsed graph does not verify: {e}"));
            assert_eq!(parsed, g.canonicalize(), "{name} {policy}");
            assert_eq!(ouroc_ir::print(&parsed), text, "{name} {policy}");
        }
    }
}

/// The loop is a region, not an unrolled trace: one loop op whose body
/// holds each layer's attention once, whatever R is.
#[test]
fn loop_is_explicit_not_unrolled() {
    let ckpt = open("mha-r4");
    let g = build(&ckpt, DType::F32, ExitPolicy::Last);
    let loops: Vec<_> = g.body.ops.iter().filter(|op| op.kind.name() == "loop").collect();
    assert_eq!(loops.len(), 1);
    let body = &g.find_loop().unwrap().body;
    let attn = body.ops.iter().filter(|op| op.kind.name() == "attention").count();
    assert_eq!(attn, ckpt.config.num_hidden_layers);
    assert_eq!(g.find_loop().unwrap().steps, 4);
    // Weights and RoPE tables live outside the loop (loop-invariant).
    assert!(
        body.ops
            .iter()
            .all(|op| !matches!(op.kind.name(), "weight" | "rope_cos" | "rope_sin"))
    );
}
