//! Lowering every fixture, before and after the pipeline, under several
//! exit policies, and executing the Program: its logits must match the IR
//! interpreter's (f32, within 1e-5 relative error) for a prefill of 8
//! tokens then 4 decode tokens; its kernel count must match the pass
//! statistics; it must survive a JSON round trip.

mod common;

use common::*;
use ouroc_ir::DType;
use ouroc_kernels::{Program, lower};
use ouroc_passes::Stats;

fn check_fixture(name: &str) {
    let ckpt = open(name);
    let p = prompt(ckpt.config.vocab_size, 12);
    for policy in POLICIES {
        let imported = graph(&ckpt, DType::F32, policy);
        let want = interp(&imported, &ckpt, &p, 8, false, false);
        for (stage, g) in [("imported", imported.clone()), ("optimised", optimised(&imported))] {
            let what = format!("{name} {policy} {stage}");
            let prog = lower(&g).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                prog.kernels_per_token(),
                Stats::of(&g).kernels_per_token,
                "{what}: kernels per token"
            );
            let back = Program::from_json(&prog.to_json()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(back, prog, "{what}: JSON round trip");

            let (got, launches) = exec(&prog, &ckpt, &p, 8, f32_exec());
            let e = rel_err(&got.logits, &want.logits);
            assert!(e <= 1e-5, "{what}: relative error {e}");
            assert_eq!(got.exit_steps, want.exit_steps, "{what}: exit steps");
            assert!(
                launches.iter().all(|&n| n == prog.kernels_per_token()),
                "{what}: {launches:?}"
            );
        }
    }
}

#[test]
fn mha_r4() {
    check_fixture("mha-r4");
}

#[test]
fn gqa_hd() {
    check_fixture("gqa-hd");
}

#[test]
fn tied() {
    check_fixture("tied");
}

#[test]
fn r1() {
    check_fixture("r1");
}

#[test]
fn sharded() {
    check_fixture("sharded");
}

#[test]
fn f16() {
    check_fixture("f16");
}
