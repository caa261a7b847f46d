//! The quantised Linear's PTX (`q8_0`, `q4_0`) on the PTX emulator against
//! the reference (`ouroc_kernels::quant::linear`, then the one rounding to
//! the activation dtype): both entries (the `dp4a` GEMV below
//! `GEMM_MIN_TOKENS` tokens, the int8 `mma` GEMM from there) on awkward
//! shapes (k not a multiple of 32, n not a multiple of 16 or of the GEMM's
//! 128 columns, several CTA rows of 64 tokens), with and without bias, f32
//! and bf16 activations and both weight dtypes of the bias, padded row
//! strides (the padding must stay untouched).
//!
//! The kernels compute the reference's operations in the reference's order
//! (activation quantisation with IEEE `div.rn` / `rcp.rn` / `cvt.rni`,
//! exact integer block sums, `(d_w * d_x) * isum` added block after block
//! from +0.0, then the bias, then one rounding), so results must be equal
//! bit for bit; NaN activations must give NaN where the reference does.

use ouroc_codegen::ptx::{self, ParamRole};
use ouroc_ir::DType;
use ouroc_kernels::KernelSpec;
use ouroc_kernels::quant::{self, QuantFormat};
use ouroc_kernels::spec::{Family, LinearSpec};
use ouroc_ptx_emu::{LaunchDims, Memory, Module, Param};

struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn decode(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => b
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// Run the quantised Linear on `tokens` rows of `x` (each row padded by
/// `pad` NaNs) and return y, checking y's padding is untouched; also the
/// entries that ran.
#[allow(clippy::too_many_arguments)]
fn run(
    format: QuantFormat,
    act: DType,
    weight: DType,
    x: &[f32],
    wq: &[u8],
    bias: Option<&[f32]>,
    (n, k, tokens, pad): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<String>) {
    let spec = KernelSpec {
        name: "q".into(),
        act,
        family: Family::Linear(LinearSpec {
            n,
            k,
            weight,
            bias: bias.is_some(),
            quant: Some(format),
        }),
    };
    let kernel = ptx::emit(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let module = Module::parse(&kernel.text).unwrap_or_else(|e| panic!("{spec}: the emulator rejects the PTX: {e}"));
    let mut mem = Memory::new();
    let rows = |mem: &mut Memory, v: &[f32], w: usize| -> (u64, usize) {
        let stride = w + pad;
        let mut all = vec![f32::NAN; tokens * stride];
        for t in 0..tokens {
            all[t * stride..t * stride + w].copy_from_slice(&v[t * w..(t + 1) * w]);
        }
        (mem.alloc_bytes(&encode(&all, act)), stride)
    };
    let (xa, xs) = rows(&mut mem, x, k);
    let wa = mem.alloc_bytes(wq);
    let ba = bias.map(|b| mem.alloc_bytes(&encode(b, weight)));
    let (ya, ys) = rows(&mut mem, &vec![f32::NAN; tokens * n], n);
    let params: Vec<Param> = kernel
        .abi
        .params
        .iter()
        .map(|p| match p.role {
            ParamRole::Operand(0) => Param::Ptr(xa),
            ParamRole::Operand(1) => Param::Ptr(wa),
            ParamRole::Operand(_) => Param::Ptr(ba.expect("a bias operand")),
            ParamRole::Result(_) => Param::Ptr(ya),
            ParamRole::OperandStride(_) => Param::U32(xs as u32),
            ParamRole::ResultStride(_) => Param::U32(ys as u32),
            ParamRole::Tokens => Param::U32(tokens as u32),
            other => panic!("unexpected parameter {other:?}"),
        })
        .collect();
    let mut ran = Vec::new();
    for e in &kernel.abi.entries {
        if !e.when.holds(tokens as u32, tokens as u32) {
            continue;
        }
        let g = e.launch.grid(tokens as u32, tokens as u32);
        let dims = LaunchDims {
            grid: (g[0], g[1], g[2]),
            block: (e.launch.block, 1, 1),
            shared_bytes: e.launch.shared_bytes,
        };
        module
            .launch(&e.entry, dims, &params, &mut mem)
            .unwrap_or_else(|err| panic!("{}: {err}", e.entry));
        ran.push(e.entry.clone());
    }
    let all = decode(&mem.read_bytes(ya, tokens * ys * act.size_bytes()).unwrap(), act);
    let mut y = Vec::new();
    for t in 0..tokens {
        let row = &all[t * ys..(t + 1) * ys];
        assert!(row[n..].iter().all(|v| v.is_nan()), "row {t}'s padding was written");
        y.extend_from_slice(&row[..n]);
    }
    (y, ran)
}

/// The reference: `quant::linear` (bias added), rounded to `act`.
fn reference(
    format: QuantFormat,
    act: DType,
    x: &[f32],
    wq: &[u8],
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
) -> Vec<f32> {
    quant::linear(format, x, wq, bias, n, k)
        .into_iter()
        .map(|v| act.round(v))
        .collect()
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(same, "{what}: element {i}: got {g}, want {w}");
    }
}

#[allow(clippy::too_many_arguments)] // the shape of one case, spelled out at each call
fn check(
    format: QuantFormat,
    act: DType,
    weight: DType,
    n: usize,
    k: usize,
    bias: bool,
    tokens: usize,
    seed: u64,
) -> Vec<String> {
    let mut rng = Rng(seed);
    let x: Vec<f32> = rng.vec(tokens * k, 2.0).into_iter().map(|v| act.round(v)).collect();
    let w = rng.vec(n * k, 0.5);
    let b: Vec<f32> = rng.vec(n, 1.0).into_iter().map(|v| weight.round(v)).collect();
    let wq = quant::quantise(format, &w, n, k).unwrap();
    let bias = bias.then_some(&b[..]);
    let (got, ran) = run(format, act, weight, &x, &wq, bias, (n, k, tokens, 3));
    let want = reference(format, act, &x, &wq, bias, n, k);
    let what = format!(
        "{format} act={act} weight={weight} n={n} k={k} bias={} tokens={tokens} ({ran:?})",
        bias.is_some()
    );
    assert_bits(&what, &got, &want);
    ran
}

#[test]
fn gemv_entry_matches_the_reference_bit_for_bit() {
    let mut seed = 1;
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        for (act, weight) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
        ] {
            // One tile, n and k off the tile and block sizes, more blocks
            // than a pass of 16 (k = 600: 19 blocks).
            for (n, k) in [(16, 32), (17, 40), (30, 88), (5, 3), (40, 600)] {
                for bias in [false, true] {
                    for tokens in [1, 3] {
                        seed += 1;
                        let ran = check(format, act, weight, n, k, bias, tokens, seed);
                        assert!(ran.len() == 1 && ran[0].ends_with("_gemv"), "{ran:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_entry_matches_the_reference_bit_for_bit() {
    let mut seed = 100;
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        for act in [DType::F32, DType::BF16] {
            // The threshold, several CTA rows (T > 64) and columns (n > 128),
            // n not a multiple of 16, k not a multiple of 32.
            for (tokens, n, k, bias) in [
                (16, 16, 32, false),
                (40, 17, 88, true),
                (70, 130, 40, true),
                (20, 288, 72, false),
            ] {
                seed += 1;
                let ran = check(format, act, act, n, k, bias, tokens, seed);
                assert!(ran.len() == 1 && ran[0].ends_with("_gemm"), "{ran:?}");
            }
        }
    }
}

#[test]
fn nan_and_zero_activation_blocks_as_the_reference() {
    for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        for tokens in [2, 17] {
            let (n, k) = (20, 70);
            let mut rng = Rng(9);
            let mut x = rng.vec(tokens * k, 1.0);
            // Token 0: a NaN in block 1; token 1: block 0 all zeros.
            x[40] = f32::NAN;
            x[k..k + 32].fill(0.0);
            let wq = quant::quantise(format, &rng.vec(n * k, 0.5), n, k).unwrap();
            let (got, ran) = run(format, DType::F32, DType::F32, &x, &wq, None, (n, k, tokens, 0));
            let want = reference(format, DType::F32, &x, &wq, None, n, k);
            assert!(got[..n].iter().all(|v| v.is_nan()), "{ran:?}");
            assert_bits(&format!("{format} tokens={tokens} {ran:?}"), &got, &want);
        }
    }
}

#[test]
fn entries_and_launches() {
    let spec = |quant| KernelSpec {
        name: "l0.o".into(),
        act: DType::BF16,
        family: Family::Linear(LinearSpec {
            n: 2048,
            k: 2048,
            weight: DType::BF16,
            bias: false,
            quant,
        }),
    };
    let k = ptx::emit(&spec(Some(QuantFormat::Q4_0))).unwrap();
    let names: Vec<&str> = k.abi.entries.iter().map(|e| e.entry.as_str()).collect();
    assert_eq!(names, ["ouroc_l0_o_gemv", "ouroc_l0_o_gemm"]);
    assert!(k.abi.entries[0].when.holds(ptx::GEMM_MIN_TOKENS - 1, 1));
    assert!(!k.abi.entries[0].when.holds(ptx::GEMM_MIN_TOKENS, 1));
    assert!(k.abi.entries[1].when.holds(ptx::GEMM_MIN_TOKENS, 1));
    assert_eq!(k.abi.entries[0].launch.grid(3, 3), [3, 128, 1]);
    assert_eq!(k.abi.entries[1].launch.grid(100, 100), [16, 2, 1]);
    assert!(k.text.contains("dp4a.u32.s32") && k.text.contains("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"));
    // A quantised Linear's code differs from the dense one's and by format.
    let dense = ptx::emit(&spec(None)).unwrap();
    let q8 = ptx::emit(&spec(Some(QuantFormat::Q8_0))).unwrap();
    assert!(!dense.text.contains("dp4a"));
    assert_ne!(q8.text, k.text);
}
