//! Running the `ouroc` binary from tests: its output, failures with their messages, and
//! throw-away copies of fixtures to break.

use super::fixture;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn ouroc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ouroc"))
        .args(args)
        .output()
        .expect("run ouroc")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command fails with a message containing every `needle`, and does not panic.
pub fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let o = ouroc(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail; stdout:\n{}", stdout(&o));
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: error should mention `{n}`:\n{err}");
    }
    err
}

/// A copy of a fixture in a fresh temporary directory.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

pub fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let f = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&f, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}
