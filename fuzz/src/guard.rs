//! Findings that do not unwind: an allocation far beyond any input's size (a length field taken
//! at its word) would end the fuzzing process through the OOM killer, with no input to show.
//! [`Capped`], installed as a fuzz binary's global allocator, refuses any single allocation above
//! [`CAP`] bytes after writing the input under test (published with [`set_current`]) to
//! `target/fuzz-findings/oversized-allocation.bin`; the process then aborts with Rust's
//! "memory allocation of N bytes failed".

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The largest single allocation a fuzzed parser may make: no input of the corpus needs more
/// than a few megabytes.
pub const CAP: usize = 1 << 30;

static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static REPORT: Mutex<Option<File>> = Mutex::new(None);
static REPORTING: AtomicBool = AtomicBool::new(false);

/// Opens the file an oversized allocation writes its input to (call once, before fuzzing).
pub fn arm(target: &str) {
    let path = report_path(target);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(f) = File::create(path) {
        *REPORT.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}

/// Closes the report file of `target`, removing it when nothing was written to it.
pub fn disarm(target: &str) {
    *REPORT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let path = report_path(target);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(path);
    }
}

fn report_path(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-findings")
        .join(format!("{target}-oversized-allocation.bin"))
}

/// Publishes the input about to be run.
pub fn set_current(input: &[u8]) {
    let mut c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    c.clear();
    c.extend_from_slice(input);
}

/// The system allocator with a cap on single allocations.
pub struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            report();
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            report();
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            report();
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Writes the current input to the armed file, without allocating (the allocator is inside
/// an allocation) and at most once.
fn report() {
    if REPORTING.swap(true, Ordering::SeqCst) {
        return;
    }
    if let (Ok(input), Ok(mut file)) = (CURRENT.try_lock(), REPORT.try_lock())
        && let Some(f) = file.as_mut()
    {
        let _ = f.write_all(&input);
        let _ = f.flush();
    }
}
