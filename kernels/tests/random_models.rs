//! Random small models (odd widths, GQA, tied heads, 1 to 4 steps) under
//! every exit policy, imported and optimised: the executed Program matches
//! the interpreter, with and without early exit in decode.

mod common;

use common::*;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::{Graph, Interpreter, Options, WeightSource};
use ouroc_kernels::lower;
use ouroc_passes::Stats;

fn run_interp(g: &Graph, w: &dyn WeightSource, p: &[u32], split: usize, skips: bool) -> Vec<f32> {
    let opts = Options {
        round_low_precision: false,
        max_positions: None,
        exit_skips: skips,
    };
    let mut it = Interpreter::new(g, w, opts).unwrap();
    let mut out = it.run_tokens(&[p[..split].to_vec()]).unwrap().outputs[0].data.clone();
    for &t in &p[split..] {
        out.extend(&it.run_tokens(&[vec![t]]).unwrap().outputs[0].data);
    }
    out
}

fn run_exec(g: &Graph, w: &dyn WeightSource, p: &[u32], split: usize, skips: bool) -> Vec<f32> {
    let prog = lower(g).unwrap_or_else(|e| panic!("{e}\n{g}"));
    assert_eq!(prog.kernels_per_token(), Stats::of(g).kernels_per_token);
    let opts = ExecOptions {
        round_low_precision: false,
        exit_skips: skips,
        ..ExecOptions::default()
    };
    let mut ex = Executor::new(&prog, w, opts).unwrap();
    let mut out = ex.run_tokens(&[p[..split].to_vec()]).unwrap().outputs[0].data.clone();
    for &t in &p[split..] {
        out.extend(&ex.run_tokens(&[vec![t]]).unwrap().outputs[0].data);
    }
    out
}

#[test]
fn random_models_match_the_interpreter() {
    let policies = ["last", "step:0", "threshold:0.5", "threshold:1.0:bf16", "weighted"];
    for seed in 0..30u64 {
        let policy = policies[seed as usize % policies.len()];
        let (g, w, vocab) = random_model(seed, policy);
        let p = prompt(vocab, 9);
        for (stage, g) in [("imported", g.clone()), ("optimised", optimised(&g))] {
            for skips in [false, true] {
                let want = run_interp(&g, &w, &p, 5, skips);
                let got = run_exec(&g, &w, &p, 5, skips);
                let e = rel_err(&got, &want);
                assert!(
                    e <= 1e-5,
                    "seed {seed} {policy} {stage} skips {skips}: relative error {e}"
                );
            }
        }
    }
}
