//! A one-off timing printout of the Linear kernel against a plain Rust
//! loop (speed belongs in benchmarks, not tests):
//! `cargo run --release -p ouroc-codegen --example linear_timing [N K [ACT]]`
//! (default 2048 2048 f32; ACT f32 or bf16, the activation dtype).

use ouroc_codegen::cpu::Jit;
use ouroc_ir::DType;
use ouroc_kernels::KernelSpec;
use ouroc_kernels::spec::{Family, LinearSpec};
use std::time::Instant;

fn main() {
    let arg = |i: usize, d: &str| std::env::args().nth(i).unwrap_or_else(|| d.to_string());
    let (n, k): (usize, usize) = (arg(1, "2048").parse().unwrap(), arg(2, "2048").parse().unwrap());
    let act = DType::parse(&arg(3, "f32")).expect("f32 or bf16");
    let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0).collect();
    let mut jit = Jit::new().unwrap();
    println!("host: {}", jit.isa_description());
    for weight in [DType::F32, DType::BF16] {
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
        let id = jit.compile(&spec).unwrap();
        let f = jit.kernel(id);
        let mut xb: Vec<u8> = match act {
            DType::BF16 => x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let mut wb: Vec<u8> = match weight {
            DType::BF16 => w
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            _ => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let mut y = vec![0u8; n * 4];
        let null = std::ptr::null_mut();
        let ptrs = [xb.as_mut_ptr(), wb.as_mut_ptr(), y.as_mut_ptr(), null, null];
        let iters = 50;
        // SAFETY: buffers of one row each, weights whole.
        unsafe { f.call(&ptrs, &[k, 0, n, 0, n], 1) };
        let t0 = Instant::now();
        for _ in 0..iters {
            unsafe { f.call(&ptrs, &[k, 0, n, 0, n], 1) };
        }
        let jit_us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
        let wf: Vec<f32> = w.iter().map(|&v| weight.round(v)).collect();
        let mut yr = vec![0f32; n];
        let t0 = Instant::now();
        for _ in 0..iters {
            for (o, out) in yr.iter_mut().enumerate() {
                *out = x.iter().zip(&wf[o * k..(o + 1) * k]).map(|(a, b)| a * b).sum();
            }
            std::hint::black_box(&mut yr);
        }
        let ref_us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
        let gbs = (n * k * weight.size_bytes()) as f64 / jit_us / 1e3;
        println!(
            "linear n={n} k={k} act={act} weight={weight}, 1 token: cranelift {jit_us:.0} us ({gbs:.1} GB/s of weights), \
             plain Rust loop (f32 weights, scalar, as built) {ref_us:.0} us"
        );
    }
}
