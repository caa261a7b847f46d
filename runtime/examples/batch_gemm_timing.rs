//! What a batch of decode rows costs against one row, with the weights
//! streamed from memory as in a real model (`ouroc_runtime::gemm`):
//! `cargo run --release -p ouroc-runtime --example batch_gemm_timing [-- OPTIONS]`.
//!
//! The four Linears of an Ouro-1.4B layer (bf16), `--layers N` copies of
//! them (default 4, about 380 MB: far more than the last-level cache), run
//! one after the other over every copy, the rows of each split over
//! `--threads N` scoped threads (default 2), as one loop step of the model
//! runs them. Each round times a pass with 1 token and a pass with each of
//! `--tokens LIST` (default 4,8,16), alternating, `--rounds N` (default 5);
//! it prints each round's time per pass and the ratio to one token, then
//! the median ratios. Continuous batching wants the ratio for 8 tokens far
//! below 8 (the weights are read once per pass whatever the tokens). With
//! `--variant NAME` (avx512bf16, avx512f, avx2fma, scalar) the kernels of
//! that variant run instead of the best one.

use ouroc_ir::DType;
use ouroc_runtime::gemm::{self, LinearArgs, Variant};
use std::time::Instant;

/// (n, k) of the 1.4B model's Linears (q/k/v and gate/up merged).
const SHAPES: [(usize, usize); 4] = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let layers: usize = opt("--layers").map_or(4, |s| s.parse().expect("--layers N"));
    let threads: usize = opt("--threads").map_or(2, |s| s.parse().expect("--threads N"));
    let rounds: usize = opt("--rounds").map_or(5, |s| s.parse().expect("--rounds N"));
    let tokens: Vec<usize> = opt("--tokens")
        .unwrap_or_else(|| "4,8,16".into())
        .split(',')
        .map(|s| s.parse().expect("--tokens LIST"))
        .collect();
    let variant = match opt("--variant") {
        None => Variant::best(),
        Some(name) => *Variant::ALL
            .iter()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("unknown --variant {name}")),
    };
    assert!(variant.supported(), "this CPU lacks {}", variant.name());
    let max_t = tokens.iter().copied().max().unwrap_or(1);
    let bf16 = |v: f32| gemm::bf16_bits(v).to_le_bytes();
    // Weights: every copy its own memory, values that differ per copy.
    let weights: Vec<Vec<u8>> = (0..layers)
        .flat_map(|l| SHAPES.iter().map(move |&(n, k)| (l, n, k)))
        .map(|(l, n, k)| {
            (0..n * k)
                .flat_map(|i| bf16((((i + l) * 11 % 17) as f32 - 8.0) / 9.0))
                .collect()
        })
        .collect();
    let kmax = SHAPES.iter().map(|s| s.1).max().unwrap();
    let nmax = SHAPES.iter().map(|s| s.0).max().unwrap();
    let x: Vec<u8> = (0..max_t * kmax)
        .flat_map(|i| bf16(((i * 7 % 13) as f32 - 6.0) / 7.0))
        .collect();
    let mut y = vec![0u8; max_t * nmax * 2];
    let gb: f64 = weights.iter().map(|w| w.len()).sum::<usize>() as f64 / 1e9;
    println!(
        "{layers} layers of the 1.4B Linears ({gb:.2} GB of bf16 weights), {threads} threads, variant {}",
        variant.name()
    );
    let (tile_rows, _) = variant.tile(DType::BF16, DType::BF16);
    let mut pass = |t: usize| {
        let t0 = Instant::now();
        for (i, w) in weights.iter().enumerate() {
            let (n, k) = SHAPES[i % SHAPES.len()];
            let p = LinearArgs {
                tokens: t,
                n,
                k,
                act: DType::BF16,
                weight: DType::BF16,
                x: x.as_ptr(),
                x_stride: k,
                w: w.as_ptr(),
                bias: std::ptr::null(),
                y: y.as_mut_ptr(),
                y_stride: n,
            };
            let cut = |i: usize| (n.div_ceil(tile_rows) * i / threads * tile_rows).min(n);
            std::thread::scope(|sc| {
                for i in 0..threads {
                    let p = &p;
                    // SAFETY: x holds t rows of k, y t rows of n, W n x k;
                    // the threads write disjoint rows of y.
                    sc.spawn(move || unsafe { gemm::linear_with(variant, p, cut(i)..cut(i + 1)) });
                }
            });
        }
        t0.elapsed().as_secs_f64()
    };
    pass(1);
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); tokens.len()];
    for r in 0..rounds {
        let one = pass(1);
        let mut line = format!("round {}: 1 token {:.1} ms ({:.1} GB/s)", r + 1, one * 1e3, gb / one);
        for (j, &t) in tokens.iter().enumerate() {
            let s = pass(t);
            ratios[j].push(s / one);
            line += &format!(", {t} tokens {:.1} ms = {:.2}x", s * 1e3, s / one);
        }
        println!("{line}");
    }
    let mut line = String::from("median time against 1 token:");
    for (j, &t) in tokens.iter().enumerate() {
        let v = &mut ratios[j];
        v.sort_by(f64::total_cmp);
        line += &format!(" {t} tokens {:.2}x", v[v.len() / 2]);
    }
    println!("{line}");
}
