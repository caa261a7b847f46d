//! `ouroc eval` end to end on the mha-r4 fixture (64 positions, vocab 288): its numbers against
//! CE and KL divergence computed here from `ouroc logits --out`, a model against itself, and
//! bad input refused by name.

mod common;

use common::cli::*;
use common::*;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

const CTX: usize = 16;
/// Scored positions of a window: CTX/2 ..= CTX-2.
const FIRST: usize = CTX / 2;

/// 2 windows of CTX and a rest of 5 tokens (dropped), a fixed pseudo-random sequence.
fn ids() -> Vec<u32> {
    (0..2 * CTX + 5).map(|i| ((i * 37 + 11) % 288) as u32).collect()
}

fn write_ids(dir: &Path, ids: &[u32]) -> PathBuf {
    let p = dir.join("ids.txt");
    // Whitespace and commas both separate ids.
    let text: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
    std::fs::write(&p, format!("{}\n{}\n", text[..7].join(" "), text[7..].join(", "))).unwrap();
    p
}

/// Runs `ouroc eval` on mha-r4 with `extra` flags and returns its JSON.
fn eval(ids_file: &Path, json: &Path, extra: &[&str]) -> serde_json::Value {
    let dir = fixture("mha-r4");
    let ctx = CTX.to_string();
    let mut args = vec![
        "eval",
        dir.to_str().unwrap(),
        "--ids-file",
        ids_file.to_str().unwrap(),
        "--ctx",
        &ctx,
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = ouroc(&args);
    assert!(o.status.success(), "{args:?}:\n{}", stderr(&o));
    assert!(stdout(&o).contains("perplexity"), "prints a table:\n{}", stdout(&o));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// Every position's logits [T][V] and exit steps of `ouroc logits --mode decode` on `ids`.
fn logits(ids: &[u32], out: &Path, flags: &[&str]) -> (Vec<Vec<f64>>, Vec<i32>) {
    let dir = fixture("mha-r4");
    let list: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
    let list = list.join(",");
    let mut args = vec![
        "logits",
        dir.to_str().unwrap(),
        "--ids",
        &list,
        "--mode",
        "decode",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(flags);
    let o = ouroc(&args);
    assert!(o.status.success(), "{args:?}:\n{}", stderr(&o));
    let bytes = std::fs::read(out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let l = st.tensor("logits").unwrap();
    let v = l.shape()[1];
    let data: Vec<f64> = l
        .data()
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect();
    let steps = st
        .tensor("exit_step")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (data.chunks(v).map(<[f64]>::to_vec).collect(), steps)
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// Per scored position of every window of `ids`: (log-probabilities, next token, exit step),
/// from `ouroc logits` run on each window alone.
fn scored(ids: &[u32], tmp: &Path, flags: &[&str]) -> Vec<(Vec<f64>, usize, i32)> {
    let mut out = vec![];
    for (w, win) in ids.chunks_exact(CTX).enumerate() {
        let (rows, steps) = logits(win, &tmp.join(format!("w{w}.safetensors")), flags);
        for j in FIRST..CTX - 1 {
            out.push((log_softmax(&rows[j]), win[j + 1] as usize, steps[j]));
        }
    }
    out
}

fn num(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "{what}: eval says {got}, computed {want} (relative tolerance {rel})"
    );
}

#[test]
fn perplexity_and_exit_depth_match_logits_of_each_window() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ids();
    let f = write_ids(tmp.path(), &ids);
    // Every step runs (--no-early-exit), as in `ouroc logits`, so the exit steps and the logits
    // are the same computation; on the interpreter too, an independent implementation.
    for (flags, backend) in [
        (vec!["--exit", "threshold:0.5", "--no-early-exit"], "cpu"),
        (vec!["--exit", "last", "--precision", "bf16"], "interp"),
    ] {
        let mut eval_flags = flags.clone();
        eval_flags.extend(["--no-base", "--backend", backend]);
        let json = eval(&f, &tmp.path().join("e.json"), &eval_flags);
        assert_eq!(json["windows"], 2);
        assert_eq!(json["tokens_read"], ids.len());
        assert_eq!(json["tokens_scored"], 2 * (CTX - 1 - FIRST));
        assert!(json["base"].is_null() && json["kld"].is_null());
        let mut logit_flags = flags.clone();
        logit_flags.retain(|f| *f != "--no-early-exit");
        logit_flags.extend(["--backend", backend]);
        let s = scored(&ids, tmp.path(), &logit_flags);
        let ce: Vec<f64> = s.iter().map(|(lp, next, _)| -lp[*next]).collect();
        let mean = ce.iter().sum::<f64>() / ce.len() as f64;
        let sem = (ce.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (ce.len() - 1) as f64 / ce.len() as f64).sqrt();
        close(num(&json, &["model", "mean_ce"]), mean, 1e-5, "mean CE");
        close(num(&json, &["model", "perplexity"]), mean.exp(), 1e-5, "perplexity");
        close(num(&json, &["model", "mean_ce_sem"]), sem, 1e-4, "SEM of the mean CE");
        let depth = s.iter().map(|(_, _, e)| f64::from(e + 1)).sum::<f64>() / s.len() as f64;
        assert_eq!(num(&json, &["model", "mean_exit_depth"]), depth, "{flags:?}");
        assert!(num(&json, &["model", "tokens_per_s"]) > 0.0);
    }
}

#[test]
fn a_model_against_itself_has_zero_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write_ids(tmp.path(), &ids());
    // With real early exit: the exit decisions and the KV slots they fill repeat exactly.
    let json = eval(
        &f,
        &tmp.path().join("e.json"),
        &["--exit", "threshold:0.5", "--base-exit", "threshold:0.5"],
    );
    for k in ["mean", "p99", "max"] {
        assert_eq!(num(&json, &["kld", k]), 0.0, "KLD {k}");
    }
    assert_eq!(num(&json, &["top1_agreement"]), 1.0);
    assert_eq!(num(&json, &["ln_ppl_ratio"]), 0.0);
    assert_eq!(json["model"]["perplexity"], json["base"]["perplexity"]);
    // threshold:0.5 exits before the last step for some tokens of this fixture.
    assert!(num(&json, &["model", "mean_exit_depth"]) < 4.0, "{json:#}");
}

#[test]
fn bf16_and_q8_against_the_f32_base_match_kl_divergence_computed_from_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ids();
    let f = write_ids(tmp.path(), &ids);
    // The default base: f32, --exit last, dense weights, whatever the model's.
    let base = scored(&ids, tmp.path(), &["--backend", "cpu", "--exit", "last"]);
    for (flags, name, weights) in [
        (["--precision", "bf16"], "bf16, last", "dense"),
        (["--weights", "q8"], "f32 q8, last", "q8"),
    ] {
        let mut eval_flags = flags.to_vec();
        eval_flags.extend(["--exit", "last"]);
        let json = eval(&f, &tmp.path().join("e.json"), &eval_flags);
        assert_eq!(json["base"]["model"], "f32, last");
        assert_eq!(json["base"]["weights"], "dense");
        assert_eq!(json["model"]["model"], name);
        assert_eq!(json["model"]["weights"], weights);
        eval_flags.extend(["--backend", "cpu"]);
        let model = scored(&ids, tmp.path(), &eval_flags);
        let mut kld: Vec<f64> = model
            .iter()
            .zip(&base)
            .map(|((q, ..), (p, ..))| p.iter().zip(q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum())
            .collect();
        let am = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
        let agree = model
            .iter()
            .zip(&base)
            .filter(|((q, ..), (p, ..))| am(q) == am(p))
            .count();
        let mean = kld.iter().sum::<f64>() / kld.len() as f64;
        kld.sort_by(f64::total_cmp);
        assert!(
            mean > 0.0 && mean < 0.01,
            "{name}: the KLD should be small and positive: {mean}"
        );
        close(num(&json, &["kld", "mean"]), mean, 1e-3, "mean KLD");
        close(num(&json, &["kld", "max"]), *kld.last().unwrap(), 1e-3, "max KLD");
        // 14 values: the 99th percentile lies 87% of the way from the 13th to the 14th.
        let p99 = kld[12] + 0.87 * (kld[13] - kld[12]);
        close(num(&json, &["kld", "p99"]), p99, 1e-3, "99th percentile KLD");
        close(
            num(&json, &["top1_agreement"]),
            agree as f64 / kld.len() as f64,
            1e-12,
            "top-1",
        );
        let ce = |s: &[(Vec<f64>, usize, i32)]| s.iter().map(|(lp, n, _)| -lp[*n]).sum::<f64>() / s.len() as f64;
        close(num(&json, &["base", "mean_ce"]), ce(&base), 1e-5, "base CE");
        close(num(&json, &["model", "mean_ce"]), ce(&model), 1e-5, "model CE");
        close(
            num(&json, &["ln_ppl_ratio"]),
            ce(&model) - ce(&base),
            1e-2,
            "ln(PPL ratio)",
        );
    }
}

#[test]
fn demo_model_reads_its_shipped_held_out_files() {
    let tmp = tempfile::tempdir().unwrap();
    let json_path = tmp.path().join("e.json");
    let o = ouroc(&[
        "eval",
        "--ctx",
        "8",
        "--max-tokens",
        "20",
        "--no-base",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("models/demo/heldout"), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    // 20 tokens are within the first file; 2 windows of 8, 3 positions scored in each.
    let files = json["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert!(
        files[0]
            .as_str()
            .unwrap()
            .ends_with("models/demo/heldout/_markupbase.py")
    );
    assert_eq!(json["tokens_read"], 20);
    assert_eq!(json["tokens_scored"], 6);
    assert_eq!(json["model"]["loop_steps"], 4);
    let ppl = num(&json, &["model", "perplexity"]);
    assert!(ppl > 1.0 && ppl < 4096.0, "{ppl}");
}

#[test]
fn bad_input_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("mha-r4");
    let d = dir.to_str().unwrap();
    let f = write_ids(tmp.path(), &ids());
    let ids_file = f.to_str().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "1 2 3 4 5").unwrap();
    let one = tmp.path().join("one.txt");
    std::fs::write(&one, "7").unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "1 2 x3").unwrap();
    let big = tmp.path().join("big.txt");
    std::fs::write(&big, "1 2 288 3").unwrap();
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").unwrap();
    let missing = tmp.path().join("missing.txt");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec!["--file".into(), s(&missing)],
            vec!["cannot read".into(), s(&missing)],
        ),
        (
            vec!["--file".into(), s(tmp.path())],
            vec!["cannot read".into(), s(tmp.path())],
        ),
        (vec!["--file".into(), s(&empty)], vec![s(&empty), "is empty".into()]),
        (vec!["--file".into(), s(&latin1)], vec![s(&latin1), "UTF-8".into()]),
        (
            vec!["--ids-file".into(), s(&empty)],
            vec![s(&empty), "no token ids".into()],
        ),
        (
            vec!["--ids-file".into(), s(&bad)],
            vec![s(&bad), "`x3` is not a token id".into()],
        ),
        (
            vec!["--ids-file".into(), s(&big)],
            vec!["id 288".into(), "vocab_size = 288".into()],
        ),
        (
            vec!["--ids-file".into(), s(&short)],
            vec![
                "gives 5 tokens, fewer than one window of --ctx 64".into(),
                "--ctx 5 or less".into(),
            ],
        ),
        (vec!["--ids-file".into(), s(&one)], vec!["1 token(s), too few".into()]),
        (
            vec!["--ids-file".into(), ids_file.into(), "--ctx".into(), "0".into()],
            vec!["--ctx 0".into()],
        ),
        (
            vec!["--ids-file".into(), ids_file.into(), "--ctx".into(), "1".into()],
            vec!["--ctx 1".into()],
        ),
        (
            vec!["--ids-file".into(), ids_file.into(), "--ctx".into(), "65".into()],
            vec!["--ctx 65 exceeds the model's context of 64".into()],
        ),
        (
            vec!["--ids-file".into(), ids_file.into(), "--max-tokens".into(), "0".into()],
            vec!["--max-tokens 0".into()],
        ),
        (
            vec!["--ids-file".into(), ids_file.into(), "--max-tokens".into(), "10".into()],
            vec!["--max-tokens 10 is less than one window of --ctx 64".into()],
        ),
        (
            vec![
                "--ids-file".into(),
                ids_file.into(),
                "--base-exit".into(),
                "sometimes".into(),
            ],
            vec!["--base-exit".into()],
        ),
        (vec![], vec!["give --file PATH".into()]),
        (
            vec![
                "--ids-file".into(),
                ids_file.into(),
                "--weights".into(),
                "q8".into(),
                "--backend".into(),
                "interp".into(),
            ],
            vec!["--weights q8 needs a compiled backend".into()],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["eval", d];
        args.extend(extra.iter().map(String::as_str));
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        fails_with(&args, &needles);
    }
}
