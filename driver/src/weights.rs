//! The resident weights of a Program, encoded in every encoding a device's
//! kernels read them in (a dtype, or a quantised format of a Linear): built
//! once by the Program's recipes ([`Program::materialise_weights`]) and
//! encoded by [`crate::codec`] or quantised by [`ouroc_kernels::quant`], or
//! borrowed from memory that outlives them (a memory-mapped weights file of
//! `ouroc build`). Devices point their kernels at these bytes or upload them.

use crate::codec;
use ouroc_ir::{DType, WeightSource};
use ouroc_kernels::quant;
use ouroc_kernels::spec::{Encoding, operand_encodings};
use ouroc_kernels::{Operand, Program};
use std::collections::HashMap;

/// Alignment of each encoded weight in [`ResidentWeights::encode`]'s buffer (a cache line, an
/// AVX-512 vector).
const ALIGN: usize = 64;

/// (weight id, encoding) -> bytes, owned or borrowed.
pub struct ResidentWeights {
    entries: HashMap<(u32, Encoding), (*const u8, usize)>,
    /// Keeps the bytes alive.
    _owner: Box<dyn std::any::Any>,
}

impl ResidentWeights {
    /// Materialise `program`'s resident weights from `src` (recipes applied,
    /// rounded to their dtypes, or kept in f32 when `round` is false) and
    /// encode each in every encoding a kernel reads it in
    /// ([`operand_encodings`]; dense ones in f32 when not rounded; a
    /// quantised one is quantised from the rounded or unrounded values).
    pub fn encode(program: &Program, src: &dyn WeightSource, round: bool) -> Result<ResidentWeights, String> {
        Self::encode_with_progress(program, src, round, &mut |_, _| {})
    }

    /// As [`ResidentWeights::encode`], streaming: each weight is encoded as
    /// soon as its recipe has built it and its f32 values are dropped, so
    /// preparing a model holds its encoding plus a few f32 tensors.
    /// `progress(done, total)` counts the encoded bytes.
    pub fn encode_with_progress(
        program: &Program,
        src: &dyn WeightSource,
        round: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ResidentWeights, String> {
        let required = ResidentWeights::required(program);
        // Unrounded weights stay f32 whatever the kernel's dtype says.
        let stored = |e: Encoding| match e {
            Encoding::Dense(_) if !round => Encoding::Dense(DType::F32),
            e => e,
        };
        for &(w, e) in &required {
            if let Encoding::Dense(d) = e
                && !matches!(d, DType::F32 | DType::BF16)
            {
                return Err(format!("weight %{w}: kernels cannot read weights of dtype {d}"));
            }
        }
        // One allocation for every encoded weight, each at a 64-byte aligned offset: encodings
        // made one by one would interleave with the recipes' f32 temporaries on the heap, and the
        // holes those leave made preparing a model take 1.7x its encoding.
        let mut keys: Vec<(u32, Encoding)> = required.iter().map(|&(w, e)| (w, stored(e))).collect();
        keys.dedup();
        let mut at = 0usize;
        let mut place: HashMap<(u32, Encoding), (usize, usize)> = HashMap::new();
        for &(w, d) in &keys {
            let e = program
                .weight(w)
                .ok_or_else(|| format!("a kernel reads weight %{w}, which is not in the table"))?;
            if !e.resident {
                return Err(format!("a kernel reads weight %{w}, which is not resident"));
            }
            let len = d
                .bytes(&e.shape)
                .ok_or_else(|| format!("weight %{w}: its size as {d} overflows (or it is not a matrix)"))?;
            at = at.next_multiple_of(ALIGN);
            place.insert((w, d), (at, len));
            at += len;
        }
        let total = at as u64;
        let mut buf = zeroed(at).ok_or_else(|| format!("cannot allocate {at} bytes for the encoded weights"))?;
        let mut done = 0u64;
        program
            .stream_weights(src, round, &mut |e, data| {
                for &(w, enc) in keys.iter().filter(|(w, _)| *w == e.id) {
                    let (off, len) = place[&(w, enc)];
                    let out = &mut buf[off..off + len];
                    match enc {
                        Encoding::Dense(d) => {
                            if data.len() * d.size_bytes() != len {
                                return Err(format!("has {} values, its table entry {len} bytes", data.len()));
                            }
                            codec::encode_into(data, d, out);
                        }
                        Encoding::Quant(q) => {
                            let (n, k) = (e.shape[0], e.shape[1]);
                            if data.len() != n * k {
                                return Err(format!("has {} values, its shape [{n}, {k}]", data.len()));
                            }
                            out.copy_from_slice(&quant::quantise(q, data, n, k).map_err(|e| format!("as {q}: {e}"))?);
                        }
                    }
                    done += len as u64;
                }
                progress(done, total);
                Ok(())
            })
            .map_err(|(id, msg)| format!("weight %{id}: {msg}"))?;
        let base = buf.as_ptr();
        // SAFETY (of later reads through `get`): every (offset, len) lies in `buf`, which is
        // moved into `_owner` (moving a Vec does not move its heap buffer) and never modified.
        let entries = place
            .into_iter()
            .map(|(k, (off, len))| (k, (base.wrapping_add(off), len)))
            .collect();
        Ok(ResidentWeights {
            entries,
            _owner: Box::new(buf),
        })
    }

    /// The (weight id, encoding) pairs `program`'s kernels read, sorted.
    pub fn required(program: &Program) -> Vec<(u32, Encoding)> {
        let mut need: Vec<(u32, Encoding)> = program
            .kernels()
            .flat_map(|k| k.inputs.iter().zip(operand_encodings(&k.spec)))
            .filter_map(|(op, d)| match op {
                Operand::Weight(w) => Some((*w, d)),
                Operand::Act(_) => None,
            })
            .collect();
        need.sort();
        need.dedup();
        need
    }

    /// Weights encoded elsewhere: `entries` point into memory `owner` keeps
    /// alive.
    ///
    /// # Safety
    /// Every slice stays valid and unmodified while `owner` lives (kernels
    /// read it without copying).
    pub unsafe fn borrowed(entries: Vec<((u32, Encoding), &[u8])>, owner: Box<dyn std::any::Any>) -> ResidentWeights {
        ResidentWeights {
            entries: entries.into_iter().map(|(k, v)| (k, (v.as_ptr(), v.len()))).collect(),
            _owner: owner,
        }
    }

    /// The bytes of weight `id` in encoding `d`, if encoded.
    pub fn get(&self, id: u32, d: Encoding) -> Option<&[u8]> {
        // SAFETY: valid while self lives (see the constructors).
        self.entries
            .get(&(id, d))
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p, n) })
    }

    /// Every entry, sorted by (weight id, encoding).
    pub fn entries(&self) -> Vec<((u32, Encoding), &[u8])> {
        let mut v: Vec<((u32, Encoding), &[u8])> = self
            .entries
            .keys()
            .map(|&(id, d)| ((id, d), self.get(id, d).expect("a key of the table")))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    /// Bytes over every entry.
    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.1).sum()
    }
}

/// `n` zero bytes from the allocator's zeroed memory (fresh pages the kernel zeroes as they are
/// first written, not a memset of the whole model up front); `None` when it cannot allocate.
fn zeroed(n: usize) -> Option<Vec<u8>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: a non-zero size; the pointer, if not null, is n zeroed bytes from the global
    // allocator with the layout of a [u8; n], which is what Vec::from_raw_parts requires.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}
