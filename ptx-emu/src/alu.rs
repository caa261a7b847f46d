//! Per-lane arithmetic on raw register bits: integer and float operations,
//! comparisons, conversions and bit-field instructions, bit-exact as PTX
//! defines them (`.approx` functions correctly rounded).

use crate::ir::{BinOp, BoolOp, Cmp, CvtRound, FMods, UnOp};
use crate::num::{self, Round, canon32, canon64, ftz32, mask, sext};
use crate::ty::Ty;

/// The value of `v` read as type `ty`, as an exact integer.
fn int_val(v: u64, ty: Ty) -> i128 {
    if ty.is_signed() {
        i128::from(sext(v, ty.bits()))
    } else {
        i128::from(v & mask(ty.bits()))
    }
}

pub(crate) fn f32_of(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

pub(crate) fn bin_int(op: BinOp, ty: Ty, a: u64, b: u64) -> Result<u64, String> {
    let bits = ty.bits();
    let m = mask(bits);
    let (a, b) = (
        a & m,
        if matches!(op, BinOp::Shl | BinOp::Shr) {
            b & 0xffff_ffff
        } else {
            b & m
        },
    );
    let s = ty.is_signed();
    let (sa, sb) = (sext(a, bits), sext(b, bits));
    Ok(match op {
        BinOp::Add => a.wrapping_add(b) & m,
        BinOp::Sub => a.wrapping_sub(b) & m,
        BinOp::AddSat => {
            (i64::from(sa as i32)
                .saturating_add(sb)
                .clamp(i32::MIN.into(), i32::MAX.into()) as u64)
                & m
        }
        BinOp::SubSat => (sa.saturating_sub(sb).clamp(i32::MIN.into(), i32::MAX.into()) as u64) & m,
        BinOp::MulLo => a.wrapping_mul(b) & m,
        BinOp::MulHi => {
            if s {
                ((i128::from(sa) * i128::from(sb)) >> bits) as u64 & m
            } else {
                ((u128::from(a) * u128::from(b)) >> bits) as u64 & m
            }
        }
        BinOp::MulWide => {
            let wm = mask(bits * 2);
            if s {
                ((i128::from(sa) * i128::from(sb)) as u64) & wm
            } else {
                a.wrapping_mul(b) & wm
            }
        }
        BinOp::Div | BinOp::Rem => {
            if b == 0 {
                return Err("integer division by zero".into());
            }
            let r = if s {
                (if op == BinOp::Div {
                    sa.wrapping_div(sb)
                } else {
                    sa.wrapping_rem(sb)
                }) as u64
            } else if op == BinOp::Div {
                a / b
            } else {
                a % b
            };
            r & m
        }
        BinOp::Min => {
            if s {
                sa.min(sb) as u64 & m
            } else {
                a.min(b)
            }
        }
        BinOp::Max => {
            if s {
                sa.max(sb) as u64 & m
            } else {
                a.max(b)
            }
        }
        BinOp::And => a & b,
        BinOp::Or => a | b,
        BinOp::Xor => a ^ b,
        BinOp::Shl => {
            if b >= u64::from(bits) {
                0
            } else {
                (a << b) & m
            }
        }
        BinOp::Shr => {
            if s {
                let sh = b.min(u64::from(bits) - 1);
                (sa >> sh) as u64 & m
            } else if b >= u64::from(bits) {
                0
            } else {
                a >> b
            }
        }
        BinOp::Mul => unreachable!("float mul on an integer type is rejected by the decoder"),
    })
}

fn fmin(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a < b {
        a
    } else if b < a {
        b
    } else if a.is_sign_negative() {
        a
    } else {
        b
    }
}

fn fmax(a: f64, b: f64) -> f64 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a > b {
        a
    } else if b > a {
        b
    } else if a.is_sign_positive() {
        a
    } else {
        b
    }
}

pub(crate) fn fin32(v: u64, fm: FMods) -> f32 {
    let x = f32_of(v);
    if fm.ftz { ftz32(x) } else { x }
}

pub(crate) fn fout32(x: f32, fm: FMods) -> u64 {
    let mut x = x;
    if fm.sat {
        x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    }
    if fm.ftz {
        x = ftz32(x);
    }
    u64::from(canon32(x))
}

pub(crate) fn bin_float(op: BinOp, ty: Ty, a: u64, b: u64, fm: FMods) -> u64 {
    if ty == Ty::F64 {
        let (x, y) = (f64::from_bits(a), f64::from_bits(b));
        let r = match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Min => fmin(x, y),
            _ => fmax(x, y),
        };
        return canon64(r);
    }
    let (x, y) = (fin32(a, fm), fin32(b, fm));
    let r = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => x / y,
        BinOp::Min => fmin(f64::from(x), f64::from(y)) as f32,
        _ => fmax(f64::from(x), f64::from(y)) as f32,
    };
    fout32(r, fm)
}

pub(crate) fn un_int(op: UnOp, ty: Ty, a: u64) -> u64 {
    let bits = ty.bits();
    let m = mask(bits);
    let a = a & m;
    match op {
        UnOp::Neg => a.wrapping_neg() & m,
        UnOp::Abs => sext(a, bits).wrapping_abs() as u64 & m,
        UnOp::Not => !a & m,
        UnOp::Cnot => u64::from(a == 0),
        UnOp::Popc => u64::from(a.count_ones()),
        UnOp::Clz => u64::from(a.leading_zeros() - (64 - bits)),
        UnOp::Brev => a.reverse_bits() >> (64 - bits),
        _ => unreachable!("float unary op on an integer type is rejected by the decoder"),
    }
}

pub(crate) fn un_float(op: UnOp, ty: Ty, a: u64, fm: FMods) -> u64 {
    if ty == Ty::F64 {
        let x = f64::from_bits(a);
        let r = match op {
            UnOp::Neg => return a ^ (1 << 63),
            UnOp::Abs => return a & !(1 << 63),
            UnOp::Rcp => 1.0 / x,
            UnOp::Sqrt => x.sqrt(),
            _ => 1.0 / x.sqrt(),
        };
        return canon64(r);
    }
    let x = fin32(a, fm);
    let r = match op {
        UnOp::Neg => return fout32(f32::from_bits(x.to_bits() ^ 0x8000_0000), FMods { sat: false, ..fm }),
        UnOp::Abs => return fout32(x.abs(), FMods { sat: false, ..fm }),
        UnOp::Rcp => 1.0 / x,
        UnOp::Sqrt => x.sqrt(),
        UnOp::Rsqrt => (1.0 / f64::from(x).sqrt()) as f32,
        UnOp::Ex2 => f64::from(x).exp2() as f32,
        UnOp::Lg2 => f64::from(x).log2() as f32,
        UnOp::Sin => f64::from(x).sin() as f32,
        UnOp::Cos => f64::from(x).cos() as f32,
        _ => f64::from(x).tanh() as f32,
    };
    fout32(r, fm)
}

pub(crate) fn compare(cmp: Cmp, ty: Ty, ftz: bool, a: u64, b: u64) -> bool {
    if ty.is_float() {
        let (x, y) = if ty == Ty::F64 {
            (f64::from_bits(a), f64::from_bits(b))
        } else {
            let f = |v| if ftz { ftz32(f32_of(v)) } else { f32_of(v) };
            (f64::from(f(a)), f64::from(f(b)))
        };
        let nan = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !nan && x == y,
            Cmp::Ne => !nan && x != y,
            Cmp::Lt => !nan && x < y,
            Cmp::Le => !nan && x <= y,
            Cmp::Gt => !nan && x > y,
            Cmp::Ge => !nan && x >= y,
            Cmp::Equ => nan || x == y,
            Cmp::Neu => nan || x != y,
            Cmp::Ltu => nan || x < y,
            Cmp::Leu => nan || x <= y,
            Cmp::Gtu => nan || x > y,
            Cmp::Geu => nan || x >= y,
            Cmp::Num => !nan,
            Cmp::Nan => nan,
            Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => unreachable!("rejected by the decoder"),
        };
    }
    let bits = ty.bits();
    let (ua, ub) = (a & mask(bits), b & mask(bits));
    let (x, y) = if ty.is_signed() {
        (i128::from(sext(a, bits)), i128::from(sext(b, bits)))
    } else {
        (i128::from(ua), i128::from(ub))
    };
    match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt => x < y,
        Cmp::Le => x <= y,
        Cmp::Gt => x > y,
        Cmp::Ge => x >= y,
        Cmp::Lo => ua < ub,
        Cmp::Ls => ua <= ub,
        Cmp::Hi => ua > ub,
        Cmp::Hs => ua >= ub,
        _ => unreachable!("rejected by the decoder"),
    }
}

pub(crate) fn bool_op(op: BoolOp, a: u32, b: u32) -> u32 {
    match op {
        BoolOp::And => a & b,
        BoolOp::Or => a | b,
        BoolOp::Xor => a ^ b,
    }
}

fn int_range(ty: Ty) -> (i128, i128) {
    let bits = ty.bits();
    if ty.is_signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    }
}

/// A float operand of `cvt` as f64 (exact for every source format).
fn float_in(ty: Ty, v: u64, ftz: bool) -> f64 {
    match ty {
        Ty::F64 => f64::from_bits(v),
        Ty::F32 => f64::from(if ftz { ftz32(f32_of(v)) } else { f32_of(v) }),
        Ty::F16 => f64::from(num::f16_to_f32(v as u16)),
        _ => f64::from(num::bf16_to_f32(v as u16)),
    }
}

/// Rounds an exact value to float type `ty`.
fn float_out(ty: Ty, x: f64, mode: Round, relu: bool, satfinite: bool, sat: bool, ftz: bool) -> u64 {
    let mut x = x;
    if relu && !x.is_nan() && x < 0.0 {
        x = 0.0;
    }
    if sat {
        x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    }
    let (fmt, bits) = match ty {
        Ty::F64 => return canon64(x),
        Ty::F32 => (num::F32, 32),
        Ty::F16 | Ty::F16x2 => (num::F16, 16),
        _ => (num::BF16, 16),
    };
    let mut r = num::f64_to_format(x, fmt, mode);
    if satfinite && !x.is_nan() && r & !(1u64 << (bits - 1)) == fmt.inf(false) {
        r = fmt.max_finite(x < 0.0);
    }
    if ftz && ty == Ty::F32 {
        r = u64::from(ftz32(f32::from_bits(r as u32)).to_bits());
    }
    r
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cvt(dty: Ty, aty: Ty, rnd: CvtRound, ftz: bool, sat: bool, relu: bool, satfinite: bool, a: u64) -> u64 {
    let round = match rnd {
        CvtRound::Float(r) | CvtRound::Int(r) => r,
        CvtRound::None => Round::Nearest,
    };
    if aty.is_int() {
        let v = int_val(a, aty);
        if dty.is_int() {
            let (lo, hi) = int_range(dty);
            let r = if sat { v.clamp(lo, hi) } else { v };
            let r = r as u64 & mask(dty.bits());
            return if dty.is_signed() { sext(r, dty.bits()) as u64 } else { r };
        }
        let x = match dty {
            Ty::F32 => f64::from(f32::from_bits(num::int_to_format(v, num::F32, round) as u32)),
            Ty::F64 => num::int_to_f64(v, round),
            Ty::F16 => f64::from(num::f16_to_f32(num::int_to_format(v, num::F16, round) as u16)),
            _ => f64::from(num::bf16_to_f32(num::int_to_format(v, num::BF16, round) as u16)),
        };
        return float_out(dty, x, Round::Nearest, relu, satfinite, sat, ftz);
    }
    let x = float_in(aty, a, ftz);
    if dty.is_int() {
        let (lo, hi) = int_range(dty);
        let r = num::float_to_int(x, round, lo, hi) as u64 & mask(dty.bits());
        return if dty.is_signed() { sext(r, dty.bits()) as u64 } else { r };
    }
    if let CvtRound::Int(r) = rnd {
        let y = if x.is_nan() { x } else { num::round_integral(x, r) };
        return float_out(dty, y, Round::Nearest, relu, satfinite, sat, ftz);
    }
    float_out(dty, x, round, relu, satfinite, sat, ftz)
}

pub(crate) fn bfe(ty: Ty, a: u64, pos: u64, len: u64) -> u64 {
    let bits = u64::from(ty.bits());
    let (pos, len) = (pos & 0xff, len & 0xff);
    let a = a & mask(ty.bits());
    let sbit = if ty.is_signed() && len != 0 {
        (a >> (pos + len - 1).min(bits - 1)) & 1
    } else {
        0
    };
    let mut d = 0u64;
    for i in 0..bits {
        let bit = if i < len && pos + i < bits {
            (a >> (pos + i)) & 1
        } else {
            sbit
        };
        d |= bit << i;
    }
    d
}

pub(crate) fn prmt(a: u64, b: u64, c: u64) -> u64 {
    let bytes = (b << 32) | (a & 0xffff_ffff);
    let mut d = 0u64;
    for i in 0..4 {
        let nib = (c >> (4 * i)) & 0xf;
        let mut byte = (bytes >> (8 * (nib & 7))) & 0xff;
        if nib & 8 != 0 {
            byte = if byte & 0x80 != 0 { 0xff } else { 0 };
        }
        d |= byte << (8 * i);
    }
    d
}

/// Byte `i` of `w`, sign extended or not.
fn byte(w: u64, i: usize, signed: bool) -> i64 {
    let b = (w >> (8 * i)) & 0xff;
    if signed { b as u8 as i8 as i64 } else { b as i64 }
}

/// `dp4a`: `c + sum_i a.byte_i * b.byte_i`, each byte sign extended when its
/// operand is `.s32`, the sum modulo 2^32.
pub(crate) fn dp4a(a_signed: bool, b_signed: bool, a: u64, b: u64, c: u64) -> u64 {
    let s: i64 = (0..4).map(|i| byte(a, i, a_signed) * byte(b, i, b_signed)).sum();
    (c as i64).wrapping_add(s) as u64 & 0xffff_ffff
}

/// `mma.m16n8k32` on 8-bit integers: `a` 4, `b` 2, `c` 4 registers of the
/// 32 lanes. Fragments (lane = 4 g + t): A register r holds row
/// `g + 8 (r & 1)`, columns `4 t + 16 (r >> 1) + 0..4` (byte j is column
/// `+ j`); B register r rows `4 t + 16 r + 0..4` of column g; C / D
/// register r row `g + 8 (r >> 1)`, column `2 t + (r & 1)`. Sums are exact
/// in i64, then wrap to 32 bits (or clamp with `.satfinite`).
pub(crate) fn mma_m16n8k32(
    a_signed: bool,
    b_signed: bool,
    satfinite: bool,
    a: &[[u64; 32]],
    b: &[[u64; 32]],
    c: &[[u64; 32]],
) -> Vec<[u64; 32]> {
    let mut am = [[0i64; 32]; 16];
    let mut bm = [[0i64; 8]; 32];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (r, regs) in a.iter().enumerate() {
            for j in 0..4 {
                am[g + 8 * (r & 1)][4 * t + 16 * (r >> 1) + j] = byte(regs[l], j, a_signed);
            }
        }
        for (r, regs) in b.iter().enumerate() {
            for j in 0..4 {
                bm[4 * t + 16 * r + j][g] = byte(regs[l], j, b_signed);
            }
        }
    }
    let mut d = vec![[0u64; 32]; 4];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (r, out) in d.iter_mut().enumerate() {
            let (row, col) = (g + 8 * (r >> 1), 2 * t + (r & 1));
            let dot: i64 = (0..32).map(|k| am[row][k] * bm[k][col]).sum();
            let v = dot + c[r][l] as u32 as i32 as i64;
            out[l] = if satfinite {
                v.clamp(i32::MIN as i64, i32::MAX as i64) as i32 as u32 as u64
            } else {
                v as i32 as u32 as u64
            };
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfe_extracts_and_sign_extends() {
        assert_eq!(bfe(Ty::U32, 0b10110, 1, 2), 0b11);
        // bits 1..5 of 0b10110 are 1011: negative as a 4-bit field
        assert_eq!(bfe(Ty::S32, 0b10110, 1, 4), 0xffff_fffb);
        assert_eq!(bfe(Ty::U32, 0xffff_ffff, 30, 8), 0b11);
        // a field running past bit 31 takes the top bit as its sign
        assert_eq!(bfe(Ty::S32, 0x8000_0000, 31, 4), 0xffff_ffff);
        assert_eq!(bfe(Ty::U32, 0x1234, 4, 0), 0);
    }

    #[test]
    fn dp4a_signedness_per_operand_and_wrapping() {
        // bytes of a: 0xff, 0x02, 0x80, 0x01; of b: 0x03, 0xfe, 0x7f, 0x80
        let (a, b) = (0x0180_02ff, 0x807f_fe03);
        // unsigned x unsigned: 255*3 + 2*254 + 128*127 + 1*128
        assert_eq!(dp4a(false, false, a, b, 10), 10 + 765 + 508 + 16256 + 128);
        // unsigned x signed: 255*3 + 2*-2 + 128*127 + 1*-128
        assert_eq!(dp4a(false, true, a, b, 0), (765 - 4 + 16256 - 128) as u64);
        // signed x signed: -1*3 + 2*-2 + -128*127 + 1*-128, as 32 bits
        assert_eq!(dp4a(true, true, a, b, 0), (-3i64 - 4 - 16256 - 128) as u32 as u64);
        // signed x unsigned, and the sum wraps modulo 2^32
        assert_eq!(
            dp4a(true, false, a, b, 0xffff_ffff),
            (-3i64 + 508 - 16256 + 128 - 1) as u32 as u64
        );
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // lane and register indices follow the ISA's formulas
    fn mma_m16n8k32_is_the_exact_integer_product() {
        // A[i][k] = (i * 7 + k * 3) % 251 - 125 as s8, B[k][j] = (k * 5 + j * 11) % 256 as u8.
        let av = |i: usize, k: usize| ((i * 7 + k * 3) % 251) as i64 - 125;
        let bv = |k: usize, j: usize| ((k * 5 + j * 11) % 256) as i64;
        let mut a = vec![[0u64; 32]; 4];
        let mut b = vec![[0u64; 32]; 2];
        let mut c = vec![[0u64; 32]; 4];
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for r in 0..4 {
                for j in 0..4 {
                    let v = av(g + 8 * (r & 1), 4 * t + 16 * (r >> 1) + j) as u8 as u64;
                    a[r][l] |= v << (8 * j);
                }
                c[r][l] = (-(l as i64) - 1000 * r as i64) as u32 as u64;
            }
            for r in 0..2 {
                for j in 0..4 {
                    b[r][l] |= (bv(4 * t + 16 * r + j, g) as u64) << (8 * j);
                }
            }
        }
        let d = mma_m16n8k32(true, false, false, &a, &b, &c);
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for r in 0..4 {
                let (row, col) = (g + 8 * (r >> 1), 2 * t + (r & 1));
                let want: i64 = (0..32).map(|k| av(row, k) * bv(k, col)).sum::<i64>() - l as i64 - 1000 * r as i64;
                assert_eq!(d[r][l], want as i32 as u32 as u64, "lane {l} register {r}");
            }
        }
        // .satfinite clamps where the plain instruction wraps.
        let big = vec![[0x7fff_fff0u64; 32]; 4];
        let ones = vec![[0x0101_0101u64; 32]; 4];
        let d = mma_m16n8k32(false, false, true, &ones, &ones[..2], &big);
        assert_eq!(d[0][0], i32::MAX as u64);
        let d = mma_m16n8k32(false, false, false, &ones, &ones[..2], &big);
        assert_eq!(d[0][0], (0x7fff_fff0u64 + 32) as u32 as i32 as u32 as u64);
    }

    #[test]
    fn prmt_selects_and_replicates_bytes() {
        let (a, b) = (0x3322_1100, 0x7766_5544);
        assert_eq!(prmt(a, b, 0x3210), 0x3322_1100);
        assert_eq!(prmt(a, b, 0x7654), 0x7766_5544);
        assert_eq!(prmt(a, b, 0x5410), 0x5544_1100);
        // bit 3 of a selector replicates the sign of the byte; selector 0
        // copies byte 0 as is
        assert_eq!(prmt(0x0000_0080, 0, 0x0008), 0x8080_80ff);
        assert_eq!(prmt(0x0000_0070, 0, 0x0008), 0x7070_7000);
    }

    #[test]
    fn integer_edge_cases() {
        assert_eq!(bin_int(BinOp::Shr, Ty::S32, 0x8000_0000, 40).unwrap(), 0xffff_ffff);
        assert_eq!(bin_int(BinOp::Shl, Ty::B32, 1, 32).unwrap(), 0);
        assert_eq!(
            bin_int(BinOp::MulHi, Ty::S32, (-2i32) as u32 as u64, 3).unwrap(),
            0xffff_ffff
        );
        assert_eq!(
            bin_int(BinOp::MulWide, Ty::S32, (-2i32) as u32 as u64, 3).unwrap(),
            (-6i64) as u64
        );
        assert_eq!(
            bin_int(BinOp::AddSat, Ty::S32, i32::MAX as u64, 1).unwrap(),
            i32::MAX as u64
        );
        assert!(bin_int(BinOp::Div, Ty::U32, 1, 0).is_err());
        assert_eq!(un_int(UnOp::Clz, Ty::B32, 1), 31);
        assert_eq!(un_int(UnOp::Brev, Ty::B32, 1), 0x8000_0000);
    }
}
