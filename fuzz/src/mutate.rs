//! Structure-aware mutation: a seed input changed in a few places chosen by the fuzzer's bytes.
//!
//! Pure random bytes almost never get past a format's first check (a JSON brace, a length field
//! that must fit the file); edits of valid seeds do. The edits are the ones that found bugs in
//! parsers before: numbers replaced by extreme ones, 8-byte length fields nudged by one or set to
//! the maximum, bytes flipped, ranges deleted, duplicated or spliced in from another seed, and
//! truncation.

use ouroc_models::random::SplitMix;

/// Numbers that sit on a boundary somewhere: zero, one off a power of two, overflowing u32/u64,
/// negative, fractional, exponents, not-a-number spellings.
const NUMBERS: [&str; 16] = [
    "0",
    "1",
    "-1",
    "2",
    "3",
    "255",
    "65536",
    "2147483648",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999999",
    "1e12",
    "1e308",
    "0.5",
    "-0",
    "NaN",
];

/// Bytes that matter to JSON and text formats.
const BYTES: [u8; 12] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'[', b',', b':', b'\\', b'\n'];

/// A splitmix64 stream seeded by the fuzzer's bytes (deterministic for an input).
struct Choices(SplitMix);

impl Choices {
    fn new(data: &[u8]) -> Choices {
        let mut h = 0x243f_6a88_85a3_08d3u64;
        for &b in data {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Choices(SplitMix(h))
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
}

/// One of `seeds` with 1 to 4 edits chosen by `data`.
pub fn mutate(seeds: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let mut c = Choices::new(data);
    if seeds.is_empty() {
        return data.to_vec();
    }
    let mut out = seeds[c.below(seeds.len())].clone();
    for _ in 0..1 + c.below(4) {
        edit(&mut out, seeds, &mut c);
    }
    out
}

fn edit(out: &mut Vec<u8>, seeds: &[Vec<u8>], c: &mut Choices) {
    if out.is_empty() {
        out.push(BYTES[c.below(BYTES.len())]);
        return;
    }
    let at = c.below(out.len());
    match c.below(8) {
        0 => out[at] ^= 1 << c.below(8),
        1 => out[at] = BYTES[c.below(BYTES.len())],
        2 => {
            let end = (at + 1 + c.below(16)).min(out.len());
            out.drain(at..end);
        }
        3 => {
            let end = (at + 1 + c.below(64)).min(out.len());
            let copy = out[at..end].to_vec();
            let to = c.below(out.len() + 1);
            out.splice(to..to, copy);
        }
        4 => replace_number(out, at, c),
        5 => edit_u64(out, c),
        6 => out.truncate(at),
        _ => {
            let other = &seeds[c.below(seeds.len())];
            if !other.is_empty() {
                let from = c.below(other.len());
                let len = 1 + c.below(other.len() - from).min(255);
                let end = (at + c.below(32)).min(out.len());
                out.splice(at..end, other[from..from + len].iter().copied());
            }
        }
    }
}

/// The first run of ASCII digits at or after `at` (wrapping) replaced by a boundary number.
fn replace_number(out: &mut Vec<u8>, at: usize, c: &mut Choices) {
    let n = out.len();
    let Some(start) = (0..n).map(|i| (at + i) % n).find(|&i| out[i].is_ascii_digit()) else {
        return;
    };
    let end = (start..n).find(|&i| !out[i].is_ascii_digit()).unwrap_or(n);
    let number = NUMBERS[c.below(NUMBERS.len())].as_bytes().to_vec();
    out.splice(start..end, number);
}

/// A little-endian u64 (a length field: the safetensors header length is the first 8 bytes)
/// nudged by one either way, or set to 0 or the maximum.
fn edit_u64(out: &mut [u8], c: &mut Choices) {
    if out.len() < 8 {
        return;
    }
    let at = if c.below(2) == 0 { 0 } else { c.below(out.len() - 7) };
    let v = u64::from_le_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    let v = match c.below(4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        2 => 0,
        _ => u64::MAX,
    };
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutation_is_deterministic_for_an_input_and_varies_across_inputs() {
        let seeds = vec![br#"{"hidden_size": 64, "vocab_size": 288}"#.to_vec()];
        assert_eq!(mutate(&seeds, b"abc"), mutate(&seeds, b"abc"));
        let distinct: std::collections::HashSet<Vec<u8>> =
            (0u32..200).map(|i| mutate(&seeds, &i.to_le_bytes())).collect();
        assert!(distinct.len() > 150, "only {} distinct mutants", distinct.len());
        assert!(distinct.iter().any(|m| m != &seeds[0]));
    }

    #[test]
    fn numbers_are_replaced_by_boundary_values() {
        let seeds = vec![b"{\"n\": 64}".to_vec()];
        let found = (0u32..2000)
            .map(|i| mutate(&seeds, &i.to_le_bytes()))
            .any(|m| m.windows(20).any(|w| w == b"18446744073709551615"));
        assert!(found);
    }
}
