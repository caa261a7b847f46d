//! The structural fuzzer (`ouroc_fuzz::extreme`): random valid-but-extreme models compiled and
//! run on the CPU engine against the reference interpreter, for `OUROC_FUZZ_SECONDS` (default 3).
//! A few fixed edge cases run first, whatever the time.

use ouroc_fuzz::extreme::Extreme;
use ouroc_fuzz::seconds;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Runs `m`; whether both engines ran it (rather than both refusing it).
fn check(m: &Extreme) -> bool {
    m.check().unwrap_or_else(|e| {
        panic!(
            "{e}\nconfig {}\npolicy {} prompt {:?} seed {}",
            m.config, m.policy, m.prompt, m.seed
        )
    })
}

#[test]
fn extreme_models_run_alike_on_the_interpreter_and_the_cpu_engine() {
    // Edges first: a one-token vocabulary, one loop step, one head, the largest GQA ratio.
    let runs = AtomicUsize::new(0);
    let ran = AtomicUsize::new(0);
    for bytes in [[0u8; 16], [255; 16], [1; 16], [7; 16]] {
        ran.fetch_add(check(&Extreme::from_bytes(&bytes)) as usize, Ordering::Relaxed);
        runs.fetch_add(1, Ordering::Relaxed);
    }
    let start = Instant::now();
    bolero::check!()
        .with_test_time(Duration::from_secs(seconds()))
        .for_each(|input: &[u8]| {
            ran.fetch_add(check(&Extreme::from_bytes(input)) as usize, Ordering::Relaxed);
            runs.fetch_add(1, Ordering::Relaxed);
        });
    eprintln!(
        "fuzz extreme_models: {} models in {:.1} s ({} run on both engines, the rest refused by both), no finding",
        runs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        ran.load(Ordering::Relaxed)
    );
}
