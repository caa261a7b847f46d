//! A persistent pool of worker threads for launching kernels in parallel.
//!
//! [`Pool::run`] runs tasks `0..n` of one job and returns when every task
//! has finished. The tasks are claimed one at a time from an atomic
//! counter by the calling thread and the workers alike, so a worker the OS
//! has not scheduled (a loaded machine, more threads than cores) delays
//! nothing: the caller runs the tasks nobody claimed. The workers live as
//! long as the pool; between jobs each one spins for a short while on the
//! job state (a decode token launches hundreds of kernels back to back, so
//! the next job usually comes within microseconds) and then parks until
//! the next job unparks it.
//!
//! Protocol: one atomic word holds the job's generation, its task count
//! and the next unclaimed task. The caller writes the job (the task
//! function), resets the done counter and publishes a new generation
//! (`SeqCst`); anyone claims task i by a compare-and-swap of the word from
//! (generation, n, i) to (generation, n, i + 1) (`Acquire`), runs it and
//! increments the done counter (`Release`); the caller returns once the
//! counter reaches n (`Acquire`), so everything a task wrote is visible to
//! it. The job is only rewritten after every task of the previous one has
//! finished, and a claim checks the generation, so a late worker can never
//! run a task of a finished job. A worker going to sleep sets its
//! `sleeping` flag and re-reads the word (both `SeqCst`); the caller reads
//! the flags after publishing and unparks the sleepers, so no wake-up is
//! lost.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// The job word: generation (32 bits), task count (16), next task (16).
fn pack(generation: u32, n: usize, next: usize) -> u64 {
    ((generation as u64) << 32) | ((n as u64) << 16) | next as u64
}

fn unpack(w: u64) -> (u32, usize, usize) {
    ((w >> 32) as u32, ((w >> 16) & 0xffff) as usize, (w & 0xffff) as usize)
}

/// The task function of the current job (lifetime erased: it is only
/// called while the caller that owns it waits in `Pool::run`).
type Task = *const (dyn Fn(usize) + Sync);

struct Shared {
    word: AtomicU64,
    /// Written by the caller only when every task of the previous job has
    /// finished (before the new generation is published); read after a
    /// successful claim.
    task: UnsafeCell<Option<Task>>,
    done: AtomicUsize,
    sleeping: Vec<AtomicBool>,
    stop: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: `task` is only written while no task of a job runs or can be
// claimed (see the module docs); the function it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above.
unsafe impl Send for Shared {}

impl Shared {
    /// Claim and run tasks of generation `generation` until none is left.
    fn work(&self, generation: u32) {
        loop {
            let w = self.word.load(Ordering::Acquire);
            let (g, n, next) = unpack(w);
            if g != generation || next >= n {
                return;
            }
            if self
                .word
                .compare_exchange_weak(w, pack(g, n, next + 1), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: the claimed task keeps the job alive until it is
            // counted done, and the job was written before its generation
            // was published (the claim's Acquire).
            let task = unsafe { &*(*self.task.get()).expect("a task with the job") };
            if catch_unwind(AssertUnwindSafe(|| task(next))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    generation: u32,
}

impl Pool {
    /// A pool running jobs on `threads` threads in all (the caller and
    /// `threads - 1` workers; `threads == 0` counts as 1).
    pub fn new(threads: usize) -> Result<Pool, String> {
        if threads > 0xffff {
            return Err(format!("{threads} threads is more than the pool handles (65535)"));
        }
        let n = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            word: AtomicU64::new(pack(0, 0, 0)),
            task: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let mut pool = Pool {
            shared,
            workers: Vec::with_capacity(n),
            generation: 0,
        };
        for w in 0..n {
            let s = Arc::clone(&pool.shared);
            let h = std::thread::Builder::new()
                .name(format!("ouroc-worker-{}", w + 1))
                .spawn(move || worker(&s, w))
                .map_err(|e| format!("cannot start worker thread {}: {e}", w + 1))?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    /// Threads a job runs on (the caller included).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `task(i)` for every `i in 0..n`, each exactly once, on this
    /// thread and the workers, and return when all have finished. Panics
    /// if a task panicked.
    pub fn run(&mut self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n <= 1 {
            for i in 0..n {
                task(i);
            }
            return;
        }
        assert!(n <= 0xffff, "{n} tasks in one job");
        let s = &*self.shared;
        // SAFETY: every task of the previous job has finished and none can
        // be claimed, so nothing reads `task` now. The function outlives
        // its use: this function waits for every task before returning.
        unsafe {
            let task: *const (dyn Fn(usize) + Sync + '_) = task;
            let task: Task = std::mem::transmute(task);
            *s.task.get() = Some(task);
        }
        s.done.store(0, Ordering::Relaxed);
        self.generation = self.generation.wrapping_add(1);
        s.word.store(pack(self.generation, n, 0), Ordering::SeqCst);
        for (w, flag) in s.sleeping.iter().enumerate() {
            if flag.load(Ordering::SeqCst) {
                self.workers[w].thread().unpark();
            }
        }
        s.work(self.generation);
        // Every task is claimed; wait for those running on workers.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != n {
            if spins < 1 << 14 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of a pool job panicked");
        }
    }
}

fn worker(s: &Shared, w: usize) {
    let mut seen = 0u32;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = unpack(s.word.load(Ordering::Acquire)).0;
            if g != seen {
                seen = g;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping[w].store(true, Ordering::SeqCst);
            if unpack(s.word.load(Ordering::SeqCst)).0 == seen && !s.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
            s.sleeping[w].store(false, Ordering::SeqCst);
            if s.stop.load(Ordering::Acquire) {
                return;
            }
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        s.work(seen);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in &self.workers {
            h.thread().unpark();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// How many threads per core a pool may have. More threads than cores only take turns on them
/// (each job waits for its slowest task), and thousands of spinning workers on a few cores make no
/// progress at all, so a count far above the machine's is refused rather than run.
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The threads `threads` asks for: itself, or all cores when 0; an error naming the limit when it
/// is more than [`MAX_THREADS_PER_CORE`] times the cores this process may use.
pub fn resolve_threads(threads: usize) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    check_threads(threads, cores)
}

/// Parser of a `--threads N` flag (clap `value_parser`): a positive count within
/// [`resolve_threads`]'s limit, refused when the flag is read rather than after compiling.
pub fn parse_threads_flag(text: &str) -> Result<u16, String> {
    let n: u16 = text
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}` is not a thread count (an integer from 1 to 65535)"))?;
    resolve_threads(usize::from(n))?;
    Ok(n)
}

fn check_threads(threads: usize, cores: usize) -> Result<usize, String> {
    let limit = cores.saturating_mul(MAX_THREADS_PER_CORE);
    match threads {
        0 => Ok(cores),
        n if n > limit => Err(format!(
            "--threads {n} is far more than the {cores} core(s) this process may use: at most {limit} \
             ({MAX_THREADS_PER_CORE} per core) are accepted; more threads than cores only wait for each other"
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_per_job() {
        for threads in 1..=4 {
            let mut pool = Pool::new(threads).unwrap();
            assert_eq!(pool.threads(), threads);
            let counts: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for job in 0..2000 {
                let n = 1 + job % threads;
                pool.run(n, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            let expect: Vec<usize> = (0..threads)
                .map(|i| (0..2000).filter(|job| i < 1 + job % threads).count())
                .collect();
            let got: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            assert_eq!(got, expect, "threads {threads}");
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let mut pool = Pool::new(3).unwrap();
        let sum = AtomicUsize::new(0);
        for _ in 0..3 {
            // Longer than the spin: the workers park in between.
            std::thread::sleep(SPIN * 5);
            pool.run(3, &|i| {
                sum.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(sum.load(Ordering::Relaxed), 3 * 6);
    }

    #[test]
    fn results_written_by_workers_are_visible() {
        let mut pool = Pool::new(2).unwrap();
        let mut data = vec![0u64; 1024];
        for round in 1..200u64 {
            let p = data.as_mut_ptr() as usize;
            pool.run(2, &move |i| {
                for j in i * 512..(i + 1) * 512 {
                    // SAFETY: each task writes its own half.
                    unsafe { *(p as *mut u64).add(j) = round * j as u64 }
                }
            });
            assert!(data.iter().enumerate().all(|(j, &x)| x == round * j as u64));
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller() {
        let mut pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(2, &|i| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works.
        let n = AtomicUsize::new(0);
        pool.run(2, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn zero_threads_means_all_cores() {
        assert!(resolve_threads(0).unwrap() >= 1);
        assert_eq!(resolve_threads(1).unwrap(), 1);
        assert_eq!(check_threads(0, 2), Ok(2));
        assert_eq!(check_threads(8, 2), Ok(8));
        let e = check_threads(10000, 2).unwrap_err();
        assert!(e.contains("--threads 10000") && e.contains("at most 8"), "{e}");
        assert!(check_threads(usize::MAX, usize::MAX).is_ok());
    }
}
