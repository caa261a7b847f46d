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
        let resident = program
            .materialise_weights(src, round)
            .map_err(|(id, msg)| format!("weight %{id}: {msg}"))?;
        let mut owned: Vec<((u32, DType), Vec<u8>)> = Vec::new();
        for (w, d) in ResidentWeights::required(program) {
            let data = resident
                .get(&w)
                .ok_or_else(|| format!("a kernel reads weight %{w}, which is not resident"))?;
            if !matches!(d, DType::F32 | DType::BF16) {
                return Err(format!("weight %{w}: kernels cannot read weights of dtype {d}"));
            }
            // Unrounded weights stay f32 whatever the kernel's dtype says.
            let d = if round { d } else { DType::F32 };
            owned.push(((w, d), codec::encode(data, d)));
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
