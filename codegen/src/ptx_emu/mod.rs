//! An emulator for the subset of PTX that [`crate::ptx`] emits, parsed from
//! the PTX text, with SIMT semantics (warps of 32 lanes), so kernels can be
//! checked numerically without a GPU.
