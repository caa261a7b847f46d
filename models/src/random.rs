//! Random-weight checkpoints of a named shape (`--shape 1.4b`), for
//! benchmarks: the same directory layout as a real checkpoint
//! (config.json + model.safetensors), so ouroc and the PyTorch peer script
//! load the very same weights.
//!
//! Values are deterministic for a seed: matrices uniform in ±0.02·√3
//! (standard deviation 0.02, the usual initialiser scale), norm weights 1,
//! the exit gate's bias 0. The file is streamed tensor by tensor, so
//! writing the 1.4B shape never holds more than one tensor in memory.

use crate::checkpoint::{StorageDtype, expected_tensors};
use crate::config::OuroConfig;
use crate::shapes::shape_config_json;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The marker file naming the shape, dtype and seed a random checkpoint was written with.
pub const MARKER: &str = "ouroc-random.json";

/// splitmix64: a small, fast, well-mixed generator (deterministic across platforms).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Whether `dir` already holds the random checkpoint of (`shape`, `dtype`, `seed`).
pub fn is_current(dir: &Path, shape: &str, dtype: StorageDtype, seed: u64) -> bool {
    std::fs::read_to_string(dir.join(MARKER)).is_ok_and(|m| m == marker(shape, dtype, seed))
}

fn marker(shape: &str, dtype: StorageDtype, seed: u64) -> String {
    format!("{{\"shape\": \"{shape}\", \"dtype\": \"{dtype}\", \"seed\": {seed}}}\n")
}

/// Write the random checkpoint of the named shape into `dir` (created if
/// needed; its config.json, model.safetensors and marker are replaced).
/// `progress(done_bytes, total_bytes)` is called after each tensor.
pub fn write_random_checkpoint(
    shape: &str,
    dir: &Path,
    dtype: StorageDtype,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), String> {
    let json = shape_config_json(shape)?;
    // A half-written directory must not look current: drop the marker first, write it last.
    let _ = std::fs::remove_file(dir.join(MARKER));
    write_random_weights(&json, dir, dtype, seed, progress)?;
    std::fs::write(dir.join(MARKER), marker(shape, dtype, seed))
        .map_err(|e| format!("cannot write the random checkpoint in {}: {e}", dir.display()))
}

/// Write `config_json` and random weights of every tensor it implies into `dir` (created if
/// needed): a checkpoint of any config, as the structural fuzzer and tests make them.
pub fn write_random_weights(
    json: &str,
    dir: &Path,
    dtype: StorageDtype,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), String> {
    let (config, _) =
        OuroConfig::from_json_str(json, &dir.join("config.json").display().to_string()).map_err(|e| e.to_string())?;
    let st = match dtype {
        StorageDtype::BF16 => "BF16",
        StorageDtype::F16 => "F16",
        StorageDtype::F32 => "F32",
    };
    let tensors = expected_tensors(&config);
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() as u64 * dtype.size_bytes() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let total = offset;
    let mut head = serde_json::Value::Object(header).to_string();
    // Pad the header to 8 bytes so the data that follows is aligned.
    while !head.len().is_multiple_of(8) {
        head.push(' ');
    }
    let io = |e: std::io::Error| format!("cannot write the random checkpoint in {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), json).map_err(io)?;
    let tmp = dir.join("model.safetensors.tmp");
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
    out.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(head.as_bytes()).map_err(io)?;
    let mut rng = SplitMix(seed);
    let mut done = 0u64;
    let mut buf = Vec::new();
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let value = |rng: &mut SplitMix| -> f32 {
            if name.ends_with("norm.weight") {
                1.0
            } else if name.ends_with(".bias") {
                0.0
            } else {
                0.02 * 3f32.sqrt() * rng.symmetric()
            }
        };
        buf.clear();
        for _ in 0..n {
            let x = value(&mut rng);
            match dtype {
                StorageDtype::BF16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                StorageDtype::F16 => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                StorageDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
            }
        }
        out.write_all(&buf).map_err(io)?;
        done += buf.len() as u64;
        progress(done, total);
    }
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Checkpoint;

    #[test]
    fn random_checkpoint_of_the_small_shape_opens_and_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut calls = 0;
        write_random_checkpoint("small", a.path(), StorageDtype::BF16, 7, &mut |d, t| {
            calls += 1;
            assert!(d <= t);
        })
        .unwrap();
        write_random_checkpoint("small", b.path(), StorageDtype::BF16, 7, &mut |_, _| {}).unwrap();
        let ck = Checkpoint::open(a.path()).unwrap();
        assert_eq!(ck.config.hidden_size, 512);
        assert_eq!(calls, expected_tensors(&ck.config).len());
        assert!(is_current(a.path(), "small", StorageDtype::BF16, 7));
        assert!(!is_current(a.path(), "small", StorageDtype::BF16, 8));
        let fa = std::fs::read(a.path().join("model.safetensors")).unwrap();
        let fb = std::fs::read(b.path().join("model.safetensors")).unwrap();
        assert!(fa == fb, "same seed, same bytes");
        let q = ck.read_f32("model.layers.0.self_attn.q_proj.weight").unwrap();
        let bound = 0.02 * 3f32.sqrt() * 1.01;
        assert!(q.iter().all(|x| x.abs() <= bound));
        let mean_sq = q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32;
        assert!((mean_sq.sqrt() - 0.02).abs() < 0.001, "std {}", mean_sq.sqrt());
        assert!(ck.read_f32("model.norm.weight").unwrap().iter().all(|&x| x == 1.0));
        assert!(write_random_checkpoint("7b", a.path(), StorageDtype::BF16, 7, &mut |_, _| {}).is_err());
    }
}
