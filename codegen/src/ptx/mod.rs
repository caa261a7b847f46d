//! The PTX backend: PTX ISA 8.x text for `.target sm_80` (A100), one
//! emitter per kernel family of [`ouroc_kernels::spec::Family`].
