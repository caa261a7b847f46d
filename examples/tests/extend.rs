//! The extension example, checked: a pass and an e-graph rule added from
//! outside the passes crate change the pipeline as they claim, the
//! compiled Programs compute the reference on the CPU engine, the
//! extension API refuses what it cannot run, and the example binary runs.

use ouroc_examples::{experiment, pipeline, silu_rule, split_silu};
use ouroc_ir::OpKind;
use ouroc_models::Checkpoint;
use ouroc_passes::egraph::EGraphRewrite;
use ouroc_passes::egraph::rules::Rule;
use ouroc_passes::{Pass, PassError};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

#[test]
fn the_pass_and_the_rule_do_what_they_claim_and_compute_the_reference() {
    for name in ["mha-r4", "gqa-hd"] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let imported = experiment::import(&ckpt).unwrap();
        let prompt = experiment::prompt(&ckpt, 6);
        let want = experiment::reference(&ckpt, &imported, &prompt, 3).unwrap();
        let run = |split, rule| experiment::compile_and_run(&ckpt, &imported, split, rule, &prompt, 3).unwrap();
        let (default, split, both) = (run(false, false), run(true, false), run(true, true));
        let layers = ckpt.config.num_hidden_layers;
        // The pass hides every silu from the built-in swiglu rule...
        assert_eq!(default.swiglu_ops, layers, "{name}");
        assert_eq!(split.swiglu_ops, 0, "{name}");
        assert!(split.kernels_per_token > default.kernels_per_token, "{name}");
        // ...and the rule finds them again: the default pipeline's kernels.
        assert_eq!(both.swiglu_ops, layers, "{name}");
        assert_eq!(both.kernels_per_token, default.kernels_per_token, "{name}");
        let fired: usize = both.rule_firings.iter().map(|r| r.1).sum();
        assert!(fired >= layers, "{name}: {:?}", both.rule_firings);
        assert_eq!(both.passes[1], split_silu::NAME, "{name}");
        for (what, o) in [("default", &default), ("split", &split), ("both", &both)] {
            let e = experiment::max_rel_err(&o.calls, &want);
            assert!(e <= 1e-4, "{name} {what}: relative error {e}");
            let depths = |c: &[experiment::Call]| c.iter().map(|x| x.1).collect::<Vec<_>>();
            assert_eq!(depths(&o.calls), depths(&want), "{name} {what}: exit depths");
        }
    }
}

#[test]
fn the_pass_alone_replaces_every_silu() {
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let g = experiment::import(&ckpt).unwrap();
    let silu = |g: &ouroc_ir::Graph| split_silu::count(g, |k| matches!(k, OpKind::Silu));
    let sigmoid = |g: &ouroc_ir::Graph| split_silu::count(g, |k| matches!(k, OpKind::Sigmoid));
    let out = split_silu::SplitSilu.run(&g).unwrap();
    ouroc_ir::verify(&out).unwrap();
    assert!(silu(&g) > 0);
    assert_eq!(silu(&out), 0);
    assert_eq!(sigmoid(&out), sigmoid(&g) + silu(&g));
}

#[test]
fn the_extension_api_refuses_what_it_cannot_run() {
    let mut pm = pipeline(false, true, false).unwrap();
    // A second pass under a name the pipeline has.
    let e = pm.insert_after("dce", Box::new(split_silu::SplitSilu)).unwrap_err();
    assert_eq!(e, PassError::Duplicate("split-silu"));
    // An anchor the pipeline lacks, named with the pipeline's passes.
    let e = pm.insert_before("fuse", Box::new(split_silu::SplitSilu)).unwrap_err();
    assert!(
        e.to_string().contains("unknown pass `fuse`") && e.to_string().contains("egraph"),
        "{e}"
    );
    let e = pm.replace("fuse", Box::new(split_silu::SplitSilu)).unwrap_err();
    assert!(e.to_string().contains("unknown pass `fuse`"), "{e}");
    // Malformed patterns and an unbound variable, each naming the rule.
    let e = Rule::pattern("bad", "", "(mul ?x", "(silu ?x)").unwrap_err();
    assert!(e.contains("rule `bad`") && e.contains("(mul ?x"), "{e}");
    let e = Rule::pattern("bad", "", "(frobnicate ?x)", "(silu ?x)").unwrap_err();
    assert!(e.contains("rule `bad`"), "{e}");
    let e = Rule::pattern("unbound", "", "(silu ?x)", "(mul ?x ?y)").unwrap_err();
    assert!(e.contains("rule `unbound`"), "{e}");
    // An extra rule under a built-in rule's name.
    let ckpt = Checkpoint::open(&fixture("mha-r4")).unwrap();
    let g = experiment::import(&ckpt).unwrap();
    let clash = Rule::pattern("swiglu", "", "(mul ?x (sigmoid ?x))", "(silu ?x)").unwrap();
    let e = EGraphRewrite::default().with_rule(clash).run(&g).unwrap_err();
    assert!(e.to_string().contains("two rewrite rules are named `swiglu`"), "{e}");
    // A rule whose right side does not type where it matches (the one-operand
    // swiglu halves the last dimension) changes nothing there.
    let ill = Rule::pattern("ill-typed", "", "(mul (silu ?g) ?u)", "(swiglu ?g)").unwrap();
    let pass = EGraphRewrite::default().with_rule(ill);
    let (with_ill, report) = pass.optimize(&g).unwrap();
    let (plain, _) = EGraphRewrite::default().optimize(&g).unwrap();
    assert_eq!(report.applied("ill-typed"), 0);
    assert_eq!(ouroc_ir::print(&with_ill), ouroc_ir::print(&plain));
    assert!(silu_rule::silu_from_sigmoid().name == silu_rule::NAME);
}

#[test]
fn the_example_binary_runs_on_a_fixture() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_extend-pipeline"))
        .arg(fixture("mha-r4"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('+') || l.starts_with("default"))
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows.iter().all(|r| r.ends_with("yes")), "{text}");
    let kernels = |r: &str| r.split_whitespace().rev().nth(3).unwrap().parse::<usize>().unwrap();
    assert_eq!(kernels(rows[0]), kernels(rows[2]), "{text}");
    assert!(kernels(rows[1]) > kernels(rows[0]), "{text}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_extend-pipeline"))
        .arg(fixture("no-such-checkpoint"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-checkpoint"));
}
