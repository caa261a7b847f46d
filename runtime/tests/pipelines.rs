//! Pipelines as parameters (`--passes` / `--skip`): any subset of the
//! default pipeline's passes, in its order, gives a correct program. A
//! property test over seeded random subsets, on the fixtures (rolled and
//! unrolled imports, several exit policies): the optimised graph in the
//! interpreter and the compiled CPU engine against the interpreter of the
//! imported graph, prefill then decode.

mod common;

use common::{Lcg, fixture};
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_runtime::cpu::{CpuForward, CpuOptions};
use ouroc_runtime::generate::Forward;
use ouroc_runtime::interp::InterpForward;

fn graph(ckpt: &Checkpoint, policy: &str, unrolled: bool) -> Graph {
    let opts = BuildOptions {
        dtype: DType::F32,
        policy: ExitPolicy::parse(policy).unwrap(),
        loops: None,
        unrolled,
    };
    ouroc_models::build_graph(ckpt, &opts).unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit lengths differ");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Prefill 6 tokens, decode 3: each call's logits, exit depth and steps.
fn calls(m: &mut dyn Forward, vocab: usize) -> Vec<(Vec<f32>, usize)> {
    let ids: Vec<u32> = (0..9u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab as u64) as u32)
        .collect();
    std::iter::once(&ids[..6])
        .chain(ids[6..].chunks(1))
        .map(|c| {
            let s = m.forward(c).unwrap();
            (s.logits, s.depth)
        })
        .collect()
}

#[test]
fn random_pass_subsets_compute_the_reference() {
    let all: Vec<String> = ouroc_passes::pass_list().iter().map(|p| p.0.to_string()).collect();
    let mut rng = Lcg(0x5eed);
    let mut tried = 0;
    for name in ["mha-r4", "gqa-hd", "tied"] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let vocab = ckpt.config.vocab_size;
        for (policy, unrolled) in [
            ("last", false),
            ("threshold:0.5", false),
            ("last", true),
            ("weighted", false),
            ("step:0", false),
            ("step:2", false),
        ] {
            let imported = graph(&ckpt, policy, unrolled);
            let mut reference = InterpForward::new(&imported, &ckpt, 64, true).unwrap();
            let want = calls(&mut reference, vocab);
            // The empty and the full pipeline, then random subsets.
            let mut subsets: Vec<Vec<String>> = vec![vec![], all.clone()];
            for _ in 0..6 {
                subsets.push(all.iter().filter(|_| rng.next() > 0.0).cloned().collect());
            }
            for only in subsets {
                let what = format!("{name} {policy} unrolled={unrolled} --passes {}", only.join(","));
                let passes = ouroc_passes::pipeline_with(false, Some(&only), &[], &[]).unwrap();
                let c = ouroc_compile::compile_with(imported.clone(), &passes);
                if unrolled && !only.iter().any(|p| p == "reroll") {
                    // Refused, naming the missing pass.
                    let e = c.err().unwrap_or_else(|| panic!("{what}: compiled")).to_string();
                    assert!(e.contains("run the `reroll` pass first"), "{what}: {e}");
                    continue;
                }
                let c = c.unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut interp = InterpForward::new(&c.optimised, &ckpt, 64, true).unwrap();
                let opts = CpuOptions {
                    early_exit: true,
                    ..CpuOptions::new(64)
                };
                let mut cpu =
                    CpuForward::with_options(c.program, &ckpt, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                // `peel` moves the last step out of the loop: exit depths
                // then count the loop's R - 1 steps.
                let same_loop = cpu.loop_steps() == reference.loop_steps();
                assert_eq!(interp.loop_steps(), cpu.loop_steps(), "{what}");
                for (engine, got) in [("interp", calls(&mut interp, vocab)), ("cpu", calls(&mut cpu, vocab))] {
                    for (i, ((g, gd), (w, wd))) in got.iter().zip(&want).enumerate() {
                        let e = rel_err(g, w);
                        assert!(e <= 1e-4, "{what}: {engine} call {i}: relative error {e}");
                        if same_loop {
                            assert_eq!(gd, wd, "{what}: {engine} call {i}: exit depth");
                        }
                    }
                }
                tried += 1;
            }
        }
    }
    assert!(tried >= 60);
}

/// Random subsets of the e-graph's rules turned off, with the whole
/// pipeline: the same property.
#[test]
fn random_rule_subsets_compute_the_reference() {
    let rules: Vec<&str> = ouroc_passes::rule_list().iter().map(|r| r.0).collect();
    let mut rng = Lcg(0x5eed2);
    for name in ["mha-r4", "gqa-hd"] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let vocab = ckpt.config.vocab_size;
        for policy in ["last", "threshold:0.5"] {
            let imported = graph(&ckpt, policy, false);
            let mut reference = InterpForward::new(&imported, &ckpt, 64, true).unwrap();
            let want = calls(&mut reference, vocab);
            let mut choices: Vec<Vec<String>> = vec![rules.iter().map(|r| format!("-{r}")).collect()];
            for _ in 0..6 {
                choices.push(
                    rules
                        .iter()
                        .filter(|_| rng.next() > 0.0)
                        .map(|r| format!("-{r}"))
                        .collect(),
                );
            }
            for off in choices {
                let what = format!("{name} {policy} --rules {}", off.join(","));
                let passes = ouroc_passes::pipeline_with(false, None, &[], &off).unwrap();
                let c =
                    ouroc_compile::compile_with(imported.clone(), &passes).unwrap_or_else(|e| panic!("{what}: {e}"));
                let opts = CpuOptions {
                    early_exit: true,
                    ..CpuOptions::new(64)
                };
                let mut cpu =
                    CpuForward::with_options(c.program, &ckpt, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                for (i, ((g, gd), (w, wd))) in calls(&mut cpu, vocab).iter().zip(&want).enumerate() {
                    let e = rel_err(g, w);
                    assert!(e <= 1e-4, "{what}: call {i}: relative error {e}");
                    assert_eq!(gd, wd, "{what}: call {i}: exit depth");
                }
            }
        }
    }
}
