//! Shared test support: fixture paths and golden token ids.
#![allow(dead_code)]

use safetensors::SafeTensors;
use std::path::PathBuf;

/// A fixture directory (`golden` for the golden files): under
/// `$OUROC_FIXTURES` when set (the test executables of the GPU package,
/// run on a machine without this source tree: scripts/gpu-check.sh),
/// else the source tree's tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("OUROC_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name),
    }
}

/// An i32 tensor of a fixture's golden file, as token ids.
pub fn golden_i32(name: &str, key: &str) -> Vec<u32> {
    let bytes = std::fs::read(fixture("golden").join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap_or_else(|_| panic!("golden {name} lacks {key}"));
    t.data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// Deterministic values in [-1, 1) (a 64-bit LCG's high bits).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
