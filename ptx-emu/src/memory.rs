//! Emulated global memory: separately allocated buffers at fake 64-bit
//! device addresses, every access bounds-checked.

use crate::EmuError;
use crate::num::{bf16_from_f32, bf16_to_f32};

/// Buffer `i` lives at `(i + 1) << BASE_SHIFT`; the gap between buffers
/// makes any overrun land outside every buffer.
const BASE_SHIFT: u32 = 40;

/// Global memory of the emulated device.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    bufs: Vec<Vec<u8>>,
}

impl Memory {
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Allocates `bytes` zeroed bytes and returns their device address
    /// (aligned to 2^40, so every natural alignment holds).
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        self.bufs.push(vec![0; bytes]);
        (self.bufs.len() as u64) << BASE_SHIFT
    }

    /// Allocates a buffer holding `data`.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> u64 {
        self.bufs.push(data.to_vec());
        (self.bufs.len() as u64) << BASE_SHIFT
    }

    pub fn alloc_f32(&mut self, data: &[f32]) -> u64 {
        self.alloc_bytes(&data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    pub fn alloc_u32(&mut self, data: &[u32]) -> u64 {
        self.alloc_bytes(&data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    /// Allocates bf16 values given as raw bits.
    pub fn alloc_bf16_bits(&mut self, data: &[u16]) -> u64 {
        self.alloc_bytes(&data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    /// Allocates `data` rounded to bf16 (to nearest even).
    pub fn alloc_bf16(&mut self, data: &[f32]) -> u64 {
        self.alloc_bf16_bits(&data.iter().map(|&v| bf16_from_f32(v)).collect::<Vec<_>>())
    }

    /// The size in bytes of the buffer starting at `addr`.
    pub fn len_of(&self, addr: u64) -> Option<usize> {
        let (i, off) = self.locate(addr, 0).ok()?;
        (off == 0).then(|| self.bufs[i].len())
    }

    /// The buffer index and offset of `[addr, addr + n)`, or why it is not
    /// inside one buffer.
    pub(crate) fn locate(&self, addr: u64, n: usize) -> Result<(usize, usize), String> {
        let i = (addr >> BASE_SHIFT) as usize;
        let off = (addr & ((1u64 << BASE_SHIFT) - 1)) as usize;
        if i == 0 || i > self.bufs.len() {
            return Err(format!("global address {addr:#x} is not inside any allocated buffer"));
        }
        let len = self.bufs[i - 1].len();
        if off + n > len {
            return Err(format!(
                "global access of {n} bytes at {addr:#x} is out of bounds: buffer #{} (base {:#x}) has {len} bytes, \
                 offset {off}",
                i - 1,
                (i as u64) << BASE_SHIFT
            ));
        }
        Ok((i - 1, off))
    }

    pub(crate) fn slice(&self, addr: u64, n: usize) -> Result<&[u8], String> {
        let (i, off) = self.locate(addr, n)?;
        Ok(&self.bufs[i][off..off + n])
    }

    pub(crate) fn slice_mut(&mut self, addr: u64, n: usize) -> Result<&mut [u8], String> {
        let (i, off) = self.locate(addr, n)?;
        Ok(&mut self.bufs[i][off..off + n])
    }

    pub fn write_bytes(&mut self, addr: u64, data: &[u8]) -> Result<(), EmuError> {
        self.slice_mut(addr, data.len())
            .map_err(EmuError::Memory)?
            .copy_from_slice(data);
        Ok(())
    }

    pub fn read_bytes(&self, addr: u64, n: usize) -> Result<Vec<u8>, EmuError> {
        Ok(self.slice(addr, n).map_err(EmuError::Memory)?.to_vec())
    }

    pub fn write_f32(&mut self, addr: u64, data: &[f32]) -> Result<(), EmuError> {
        self.write_bytes(addr, &data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, EmuError> {
        let b = self.read_bytes(addr, n * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub fn write_u32(&mut self, addr: u64, data: &[u32]) -> Result<(), EmuError> {
        self.write_bytes(addr, &data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    pub fn read_u32(&self, addr: u64, n: usize) -> Result<Vec<u32>, EmuError> {
        let b = self.read_bytes(addr, n * 4)?;
        Ok(b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Writes f32 values rounded to bf16.
    pub fn write_bf16(&mut self, addr: u64, data: &[f32]) -> Result<(), EmuError> {
        self.write_bf16_bits(addr, &data.iter().map(|&v| bf16_from_f32(v)).collect::<Vec<_>>())
    }

    pub fn write_bf16_bits(&mut self, addr: u64, data: &[u16]) -> Result<(), EmuError> {
        self.write_bytes(addr, &data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }

    pub fn read_bf16_bits(&self, addr: u64, n: usize) -> Result<Vec<u16>, EmuError> {
        let b = self.read_bytes(addr, n * 2)?;
        Ok(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    }

    /// Reads bf16 values widened to f32.
    pub fn read_bf16(&self, addr: u64, n: usize) -> Result<Vec<f32>, EmuError> {
        Ok(self.read_bf16_bits(addr, n)?.into_iter().map(bf16_to_f32).collect())
    }
}
