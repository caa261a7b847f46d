//! Timing of the prefill GEMM (`ouroc_runtime::gemm`) per variant against
//! the Cranelift Linear kernel on the Ouro-1.4B Linear shapes, one thread:
//! `cargo run --release -p ouroc-runtime --example gemm_timing [-- OPTIONS]`.
//!
//! Options: `--tokens N` (default 128), `--iters N` (default 3), `--scalar`
//! (also time the portable variant, slow), `--no-cranelift`, `--dtypes
//! bf16,f32,f32w16` (activation/weight pairs: bf16 x bf16, f32 x f32, f32
//! activations with bf16 weights), `--shape N,K` (one shape instead of the
//! model's), `--offset B` (start x, W and y B bytes past a 64-byte
//! boundary; default 0), `--threads N` (also time the best variant with
//! the rows split over N scoped threads, wall time: on a shared machine
//! other processes count).

use ouroc_codegen::cpu::Jit;
use ouroc_ir::DType;
use ouroc_kernels::KernelSpec;
use ouroc_kernels::spec::{Family, LinearSpec};
use ouroc_runtime::gemm::{self, LinearArgs, Variant};

/// (name, n, k) of the 1.4B model's Linears (q/k/v and gate/up merged).
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 6144, 2048),
    ("o_proj", 2048, 2048),
    ("gate_up", 11264, 2048),
    ("down", 2048, 5632),
];

fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v.iter().flat_map(|&x| gemm::bf16_bits(x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// `data` copied to a buffer where it starts `offset` bytes past a 64-byte
/// boundary: (storage, start).
fn place(data: &[u8], offset: usize) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; data.len() + 128];
    let start = v.as_ptr().align_offset(64) + offset;
    v[start..start + data.len()].copy_from_slice(data);
    (v, start)
}

/// Seconds of CPU time this thread has used (Linux: the time it was
/// scheduled, so other processes on a shared machine do not count), or
/// wall time elsewhere.
#[cfg(target_os = "linux")]
fn now() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: a valid clock id and out pointer.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

#[cfg(not(target_os = "linux"))]
fn now() -> f64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
}

/// Best of `iters` timed calls (after one warm-up), in seconds.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let t0 = now();
            f();
            now() - t0
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best of `iters` calls (after one warm-up) in wall-clock seconds.
fn wall(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let tokens: usize = opt("--tokens").map_or(128, |s| s.parse().expect("--tokens N"));
    let offset: usize = opt("--offset").map_or(0, |s| s.parse().expect("--offset B"));
    let iters: usize = opt("--iters").map_or(3, |s| s.parse().expect("--iters N"));
    let scalar = args.iter().any(|a| a == "--scalar");
    let cranelift = !args.iter().any(|a| a == "--no-cranelift");
    let threads: usize = opt("--threads").map_or(1, |s| s.parse().expect("--threads N"));
    let dtypes = opt("--dtypes").unwrap_or_else(|| "bf16,f32,f32w16".into());
    let mut jit = Jit::new().expect("jit");
    println!(
        "host: {}; best gemm variant: {}",
        jit.isa_description(),
        gemm::available()
    );
    println!("tokens = {tokens}, one thread, best of {iters} (thread CPU time); GFLOP/s = 2*tokens*n*k / time");
    for dt in dtypes.split(',') {
        let (act, weight) = match dt {
            "bf16" => (DType::BF16, DType::BF16),
            "f32" => (DType::F32, DType::F32),
            "f32w16" => (DType::F32, DType::BF16),
            other => panic!("unknown --dtypes entry `{other}`"),
        };
        let shapes: Vec<(&str, usize, usize)> = match opt("--shape") {
            Some(s) => {
                let (n, k) = s.split_once(',').expect("--shape N,K");
                vec![("shape", n.parse().expect("N"), k.parse().expect("K"))]
            }
            None => SHAPES.to_vec(),
        };
        for (name, n, k) in shapes {
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0).collect();
            let (mut xv, xo) = place(&encode(&x, act), offset);
            let (mut wv, wo) = place(&encode(&w, weight), offset);
            let (mut yv, yo) = place(&vec![0u8; tokens * n * act.size_bytes()], offset);
            let (xb, wb, y) = (&mut xv[xo..], &mut wv[wo..], &mut yv[yo..]);
            let flop = 2.0 * (tokens * n * k) as f64;
            let mut line = format!("act={act} weight={weight} {name:8} n={n:5} k={k}:");
            for v in Variant::supported_all() {
                if v == Variant::Scalar && !scalar {
                    continue;
                }
                let p = LinearArgs {
                    tokens,
                    n,
                    k,
                    act,
                    weight,
                    x: xb.as_ptr(),
                    x_stride: k,
                    w: wb.as_ptr(),
                    bias: std::ptr::null(),
                    y: y.as_mut_ptr(),
                    y_stride: n,
                };
                // SAFETY: buffers of tokens rows of k (x) and n (y), W whole.
                let s = time(iters, || unsafe { gemm::linear_with(v, &p, 0..n) });
                line += &format!(" {} {:.1}", v.name(), flop / s / 1e9);
            }
            if threads > 1 {
                let p = LinearArgs {
                    tokens,
                    n,
                    k,
                    act,
                    weight,
                    x: xb.as_ptr(),
                    x_stride: k,
                    w: wb.as_ptr(),
                    bias: std::ptr::null(),
                    y: y.as_mut_ptr(),
                    y_stride: n,
                };
                // Cut at multiples of the tile rows.
                let (r, _) = Variant::best().tile(act, weight);
                let cut = |i: usize| (n.div_ceil(r) * i / threads * r).min(n);
                let s = wall(iters, || {
                    std::thread::scope(|sc| {
                        for i in 0..threads {
                            let p = &p;
                            // SAFETY: as above; the threads write disjoint rows.
                            sc.spawn(move || unsafe { gemm::linear(p, cut(i)..cut(i + 1)) });
                        }
                    })
                });
                line += &format!(" {}x{threads}threads {:.1}", gemm::available(), flop / s / 1e9);
            }
            if cranelift {
                let spec = KernelSpec {
                    name: "lin".into(),
                    act,
                    family: Family::Linear(LinearSpec {
                        n,
                        k,
                        weight,
                        bias: false,
                        quant: None,
                    }),
                };
                let id = jit.compile(&spec).expect("compile");
                let f = jit.kernel(id);
                let ptrs = [xb.as_mut_ptr(), wb.as_mut_ptr(), y.as_mut_ptr()];
                // SAFETY: the kernel ABI: one pointer per operand, row strides in elements.
                let s = time(1, || unsafe { f.call(&ptrs, &[k, 0, n], tokens) });
                line += &format!(" cranelift {:.1}", flop / s / 1e9);
            }
            println!("{line} GFLOP/s");
        }
    }
}
