//! Every parser of untrusted bytes under bolero: the committed corpus
//! (`tests/__fuzz__/parsers__NAME/corpus`), then inputs for `OUROC_FUZZ_SECONDS` (default 3) per
//! target. Each input runs through the target as it is, and as the mutation it selects of a
//! corpus seed (`ouroc_fuzz::mutate`), which is what gets past each format's first check.
//! A finding fails the test with the input; add it to the target's corpus (or a regression test
//! beside the parser) once fixed.

use ouroc_fuzz::{corpus, guard, mutate::mutate, seconds, targets};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: guard::Capped = guard::Capped;

/// Runs `target` on `input`; a panic first saves the input as
/// `target/fuzz-findings/NAME-HASH.bin` (the mutant is not what bolero prints).
fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    guard::set_current(input);
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| target(input))) {
        let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-findings");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{name}-{hash:016x}.bin"));
        let _ = std::fs::write(&path, input);
        eprintln!("fuzz {name}: finding saved as {}", path.display());
        resume_unwind(p);
    }
}

fn fuzz(name: &str, target: fn(&[u8])) {
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "{name}: empty corpus");
    // The seeds themselves first: each must run cleanly.
    guard::arm(name);
    for s in &seeds {
        run(name, target, s);
    }
    let runs = AtomicUsize::new(0);
    let start = Instant::now();
    bolero::check!()
        .with_test_time(Duration::from_secs(seconds()))
        .for_each(|input: &[u8]| {
            run(name, target, input);
            run(name, target, &mutate(&seeds, input));
            runs.fetch_add(2, Ordering::Relaxed);
        });
    guard::disarm(name);
    eprintln!(
        "fuzz {name}: {} executions in {:.1} s ({} seeds), no finding",
        runs.load(Ordering::Relaxed) + seeds.len(),
        start.elapsed().as_secs_f64(),
        seeds.len()
    );
}

#[test]
fn safetensors() {
    fuzz("safetensors", targets::safetensors);
}

#[test]
fn safetensors_index() {
    fuzz("safetensors_index", targets::safetensors_index);
}

#[test]
fn config_json() {
    fuzz("config_json", targets::config_json);
}

#[test]
fn tokenizer_files() {
    fuzz("tokenizer_files", targets::tokenizer_files);
}

#[test]
fn tokenizer_json() {
    fuzz("tokenizer_json", targets::tokenizer_json);
}

#[test]
fn ir_text() {
    fuzz("ir_text", targets::ir_text);
}

#[test]
fn ptx_text() {
    fuzz("ptx_text", targets::ptx_text);
}

#[test]
fn weights_file() {
    fuzz("weights_file", targets::weights_file);
}

#[test]
fn app_meta() {
    fuzz("app_meta", targets::app_meta);
}

#[test]
fn openai_request() {
    fuzz("openai_request", targets::openai_request);
}
