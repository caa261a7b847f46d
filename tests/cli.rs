//! The `ouroc` binary end to end: the commands work on fixtures, and bad
//! input gets a clear error naming the problem (never a panic), and
//! loses nothing the user had.

mod common;

use common::cli::*;
use common::*;
use safetensors::SafeTensors;
use std::path::Path;
use std::process::Output;

fn prompt_arg(name: &str) -> String {
    Golden::load(name)
        .prompt()
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn read_out(path: &Path) -> (Vec<f32>, Vec<usize>, Vec<i32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let l = st.tensor("logits").unwrap();
    let logits = l
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let steps = st
        .tensor("exit_step")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (logits, l.shape().to_vec(), steps)
}

#[test]
fn logits_command_reproduces_golden_in_prefill_and_decode() {
    let golden = Golden::load("mha-r4");
    let ids = prompt_arg("mha-r4");
    let tmp = tempfile::tempdir().unwrap();
    for (mode, prec, pol) in [
        ("prefill", "f32", "threshold:0.5"),
        ("decode", "f32", "weighted"),
        ("decode", "bf16", "threshold:1.0:bf16"),
    ] {
        let out = tmp.path().join(format!("{mode}-{prec}.safetensors"));
        let dir = fixture("mha-r4");
        let args = [
            "logits",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--mode",
            mode,
            "--precision",
            prec,
            "--exit",
            pol,
            "--out",
            out.to_str().unwrap(),
        ];
        let o = ouroc(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("tokens per exit depth:"),
            "prints the exit-depth histogram"
        );
        let (logits, shape, steps) = read_out(&out);
        assert_eq!(shape, vec![12, 288]);
        let e = rel_err(&logits, &golden.get(&format!("{prec}/{pol}/logits")).f32);
        assert!(e < 1e-4, "{mode} {prec} {pol}: relative error {e}");
        assert_eq!(steps, golden.get(&format!("{prec}/{pol}/exit_step")).i32);
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("hidden_states").unwrap().shape(), &[4, 12, 32]);
        assert_eq!(st.tensor("exit_lambda").unwrap().shape(), &[4, 12]);
    }
}

#[test]
fn inspect_reports_shape_loop_and_kv_bytes() {
    let dir = fixture("gqa-hd");
    let o = ouroc(&["inspect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for want in [
        "heads 4 (kv 2), head_dim 16 (explicit)",
        "4 steps over the 2 layers",
        "threshold:1.0:bf16",
        "warnings          none",
    ] {
        assert!(s.contains(want), "inspect output lacks `{want}`:\n{s}");
    }
    // 4 steps * 2 layers * (k + v) * 2 kv heads * 16 dims * 2 bytes
    assert!(s.contains("1,024 bytes per token"), "{s}");
}

#[test]
fn inspect_counts_tied_head_once() {
    let dir = fixture("tied");
    let o = ouroc(&["inspect", dir.to_str().unwrap()]);
    let s = stdout(&o);
    assert!(s.contains("model.embed_tokens.weight (tied)"), "{s}");
    let ckpt = open("tied");
    let c = &ckpt.config;
    let (h, i, l) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
    );
    let per_layer = 4 * h * h + 3 * h * i + 4 * h;
    assert_eq!(
        ckpt.parameter_count(),
        c.vocab_size as u64 * h + l * per_layer + h + h + 1
    );
}

#[test]
fn emit_ir_prints_the_loop() {
    let dir = fixture("r1");
    let o = ouroc(&["emit", "ir", dir.to_str().unwrap(), "--exit", "last"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("loop(") && text.contains("steps = 1, policy = \"last\""),
        "{text}"
    );
    assert_eq!(ouroc_ir::print(&ouroc_ir::parse(&text).unwrap()), text);
}

/// `--weights`: the Program shows the format, `compile` counts the bytes it
/// saves, `run` generates with it, and what cannot run it says so.
#[test]
fn weights_flag_quantises_the_linears_and_refuses_what_it_cannot() {
    let dir = fixture("mha-r4");
    let d = dir.to_str().unwrap();
    let o = ouroc(&["emit", "program", d, "--weights", "q4", "--precision", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("weight = q4_0 (from bf16)") && text.contains("(read as q8_0)"),
        "{text}"
    );
    let o = ouroc(&["compile", d, "--weights", "q8_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("--weights q8:") && stdout(&o).contains("saved"),
        "{}",
        stdout(&o)
    );
    let o = ouroc(&[
        "run",
        d,
        "--weights",
        "q8",
        "--prompt",
        "The loop",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
    // Self-speculative decoding on quantised weights changes no greedy token.
    let greedy = |spec: &str| {
        let o = ouroc(&[
            "run",
            d,
            "--weights",
            "q4",
            "--prompt",
            "The loop",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--draft-tokens",
            spec,
            "--draft-steps",
            "2",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(greedy("3"), greedy("off"));
    // The research trace on the compiled quantised Program.
    let o = ouroc(&["logits", d, "--ids", "5,17,42", "--backend", "cpu", "--weights", "q8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    fails_with(&["run", d, "--weights", "q3"], &["--weights", "q3", "q8", "q4"]);
    fails_with(
        &["run", d, "--weights", "q4", "--backend", "interp", "--prompt", "x"],
        &["--weights q4", "--backend cpu"],
    );
    // The PTX backend has the quantised Linears too: a dp4a GEMV and an int8 mma GEMM.
    let o = ouroc(&["emit", "ptx", d, "--weights", "q8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ptx = stdout(&o);
    assert!(
        ptx.contains("ouroc_l0_qkv_gemv") && ptx.contains("dp4a."),
        "no quantised GEMV"
    );
    assert!(
        ptx.contains("ouroc_l0_qkv_gemm") && ptx.contains("mma.sync.aligned.m16n8k32"),
        "no quantised GEMM"
    );
}

#[test]
fn loops_flag_changes_the_step_count() {
    let dir = fixture("mha-r4");
    let o = ouroc(&["emit", "ir", dir.to_str().unwrap(), "--loops", "2", "--exit", "step:1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("steps = 2, policy = \"step:1\""));
    fails_with(
        &["emit", "ir", dir.to_str().unwrap(), "--loops", "2", "--exit", "step:3"],
        &["step:3", "out of range"],
    );
    fails_with(
        &["emit", "ir", dir.to_str().unwrap(), "--loops", "0"],
        &["--loops", "at least 1"],
    );
}

#[test]
fn truncated_safetensors_is_refused() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    fails_with(
        &["logits", dir.to_str().unwrap(), "--ids", "1,2"],
        &["model.safetensors"],
    );
    fails_with(&["inspect", dir.to_str().unwrap()], &["model.safetensors"]);
}

#[test]
fn header_lying_about_its_size_is_refused() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    fails_with(&["inspect", dir.to_str().unwrap()], &["model.safetensors", "header"]);
}

#[test]
fn data_offsets_past_the_end_are_refused() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Make the norm weight claim a range far beyond the file, keeping the header length.
    let mut v: serde_json::Value = serde_json::from_str(header).unwrap();
    let entry = v.get_mut("model.norm.weight").unwrap();
    entry["data_offsets"] = serde_json::json!([10_000_000, 10_000_064]);
    let mut new_header = serde_json::to_string(&v).unwrap();
    while new_header.len() < n {
        new_header.push(' ');
    }
    assert_eq!(new_header.len(), n, "rewritten header fits");
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(new_header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&f, out).unwrap();
    fails_with(&["inspect", dir.to_str().unwrap()], &["model.norm.weight"]);
}

/// Rewrite a fixture's model.safetensors through `edit` on (name, shape, bytes).
fn rewrite_tensors(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &f).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    rewrite_tensors(&dir, |ts| {
        ts.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    fails_with(
        &["logits", dir.to_str().unwrap(), "--ids", "1,2"],
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    rewrite_tensors(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|(n, _, _)| n == "model.layers.0.mlp.down_proj.weight")
            .unwrap();
        t.1 = vec![88, 32]; // transposed: same bytes, wrong shape
    });
    fails_with(
        &["inspect", dir.to_str().unwrap()],
        &["model.layers.0.mlp.down_proj.weight", "[32, 88]", "[88, 32]"],
    );
}

#[test]
fn unexpected_tensor_is_a_warning_not_an_error() {
    let (_tmp, dir) = copy_fixture("mha-r4");
    rewrite_tensors(&dir, |ts| {
        ts.push(("model.layers.0.self_attn.q_norm.weight".into(), vec![8], vec![0; 16]))
    });
    let o = ouroc(&["inspect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("q_norm"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("warning") && stderr(&o).contains("q_norm"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unsupported_config_keys_are_refused_by_name() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "linear",
        ),
        ("use_sliding_window", serde_json::json!(true), "true"),
        ("hidden_act", serde_json::json!("gelu"), "gelu"),
        ("model_type", serde_json::json!("llama"), "llama"),
    ];
    for (key, value, shown) in cases {
        let (_tmp, dir) = copy_fixture("mha-r4");
        edit_config(&dir, |v| v[key] = value.clone());
        fails_with(&["logits", dir.to_str().unwrap(), "--ids", "1,2"], &[key, shown]);
    }
}

#[test]
fn bad_ids_are_refused() {
    let dir = fixture("mha-r4");
    let d = dir.to_str().unwrap();
    fails_with(&["logits", d, "--ids", "5,288"], &["288", "vocab"]);
    fails_with(&["logits", d, "--ids", ""], &["--ids", "empty"]);
    fails_with(&["logits", d, "--ids", "5,,6"], &["--ids", "``"]);
    fails_with(&["logits", d, "--ids", "5,-1"], &["`-1`"]);
    let long: Vec<String> = (0..65).map(|i| (i % 200).to_string()).collect();
    fails_with(&["logits", d, "--ids", &long.join(",")], &["65 tokens", "64 positions"]);
}

#[test]
fn bad_flags_are_refused() {
    let dir = fixture("mha-r4");
    let d = dir.to_str().unwrap();
    fails_with(
        &["logits", d, "--ids", "1", "--exit", "sometimes"],
        &["sometimes", "last, step:K"],
    );
    fails_with(&["logits", d, "--ids", "1", "--exit", "threshold:2"], &["(0, 1]"]);
    fails_with(
        &["logits", d, "--ids", "1", "--precision", "f64"],
        &["f64", "f32", "bf16"],
    );
    fails_with(
        &["logits", d, "--ids", "1", "--mode", "stream"],
        &["stream", "prefill", "decode"],
    );
    fails_with(&["logits", "/nonexistent/ckpt", "--ids", "1"], &["/nonexistent/ckpt"]);
}

#[test]
fn failed_run_leaves_existing_output_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("keep.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let dir = fixture("mha-r4");
    fails_with(
        &[
            "logits",
            dir.to_str().unwrap(),
            "--ids",
            "999",
            "--out",
            out.to_str().unwrap(),
        ],
        &["999"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn run_uses_the_builtin_model_streams_text_and_reports_exit_depths() {
    let o = ouroc(&[
        "run",
        "--prompt",
        "def ",
        "--max-new-tokens",
        "12",
        "--exit",
        "threshold:0.5",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("def ") && out.len() > 6, "{out}");
    let err = stderr(&o);
    for want in [
        "models/demo",
        "generated 12 tokens",
        "decode",
        "tokens/s",
        "exit depth per generated token",
        "decode ran",
    ] {
        assert!(err.contains(want), "summary lacks `{want}`:\n{err}");
    }
    // The same seed gives the same text.
    let again = ouroc(&[
        "run",
        "--prompt",
        "def ",
        "--max-new-tokens",
        "12",
        "--exit",
        "threshold:0.5",
        "--seed",
        "3",
    ]);
    assert_eq!(stdout(&again), out);
}

#[test]
fn run_refuses_bad_prompts_and_sampling_flags() {
    let d = fixture("mha-r4");
    let d = d.to_str().unwrap();
    fails_with(&["run", d, "--prompt", ""], &["empty"]);
    let long = "the hidden model is ready ".repeat(20);
    fails_with(&["run", d, "--prompt", &long], &["context", "64 positions"]);
    fails_with(&["run", d, "--prompt", "hi", "--temperature", "-1"], &["--temperature"]);
    fails_with(&["run", d, "--prompt", "hi", "--top-p", "0"], &["--top-p"]);
    fails_with(&["run", d, "--prompt", "hi", "--system", "be brief"], &["--chat"]);
    fails_with(&["run", "/nonexistent", "--prompt", "hi"], &["/nonexistent"]);
}

#[test]
fn run_chat_mode_wraps_the_prompt_in_chatml() {
    let d = fixture("mha-r4");
    let o = ouroc(&[
        "run",
        d.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" is 3 specials plus the text's tokens.
    let err = stderr(&o);
    let prompt_tokens: usize = err
        .split("prompt ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(prompt_tokens >= 8, "chat template applied: {err}");
}

#[test]
fn run_backends_generate_the_same_text() {
    let args = |b: &'static str| {
        vec![
            "run",
            "--prompt",
            "def parse(self):",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
            "--backend",
            b,
        ]
    };
    let cpu = ouroc(&args("cpu"));
    let interp = ouroc(&args("interp"));
    assert!(
        cpu.status.success() && interp.status.success(),
        "{}{}",
        stderr(&cpu),
        stderr(&interp)
    );
    assert_eq!(stdout(&cpu), stdout(&interp));
    assert!(stderr(&cpu).contains("Cranelift JIT kernels"), "{}", stderr(&cpu));
}

#[test]
fn emit_clif_prints_each_distinct_kernel_once_or_the_one_asked_for() {
    let dir = fixture("mha-r4");
    let all = ouroc(&["emit", "clif", dir.to_str().unwrap()]);
    assert!(all.status.success(), "{}", stderr(&all));
    let text = stdout(&all);
    // The two layers share their kernels: one function per code key, headed by its users.
    assert!(
        text.contains("; l0.qkv, l1.qkv: linear<f32> {n = 96, k = 32, weight = f32}"),
        "{text}"
    );
    assert_eq!(text.matches("; l0.qkv").count(), 1);
    let functions = text.matches("function u0:1(i64, i64, i64) system_v").count();
    assert_eq!(functions, text.lines().filter(|l| l.starts_with("; ")).count());
    assert!(
        text.contains(" = fma v") && text.contains("load.f32x4"),
        "the Linear kernel uses vector FMA"
    );

    let one = ouroc(&["emit", "clif", dir.to_str().unwrap(), "--kernel", "lm_head"]);
    assert!(one.status.success(), "{}", stderr(&one));
    let one = stdout(&one);
    assert!(
        one.starts_with("; lm_head: linear<f32> {n = 288, k = 32, weight = f32}\n"),
        "{one}"
    );
    assert_eq!(one.matches("function ").count(), 1);

    fails_with(
        &["emit", "clif", dir.to_str().unwrap(), "--kernel", "l9.qkv"],
        &["no kernel named `l9.qkv`", "l0.qkv", "lm_head"],
    );
}

#[test]
fn emit_ptx_prints_launch_records_then_one_module_or_one_kernel() {
    let dir = fixture("mha-r4");
    let o = ouroc(&["emit", "ptx", dir.to_str().unwrap(), "--precision", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(".target sm_80") && text.contains(".address_size 64"),
        "{text}"
    );
    assert_eq!(text.matches(".target sm_80").count(), 1, "one module");
    // Layers share code: the records name both users of the tensor-core GEMM entry.
    let gemm = text
        .lines()
        .find(|l| l.starts_with("// ouroc_l0_qkv_gemm "))
        .expect("a GEMM record");
    assert!(
        gemm.contains("TokensAtLeast") && gemm.ends_with("(l0.qkv, l1.qkv)"),
        "{gemm}"
    );
    assert!(text.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert_eq!(text.matches(".entry ouroc_l0_qkv_gemm").count(), 1);

    let one = ouroc(&["emit", "ptx", dir.to_str().unwrap(), "--kernel", "step_end"]);
    assert!(one.status.success(), "{}", stderr(&one));
    let one = stdout(&one);
    assert_eq!(one.matches(".entry ").count(), 1, "{one}");
    assert!(one.starts_with("// ouroc_step_end when Always"), "{one}");
    fails_with(
        &["emit", "ptx", dir.to_str().unwrap(), "--kernel", "nope"],
        &["no kernel named `nope`"],
    );
}

/// `--backend cpu` runs the optimised Program on the compiled kernels and
/// writes the same research outputs: logits, every step's hidden state and
/// exit gate, exit steps, in prefill and through the KV cache.
#[test]
fn logits_on_the_cpu_backend_match_golden_hidden_states_gates_and_logits() {
    let golden = Golden::load("mha-r4");
    let ids = prompt_arg("mha-r4");
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("mha-r4");
    for (mode, pol, threads) in [("prefill", "threshold:0.5", "1"), ("decode", "weighted", "2")] {
        let out = tmp.path().join(format!("{mode}.safetensors"));
        let args = [
            "logits",
            dir.to_str().unwrap(),
            "--ids",
            &ids,
            "--mode",
            mode,
            "--exit",
            pol,
            "--backend",
            "cpu",
            "--threads",
            threads,
            "--out",
            out.to_str().unwrap(),
        ];
        let o = ouroc(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("cpu backend"), "{}", stdout(&o));
        let (logits, shape, steps) = read_out(&out);
        assert_eq!(shape, vec![12, 288]);
        let e = rel_err(&logits, &golden.get(&format!("f32/{pol}/logits")).f32);
        assert!(e < 1e-4, "{mode} {pol}: relative error {e}");
        assert_eq!(steps, golden.get(&format!("f32/{pol}/exit_step")).i32);
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for name in ["hidden_states", "exit_lambda"] {
            let got: Vec<f32> = st
                .tensor(name)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let e = rel_err(&got, &golden.get(&format!("f32/{name}")).f32);
            assert!(e < 1e-4, "{mode} {name}: relative error {e}");
        }
    }
    // Under `last` the fastest Program drops the exit gate; `logits` keeps
    // it, so the gates are written as the interpreter writes them.
    let out = tmp.path().join("last.safetensors");
    let o = ouroc(&[
        "logits",
        dir.to_str().unwrap(),
        "--ids",
        &ids,
        "--exit",
        "last",
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let lambdas: Vec<f32> = st
        .tensor("exit_lambda")
        .expect("exit_lambda under `last`")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(rel_err(&lambdas, &golden.get("f32/exit_lambda").f32) < 1e-4);
    let (logits, _, _) = read_out(&out);
    assert!(rel_err(&logits, &golden.get("f32/last/logits").f32) < 1e-4);
    fails_with(
        &[
            "logits",
            dir.to_str().unwrap(),
            "--ids",
            "1",
            "--backend",
            "cpu",
            "--threads",
            "0",
        ],
        &["--threads"],
    );
}

#[test]
fn run_threads_do_not_change_the_text_and_kv_modes_are_reported() {
    let run = |extra: &[&str]| {
        let mut a = vec![
            "run",
            "--prompt",
            "import os",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ];
        a.extend_from_slice(extra);
        let o = ouroc(&a);
        assert!(o.status.success(), "{a:?}: {}", stderr(&o));
        o
    };
    let one = run(&["--threads", "1"]);
    let two = run(&["--threads", "2"]);
    assert_eq!(stdout(&one), stdout(&two));
    assert!(stderr(&two).contains("2 thread(s), KV cache full"), "{}", stderr(&two));
    for mode in ["last", "mean"] {
        let o = run(&["--kv", mode]);
        assert!(stderr(&o).contains(&format!("KV cache {mode}")), "{}", stderr(&o));
        // The prompt's logits come from prefill, which fills every step's cache in every mode.
        let first = |o: &Output| stdout(o).chars().take("import os".len() + 1).collect::<String>();
        assert_eq!(first(&o), first(&one));
    }
    fails_with(
        &["run", "--prompt", "x", "--kv", "first"],
        &["unknown KV mode `first`", "full, last, mean"],
    );
    fails_with(&["run", "--prompt", "x", "--threads", "0"], &["--threads"]);
    fails_with(
        &["run", "--prompt", "x", "--backend", "interp", "--threads", "2"],
        &["--backend cpu only"],
    );
}

#[test]
fn bench_reports_prefill_decode_and_bandwidth_per_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let dir = fixture("gqa-hd");
    let o = ouroc(&[
        "bench",
        dir.to_str().unwrap(),
        "--prefill-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--runs",
        "2",
        "--threads",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("read bandwidth measured here"), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "bf16 and f32 by default");
    for (row, prec) in rows.iter().zip(["bf16", "f32"]) {
        assert_eq!(row["precision"], prec);
        assert!(row["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        // `last` runs all 4 steps of every decode token.
        assert_eq!(row["decode_loop_steps_per_token"].as_f64().unwrap(), 4.0);
    }
    let bytes = |i: usize| rows[i]["decode_weight_bytes_per_token"].as_f64().unwrap();
    assert!(
        (bytes(1) / bytes(0) - 2.0).abs() < 0.05,
        "f32 weights are twice bf16's bytes"
    );
    fails_with(&["bench", dir.to_str().unwrap(), "--runs", "0"], &["--runs"]);
    fails_with(&["bench", "--shape", "7b"], &["unknown shape `7b`"]);
    fails_with(
        &["bench", dir.to_str().unwrap(), "--prefill-tokens", "100000"],
        &["exceed the context"],
    );
}

/// The PTX path, emulated: the same research outputs as the interpreter,
/// from the sm_80 kernels run on ouroc's PTX emulator.
#[test]
fn logits_on_the_ptx_emulator_match_golden() {
    let golden = Golden::load("mha-r4");
    let ids = prompt_arg("mha-r4");
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("mha-r4");
    let out = tmp.path().join("emu.safetensors");
    let o = ouroc(&[
        "logits",
        dir.to_str().unwrap(),
        "--ids",
        &ids,
        "--exit",
        "threshold:0.5",
        "--backend",
        "ptx-emu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ptx-emu backend"), "{}", stdout(&o));
    let (logits, shape, steps) = read_out(&out);
    assert_eq!(shape, vec![12, 288]);
    let e = rel_err(&logits, &golden.get("f32/threshold:0.5/logits").f32);
    assert!(e < 1e-4, "relative error {e}");
    assert_eq!(steps, golden.get("f32/threshold:0.5/exit_step").i32);
}

#[test]
fn cuda_without_a_driver_or_the_feature_is_a_clear_error() {
    let dir = fixture("mha-r4");
    // This test binary is built without the `cuda` feature (CI tests the feature in runtime/).
    let needle = if cfg!(feature = "cuda") {
        "no CUDA"
    } else {
        "--features cuda"
    };
    fails_with(
        &["logits", dir.to_str().unwrap(), "--ids", "1,2", "--backend", "cuda"],
        &[needle],
    );
    fails_with(&["run", "--prompt", "x", "--device", "cuda"], &[needle]);
    // The one driver runs every KV mode on the GPU too; threads are the CPU's.
    fails_with(&["run", "--prompt", "x", "--device", "cuda", "--kv", "last"], &[needle]);
    fails_with(
        &["run", "--prompt", "x", "--device", "cuda", "--threads", "2"],
        &["--device cuda", "--threads"],
    );
}

/// Self-speculative decoding on `run` and `bench`: greedy text unchanged,
/// its summary printed, the mechanism measured, bad settings refused.
#[test]
fn speculation_flags_on_run_and_bench() {
    let run = |extra: &[&str]| {
        let mut a = vec![
            "run",
            "--prompt",
            "def ",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--exit",
            "last",
        ];
        a.extend_from_slice(extra);
        ouroc(&a)
    };
    let plain = run(&["--draft-tokens", "off"]);
    let spec = run(&["--draft-tokens", "3", "--draft-steps", "2"]);
    assert!(plain.status.success() && spec.status.success(), "{}", stderr(&spec));
    assert_eq!(stdout(&spec), stdout(&plain));
    let err = stderr(&spec);
    for want in [
        "speculation: draft 2 of 4 steps",
        "acceptance",
        "tokens per round",
        "weight reads saved",
    ] {
        assert!(err.contains(want), "summary lacks `{want}`:\n{err}");
    }
    assert!(!stderr(&plain).contains("speculation:"));
    let d = fixture("mha-r4");
    let d = d.to_str().unwrap();
    fails_with(
        &["run", d, "--prompt", "hi", "--draft-tokens", "9"],
        &["--draft-tokens"],
    );
    fails_with(
        &["run", d, "--prompt", "hi", "--draft-tokens", "3", "--draft-steps", "4"],
        &["--draft-steps"],
    );
    fails_with(
        &["run", d, "--prompt", "hi", "--backend", "interp", "--draft-tokens", "3"],
        &["interpreter"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let o = ouroc(&[
        "bench",
        d,
        "--precision",
        "f32",
        "--prefill-tokens",
        "8",
        "--decode-tokens",
        "8",
        "--runs",
        "1",
        "--draft-tokens",
        "2",
        "--draft-steps",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("verifying 2 drafted tokens"), "{}", stdout(&o));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let m = &doc["results"][0]["mechanism"];
    assert!(
        m["verify_s"].as_f64().unwrap() > 0.0 && m["single_verifies_s"].as_f64().unwrap() > 0.0,
        "{doc}"
    );
    assert_eq!(doc["draft_tokens"], "2");
    fails_with(
        &[
            "bench",
            d,
            "--prefill-tokens",
            "4",
            "--draft-tokens",
            "8",
            "--decode-tokens",
            "2",
        ],
        &["--draft-tokens 8", "--decode-tokens 8 or more"],
    );
    fails_with(&["run", d, "--prompt", "hi", "--draft-steps", "-1"], &["--draft-steps"]);
    fails_with(
        &["run", d, "--prompt", "hi", "--draft-tokens", "4x"],
        &["--draft-tokens", "4x"],
    );
}

/// Pipelines as parameters: `compile --list` names every pass, `--passes`
/// and `--skip` choose them on every command, bad choices are refused by
/// name (a missing prerequisite names the pass to add).
#[test]
fn passes_and_skip_choose_the_pipeline() {
    let o = ouroc(&["compile", "--list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list = stdout(&o);
    for pass in [
        "reroll",
        "egraph",
        "hoist",
        "rotate",
        "policy-dce",
        "peel",
        "cse",
        "dce",
    ] {
        assert!(list.contains(&format!("  {pass} ")), "--list lacks {pass}:\n{list}");
    }
    let d = fixture("mha-r4");
    let d = d.to_str().unwrap();
    let passes = |flags: &[&str]| {
        let mut a = vec!["compile", d];
        a.extend_from_slice(flags);
        let o = ouroc(&a);
        assert!(o.status.success(), "{flags:?}: {}", stderr(&o));
        stdout(&o)
    };
    assert!(passes(&[]).starts_with("8 passes"));
    assert!(passes(&["--passes", "egraph,dce"]).starts_with("2 passes"));
    assert!(passes(&["--skip", "egraph"]).starts_with("7 passes"));
    let none = passes(&["--passes", ""]);
    assert!(none.starts_with("0 passes: kernels/token 160 -> 160"), "{none}");
    for rule in ["merge-linears", "swiglu", "step-end"] {
        assert!(
            list.contains(&format!("  {rule} ")),
            "--list lacks rule {rule}:\n{list}"
        );
    }
    let unmerged = passes(&["--rules", "-merge-linears"]);
    assert!(
        unmerged.starts_with("8 passes") && unmerged != passes(&[]),
        "{unmerged}"
    );
    assert_eq!(passes(&["--rules=-merge-linears,-swiglu,+swiglu"]), unmerged);
    fails_with(&["compile", d, "--rules", "swiglu"], &["-NAME", "merge-linears"]);
    fails_with(&["compile", d, "--rules", "-fuse-all"], &["unknown rule `fuse-all`"]);
    fails_with(
        &["compile", d, "--passes", "dce", "--rules", "-swiglu"],
        &["does not run"],
    );
    fails_with(&["compile", d, "--skip", "fuse"], &["unknown pass `fuse`", "egraph"]);
    fails_with(&["compile", d, "--passes", "cse,cse"], &["named twice"]);
    fails_with(
        &["emit", "ir", d, "--after", "dce", "--skip", "dce"],
        &["unknown pass `dce`"],
    );
    // Every command takes them; a program without its prerequisite is refused.
    let o = ouroc(&["run", d, "--prompt", "hi", "--max-new-tokens", "4", "--passes", ""]);
    assert!(o.status.success(), "{}", stderr(&o));
    fails_with(
        &["run", d, "--prompt", "hi", "--unrolled", "--skip", "reroll"],
        &["run the `reroll` pass first"],
    );
    fails_with(&["bench", d, "--runs", "1", "--skip", "nope"], &["unknown pass `nope`"]);
    fails_with(
        &["logits", d, "--ids", "1,2", "--skip", "nope"],
        &["unknown pass `nope`"],
    );
}

/// `ouroc ablate`: the default and the variants given, with their static
/// costs and measured ratios; a variant the pipeline refuses is a row
/// naming why; bad variants are refused by name.
#[test]
fn ablate_measures_variants_and_names_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("ablate.json");
    let d = fixture("mha-r4");
    let d = d.to_str().unwrap();
    let o = ouroc(&[
        "ablate",
        d,
        "--rounds",
        "1",
        "--prefill-tokens",
        "4",
        "--decode-tokens",
        "2",
        "--threads",
        "1",
        "--variants",
        "--skip egraph; --rules -merge-linears,-swiglu; --passes dce --rules -swiglu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "default",
        "--skip egraph",
        "--rules -merge-linears,-swiglu",
        "refused: --rules chooses",
    ] {
        assert!(out.contains(want), "table lacks `{want}`:\n{out}");
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["variants"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let kernels = |i: usize| rows[i]["kernels_per_token"].as_u64().unwrap();
    assert!(kernels(1) > kernels(0), "without egraph more kernels launch: {doc}");
    assert!(kernels(2) > kernels(0), "without merging more kernels launch: {doc}");
    assert_eq!(rows[0]["decode_ratio"].as_f64().unwrap(), 1.0);
    assert!(rows[1]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(rows[3]["refused"].as_str().unwrap().contains("egraph"));
    fails_with(&["ablate", d, "--variants", "--fuse all"], &["unknown flag `--fuse`"]);
    fails_with(&["ablate", d, "--variants", ";"], &["names no variant"]);
    fails_with(&["ablate", d, "--rounds", "0"], &["--rounds"]);
}
