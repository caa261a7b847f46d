//! The optimisation pipeline through the CLI: the stats table, the IR after
//! a pass, and re-rolling an unrolled import back to the direct import.

use std::process::{Command, Output};

fn ouroc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(args)
        .output()
        .expect("run ouroc")
}

fn ok(args: &[&str]) -> String {
    let o = ouroc(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn compile_stats_table_for_mha_r4() {
    let out = ok(&["compile", &fixture("mha-r4"), "--stats", "--exit", "threshold:0.5"]);
    insta::assert_snapshot!("compile_stats_mha_r4", out);
}

/// The 1.4B shape needs no weights; the pipeline must cut kernel launches
/// and bytes moved per token.
#[test]
fn pipeline_reduces_launches_and_bytes_for_the_1_4b_shape() {
    let out = ok(&["compile", "--shape", "1.4b", "--precision", "bf16", "--stats"]);
    insta::assert_snapshot!("compile_stats_1_4b", out);
    let summary = out.lines().last().unwrap();
    let nums: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    // "N passes: kernels/token A -> B, weight bytes/token C -> D, activation bytes/token E -> F"
    let [_, a, b, c, d, e, f] = nums[..] else {
        panic!("unexpected summary: {summary}")
    };
    assert!(b < a && d < c && f < e, "{summary}");
}

#[test]
fn unrolled_import_rerolls_to_the_direct_import() {
    for name in ["mha-r4", "gqa-hd", "tied"] {
        let direct = ok(&["emit", "ir", &fixture(name), "--exit", "weighted"]);
        let unrolled = ok(&["emit", "ir", &fixture(name), "--exit", "weighted", "--unrolled"]);
        assert!(!unrolled.contains("loop("), "an unrolled import has no loop");
        assert!(unrolled.contains("exit_select("));
        let rerolled = ok(&[
            "emit",
            "ir",
            &fixture(name),
            "--exit",
            "weighted",
            "--unrolled",
            "--after",
            "reroll",
        ]);
        assert_eq!(rerolled, direct, "{name}");
    }
}

#[test]
fn emit_after_a_pass_shows_its_effect_and_unknown_passes_are_named() {
    let ir = ok(&["emit", "ir", &fixture("mha-r4"), "--after", "egraph"]);
    assert!(ir.contains("swiglu(") && ir.contains("step_end("), "{ir}");
    let o = ouroc(&["emit", "ir", &fixture("mha-r4"), "--after", "vectorize"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("vectorize") && err.contains("egraph"),
        "{err}"
    );
}

/// Memory planning is an analysis lowering runs, not a pass: the pipeline
/// ends at `dce`, and neither `--after memplan` nor the stats table offer
/// a pass that does nothing.
#[test]
fn memplan_is_not_a_pass() {
    let o = ouroc(&["emit", "ir", &fixture("mha-r4"), "--after", "memplan"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown pass `memplan`") && err.contains("cse, dce"),
        "{err}"
    );
    let stats = ok(&["compile", &fixture("mha-r4"), "--stats"]);
    let passes: Vec<&str> = stats
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(passes.last(), Some(&"dce"), "{stats}");
    assert!(!passes.contains(&"memplan"), "{stats}");
    // The plan is still reported, at one token and at 128.
    assert!(
        stats.contains("activation arena") && stats.contains("seq 128"),
        "{stats}"
    );
}

#[test]
fn shape_and_checkpoint_are_exclusive() {
    let o = ouroc(&["compile", &fixture("mha-r4"), "--shape", "1.4b"]);
    assert!(!o.status.success());
    let o = ouroc(&["compile", "--shape", "7b"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("7b") && err.contains("1.4b"),
        "{err}"
    );
}

#[test]
fn optimised_ir_snapshots() {
    let mha = ok(&[
        "emit",
        "ir",
        &fixture("mha-r4"),
        "--precision",
        "bf16",
        "--after",
        "dce",
    ]);
    insta::assert_snapshot!("optimised_mha_r4_bf16_default_policy", mha);
    let gqa = ok(&["emit", "ir", &fixture("gqa-hd"), "--exit", "last", "--after", "dce"]);
    insta::assert_snapshot!("optimised_gqa_hd_last", gqa);
    // Under `last` nothing reads the exit signal: the gate is gone entirely.
    assert!(
        !gqa.contains("early_exit_gate") && gqa.contains("gate = \"none\""),
        "{gqa}"
    );
    assert!(mha.contains("early_exit_gate"), "threshold policies keep the gate");
}

/// `logits` on an unrolled import reports the same per-token exit depths,
/// gate values and argmax tokens as on the rolled import.
#[test]
fn logits_on_the_unrolled_import_match_the_rolled_one() {
    let ids = "54,74,71,282,283,281,85,284,67,70,91,16";
    let rolled = ok(&["logits", &fixture("mha-r4"), "--ids", ids, "--exit", "threshold:0.5"]);
    let unrolled = ok(&[
        "logits",
        &fixture("mha-r4"),
        "--ids",
        ids,
        "--exit",
        "threshold:0.5",
        "--unrolled",
    ]);
    assert_eq!(unrolled, rolled);
}
