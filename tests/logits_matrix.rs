//! `ouroc logits --out` on every backend under every exit policy (every
//! `step:K` of the loop included) in prefill and decode: no panic, the
//! same tensors (names, shapes) on every backend, exit steps identical to
//! the interpreter's and values within f32 rounding of it.

use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const IDS: &str = "54,74,71,282,283,281";
const STEPS: usize = 4;

/// Every tensor of a `--out` file: name -> (shape, values as f64).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|c| match t.dtype() {
                    safetensors::Dtype::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
                    _ => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                })
                .collect();
            (name, (t.shape().to_vec(), vals))
        })
        .collect()
}

fn logits(dir: &Path, backend: &str, policy: &str, mode: &str) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let out = dir.join(format!("{backend}-{}-{mode}.safetensors", policy.replace(':', "_")));
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mha-r4");
    let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args([
            "logits",
            ckpt.to_str().unwrap(),
            "--ids",
            IDS,
            "--exit",
            policy,
            "--mode",
            mode,
        ])
        .args(["--backend", backend, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{backend} {policy} {mode} failed:\n{err}");
    assert!(!err.contains("panicked"), "{backend} {policy} {mode} panicked:\n{err}");
    tensors(&out)
}

#[test]
fn every_backend_writes_the_interpreters_tensors_under_every_policy_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut policies: Vec<String> = ["last", "threshold:0.5", "weighted"].map(String::from).to_vec();
    policies.extend((0..STEPS).map(|k| format!("step:{k}")));
    for policy in &policies {
        for mode in ["prefill", "decode"] {
            let want = logits(dir.path(), "interp", policy, mode);
            let names: Vec<&String> = want.keys().collect();
            assert_eq!(
                names,
                ["exit_lambda", "exit_step", "hidden_states", "logits"],
                "{policy} {mode}"
            );
            for backend in ["cpu", "ptx-emu"] {
                let got = logits(dir.path(), backend, policy, mode);
                let what = format!("{backend} {policy} {mode}");
                assert_eq!(got.keys().collect::<Vec<_>>(), names, "{what}: tensor set");
                for (name, (shape, w)) in &want {
                    let (gshape, g) = &got[name];
                    assert_eq!(gshape, shape, "{what}: shape of {name}");
                    if name == "exit_step" {
                        assert_eq!(g, w, "{what}: exit steps");
                        continue;
                    }
                    let scale = w.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
                    let err = g.iter().zip(w).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                    assert!(err / scale < 1e-4, "{what}: {name} off by {err} (scale {scale})");
                }
            }
        }
    }
}
