//! Tensor types: element dtype and a shape whose dims are fixed or symbolic.

use std::fmt;

/// Element type of a tensor. Activations carry the model dtype, so the
/// interpreter knows where the reference rounds (every bf16-typed value is
/// rounded to bf16 when it is produced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "i32" => DType::I32,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Round an f32 to the nearest value representable in this dtype
    /// (round-to-nearest-even, as torch's casts do). Identity for f32/i32.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::BF16 => round_bf16(x),
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::F32 | DType::I32 => x,
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as f32: the same bits as
/// `half::bf16::from_f32(x).to_f32()`, without its branches, so that loops over whole weight
/// tensors vectorise (preparing a model rounds every weight).
#[inline]
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: keep its upper half, quiet.
        return f32::from_bits((b | 0x0040_0000) & 0xffff_0000);
    }
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a number known at compile time, or a name bound when the
/// graph runs (`batch`, `seq`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    pub fn fixed(&self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The type of an SSA value: `bf16[batch, seq, 2048]`; a scalar is `i32[]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl Type {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Type {
        Type { dtype, shape }
    }

    pub fn scalar(dtype: DType) -> Type {
        Type { dtype, shape: vec![] }
    }

    /// Activation type `[batch, seq, width]`.
    pub fn act(dtype: DType, width: usize) -> Type {
        Type::new(dtype, vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Fixed(width)])
    }

    /// Weight type with fixed dims.
    pub fn fixed(dtype: DType, dims: &[usize]) -> Type {
        Type::new(dtype, dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn last(&self) -> Option<&Dim> {
        self.shape.last()
    }

    pub fn with_dtype(&self, dtype: DType) -> Type {
        Type {
            dtype,
            shape: self.shape.clone(),
        }
    }

    /// The same shape with the last dim replaced.
    pub fn with_last(&self, last: Dim) -> Type {
        let mut shape = self.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = last;
        }
        Type {
            dtype: self.dtype,
            shape,
        }
    }

    /// Number of elements when every dim is fixed.
    pub fn fixed_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(d.fixed()?))
    }

    pub fn fixed_dims(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(Dim::fixed).collect()
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_the_half_crate_bit_for_bit() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            -1e-40,
        ];
        // Ties (the rounding bit alone set), just above and below, at even and odd upper halves.
        for upper in [0x3f80u32, 0x3f81, 0x7f7f, 0x0001, 0x8001] {
            for low in [0x7fffu32, 0x8000, 0x8001, 0xffff, 0] {
                specials.push(f32::from_bits((upper << 16) | low));
            }
        }
        let mut state = 0x9e37_79b9u32;
        let randoms = (0..200_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        });
        for x in specials.into_iter().chain(randoms) {
            let want = half::bf16::from_f32(x).to_f32();
            let got = DType::BF16.round(x);
            assert_eq!(got.to_bits(), want.to_bits(), "{x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn bf16_rounding_is_round_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1.0).
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(DType::BF16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        // 0.999 rounds to 1.0 in bf16 (anything above 1 - 2^-9): the reason the reference can exit
        // at threshold 1.0. 0.998 is below that midpoint and rounds down to 1 - 2^-8.
        assert_eq!(DType::BF16.round(0.999), 1.0);
        assert_eq!(DType::BF16.round(0.998), 1.0 - 1.0 / 256.0);
        assert_eq!(DType::F32.round(0.999), 0.999);
    }

    #[test]
    fn type_display() {
        let t = Type::act(DType::BF16, 64);
        assert_eq!(t.to_string(), "bf16[batch, seq, 64]");
        assert_eq!(Type::scalar(DType::I32).to_string(), "i32[]");
    }
}
