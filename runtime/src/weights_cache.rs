//! The compile cache: a checkpoint's weights, encoded for a Program, kept on disk in the weights
//! file format of `ouroc build` (`crate::deploy`) and memory-mapped on the next start, so that a
//! second start is a map and a check instead of a preparation.
//!
//! An entry is `DIR/KEY.weights`; KEY hashes the ouroc version, the Program (its kernels, weight
//! recipes and dtypes) and the checkpoint's identity (`Checkpoint::identity`: config.json, each
//! weight file's size and time). The entry's header carries KEY and the layout hash, and
//! [`read_weights`] checks both and the file's length: an entry of another version, program or
//! checkpoint, a truncated or otherwise corrupt one, is a miss and is rebuilt, never used. Entries
//! are written under a temporary name and renamed, so concurrent starts never see a partial one.

use crate::deploy::{self, Fingerprint, Hasher, WeightsHeader, read_weights};
use ouroc_driver::ResidentWeights;
use ouroc_kernels::Program;
use ouroc_kernels::spec::Encoding;
use std::path::{Path, PathBuf};

/// A cache directory.
pub struct WeightsCache {
    dir: PathBuf,
}

/// What [`WeightsCache::load`] found.
pub enum Lookup {
    Hit(ResidentWeights),
    /// No entry for the key.
    Miss,
    /// An entry that cannot be used (and will be replaced), with the reason.
    Invalid(String),
}

impl WeightsCache {
    pub fn new(dir: impl Into<PathBuf>) -> WeightsCache {
        WeightsCache { dir: dir.into() }
    }

    /// `$OUROC_CACHE_DIR`, else `$XDG_CACHE_HOME/ouroc`, else `$HOME/.cache/ouroc`.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        env("OUROC_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ouroc")))
            .or_else(|| env("HOME").map(|h| h.join(".cache/ouroc")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `program`'s weights from the checkpoint `identity`.
    pub fn key(program: &Program, identity: &str) -> Result<String, String> {
        let mut h = Hasher::default();
        h.update(deploy::VERSION.as_bytes());
        h.update(ouroc_kernels::quant::LAYOUT.as_bytes());
        h.update(serde_json::to_string(program).map_err(|e| e.to_string())?.as_bytes());
        h.update(identity.as_bytes());
        Ok(h.hex())
    }

    /// The entry's path.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.weights"))
    }

    /// The entry of `key` for `program`, memory-mapped, when it is there and sound.
    pub fn load(&self, key: &str, program: &Program) -> Lookup {
        let path = self.path(key);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Invalid(format!("cannot open {}: {e}", path.display())),
        };
        // SAFETY: entries are only ever replaced by rename, never written in place, so the
        // mapped file does not change while it is mapped.
        let map = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => return Lookup::Invalid(format!("cannot map {}: {e}", path.display())),
        };
        let what = path.display().to_string();
        let header = match deploy::read_header(&map, &what) {
            Ok(h) => h,
            Err(e) => return Lookup::Invalid(e),
        };
        let want = match fingerprint(key, program, &header.entries) {
            Ok(f) => f,
            Err(e) => return Lookup::Invalid(e),
        };
        let slices = match read_weights(&map, &want, &what) {
            Ok(s) => s,
            Err(e) => return Lookup::Invalid(e),
        };
        // Every weight a kernel reads, with its full length.
        if let Err(e) = deploy::check_entries(program, &slices, &what) {
            return Lookup::Invalid(e);
        }
        // The slices point into `map`, which the weights then own.
        let entries: Vec<((u32, Encoding), &[u8])> = slices;
        let table: Vec<((u32, Encoding), (usize, usize))> = entries
            .iter()
            .map(|(k, b)| (*k, (b.as_ptr() as usize - map.as_ptr() as usize, b.len())))
            .collect();
        let owner = Box::new(map);
        let base = owner.as_ptr();
        // SAFETY: each (offset, len) lies in the map (checked by read_weights above), which
        // `owner` keeps alive and unmodified (read-only, replaced only by rename).
        let borrowed = table
            .into_iter()
            .map(|(k, (at, len))| (k, unsafe { std::slice::from_raw_parts(base.add(at), len) }))
            .collect();
        // SAFETY: as above.
        Lookup::Hit(unsafe { ResidentWeights::borrowed(borrowed, owner) })
    }

    /// Writes `weights` as the entry of `key` (a temporary file, then a rename).
    pub fn store(&self, key: &str, program: &Program, weights: &ResidentWeights) -> Result<PathBuf, String> {
        let io = |e: std::io::Error| format!("cannot write the cache entry in {}: {e}", self.dir.display());
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let (entries, data_bytes) = deploy::layout(weights);
        let header = WeightsHeader {
            fingerprint: fingerprint(key, program, &entries)?,
            entries,
            data_bytes,
        };
        let path = self.path(key);
        // Unique per writer: processes (pid) and threads of one process (a counter).
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{key}.weights.tmp-{}-{n}", std::process::id()));
        let written = (|| {
            let file = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            deploy::write_weights(&mut w, &header, weights)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(path)
    }
}

/// An entry's fingerprint: the key in place of the content hash (the key already names the
/// checkpoint and program), the version, the layout of `program` with `entries`.
fn fingerprint(key: &str, program: &Program, entries: &[deploy::WeightIndex]) -> Result<Fingerprint, String> {
    Ok(Fingerprint {
        checkpoint: key.to_string(),
        ouroc: deploy::VERSION.to_string(),
        layout: deploy::layout_hash(program, entries)?,
    })
}
