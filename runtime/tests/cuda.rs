//! The CUDA device (feature `cuda`). On a machine without the CUDA driver
//! (CI, developers' machines) `CudaDevice::new` must fail with the clear
//! "no CUDA driver found" error, never a panic. On a machine with an NVIDIA
//! GPU (scripts/gpu-check.sh) every fixture runs through
//! `GpuForward<CudaDevice>` against the golden outputs, with the
//! tolerances of gpu_emu.rs (the hardware's `ex2.approx` and `mma` are
//! within the bounds argued there), plus decode, early exit and the
//! tensor-core GEMM path against the reference executor.
//!
//! `OUROC_REQUIRE_CUDA=1` (set by scripts/gpu-check.sh) turns a missing GPU
//! into a failure instead of the error-path check.
#![cfg(feature = "cuda")]

mod gpu_common;

use gpu_common::*;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::DType;
use ouroc_runtime::gpu::cuda::{CudaDevice, NO_DRIVER, driver_present};
use ouroc_runtime::gpu::{Gpu, GpuError, GpuForward, GpuOptions};

fn require_gpu() -> bool {
    std::env::var("OUROC_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// A CUDA device, or None after checking the error is the clear one.
fn device() -> Option<CudaDevice> {
    match CudaDevice::new() {
        Ok(d) => Some(d),
        Err(GpuError::NoDevice(msg)) => {
            assert!(!require_gpu(), "OUROC_REQUIRE_CUDA=1 but: {msg}");
            if driver_present() {
                assert!(msg.starts_with("no CUDA device"), "{msg}");
            } else {
                assert_eq!(msg, NO_DRIVER);
            }
            eprintln!("skipping the GPU checks: {msg}");
            None
        }
        Err(e) => panic!("CudaDevice::new failed with an unexpected error: {e}"),
    }
}

#[test]
fn missing_driver_is_a_clear_error_not_a_panic() {
    let r = std::panic::catch_unwind(CudaDevice::new);
    let r = r.expect("CudaDevice::new must not panic");
    match r {
        Ok(dev) => {
            assert!(driver_present());
            eprintln!("CUDA device: {}", dev.name());
        }
        Err(GpuError::NoDevice(msg)) if !driver_present() => {
            assert_eq!(msg, "no CUDA driver found (libcuda.so could not be loaded)");
            // The error reaches a caller of GpuForward unchanged.
            assert_eq!(GpuError::NoDevice(msg).to_string(), NO_DRIVER);
        }
        Err(GpuError::NoDevice(msg)) => assert!(msg.starts_with("no CUDA device"), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    if require_gpu() {
        assert!(CudaDevice::new().is_ok(), "OUROC_REQUIRE_CUDA=1 but no CUDA device");
    }
}

#[test]
fn every_fixture_on_cuda_matches_golden() {
    let Some(_) = device() else { return };
    for name in FIXTURES {
        let ckpt = open(name);
        let golden = Golden::load(name);
        let prompt = golden.prompt();
        let pol = if ckpt.config.total_ut_steps > 1 {
            "threshold:0.5"
        } else {
            "last"
        };
        for (prec, p) in [
            ("f32", program(&ckpt, DType::F32, pol)),
            ("bf16", program_unfused(&ckpt, DType::BF16, pol)),
        ] {
            let steps = loop_steps(&p);
            for decode in [false, true] {
                let dev = device().expect("a device");
                let mut m = GpuForward::new(p.clone(), &ckpt, dev, GpuOptions::new(64)).expect("load on the GPU");
                let t = trace_all(&mut m, &prompt, decode);
                let ctx = format!("cuda {name} {prec} {pol} decode={decode}");
                check_golden(&ctx, &golden, prec, pol, steps, &t);
                assert!(t.logits.iter().all(|x| x.is_finite()), "{ctx}: finite logits");
            }
        }
    }
}

#[test]
fn every_policy_early_exit_and_gemm_on_cuda() {
    let Some(_) = device() else { return };
    let ckpt = open("mha-r4");
    let golden = Golden::load("mha-r4");
    let prompt = golden.prompt();
    for pol in &golden.policies {
        let p = program(&ckpt, DType::F32, pol);
        let steps = loop_steps(&p);
        let mut m = GpuForward::new(p, &ckpt, device().unwrap(), GpuOptions::new(64)).unwrap();
        let t = trace_all(&mut m, &prompt, false);
        check_golden(&format!("cuda mha-r4 f32 {pol}"), &golden, "f32", pol, steps, &t);
    }
    // Early exit in decode against the executor's exit_skips.
    let p = program(&ckpt, DType::F32, "threshold:0.5");
    let mut exec = Executor::new(
        &p,
        &ckpt,
        ExecOptions {
            round_low_precision: true,
            exit_skips: true,
            ..ExecOptions::default()
        },
    )
    .unwrap();
    let opts = GpuOptions {
        early_exit: true,
        ..GpuOptions::new(64)
    };
    let mut m = GpuForward::new(p.clone(), &ckpt, device().unwrap(), opts).unwrap();
    let mut ids = prompt.clone();
    ids.extend([17, 5, 200, 31, 9, 250]);
    let mut skipped = 0;
    for (i, call) in std::iter::once(&ids[..8]).chain(ids[8..].chunks(1)).enumerate() {
        let want = exec.run_tokens(&[call.to_vec()]).unwrap();
        let (step, got) = m.run_traced(call).unwrap();
        let e = rel_err(&got.logits, &want.outputs[0].data);
        assert!(e <= 1e-4, "call {i}: relative error {e}");
        assert_eq!(got.exit_steps, want.exit_steps, "call {i}");
        assert_eq!(step.steps_run, want.steps_run, "call {i}");
        skipped += (call.len() == 1 && step.steps_run < 4) as usize;
    }
    assert!(skipped > 0, "no decode call exited early");
    // The tensor-core GEMM path (bf16, 40 tokens) against the executor.
    let p = program(&ckpt, DType::BF16, "last");
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 288).collect();
    let want = Executor::new(&p, &ckpt, ExecOptions::default())
        .unwrap()
        .run_tokens(std::slice::from_ref(&ids))
        .unwrap();
    let mut m = GpuForward::new(p, &ckpt, device().unwrap(), GpuOptions::new(64)).unwrap();
    m.set_profiling(true);
    let (_, t) = m.run_traced(&ids).unwrap();
    let prof = m.take_profile();
    assert!(prof.iter().any(|r| r.entry.ends_with("_gemm")), "GEMM ran");
    assert!(prof.iter().all(|r| r.seconds > 0.0), "every launch timed");
    let e = rel_err(&t.logits, &want.outputs[0].data);
    assert!(e <= 1e-2, "GEMM prefill: relative error {e}");
    // Device argmax.
    let host = {
        let row = &t.logits[39 * 288..];
        (0..288).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32
    };
    assert_eq!(m.greedy_next().unwrap(), host);
}

/// Every KV mode of the driver (`full`, `last`, `mean`) on the GPU, with
/// early exit, against the CPU device token for token: both decode the
/// CPU's greedy tokens; the same logits within f32 rounding, exit depths,
/// loop steps run and KV bytes (gpu_emu.rs checks the same on the emulator).
#[test]
fn every_kv_mode_on_cuda_matches_the_cpu_device() {
    use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
    let Some(_) = device() else { return };
    let ckpt = open("mha-r4");
    let prompt = Golden::load("mha-r4").prompt();
    for kv in KvMode::ALL {
        for policy in ["last", "threshold:0.5"] {
            let p = program(&ckpt, DType::F32, policy);
            let mut g = GpuOptions::new(64);
            (g.early_exit, g.kv) = (true, kv);
            let mut gpu = GpuForward::new(p.clone(), &ckpt, device().unwrap(), g).expect("load on the GPU");
            let c = CpuOptions {
                early_exit: true,
                kv,
                threads: 1,
                ..CpuOptions::new(64)
            };
            let mut cpu = CpuForward::with_options(p, &ckpt, &c).unwrap();
            let (mut a, mut b) = (gpu.run(&prompt).unwrap(), cpu.run(&prompt).unwrap());
            for i in 0..8 {
                let ctx = format!("cuda kv {kv} {policy} token {i}");
                let e = rel_err(&a.logits, &b.logits);
                assert!(e <= 1e-4, "{ctx}: logits relative error {e}");
                assert_eq!((a.depth, a.steps_run), (b.depth, b.steps_run), "{ctx}: depth, steps");
                let next = argmax(&b.logits);
                (a, b) = (gpu.run(&[next]).unwrap(), cpu.run(&[next]).unwrap());
            }
            assert_eq!(gpu.kv_bytes(), cpu.kv_bytes(), "cuda kv {kv} {policy}: KV bytes");
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32
}
