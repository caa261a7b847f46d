//! An attention microkernel for the `Attention` family's attend phase
//! (`ouroc_kernels::abi::AttentionPhase::Attend`): the new tokens' K and V
//! rows are already in the KV store (the Cranelift kernel appends them);
//! each token t (absolute position `past + t`) and query head attends over
//! positions `0 ..= past + t`.
//!
//! Numerics follow `ouroc_kernels::exec::attention_seq` step for step, with
//! the kernel's own order of the two long sums: q rotated exactly as the
//! reference (`round(round(x * cos) + round(rot * sin))`, element by
//! element); each score `round(round(q . k_j) * scale)` with the dot
//! product in f32 lanes (16 on AVX-512) summed at the end; `exp(s_j - max)`
//! with `f32::exp` and their sum in position order (both as the reference);
//! `p_j = round(e_j / sum)`; the output `round(sum_j p_j * v_j)` with one
//! fused multiply-add per position, in position order. So it differs from
//! the reference only by the order of a score's dot product and the fusing
//! of `p_j * v_j` into the sum: the same kind of difference the GEMM's
//! order makes (see [`crate::gemm`]). Each token is computed alone, so
//! results do not depend on how tokens are split over threads.
//!
//! Dispatch: [`Variant::best`] (AVX-512 F/BW/VL, else the portable
//! variant); the CPU device uses the microkernel only where the vector
//! variant runs (elsewhere the Cranelift kernel attends, bit for bit the
//! reference). The portable variant is the scalar reference of the same
//! arithmetic, tested beside it.

use crate::gemm::load_elem;
use ouroc_ir::DType;
use std::cell::RefCell;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod x86;

/// One implementation, chosen by CPU features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// AVX-512 F/BW/VL: 16 f32 lanes, fused multiply-add.
    Avx512,
    /// Portable Rust.
    Scalar,
}

impl Variant {
    /// Every variant, fastest first.
    pub const ALL: [Variant; 2] = [Variant::Avx512, Variant::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Avx512 => "avx512",
            Variant::Scalar => "scalar",
        }
    }

    /// Whether this CPU runs the variant.
    pub fn supported(self) -> bool {
        match self {
            Variant::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => crate::gemm::has_avx512(),
            #[cfg(not(target_arch = "x86_64"))]
            Variant::Avx512 => false,
        }
    }

    /// The fastest supported variant (detected once).
    pub fn best() -> Variant {
        static BEST: OnceLock<Variant> = OnceLock::new();
        *BEST.get_or_init(|| {
            Variant::ALL
                .into_iter()
                .find(|v| v.supported())
                .unwrap_or(Variant::Scalar)
        })
    }
}

/// Whether the CPU device attends with the microkernel on this CPU (a
/// vector variant exists) for activations of `act`.
pub fn microkernel(act: DType) -> bool {
    matches!(act, DType::F32 | DType::BF16) && Variant::best() != Variant::Scalar
}

/// The operands of one attend launch over `tokens` tokens of one sequence.
/// Activation rows are `act` elements (f32, or bf16 as u16 bits); row t of
/// an activation starts `t * stride` elements after its pointer.
#[derive(Clone, Copy, Debug)]
pub struct AttendArgs {
    pub heads: usize,
    /// The query heads computed: `head_from .. head_to` (of `heads`).
    pub head_from: usize,
    pub head_to: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub act: DType,
    pub tokens: usize,
    /// Positions before the first token (its absolute position).
    pub past: usize,
    /// `heads * head_dim` query columns per row (before RoPE).
    pub q: *const u8,
    pub q_stride: usize,
    /// RoPE tables (`head_dim` columns per row), or null without RoPE.
    pub cos: *const u8,
    pub cos_stride: usize,
    pub sin: *const u8,
    pub sin_stride: usize,
    /// `heads * head_dim` output columns per row.
    pub out: *mut u8,
    pub out_stride: usize,
    /// The KV store: position p's K (rotated) and V rows of `kv_heads *
    /// head_dim` elements at `p * kv_heads * head_dim`, filled up to
    /// `past + tokens`.
    pub k: *const u8,
    pub v: *const u8,
}

// SAFETY: plain pointers to buffers the caller owns; concurrent calls
// write disjoint output rows and only read the store (see `attend`).
unsafe impl Send for AttendArgs {}
unsafe impl Sync for AttendArgs {}

impl AttendArgs {
    /// Query heads `from .. to` of these.
    pub fn heads(&self, from: usize, to: usize) -> AttendArgs {
        AttendArgs {
            head_from: from,
            head_to: to,
            ..*self
        }
    }

    /// Tokens `t0 .. t0 + tokens` of these: row pointers advanced, `past`
    /// advanced by `t0`.
    pub fn block(&self, t0: usize, tokens: usize) -> AttendArgs {
        let e = self.act.size_bytes();
        let at = |p: *const u8, stride: usize| {
            if p.is_null() {
                p
            } else {
                p.wrapping_add(t0 * stride * e)
            }
        };
        AttendArgs {
            tokens,
            past: self.past + t0,
            q: at(self.q, self.q_stride),
            cos: at(self.cos, self.cos_stride),
            sin: at(self.sin, self.sin_stride),
            out: at(self.out, self.out_stride) as *mut u8,
            ..*self
        }
    }
}

/// A thread's buffers: the query head as loaded and rotated (f32), and
/// the scores of one query head.
#[derive(Default)]
struct Scratch {
    head: Vec<f32>,
    q: Vec<f32>,
    scores: Vec<f32>,
}

thread_local! {
    /// This thread's buffers.
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            head: Vec::new(),
            q: Vec::new(),
            scores: Vec::new(),
        })
    };
}

/// Attend every token of `p` with the fastest variant.
///
/// # Safety
/// The pointers address buffers of the documented shapes for `p.tokens`
/// tokens and `p.past + p.tokens` store positions; `heads` is a multiple
/// of `kv_heads`, `head_dim` even with RoPE; the output does not overlap
/// the store.
pub unsafe fn attend(p: &AttendArgs) {
    unsafe { attend_with(Variant::best(), p) }
}

/// [`attend`] with a given variant. Panics if the CPU does not run it or
/// the dtype is not f32 / bf16.
///
/// # Safety
/// As [`attend`].
pub unsafe fn attend_with(v: Variant, p: &AttendArgs) {
    assert!(
        v.supported(),
        "attention variant {} is not supported by this CPU",
        v.name()
    );
    let bf16 = match p.act {
        DType::BF16 => true,
        DType::F32 => false,
        d => panic!("attention microkernel: activation dtype {d}"),
    };
    assert!(
        p.head_from <= p.head_to && p.head_to <= p.heads,
        "heads {}..{} of {}",
        p.head_from,
        p.head_to,
        p.heads
    );
    // The buffers taken out of the thread-local for the call: the body
    // runs in this function (compiled for the variant's ISA), not in a
    // closure, which would not inherit the target features.
    let mut scratch = SCRATCH.take();
    // SAFETY: the caller's contract; the variant runs on this CPU.
    unsafe {
        match v {
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => attend_avx512(p, bf16, &mut scratch),
            _ => attend_body(v, p, bf16, &mut scratch),
        }
    }
    SCRATCH.set(scratch);
}

/// [`attend_body`] compiled for AVX-512 (its own loops: RoPE, rounding,
/// the softmax's scaling).
///
/// # Safety
/// As [`attend`], on a CPU with AVX-512 F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend_avx512(p: &AttendArgs, bf16: bool, scratch: &mut Scratch) {
    unsafe { attend_body(Variant::Avx512, p, bf16, scratch) }
}

/// Every token and query head of `p` (see [`attend`]).
///
/// # Safety
/// As [`attend`]; `v` runs on this CPU.
#[inline(always)]
unsafe fn attend_body(v: Variant, p: &AttendArgs, bf16: bool, scratch: &mut Scratch) {
    let (hd, kvw) = (p.head_dim, p.kv_heads * p.head_dim);
    let group = p.heads / p.kv_heads;
    let scale = (hd as f64).powf(-0.5) as f32;
    let rd = |x: f32| if bf16 { DType::BF16.round(x) } else { x };
    let size = p.act.size_bytes();
    {
        let Scratch { head: x, q, scores } = scratch;
        x.resize(hd, 0.0);
        q.resize(hd, 0.0);
        scores.resize(p.past + p.tokens, 0.0);
        for t in 0..p.tokens {
            let n = p.past + t + 1;
            // SAFETY: row t of q, cos, sin and out (the caller's shapes).
            let (qr, outr) = unsafe { (p.q.add(t * p.q_stride * size), p.out.add(t * p.out_stride * size)) };
            for h in p.head_from..p.head_to {
                // SAFETY: head h of row t.
                let qh = unsafe { qr.add(h * hd * size) };
                for (j, x) in x.iter_mut().enumerate() {
                    *x = unsafe { load_elem(qh, j, bf16) };
                }
                if p.cos.is_null() {
                    q.copy_from_slice(x);
                } else {
                    // SAFETY: row t of the tables, hd elements each.
                    let (c, s) = unsafe { (p.cos.add(t * p.cos_stride * size), p.sin.add(t * p.sin_stride * size)) };
                    let half = hd / 2;
                    for (j, out) in q.iter_mut().enumerate() {
                        let rot = if j < half { -x[j + half] } else { x[j - half] };
                        let (cj, sj) = unsafe { (load_elem(c, j, bf16), load_elem(s, j, bf16)) };
                        *out = rd(rd(x[j] * cj) + rd(rot * sj));
                    }
                }
                let kvh = h / group;
                // SAFETY: positions 0 .. n of the store, head kvh.
                let (kb, vb) = unsafe { (p.k.add(kvh * hd * size), p.v.add(kvh * hd * size)) };
                let row = kvw * size;
                let sc = &mut scores[..n];
                unsafe { dots(v, q, kb, row, bf16, sc) };
                for s in sc.iter_mut() {
                    *s = rd(rd(*s) * scale);
                }
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in sc.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for s in sc.iter_mut() {
                    *s = rd(*s / sum);
                }
                // SAFETY: head h of row t of the output.
                let oh = unsafe { outr.add(h * hd * size) };
                unsafe { weighted_sum(v, sc, vb, row, hd, bf16, oh) };
            }
        }
    }
}

/// `scores[j] = q . k_j` for the `scores.len()` positions (K row j at
/// `k + j * row` bytes, `q.len()` elements).
unsafe fn dots(v: Variant, q: &[f32], k: *const u8, row: usize, bf16: bool, scores: &mut [f32]) {
    match v {
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512 => unsafe { x86::dots(q, k, row, bf16, scores) },
        _ => {
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = k.wrapping_add(j * row);
                let mut acc = [0f32; LANES];
                for (i, &x) in q.iter().enumerate() {
                    // SAFETY: element i < head_dim of row j.
                    acc[i % LANES] = x.mul_add(unsafe { load_elem(kj, i, bf16) }, acc[i % LANES]);
                }
                *s = acc.iter().sum();
            }
        }
    }
}

/// Lanes of the portable dot product (the vector variant's count).
const LANES: usize = 16;

/// `out = round(sum_j p[j] * v_j)` over `hd` columns (V row j at
/// `v + j * row` bytes), one fused multiply-add per position, in order.
unsafe fn weighted_sum(var: Variant, p: &[f32], v: *const u8, row: usize, hd: usize, bf16: bool, out: *mut u8) {
    match var {
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512 => unsafe { x86::weighted_sum(p, v, row, hd, bf16, out) },
        _ => {
            for d in 0..hd {
                let mut o = 0f32;
                for (j, &pj) in p.iter().enumerate() {
                    // SAFETY: element d < hd of row j.
                    o = pj.mul_add(unsafe { load_elem(v.wrapping_add(j * row), d, bf16) }, o);
                }
                // SAFETY: column d of the output head.
                unsafe { put(out, d, bf16, o) };
            }
        }
    }
}

/// Store `x` rounded to the row's dtype at element `i`.
#[inline(always)]
unsafe fn put(p: *mut u8, i: usize, bf16: bool, x: f32) {
    unsafe {
        if bf16 {
            (p as *mut u16).add(i).write_unaligned(crate::gemm::bf16_bits(x))
        } else {
            (p as *mut f32).add(i).write_unaligned(x)
        }
    }
}
