//! Quantised weights (`--weights q8|q4`) on the GPU path: whole fixture
//! models run by `GpuForward<EmuDevice>` (the quantised Linears' PTX:
//! `dp4a` GEMV for decode, int8 `mma` GEMM for prefill; the weights
//! uploaded as the bytes the CPU reads) against the reference device
//! running the same quantised Program (`ouroc_kernels::exec`, the
//! arithmetic of `ouroc_kernels::quant`).
//!
//! Each case prefills 7 tokens (the GEMV entries), then decodes greedily
//! 3 tokens, one per call through the KV cache, both sides feeding the
//! token they chose: the chosen tokens and exit depths must be equal and
//! the logits close. The quantised Linears return the reference's bits;
//! the other kernels reorder f32 sums (see gpu_emu.rs), so f32 logits
//! within 1e-4 of their largest value, bf16 within 2e-2 (a bf16 rounding
//! can flip by one unit and propagate). A 40-token prefill runs the GEMM
//! entries.

mod gpu_common;

use gpu_common::*;
use ouroc_driver::host::{ExecOptions, Executor};
use ouroc_ir::DType;
use ouroc_kernels::Program;
use ouroc_kernels::quant::WeightScheme;
use ouroc_models::Checkpoint;
use ouroc_runtime::generate::Forward;
use ouroc_runtime::gpu::{EmuDevice, GpuForward, GpuOptions};

fn quantised(mut p: Program, scheme: WeightScheme) -> Program {
    assert!(scheme.apply(&mut p) > 0, "no Linear quantised");
    p
}

fn emu(p: Program, ckpt: &Checkpoint) -> GpuForward<EmuDevice> {
    GpuForward::emulated(p, ckpt, GpuOptions::new(64)).expect("gpu forward on the emulator")
}

/// The index of the first maximum (the greedy token).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The reference's last-position logits and exit depth of one call.
fn reference_call(exec: &mut Executor, ids: &[u32]) -> (Vec<f32>, usize) {
    let out = exec.run_tokens(&[ids.to_vec()]).unwrap();
    let t = &out.outputs[0];
    let v = t.shape[2];
    (
        t.data[t.data.len() - v..].to_vec(),
        out.exit_steps.last().map_or(0, |s| s + 1),
    )
}

/// Prefill `prompt`, then `decode` greedy tokens, on the emulator and the
/// reference; checks each call.
fn check(what: &str, p: Program, ckpt: &Checkpoint, prompt: &[u32], decode: usize, tol: f32) {
    let mut exec = Executor::new(&p, ckpt, ExecOptions::default()).unwrap();
    let mut gpu = emu(p, ckpt);
    let mut call = prompt.to_vec();
    for i in 0..=decode {
        let s = gpu.forward(&call).unwrap_or_else(|e| panic!("{what} call {i}: {e}"));
        let (want, depth) = reference_call(&mut exec, &call);
        let e = rel_err(&s.logits, &want);
        assert!(e <= tol, "{what} call {i}: logits relative error {e}");
        assert_eq!(s.depth, depth, "{what} call {i}: exit depth");
        let tok = argmax(&want);
        assert_eq!(argmax(&s.logits), tok, "{what} call {i}: greedy token");
        call = vec![tok];
    }
}

fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 777) % vocab as u64) as u32)
        .collect()
}

#[test]
fn quantised_fixtures_decode_like_the_reference_in_f32() {
    for name in ["mha-r4", "gqa-hd", "tied"] {
        let ckpt = open(name);
        let pol = if ckpt.config.total_ut_steps > 1 {
            "threshold:0.5"
        } else {
            "last"
        };
        let ids = prompt(ckpt.config.vocab_size, 7);
        for scheme in [WeightScheme::Q8, WeightScheme::Q4] {
            let p = quantised(program(&ckpt, DType::F32, pol), scheme);
            check(&format!("{name} f32 {pol} {}", scheme.name()), p, &ckpt, &ids, 3, 1e-4);
        }
    }
}

#[test]
fn quantised_fixture_decodes_like_the_reference_in_bf16() {
    let ckpt = open("mha-r4");
    let ids = prompt(ckpt.config.vocab_size, 7);
    for (scheme, pol) in [(WeightScheme::Q8, "threshold:1.0:bf16"), (WeightScheme::Q4, "step:1")] {
        let p = quantised(program(&ckpt, DType::BF16, pol), scheme);
        check(&format!("mha-r4 bf16 {pol} {}", scheme.name()), p, &ckpt, &ids, 3, 2e-2);
    }
}

/// 40 tokens in one call: the quantised Linears' GEMM entries
/// (`mma.m16n8k32`) run, no GEMV, and the logits match the reference.
#[test]
fn quantised_prefill_runs_the_int8_tensor_core_entries() {
    let ckpt = open("mha-r4");
    let ids = prompt(ckpt.config.vocab_size, 40);
    for (scheme, dtype, tol) in [
        (WeightScheme::Q4, DType::BF16, 2e-2),
        (WeightScheme::Q8, DType::F32, 1e-4),
    ] {
        let what = format!("mha-r4 {dtype} {} prefill", scheme.name());
        let p = quantised(program(&ckpt, dtype, "last"), scheme);
        let mut exec = Executor::new(&p, &ckpt, ExecOptions::default()).unwrap();
        let (want, depth) = reference_call(&mut exec, &ids);
        let mut m = emu(p, &ckpt);
        m.set_profiling(true);
        let s = m.forward(&ids).unwrap();
        let entries: Vec<String> = m.take_profile().into_iter().map(|r| r.entry).collect();
        for lin in ["qkv", "o", "gate_up", "down"] {
            assert!(
                entries.iter().any(|e| e.ends_with(&format!("_{lin}_gemm"))),
                "{what}: the {lin} GEMM ran: {entries:?}"
            );
        }
        assert!(
            !entries.iter().any(|e| e.ends_with("_gemv")),
            "{what}: no GEMV at 40 tokens"
        );
        let e = rel_err(&s.logits, &want);
        assert!(e <= tol, "{what}: logits relative error {e}");
        assert_eq!(s.depth, depth, "{what}: exit depth");
    }
}

/// The device uploads the quantised bytes as they are: the weight bytes it
/// holds are the Program's quantised sizes (fewer than the dense model's).
#[test]
fn the_device_holds_the_quantised_bytes() {
    let ckpt = open("mha-r4");
    let dense = emu(program(&ckpt, DType::BF16, "last"), &ckpt).weight_bytes();
    let q4 = emu(quantised(program(&ckpt, DType::BF16, "last"), WeightScheme::Q4), &ckpt).weight_bytes();
    let q8 = emu(quantised(program(&ckpt, DType::BF16, "last"), WeightScheme::Q8), &ckpt).weight_bytes();
    assert!(q4 < q8 && q8 < dense, "q4 {q4}, q8 {q8}, dense {dense}");
}
