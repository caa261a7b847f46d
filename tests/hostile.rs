//! Input a hostile or careless user gives the CLI, each once a crash, a hang, an abort or a
//! silent wrong answer: now a clear error naming the problem (issue #17's findings).

mod common;

use common::cli::*;
use std::path::Path;

fn rewrite_header_length(file: &Path, delta: i64) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes[..8].copy_from_slice(&n.checked_add_signed(delta).unwrap().to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

/// The safetensors header of the fixtures ends in padding spaces, so a header length one short
/// still parses as JSON; every tensor was then read one byte off and `inspect`, `logits` and
/// `run` printed garbage with exit code 0.
#[test]
fn a_header_length_one_short_is_refused_by_every_command() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    rewrite_header_length(&dir.join("model.safetensors"), -1);
    let d = dir.to_str().unwrap();
    let needles = ["model.safetensors", "unaccounted for"];
    fails_with(&["inspect", d], &needles);
    fails_with(&["logits", d, "--ids", "1,2"], &needles);
    fails_with(&["run", d, "--prompt", "a", "--max-new-tokens", "2"], &needles);
}

#[test]
fn loop_counts_far_too_large_are_refused_before_anything_is_allocated() {
    let d = fixture_str("mha-r4");
    for loops in ["1000000000000", "18446744073709551615", "99999999999999999999999"] {
        for cmd in [
            &["run", d.as_str(), "--prompt", "a", "--loops", loops][..],
            &["logits", d.as_str(), "--ids", "1", "--loops", loops],
            &["emit", "ir", d.as_str(), "--loops", loops],
        ] {
            fails_with(cmd, &["--loops", "256"]);
        }
    }
    let (_tmp, dir) = copy_fixture("mha-r4");
    edit_config(&dir, |c| c["total_ut_steps"] = serde_json::json!(1_000_000_000_000u64));
    fails_with(
        &["inspect", dir.to_str().unwrap()],
        &["total_ut_steps", "1000000000000", "at most 256"],
    );
    edit_config(&dir, |c| c["total_ut_steps"] = serde_json::json!(1e12));
    fails_with(
        &["inspect", dir.to_str().unwrap()],
        &["total_ut_steps", "positive integer"],
    );
}

#[test]
fn every_config_size_is_bounded() {
    for (key, value) in [
        ("hidden_size", 1u64 << 40),
        ("intermediate_size", 1 << 40),
        ("num_hidden_layers", 1 << 20),
        ("vocab_size", 1 << 40),
        ("max_position_embeddings", 1 << 40),
        ("head_dim", 1 << 20),
    ] {
        let (_tmp, dir) = copy_fixture("mha-r4");
        edit_config(&dir, |c| c[key] = serde_json::json!(value));
        fails_with(
            &["inspect", dir.to_str().unwrap()],
            &[key, &value.to_string(), "at most"],
        );
    }
}

/// A config within every bound whose KV cache for the context is still more than any machine
/// has: `inspect` warns with the number and `run` refuses with the numbers before allocating.
#[test]
fn a_kv_cache_larger_than_the_machine_is_refused_naming_the_bytes() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    edit_config(&dir, |c| {
        c["total_ut_steps"] = serde_json::json!(256);
        c["max_position_embeddings"] = serde_json::json!(1 << 24);
    });
    let d = dir.to_str().unwrap();
    let o = ouroc(&["inspect", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("1,099,511,627,776 bytes at 16777216 positions"), "{out}");
    if ouroc_runtime::memory::available_bytes().is_some_and(|a| a < 1 << 40) {
        assert!(out.contains("more than this machine's"), "{out}");
        fails_with(
            &["run", d, "--prompt", "a", "--max-new-tokens", "100000000"],
            &["would need", "KV cache for 16777216 positions", "available"],
        );
    }
}

#[test]
fn thread_counts_far_above_the_cores_are_refused_at_once() {
    let d = fixture_str("mha-r4");
    fails_with(
        &["run", &d, "--prompt", "a", "--threads", "10000"],
        &["--threads 10000", "core"],
    );
    fails_with(
        &["logits", &d, "--ids", "1", "--backend", "cpu", "--threads", "10000"],
        &["--threads 10000", "core"],
    );
    fails_with(&["bench", &d, "--threads", "10000"], &["--threads 10000"]);
    fails_with(&["run", &d, "--prompt", "a", "--threads", "0"], &["not a thread count"]);
}

/// Writes to a full device were reported as "wrote" with exit code 0, and `logits --out`
/// renamed its temporary file over the device node.
#[test]
fn failed_writes_are_errors_and_devices_are_not_replaced() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let d = fixture_str("mha-r4");
    fails_with(
        &["logits", &d, "--ids", "1,2", "--out", "/dev/full"],
        &["cannot write /dev/full"],
    );
    assert!(
        !std::fs::metadata(full).unwrap().is_file(),
        "/dev/full was replaced by a file"
    );
    fails_with(
        &[
            "bench",
            &d,
            "--prefill-tokens",
            "4",
            "--decode-tokens",
            "2",
            "--runs",
            "1",
            "--precision",
            "f32",
            "--json",
            "/dev/full",
        ],
        &["cannot write /dev/full"],
    );
    // stdout on a full device: an error, not a panic.
    for args in [
        &["inspect", d.as_str()][..],
        &["logits", d.as_str(), "--ids", "1"],
        &["run", d.as_str(), "--prompt", "a", "--max-new-tokens", "2"],
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ouroc"))
            .args(args)
            .stdout(std::fs::File::options().write(true).open(full).unwrap())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} exited 0 with a full stdout");
        assert!(
            err.contains("cannot write to stdout") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_write_into_a_missing_directory_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("no-such-dir/out.safetensors");
    let d = fixture_str("mha-r4");
    fails_with(
        &["logits", &d, "--ids", "1", "--out", out.to_str().unwrap()],
        &["no-such-dir/out.safetensors"],
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// `<|im_start|>` with one id in `added_tokens` and another in the vocabulary was silently given
/// the vocabulary's.
#[test]
fn added_tokens_disagreeing_with_the_vocabulary_are_refused() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    let path = dir.join("tokenizer.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for t in v["added_tokens"].as_array_mut().unwrap() {
        if t["content"] == "<|im_start|>" {
            t["id"] = serde_json::json!(5);
        }
    }
    std::fs::write(&path, v.to_string()).unwrap();
    fails_with(
        &["run", dir.to_str().unwrap(), "--prompt", "a", "--chat"],
        &["tokenizer.json", "<|im_start|>", "id 5", "id 1"],
    );
}

/// `--chat` renders the checkpoint's own template (here Llama-2 style,
/// with a system turn, Python string methods and trimmed blocks), and a
/// template that raises stops with its message instead of generating.
#[test]
fn chat_uses_the_checkpoints_template_and_reports_its_errors() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    let set_template = |t: &str| {
        let path = dir.join("tokenizer_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["chat_template"] = serde_json::json!(t);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    let prompt_tokens = |args: &[&str]| -> usize {
        let o = ouroc(args);
        assert!(o.status.success(), "{}", stderr(&o));
        let err = stderr(&o);
        err.split("prompt ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let d = dir.to_str().unwrap();
    let run = [
        "run",
        d,
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ];
    let chatml = prompt_tokens(&run);
    set_template(
        "{% for m in messages %}\n{% if m['role'] == 'system' %}<<SYS>>{{ m['content'].strip() }}<</SYS>>\n\
         {% else %}[INST] {{ m['content'].upper() }} [/INST]{% endif %}\n{% endfor %}",
    );
    let plain = prompt_tokens(&[
        "run",
        d,
        "--prompt",
        "[INST] HI [/INST]",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert_eq!(prompt_tokens(&run), plain, "the template, not ChatML ({chatml} tokens)");
    let mut with_system = run.to_vec();
    with_system.extend(["--system", "  be brief "]);
    let plain = prompt_tokens(&[
        "run",
        d,
        "--prompt",
        // The newline after <</SYS>> is text, not a block tag's: it stays (as in Jinja).
        "<<SYS>>be brief<</SYS>>\n[INST] HI [/INST]",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert_eq!(prompt_tokens(&with_system), plain);
    set_template("{{ raise_exception('no system role here') }}");
    fails_with(&run, &["chat_template", "raised", "no system role here"]);
    set_template("{% for m in messages %}");
    fails_with(&run, &["chat_template"]);
}

fn fixture_str(name: &str) -> String {
    common::fixture(name).to_str().unwrap().to_string()
}
