//! The printed Program of mha-r4 after the default pipeline (reviewed),
//! and the kernel counts the pipeline buys.

mod common;

use common::*;
use ouroc_ir::DType;
use ouroc_kernels::lower;

#[test]
fn program_of_mha_r4_after_the_pipeline() {
    let ckpt = open("mha-r4");
    let g = optimised(&graph(&ckpt, DType::F32, "threshold:0.5"));
    let prog = lower(&g).unwrap();
    insta::assert_snapshot!("program_mha_r4", prog.to_string());
}

#[test]
fn the_pipeline_cuts_mha_r4_from_160_to_89_kernels_per_token() {
    let ckpt = open("mha-r4");
    let imported = graph(&ckpt, DType::F32, "threshold:0.5");
    let before = lower(&imported).unwrap();
    let after = lower(&optimised(&imported)).unwrap();
    // 3 + 39 x 4 + 1: per layer norm, q, k, v, 2 rope, attention, o, norm, add,
    // norm, gate, up, silu, mul, down, norm, add; then norm, gate, sigmoid.
    assert_eq!(
        (before.before.len(), before.loop_.as_ref().unwrap().body.len()),
        (3, 39)
    );
    assert_eq!(before.kernels_per_token(), 160);
    // 4 + 21 x 4 + 1: per layer qkv, attention (+rope), o, norm, add+norm,
    // gate_up, swiglu, down, norm, add+norm (the last one: add); step_end.
    assert_eq!((after.before.len(), after.loop_.as_ref().unwrap().body.len()), (4, 21));
    assert_eq!(after.kernels_per_token(), 89);
}

/// The Ouro-1.4B shape (no weights needed to lower): 24 layers, bf16.
#[test]
fn the_1_4b_shape_lowers_with_few_distinct_kernels() {
    let cfg = ouroc_models::shapes::named_shape("1.4b").unwrap();
    let opts = ouroc_models::BuildOptions {
        dtype: DType::BF16,
        policy: ouroc_ir::ExitPolicy::parse("threshold:1.0:bf16").unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = optimised(&ouroc_models::build_from_config(&cfg, "lm_head.weight", &opts).unwrap());
    let prog = lower(&g).unwrap();
    assert_eq!(prog.kernels_per_token(), ouroc_passes::Stats::of(&g).kernels_per_token);
    let body = &prog.loop_.as_ref().unwrap().body;
    assert_eq!(body.len(), 24 * 10 + 1, "10 kernels per layer and step_end");
    assert_eq!(prog.kv.len(), 4 * 24);
    assert!(prog.kernels().all(|k| k.spec.act == DType::BF16));
    // One code per role, whatever the layer: ~16 functions for 969 launches.
    assert!(prog.distinct_kernels() <= 16, "{}", prog.distinct_kernels());
    assert!(prog.kernel("l23.gate_up").is_some() && prog.kernel("l0.attn").is_some());
}
