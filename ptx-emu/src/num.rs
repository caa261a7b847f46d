//! Bit-exact number formats and rounding: f16 and bf16, integer <-> float
//! with the four IEEE rounding directions, float -> integer with PTX's
//! saturation. Everything the emulator rounds goes through [`round_bits`],
//! one correctly rounding routine for an exact value `m * 2^e`.

/// An IEEE rounding direction (PTX `.rn`, `.rz`, `.rm`, `.rp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// To nearest, ties to even.
    Nearest,
    /// Towards zero.
    Zero,
    /// Towards minus infinity.
    Down,
    /// Towards plus infinity.
    Up,
}

/// A binary floating-point format: `mant` stored fraction bits, `exp`
/// exponent bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Format {
    pub mant: u32,
    pub exp: u32,
}

pub(crate) const F16: Format = Format { mant: 10, exp: 5 };
pub(crate) const BF16: Format = Format { mant: 7, exp: 8 };
pub(crate) const F32: Format = Format { mant: 23, exp: 8 };

impl Format {
    fn bias(self) -> i32 {
        (1 << (self.exp - 1)) - 1
    }
    fn total_bits(self) -> u32 {
        1 + self.exp + self.mant
    }
    /// The canonical NaN PTX produces: sign clear, all fraction bits set.
    pub(crate) fn canonical_nan(self) -> u64 {
        let e = ((1u64 << self.exp) - 1) << self.mant;
        e | ((1u64 << self.mant) - 1)
    }
    pub(crate) fn inf(self, neg: bool) -> u64 {
        let e = ((1u64 << self.exp) - 1) << self.mant;
        e | (u64::from(neg) << (self.total_bits() - 1))
    }
    pub(crate) fn max_finite(self, neg: bool) -> u64 {
        let e = ((1u64 << self.exp) - 2) << self.mant;
        e | ((1u64 << self.mant) - 1) | (u64::from(neg) << (self.total_bits() - 1))
    }
}

/// Rounds the exact value `(-1)^neg * m * 2^e` to `fmt` in direction `mode`
/// and returns its bits (overflow gives infinity or the largest finite value
/// as IEEE 754 prescribes for the direction).
pub(crate) fn round_bits(neg: bool, m: u128, e: i32, fmt: Format, mode: Round) -> u64 {
    let sign = u64::from(neg) << (fmt.total_bits() - 1);
    if m == 0 {
        return sign;
    }
    let mant = fmt.mant as i32;
    let emin = 1 - fmt.bias();
    let nbits = 128 - m.leading_zeros() as i32;
    let top = e + nbits - 1; // exponent of the leading bit
    let mut q = top.max(emin) - mant; // exponent of the last kept bit
    let shift = q - e;
    let mut r: u128;
    if shift <= 0 {
        r = m << (-shift) as u32;
    } else {
        let (kept, rem, half) = if shift >= 128 {
            (0u128, m, None)
        } else {
            (m >> shift, m & ((1u128 << shift) - 1), Some(1u128 << (shift - 1)))
        };
        r = kept;
        let up = match mode {
            Round::Nearest => match half {
                Some(h) => rem > h || (rem == h && r & 1 == 1),
                None => false, // the value is below a quarter of the quantum
            },
            Round::Zero => false,
            Round::Down => neg && rem != 0,
            Round::Up => !neg && rem != 0,
        };
        if up {
            r += 1;
        }
    }
    if r >> (mant + 1) != 0 {
        r >>= 1;
        q += 1;
    }
    let overflow = |sign_neg: bool| -> u64 {
        match mode {
            Round::Nearest => fmt.inf(sign_neg),
            Round::Zero => fmt.max_finite(sign_neg),
            Round::Down => {
                if sign_neg {
                    fmt.inf(true)
                } else {
                    fmt.max_finite(false)
                }
            }
            Round::Up => {
                if sign_neg {
                    fmt.max_finite(true)
                } else {
                    fmt.inf(false)
                }
            }
        }
    };
    if r >> mant == 0 {
        // subnormal (or zero after rounding)
        return sign | r as u64;
    }
    let biased = q + mant + fmt.bias();
    if biased >= (1 << fmt.exp) - 1 {
        return overflow(neg);
    }
    sign | ((biased as u64) << fmt.mant) | (r as u64 & ((1u64 << fmt.mant) - 1))
}

/// Decomposes a finite, non-zero f64 into `(neg, m, e)` with value `m * 2^e`.
fn decompose_f64(x: f64) -> (bool, u128, i32) {
    let b = x.to_bits();
    let neg = b >> 63 != 0;
    let exp = ((b >> 52) & 0x7ff) as i32;
    let frac = b & ((1u64 << 52) - 1);
    if exp == 0 {
        (neg, u128::from(frac), -1074)
    } else {
        (neg, u128::from(frac | (1u64 << 52)), exp - 1075)
    }
}

/// Rounds an f64 to a narrower format (`fmt` ≠ f64); NaN gives the
/// canonical NaN of `fmt`.
pub(crate) fn f64_to_format(x: f64, fmt: Format, mode: Round) -> u64 {
    if x.is_nan() {
        return fmt.canonical_nan();
    }
    if x.is_infinite() {
        return fmt.inf(x < 0.0);
    }
    if x == 0.0 {
        return u64::from(x.is_sign_negative()) << (fmt.total_bits() - 1);
    }
    let (neg, m, e) = decompose_f64(x);
    round_bits(neg, m, e, fmt, mode)
}

/// f32 -> bf16 bits, rounding to nearest even (PTX `cvt.rn.bf16.f32`); NaN
/// gives the canonical NaN `0x7fff`.
pub fn bf16_from_f32(x: f32) -> u16 {
    f64_to_format(f64::from(x), BF16, Round::Nearest) as u16
}

/// bf16 bits -> f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 -> f16 bits, rounding to nearest even; NaN gives `0x7fff`.
pub fn f16_from_f32(x: f32) -> u16 {
    f64_to_format(f64::from(x), F16, Round::Nearest) as u16
}

/// f16 bits -> f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let neg = h >> 15 != 0;
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let mag = if exp == 0x1f {
        if frac == 0 { f32::INFINITY } else { f32::NAN }
    } else if exp == 0 {
        frac as f32 * 2f32.powi(-24)
    } else {
        f32::from_bits((((exp - 15 + 127) as u32) << 23) | (frac << 13))
    };
    if neg { -mag } else { mag }
}

/// An exact integer (as i128) -> float bits in `fmt` with direction `mode`.
pub(crate) fn int_to_format(v: i128, fmt: Format, mode: Round) -> u64 {
    let neg = v < 0;
    round_bits(neg, v.unsigned_abs(), 0, fmt, mode)
}

/// An exact integer -> f64 bits with direction `mode`.
pub(crate) fn int_to_f64(v: i128, mode: Round) -> f64 {
    if v == 0 {
        return 0.0;
    }
    let neg = v < 0;
    let m = v.unsigned_abs();
    // f64 as a Format: 52 fraction bits, 11 exponent bits
    let bits = round_bits(neg, m, 0, Format { mant: 52, exp: 11 }, mode);
    f64::from_bits(bits)
}

/// PTX integer rounding (`.rni`, `.rzi`, `.rmi`, `.rpi`) of a float to an
/// integral value.
pub(crate) fn round_integral(x: f64, mode: Round) -> f64 {
    match mode {
        Round::Nearest => x.round_ties_even(),
        Round::Zero => x.trunc(),
        Round::Down => x.floor(),
        Round::Up => x.ceil(),
    }
}

/// Float -> integer the PTX way: round with `mode`, NaN gives 0, out-of-range
/// values saturate to `[lo, hi]`.
pub(crate) fn float_to_int(x: f64, mode: Round, lo: i128, hi: i128) -> i128 {
    if x.is_nan() {
        return 0;
    }
    let r = round_integral(x, mode);
    if r <= lo as f64 {
        lo
    } else if r >= hi as f64 {
        hi
    } else {
        r as i128
    }
}

/// The low `bits` bits set.
#[inline]
pub(crate) fn mask(bits: u32) -> u64 {
    if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 }
}

/// The low `bits` bits of `v` sign-extended.
#[inline]
pub(crate) fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

/// Flushes an f32 subnormal to a zero of the same sign (`.ftz`).
#[inline]
pub(crate) fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// Canonicalises a NaN result to PTX's `0x7fffffff`.
#[inline]
pub(crate) fn canon32(x: f32) -> u32 {
    if x.is_nan() { 0x7fff_ffff } else { x.to_bits() }
}

/// Canonicalises a NaN result to PTX's f64 canonical NaN.
#[inline]
pub(crate) fn canon64(x: f64) -> u64 {
    if x.is_nan() { 0x7fff_ffff_ffff_ffff } else { x.to_bits() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_and_rounding() {
        assert_eq!(f16_from_f32(1.0), 0x3c00);
        assert_eq!(f16_from_f32(-2.0), 0xc000);
        assert_eq!(f16_from_f32(65504.0), 0x7bff);
        assert_eq!(f16_from_f32(65520.0), 0x7c00); // ties to even overflows
        assert_eq!(f16_from_f32(2f32.powi(-24)), 0x0001);
        assert_eq!(f16_from_f32(2f32.powi(-25)), 0x0000); // tie to even: 0
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), f16_to_f32(f16_from_f32(f16_to_f32(0x3555))));
    }

    #[test]
    fn int_to_f32_directed() {
        let v = (1i128 << 24) + 1;
        assert_eq!(f32::from_bits(int_to_format(v, F32, Round::Nearest) as u32), 16777216.0);
        assert_eq!(f32::from_bits(int_to_format(v, F32, Round::Up) as u32), 16777218.0);
        assert_eq!(f32::from_bits(int_to_format(-v, F32, Round::Down) as u32), -16777218.0);
        assert_eq!(f32::from_bits(int_to_format(-v, F32, Round::Zero) as u32), -16777216.0);
    }
}
