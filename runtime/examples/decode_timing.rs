//! A one-off timing printout of `CpuForward` decode on random weights of a
//! named shape, for several thread counts (speed belongs in benchmarks,
//! not tests):
//!
//! ```text
//! cargo run --release -p ouroc-runtime --example decode_timing -- \
//!     [--shape 1.4b] [--layers N] [--dtype bf16|f32] [--threads 1,2] \
//!     [--kv full|last|mean] [--prompt 16] [--tokens 8]
//! ```
//!
//! `--layers` overrides the shape's layer count (a 1.4B-shaped stack with
//! fewer layers needs less memory and time; decode time scales with the
//! layers). The policy is `last`: every token runs all R loop steps.

use ouroc_ir::{DType, ExitPolicy, WeightSource};
use ouroc_models::{BuildOptions, OuroConfig, expected_tensors};
use ouroc_runtime::Forward;
use ouroc_runtime::cpu::{CpuForward, CpuOptions, KvMode};
use std::collections::HashMap;
use std::time::Instant;

/// Deterministic random weights: matrices uniform with standard deviation
/// 0.02, norm weights 1, the exit gate's bias 0.
struct Random {
    shapes: HashMap<String, usize>,
}

impl WeightSource for Random {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, String> {
        let n = *self.shapes.get(name).ok_or_else(|| format!("no weight named {name}"))?;
        if name.contains("norm") {
            return Ok(vec![1.0; n]);
        }
        if name.ends_with(".bias") {
            return Ok(vec![0.0; n]);
        }
        let mut s = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let scale = 0.02 * 3f32.sqrt();
        Ok((0..n)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
            })
            .collect())
    }
}

fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|s| s.as_str())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shape = arg(&args, "--shape").unwrap_or("1.4b");
    let mut cfg: OuroConfig = ouroc_models::shapes::named_shape(shape)?;
    if let Some(l) = arg(&args, "--layers") {
        cfg.num_hidden_layers = l.parse().map_err(|e| format!("--layers: {e}"))?;
    }
    let dtype = match arg(&args, "--dtype").unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        d => return Err(format!("--dtype {d}: bf16 or f32")),
    };
    let threads: Vec<usize> = arg(&args, "--threads")
        .unwrap_or("1,2")
        .split(',')
        .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
        .collect::<Result<_, _>>()?;
    let kv = KvMode::parse(arg(&args, "--kv").unwrap_or("full"))?;
    let prompt_len: usize = arg(&args, "--prompt")
        .unwrap_or("16")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let tokens: usize = arg(&args, "--tokens")
        .unwrap_or("8")
        .parse()
        .map_err(|e| format!("{e}"))?;

    let src = Random {
        shapes: expected_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| (n, s.iter().product()))
            .collect(),
    };
    let opts = BuildOptions {
        dtype,
        policy: ExitPolicy::parse("last")?,
        loops: None,
        unrolled: false,
    };
    let head = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let g = ouroc_models::build_from_config(&cfg, head, &opts)?;
    let program = ouroc_compile::compile_graph(g, false)
        .map_err(|e| e.to_string())?
        .program;
    let weight_bytes: usize = program
        .kernels()
        .filter_map(|k| match &k.spec.family {
            ouroc_kernels::Family::Linear(l) => Some(l.n * l.k * l.weight.size_bytes()),
            _ => None,
        })
        .sum();
    println!(
        "shape {shape}: hidden {}, {} layers x {} steps, vocab {}, {dtype}, kv {kv}; \
         Linear weights {:.2} GB (read {}x per token in the loop)",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.total_ut_steps,
        cfg.vocab_size,
        weight_bytes as f64 / 1e9,
        cfg.total_ut_steps,
    );
    for &t in threads.iter().filter(|&&t| t > 1) {
        // The cost of one launch on the pool: an empty job, back to back.
        let mut pool = ouroc_runtime::threads::Pool::new(t)?;
        let jobs = 20000;
        let t0 = Instant::now();
        for _ in 0..jobs {
            pool.run(t, &|i| {
                std::hint::black_box(i);
            });
        }
        println!(
            "pool of {t} threads: {:.2} us per empty job",
            t0.elapsed().as_secs_f64() * 1e6 / jobs as f64
        );
    }
    let ids: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    // One model per thread count, run in turns (prefill, then token by
    // token) so that a shared machine's changing load hits all alike.
    let mut models = Vec::new();
    for &t in &threads {
        let t0 = Instant::now();
        let opts = CpuOptions {
            threads: t,
            kv,
            ..CpuOptions::new(prompt_len + tokens + 1)
        };
        let m = CpuForward::with_options(program.clone(), &src, &opts)?;
        println!("threads {t}: setup {:.1} s", t0.elapsed().as_secs_f64());
        models.push(m);
    }
    let mut prefill = Vec::new();
    let mut last = Vec::new();
    for m in &mut models {
        let t0 = Instant::now();
        last.push(m.forward(&ids)?);
        prefill.push(t0.elapsed().as_secs_f64());
    }
    let mut times = vec![Vec::new(); models.len()];
    for _ in 0..tokens {
        for (i, m) in models.iter_mut().enumerate() {
            let next = last[i]
                .logits
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b })
                .0 as u32;
            let t0 = Instant::now();
            last[i] = m.forward(&[next])?;
            times[i].push(t0.elapsed().as_secs_f64());
        }
    }
    for (i, &t) in threads.iter().enumerate() {
        let ts = &mut times[i];
        let total: f64 = ts.iter().sum();
        ts.sort_by(f64::total_cmp);
        println!(
            "threads {t}: prefill {prompt_len} tokens {:.2} tok/s, decode {tokens} tokens: \
             {:.3} tok/s (median {:.3}, best {:.3}), KV {} KiB",
            prompt_len as f64 / prefill[i],
            tokens as f64 / total,
            1.0 / ts[ts.len() / 2],
            1.0 / ts[0],
            models[i].kv_bytes() / 1024,
        );
    }
    Ok(())
}
