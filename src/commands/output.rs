//! Files the commands write (`logits --out`, `bench --json`): every write and the final flush are
//! checked, and a regular file is written under a temporary name in the same directory and then
//! renamed, so a failed write never leaves a partial file that looks complete. A path that exists
//! and is not a regular file (`/dev/stdout`, a pipe, a device) is written in place: renaming over
//! it would replace the device itself.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` (see the module doc); the error names the path.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let special = std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    if special {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        return f
            .write_all(bytes)
            .and_then(|()| f.flush())
            .with_context(|| format!("cannot write {}", path.display()));
    }
    let tmp = temporary_name(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .with_context(|| format!("cannot write {}", path.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `dir/.name.tmp-PID`: beside the target (so the rename stays on one file system), hidden,
/// and distinct for concurrent writers.
fn temporary_name(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_replaced_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        std::fs::write(&p, "old contents, longer than the new").unwrap();
        write_file(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_full_device_is_an_error_naming_it_and_is_not_replaced() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return; // not Linux
        }
        let e = write_file(full, &[0; 4096]).unwrap_err();
        assert!(format!("{e:#}").contains("cannot write /dev/full"), "{e:#}");
        assert!(
            !std::fs::metadata(full).unwrap().is_file(),
            "/dev/full was replaced by a file"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let e = write_file(Path::new("/nonexistent-ouroc-dir/x.json"), b"{}").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent-ouroc-dir/x.json"), "{e:#}");
    }
}
