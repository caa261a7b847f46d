//! GPU timing of the generated PTX (feature `cuda`): prefill and decode on
//! a named Ouro shape with random bf16 weights, end to end and per kernel.
//!
//! ```text
//! cargo run --release -p ouroc-runtime --features cuda --example gpu_bench -- \
//!     [--shape 1.4b] [--dir DIR] [--prefill 128] [--decode 64] [--runs 3] \
//!     [--policy last] [--weights dense|q8|q4] [--copy-gbs X] [--mm-tflops Y] [--markdown FILE]
//! ```
//!
//! 1. Writes (or reuses) the random checkpoint of the shape
//!    (`ouroc_models::random`, seed 1, bf16) in `--dir` (default
//!    `$TMPDIR/ouroc-shapes/SHAPE`, shared with `ouroc bench`).
//! 2. Builds the bf16 graph with the exit policy, optimises, lowers, loads
//!    the Program on the GPU (`GpuForward<CudaDevice>`, early exit on);
//!    `--weights q8|q4` quantises its Linears as `ouroc run --weights` does
//!    (the quantised Linears' PTX: dp4a GEMV, int8 mma GEMM).
//! 3. End to end, `--runs` times (median): prefill `--prefill` random ids
//!    (wall clock until the greedy token is back), then `--decode` tokens
//!    greedily (`forward_greedy`: the argmax runs on the device; only the
//!    token comes back).
//! 4. Per kernel: the same prefill and decode once more with every launch
//!    timed by CUDA events, grouped by kernel code and entry; for each
//!    group the bytes it must move (weights, activations, the KV rows it
//!    reads) and its flops from the specs give GB/s and TFLOP/s, and the
//!    fraction of the ceiling that binds it (`--copy-gbs`: a device copy's
//!    bandwidth; `--mm-tflops`: a large bf16 matmul's throughput, both
//!    measured by scripts/gpu-check.sh with torch). A group is
//!    compute-bound when its flops per byte exceed the ceilings' ratio.

use ouroc_compile::{CompileOptions, compile};
use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::Program;
use ouroc_kernels::quant::WeightScheme;
use ouroc_kernels::spec::{Encoding, Family};
use ouroc_models::{Checkpoint, StorageDtype};
use ouroc_runtime::gpu::cuda::CudaDevice;
use ouroc_runtime::gpu::{Gpu, GpuForward, GpuOptions, LaunchRecord};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    shape: String,
    dir: Option<PathBuf>,
    prefill: usize,
    decode: usize,
    runs: usize,
    policy: String,
    weights: WeightScheme,
    copy_gbs: Option<f64>,
    mm_tflops: Option<f64>,
    markdown: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        shape: "1.4b".into(),
        dir: None,
        prefill: 128,
        decode: 64,
        runs: 3,
        policy: "last".into(),
        weights: WeightScheme::Dense,
        copy_gbs: None,
        mm_tflops: None,
        markdown: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--shape" => a.shape = val()?,
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            "--prefill" => a.prefill = num(val()?)? as usize,
            "--decode" => a.decode = num(val()?)? as usize,
            "--runs" => a.runs = (num(val()?)? as usize).max(1),
            "--policy" => a.policy = val()?,
            "--weights" => {
                a.weights = match val()?.as_str() {
                    "dense" => WeightScheme::Dense,
                    "q8" => WeightScheme::Q8,
                    "q4" => WeightScheme::Q4,
                    v => return Err(format!("--weights {v}: dense, q8 or q4")),
                }
            }
            "--copy-gbs" => a.copy_gbs = Some(num(val()?)?),
            "--mm-tflops" => a.mm_tflops = Some(num(val()?)?),
            "--markdown" => a.markdown = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("gpu_bench.rs")
                        .lines()
                        .take(9)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            f => return Err(format!("unknown flag {f} (see --help)")),
        }
    }
    if a.prefill == 0 {
        return Err("--prefill must be at least 1".into());
    }
    Ok(a)
}

fn checkpoint(shape: &str, dir: Option<PathBuf>) -> Result<PathBuf, String> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("ouroc-shapes").join(shape));
    const SEED: u64 = 1;
    if ouroc_models::random::is_current(&dir, shape, StorageDtype::BF16, SEED) {
        eprintln!("using the random {shape} checkpoint in {}", dir.display());
        return Ok(dir);
    }
    eprintln!("writing a random {shape} checkpoint (bf16) to {}", dir.display());
    ouroc_models::random::write_random_checkpoint(shape, &dir, StorageDtype::BF16, SEED, &mut |_, _| {})?;
    Ok(dir)
}

fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes a launch must move and the flops it does, from its spec.
fn cost(p: &Program, r: &LaunchRecord) -> (f64, f64) {
    let Some(k) = p.kernel(&r.kernel) else {
        return match r.kernel.as_str() {
            "argmax" => {
                let v = p.outputs[0].len as f64;
                (v * 2.0 * r.tokens as f64, 0.0)
            }
            _ => (0.0, 0.0),
        };
    };
    let a = k.spec.act.size_bytes() as f64;
    let t = r.tokens as f64;
    let (seq, past) = (r.seq as f64, r.past as f64);
    let suffix = r.entry.rsplit('_').next().unwrap_or("");
    match &k.spec.family {
        Family::Linear(l) => {
            let (n, kk, w) = (l.n as f64, l.k as f64, l.weight.size_bytes() as f64);
            let bias = if l.bias { n * w } else { 0.0 };
            // A quantised Linear reads its encoded bytes (quants and scales).
            let matrix = match l.quant {
                Some(q) => Encoding::Quant(q).bytes(&[l.n, l.k]).unwrap_or(0) as f64,
                None => n * kk * w,
            };
            (matrix + bias + t * (kk + n) * a, 2.0 * t * n * kk)
        }
        Family::Attention(at) => {
            let (h, kvh, hd) = (at.heads as f64, at.kv_heads as f64, at.head_dim as f64);
            let batch = (t / seq.max(1.0)).max(1.0);
            let len = past + seq;
            match suffix {
                "append" => (
                    t * kvh * hd * a * 4.0 + if at.rope { 2.0 * t * hd * a } else { 0.0 },
                    0.0,
                ),
                // One K (scores) or V (pv) store read, the query / output.
                "scores" | "pv" => (batch * (len * kvh * hd * a + h * hd * a), 2.0 * batch * h * hd * len),
                "combine" => (batch * h * hd * (4.0 * 8.0 + a), 0.0),
                // q, K and V of every position, out; causal flops.
                _ => {
                    let pairs = batch * (seq * past + seq * (seq + 1.0) / 2.0);
                    (
                        t * 2.0 * h * hd * a + batch * 2.0 * len * kvh * hd * a,
                        4.0 * h * hd * pairs,
                    )
                }
            }
        }
        f => {
            let acts: f64 = k
                .inputs
                .iter()
                .map(|o| match o {
                    ouroc_kernels::Operand::Act(r) => r.len as f64,
                    ouroc_kernels::Operand::Weight(_) => 0.0,
                })
                .sum();
            let weights: f64 = k
                .inputs
                .iter()
                .filter_map(|o| match o {
                    ouroc_kernels::Operand::Weight(w) => p.weight(*w),
                    _ => None,
                })
                .map(|w| match f {
                    Family::Gather(g) => t * g.width as f64 * w.dtype.size_bytes() as f64,
                    _ => w.shape.iter().product::<usize>() as f64 * a,
                })
                .sum();
            let results: f64 = f.result_widths().iter().map(|&x| x as f64).sum();
            (t * (acts + results) * a + weights, 0.0)
        }
    }
}

#[derive(Default)]
struct Group {
    calls: usize,
    seconds: f64,
    bytes: f64,
    flops: f64,
}

/// The kernel's code (`linear<bf16> {n = 6144, k = 2048, weight = bf16}`,
/// attention without its layer) and, for multi-entry families, the entry.
fn label(p: &Program, r: &LaunchRecord) -> String {
    let suffix = r.entry.rsplit('_').next().unwrap_or("");
    match p.kernel(&r.kernel) {
        Some(k) if matches!(k.spec.family, Family::Linear(_) | Family::Attention(_)) => {
            format!("{} [{suffix}]", k.spec.code_key())
        }
        Some(k) => k.spec.code_key(),
        None => r.kernel.clone(),
    }
}

fn table(title: &str, p: &Program, recs: &[LaunchRecord], args: &Args, wall: f64) -> String {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for r in recs {
        let (b, f) = cost(p, r);
        let g = groups.entry(label(p, r)).or_default();
        g.calls += 1;
        g.seconds += r.seconds;
        g.bytes += b;
        g.flops += f;
    }
    let total: f64 = groups.values().map(|g| g.seconds).sum();
    let mut rows: Vec<(&String, &Group)> = groups.iter().collect();
    rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let ridge = match (args.copy_gbs, args.mm_tflops) {
        (Some(bw), Some(fl)) => Some(fl * 1e12 / (bw * 1e9)),
        _ => None,
    };
    let mut out = format!(
        "\n### {title}\n\nkernel time {:.3} ms over {} launches; wall {:.3} ms (the rest: launch gaps, \
         per-step exit reads, copies)\n\n| kernel | calls | total ms | share | avg us | GB/s | TFLOP/s | of peak |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        total * 1e3,
        recs.len(),
        wall * 1e3
    );
    for (name, g) in rows {
        let gbs = g.bytes / g.seconds / 1e9;
        let tfs = g.flops / g.seconds / 1e12;
        let compute = ridge.is_some_and(|r| g.bytes > 0.0 && g.flops / g.bytes > r);
        let peak = if compute {
            args.mm_tflops.map(|p| format!("{:.0}% of bf16 mma", 100.0 * tfs / p))
        } else {
            args.copy_gbs
                .filter(|_| g.bytes > 0.0)
                .map(|p| format!("{:.0}% of copy", 100.0 * gbs / p))
        };
        out.push_str(&format!(
            "| `{name}` | {} | {:.3} | {:.1}% | {:.1} | {} | {} | {} |\n",
            g.calls,
            g.seconds * 1e3,
            100.0 * g.seconds / total.max(1e-12),
            g.seconds / g.calls as f64 * 1e6,
            if g.bytes > 0.0 { format!("{gbs:.0}") } else { "-".into() },
            if g.flops > 0.0 { format!("{tfs:.2}") } else { "-".into() },
            peak.unwrap_or_else(|| "-".into())
        ));
    }
    out
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // The device first: no multi-GB checkpoint written for nothing.
    let dev = CudaDevice::new().map_err(|e| e.to_string())?;
    let dir = checkpoint(&args.shape, args.dir.clone())?;
    let ckpt = Checkpoint::open(&dir).map_err(|e| e.to_string())?;
    let positions = args.prefill + args.decode + 1;
    let opts = CompileOptions::reference(&ckpt, DType::BF16).with_policy(ExitPolicy::parse(&args.policy)?);
    let t0 = Instant::now();
    let mut program = compile(&ckpt, &opts).map_err(|e| e.to_string())?.program;
    args.weights.apply(&mut program);
    let device = dev.name();
    let gopts = GpuOptions {
        max_positions: positions,
        early_exit: true,
        kv_positions: positions,
        ..GpuOptions::new(positions)
    };
    let mut m = GpuForward::new(program, &ckpt, dev, gopts).map_err(|e| e.to_string())?;
    let setup = t0.elapsed().as_secs_f64();
    eprintln!(
        "{device}: {} shape, {} weights, {:.2} GB of weights and {:.2} GB of KV cache on the device (setup {setup:.1} s)",
        args.shape,
        args.weights.name(),
        m.weight_bytes() as f64 / 1e9,
        m.kv_reserved_bytes() as f64 / 1e9
    );
    let ids = random_ids(args.prefill, ckpt.config.vocab_size);
    let err = |e: ouroc_runtime::gpu::GpuError| e.to_string();
    // Warm up (module JIT, caches), then the timed runs.
    m.forward_greedy(&ids[..args.prefill.min(16)]).map_err(err)?;
    m.reset();
    let (mut pre, mut dec, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        m.reset();
        let t = Instant::now();
        let (mut next, _, _) = m.forward_greedy(&ids).map_err(err)?;
        pre.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut run_steps = 0;
        for _ in 0..args.decode {
            let (tok, _, s) = m.forward_greedy(&[next]).map_err(err)?;
            next = tok;
            run_steps += s;
        }
        dec.push(t.elapsed().as_secs_f64());
        steps.push(run_steps as f64 / args.decode.max(1) as f64);
    }
    let (pre, dec) = (median(pre), median(dec));
    // Per kernel.
    m.reset();
    m.set_profiling(true);
    let t = Instant::now();
    let (mut next, _, _) = m.forward_greedy(&ids).map_err(err)?;
    let pre_wall = t.elapsed().as_secs_f64();
    let pre_recs = m.take_profile();
    let t = Instant::now();
    for _ in 0..args.decode {
        next = m.forward_greedy(&[next]).map_err(err)?.0;
    }
    let dec_wall = t.elapsed().as_secs_f64();
    let dec_recs = m.take_profile();
    m.device_mut().synchronize().map_err(err)?;
    let p = m.program().clone();
    let mut report = format!(
        "## GPU: {device}\n\n`{}` shape, bf16 random weights (`--weights {}`), policy `{}`, early exit on; PTX of `ouroc_codegen::ptx` \
         (sm_80) on `GpuForward<CudaDevice>`.\n\n\
         | phase | tokens | median time | tokens/s |\n|---|---:|---:|---:|\n\
         | prefill | {} | {:.1} ms | {:.0} |\n| decode (greedy on device, {:.2} loop steps/token) | {} | {:.1} ms | {:.1} |\n",
        args.shape,
        args.weights.name(),
        args.policy,
        args.prefill,
        pre * 1e3,
        args.prefill as f64 / pre,
        median(steps),
        args.decode,
        dec * 1e3,
        args.decode as f64 / dec.max(1e-12)
    );
    if let (Some(bw), Some(fl)) = (args.copy_gbs, args.mm_tflops) {
        report.push_str(&format!(
            "\nCeilings measured on this device: device copy {bw:.0} GB/s, bf16 matmul {fl:.1} TFLOP/s.\n"
        ));
    }
    report.push_str(&table(
        &format!(
            "Prefill of {} tokens, per kernel (each launch timed alone)",
            args.prefill
        ),
        &p,
        &pre_recs,
        &args,
        pre_wall,
    ));
    report.push_str(&table(
        &format!("Decode of {} tokens, per kernel (each launch timed alone)", args.decode),
        &p,
        &dec_recs,
        &args,
        dec_wall,
    ));
    println!("{report}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
