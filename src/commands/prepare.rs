//! Weights for a compiled Program: from the compile cache when an entry is there, otherwise
//! prepared from the checkpoint (streamed, with progress and an ETA for large models) and
//! stored in the cache for the next start (`ouroc_runtime::weights_cache`).

use crate::cli::CacheFlags;
use anyhow::Result;
use ouroc_kernels::Program;
use ouroc_models::Checkpoint;
use ouroc_runtime::cpu::{CpuForward, CpuOptions, ResidentWeights};
use ouroc_runtime::memory::bytes;
use ouroc_runtime::weights_cache::{Lookup, WeightsCache};
use std::time::Instant;

/// Weights above this are prepared with a progress line.
const PROGRESS_BYTES: u64 = 256 << 20;

/// Models with fewer bytes of weights are not cached (they prepare in moments), unless
/// `OUROC_CACHE_MIN_BYTES` says otherwise.
const CACHE_MIN_BYTES: u64 = 64 << 20;

/// The encoded weights of `program` from `ckpt`, through the cache the flags choose.
pub fn weights(program: &Program, ckpt: &Checkpoint, flags: &CacheFlags) -> Result<ResidentWeights> {
    let cache = match (&flags.no_cache, &flags.cache_dir) {
        (true, _) => None,
        (false, Some(dir)) => Some(WeightsCache::new(dir)),
        (false, None) => WeightsCache::default_dir().map(WeightsCache::new),
    };
    let min = std::env::var("OUROC_CACHE_MIN_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CACHE_MIN_BYTES);
    let Some(cache) = cache.filter(|_| ckpt.weight_bytes() >= min) else {
        return prepare(program, ckpt);
    };
    let key = WeightsCache::key(program, &ckpt.identity()).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    match cache.load(&key, program) {
        Lookup::Hit(w) => {
            eprintln!(
                "weights: {} from the cache {} ({:.2} s)",
                bytes(w.bytes() as u64),
                cache.path(&key).display(),
                t.elapsed().as_secs_f64()
            );
            return Ok(w);
        }
        Lookup::Invalid(why) => eprintln!("weights: the cache entry is unusable ({why}); preparing again"),
        Lookup::Miss => {}
    }
    let w = prepare(program, ckpt)?;
    match cache.store(&key, program, &w) {
        Ok(path) => eprintln!("weights: cached in {} for the next start", path.display()),
        // A full disk or a read-only cache costs the next start time, not this run.
        Err(e) => eprintln!("warning: {e}"),
    }
    Ok(w)
}

/// The compiled CPU engine of `program`, its weights through the cache.
pub fn cpu_forward(program: Program, ckpt: &Checkpoint, opts: &CpuOptions, flags: &CacheFlags) -> Result<CpuForward> {
    ouroc_driver::check_program(&program).map_err(anyhow::Error::msg)?;
    let w = weights(&program, ckpt, flags)?;
    let jit = ouroc_codegen::cpu::Jit::new()?;
    CpuForward::from_parts(program, w, opts, Box::new(jit)).map_err(anyhow::Error::msg)
}

/// Prepares the weights from the checkpoint, one tensor at a time.
fn prepare(program: &Program, ckpt: &Checkpoint) -> Result<ResidentWeights> {
    let t = Instant::now();
    let mut last = Instant::now();
    let mut shown = false;
    let w = ResidentWeights::encode_with_progress(program, ckpt, true, &mut |done, total| {
        if total < PROGRESS_BYTES || last.elapsed().as_secs_f64() < 1.0 {
            return;
        }
        last = Instant::now();
        let s = t.elapsed().as_secs_f64();
        let eta = if done > 0 {
            s * (total - done) as f64 / done as f64
        } else {
            0.0
        };
        eprint!(
            "\rpreparing weights: {:>3}% ({} of {}), {s:.0} s, about {eta:.0} s left   ",
            done * 100 / total.max(1),
            bytes(done),
            bytes(total)
        );
        shown = true;
    })
    .map_err(anyhow::Error::msg)?;
    if shown {
        eprintln!();
    }
    if w.bytes() as u64 >= PROGRESS_BYTES {
        eprintln!(
            "weights: {} prepared in {:.1} s",
            bytes(w.bytes() as u64),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(w)
}
