//! The resident weights of a Program, encoded in every dtype a device's
//! kernels read them in: built once by the Program's recipes
//! ([`Program::materialise_weights`]) and encoded by [`crate::codec`], or
//! borrowed from memory that outlives them (a memory-mapped weights file of
//! `ouroc build`). Devices point their kernels at these bytes or upload them.

use crate::codec;
use ouroc_ir::{DType, WeightSource};
use ouroc_kernels::spec::operand_dtypes;
use ouroc_kernels::{Operand, Program};
use std::collections::HashMap;

/// (weight id, dtype) -> bytes, owned or borrowed.
pub struct ResidentWeights {
    entries: HashMap<(u32, DType), (*const u8, usize)>,
    /// Keeps the bytes alive.
    _owner: Box<dyn std::any::Any>,
}

impl ResidentWeights {
    /// Materialise `program`'s resident weights from `src` (recipes applied,
    /// rounded to their dtypes, or kept in f32 when `round` is false) and
    /// encode each in every dtype a kernel reads it in
    /// ([`operand_dtypes`]; in f32 when not rounded).
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
        let stored = |d: DType| if round { d } else { DType::F32 };
        for &(w, d) in &required {
            if !matches!(d, DType::F32 | DType::BF16) {
                return Err(format!("weight %{w}: kernels cannot read weights of dtype {d}"));
            }
        }
        let total: u64 = required
            .iter()
            .filter_map(|&(w, d)| {
                let n: usize = program.weight(w)?.shape.iter().product();
                Some((n * stored(d).size_bytes()) as u64)
            })
            .sum();
        let mut owned: Vec<((u32, DType), Vec<u8>)> = Vec::with_capacity(required.len());
        let mut done = 0u64;
        program
            .stream_weights(src, round, &mut |e, data| {
                for &(w, d) in required.iter().filter(|(w, _)| *w == e.id) {
                    if owned.iter().any(|(k, _)| *k == (w, stored(d))) {
                        continue; // f32 for two kernel dtypes when not rounded
                    }
                    let bytes = codec::encode(data, stored(d));
                    done += bytes.len() as u64;
                    owned.push(((w, stored(d)), bytes));
                }
                progress(done, total);
                Ok(())
            })
            .map_err(|(id, msg)| format!("weight %{id}: {msg}"))?;
        for &(w, d) in &required {
            if !owned.iter().any(|(k, _)| *k == (w, stored(d))) {
                return Err(format!("a kernel reads weight %{w}, which is not resident"));
            }
        }
        let entries = owned.iter().map(|(k, v)| (*k, (v.as_ptr(), v.len()))).collect();
        Ok(ResidentWeights {
            entries,
            _owner: Box::new(owned),
        })
    }

    /// The (weight id, dtype) pairs `program`'s kernels read, sorted.
    pub fn required(program: &Program) -> Vec<(u32, DType)> {
        let mut need: Vec<(u32, DType)> = program
            .kernels()
            .flat_map(|k| k.inputs.iter().zip(operand_dtypes(&k.spec)))
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
    pub unsafe fn borrowed(entries: Vec<((u32, DType), &[u8])>, owner: Box<dyn std::any::Any>) -> ResidentWeights {
        ResidentWeights {
            entries: entries.into_iter().map(|(k, v)| (k, (v.as_ptr(), v.len()))).collect(),
            _owner: owner,
        }
    }

    /// The bytes of weight `id` in dtype `d`, if encoded.
    pub fn get(&self, id: u32, d: DType) -> Option<&[u8]> {
        // SAFETY: valid while self lives (see the constructors).
        self.entries
            .get(&(id, d))
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p, n) })
    }

    /// Every entry, sorted by (weight id, dtype).
    pub fn entries(&self) -> Vec<((u32, DType), &[u8])> {
        let mut v: Vec<((u32, DType), &[u8])> = self
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
