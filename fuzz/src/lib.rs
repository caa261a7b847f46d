//! ouroc-fuzz: fuzz targets for every parser of bytes ouroc does not control, and a structural
//! fuzzer that compiles valid-but-extreme models.
//!
//! - [`targets`]: one function per parser (safetensors file and shard index, config.json,
//!   tokenizer files, IR text, PTX text, the weights file and metadata of built executables, the
//!   server's OpenAI request bodies).
//!   A parser may refuse its input; a target fails (panics) only when the parser panics or
//!   accepts something that breaks the invariants its callers rely on.
//! - [`mutate`]: structure-aware mutation of a committed seed input, driven by the fuzzer's
//!   bytes, so that random bytes reach past the first check of each format.
//! - [`extreme`]: random model configs at the edges (tiny and odd dims, GQA ratios, loop counts
//!   1 to 16, vocab sizes) written as checkpoints with random weights; the compiled CPU engine
//!   and the reference interpreter must agree or both refuse.
//!
//! The targets run as ordinary tests under bolero (`cargo test -p ouroc-fuzz`, a few seconds
//! each; `OUROC_FUZZ_SECONDS` sets the time per target) over the committed corpus in
//! `tests/__fuzz__/` and random inputs. README.md ("Fuzzing") says how to run them longer.

pub mod extreme;
pub mod guard;
pub mod mutate;
pub mod targets;

use std::path::{Path, PathBuf};

/// The committed seed inputs of `target`: the files of its bolero corpus folder.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no corpus for {target} at {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).expect("read a corpus file"))
        .collect()
}

/// Where bolero keeps a target's corpus: `tests/__fuzz__/parsers__TARGET/corpus`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/__fuzz__")
        .join(format!("parsers__{target}"))
        .join("corpus")
}

/// Seconds each target runs for (`OUROC_FUZZ_SECONDS`, default 3).
pub fn seconds() -> u64 {
    std::env::var("OUROC_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// A checkpoint fixture of the repository (tests/fixtures/NAME).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}
