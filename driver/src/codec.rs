//! Activations, weights and KV rows as bytes: the one place that turns f32
//! values into a dtype's little-endian bytes and back (bf16 as its upper 16
//! bits, rounded to nearest even; i32 as an integer).

use ouroc_ir::DType;

/// `x` rounded to `d` and encoded into `out` (`d.size_bytes()` bytes).
pub fn put(out: &mut [u8], d: DType, x: f32) {
    match d {
        DType::F32 => out[..4].copy_from_slice(&x.to_le_bytes()),
        DType::BF16 => out[..2].copy_from_slice(&bf16_bits(x).to_le_bytes()),
        DType::F16 => out[..2].copy_from_slice(&f16_bits(x).to_le_bytes()),
        DType::I32 => out[..4].copy_from_slice(&(x as i32).to_le_bytes()),
    }
}

/// The element of dtype `d` at the start of `b`, as f32.
pub fn get(b: &[u8], d: DType) -> f32 {
    match d {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
    }
}

/// Every value of `v`, rounded to `d` and encoded.
pub fn encode(v: &[f32], d: DType) -> Vec<u8> {
    // The weight dtypes without a per-element dispatch (whole checkpoints go through here).
    match d {
        DType::F32 => return v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => return v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect(),
        _ => {}
    }
    let size = d.size_bytes();
    let mut out = vec![0u8; v.len() * size];
    for (chunk, &x) in out.chunks_exact_mut(size).zip(v) {
        put(chunk, d, x);
    }
    out
}

/// [`encode`] into `out` (exactly `v.len() * d.size_bytes()` bytes).
pub fn encode_into(v: &[f32], d: DType, out: &mut [u8]) {
    let size = d.size_bytes();
    assert_eq!(out.len(), v.len() * size, "encode_into: wrong output length");
    match d {
        DType::F32 => out
            .chunks_exact_mut(4)
            .zip(v)
            .for_each(|(c, x)| c.copy_from_slice(&x.to_le_bytes())),
        DType::BF16 => out
            .chunks_exact_mut(2)
            .zip(v)
            .for_each(|(c, &x)| c.copy_from_slice(&bf16_bits(x).to_le_bytes())),
        _ => out.chunks_exact_mut(size).zip(v).for_each(|(c, &x)| put(c, d, x)),
    }
}

/// Every element of `b` (a whole number of `d` elements) as f32.
pub fn decode(b: &[u8], d: DType) -> Vec<f32> {
    b.chunks_exact(d.size_bytes()).map(|c| get(c, d)).collect()
}

fn bf16_bits(x: f32) -> u16 {
    (DType::BF16.round(x).to_bits() >> 16) as u16
}

fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype_at_its_precision() {
        let xs = [0.0f32, 1.0, -2.5, 3.140625, 1e-3, -65504.0, 1.0e-6];
        for d in [DType::F32, DType::BF16, DType::F16] {
            let back = decode(&encode(&xs, d), d);
            for (&x, &y) in xs.iter().zip(&back) {
                assert_eq!(y, d.round(x), "{d}: {x}");
            }
        }
        assert_eq!(decode(&encode(&[7.0, -3.0], DType::I32), DType::I32), vec![7.0, -3.0]);
    }

    #[test]
    fn bf16_is_the_upper_half_rounded_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        let b = encode(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], DType::BF16);
        assert_eq!(b, vec![0x80, 0x3f, 0x82, 0x3f]);
    }
}
