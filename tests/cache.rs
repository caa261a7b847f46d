//! The compile cache through the CLI: a second start maps the weights the first one prepared
//! and prints the same text; `--no-cache` neither reads nor writes it.

mod common;

use common::cli::*;
use common::fixture;
use std::process::Command;

fn run(cache: &str, extra: &[&str]) -> (String, String) {
    let d = fixture("mha-r4");
    let mut args = vec![
        "run",
        d.to_str().unwrap(),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--cache-dir",
        cache,
    ];
    args.retain(|a| !(extra.contains(&"--no-cache") && (*a == "--cache-dir" || *a == cache)));
    args.extend(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(&args)
        // Cache even the fixture's 175 kB of weights.
        .env("OUROC_CACHE_MIN_BYTES", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (stdout(&o), stderr(&o))
}

#[test]
fn a_second_start_maps_the_cached_weights_and_prints_the_same_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let c = dir.to_str().unwrap();
    let (first, err1) = run(c, &[]);
    assert!(err1.contains("cached in"), "{err1}");
    let (second, err2) = run(c, &[]);
    assert!(err2.contains("from the cache"), "{err2}");
    assert_eq!(first, second);
    // A corrupted entry is reported, rebuilt and the text is unchanged.
    let entry = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&entry, b"OUROCWT1 not really").unwrap();
    let (third, err3) = run(c, &[]);
    assert!(err3.contains("unusable") && err3.contains("cached in"), "{err3}");
    assert_eq!(first, third);
    // --no-cache: prepared from the checkpoint, the cache untouched.
    let before = std::fs::read(&entry).unwrap();
    let (fourth, err4) = run(c, &["--no-cache"]);
    assert!(!err4.contains("weights:"), "{err4}");
    assert_eq!(first, fourth);
    assert_eq!(std::fs::read(&entry).unwrap(), before);
}

#[test]
fn cache_flags_conflict_clearly() {
    let d = fixture("mha-r4");
    fails_with(
        &[
            "run",
            d.to_str().unwrap(),
            "--prompt",
            "a",
            "--no-cache",
            "--cache-dir",
            "/tmp/x",
        ],
        &["--no-cache", "--cache-dir"],
    );
}
