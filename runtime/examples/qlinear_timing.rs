//! `cargo run --release -p ouroc-runtime --example qlinear_timing [N K TOKENS]`:
//! times the quantised Linear (`ouroc_runtime::qlinear`) per variant and
//! format on one thread, as weight bytes read per second (decode) and
//! GFLOP/s (prefill), beside the dense bf16 microkernel on the same shape.

use ouroc_ir::DType;
use ouroc_kernels::quant::{self, QuantFormat};
use ouroc_runtime::gemm::{self, LinearArgs};
use ouroc_runtime::qlinear::{QLinearArgs, QVariant, QuantRows, qlinear_with};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("N K TOKENS"))
        .collect();
    let (n, k, tokens) = match a.as_slice() {
        [n, k, t] => (*n, *k, *t),
        _ => (2048, 5632, 1),
    };
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let x: Vec<f32> = (0..tokens * k)
        .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
        .collect();
    let xb = ouroc_driver::codec::encode(&x, DType::BF16);
    let mut y = vec![0u8; tokens * n * 2];
    let reps = (2_000_000_000 / (n * k * tokens).max(1)).clamp(3, 200);
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    let report = |what: &str, s: f64, bytes: usize| {
        let flops = 2.0 * (n * k * tokens) as f64;
        println!(
            "{what:<22} {:>9.3} ms  {:>7.2} GB/s weights  {:>7.1} GFLOP/s",
            s * 1e3,
            bytes as f64 / s / 1e9,
            flops / s / 1e9
        );
    };
    println!("n = {n}, k = {k}, tokens = {tokens}, one thread, {reps} repetitions");
    let wb = ouroc_driver::codec::encode(&w, DType::BF16);
    let p = LinearArgs {
        tokens,
        n,
        k,
        act: DType::BF16,
        weight: DType::BF16,
        x: xb.as_ptr(),
        x_stride: k,
        w: wb.as_ptr(),
        bias: std::ptr::null(),
        y: y.as_mut_ptr(),
        y_stride: n,
    };
    // SAFETY: the buffers have the shapes above.
    let s = time(&mut || unsafe { gemm::linear(&p, 0..n) });
    report("bf16 dense", s, wb.len());
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        let wq = quant::quantise(format, &w, n, k).expect("finite weights");
        let mut rows = QuantRows::default();
        for v in QVariant::ALL.into_iter().filter(|v| v.supported()) {
            let s = time(&mut || {
                // SAFETY: as above.
                unsafe { rows.fill(xb.as_ptr(), DType::BF16, k, tokens, k) };
                let p = QLinearArgs {
                    tokens,
                    n,
                    k,
                    format,
                    x: &rows,
                    w: wq.as_ptr(),
                    bias: std::ptr::null(),
                    bias_dtype: DType::F32,
                    act: DType::BF16,
                    y: y.as_mut_ptr(),
                    y_stride: n,
                };
                // SAFETY: as above.
                unsafe { qlinear_with(v, &p, 0..quant::tiles(n)) }
            });
            report(&format!("{format} {}", v.name()), s, wq.len());
        }
    }
}
