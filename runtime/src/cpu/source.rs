//! Where the CPU device gets the machine code of a kernel: the Cranelift
//! JIT (feature `jit`) or the kernels `ouroc build` linked in.

#[cfg(feature = "jit")]
use ouroc_codegen::cpu::Jit;
use ouroc_kernels::KernelSpec;
use ouroc_kernels::abi::RawKernel;
use std::collections::HashMap;

/// Where a [`CpuForward`] gets the machine code of a kernel.
pub trait KernelSource {
    /// The entry point of the kernel of `spec` (the ABI of
    /// `ouroc_kernels::abi`), valid as long as the source lives.
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String>;
}

/// Kernels compiled on demand by the Cranelift JIT.
#[cfg(feature = "jit")]
impl KernelSource for Jit {
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String> {
        let id = self.compile(spec).map_err(|e| e.to_string())?;
        Ok(self.kernel(id).raw())
    }
}

/// Kernels linked into the executable ahead of time, by code key
/// (`KernelSpec::code_key`).
pub struct LinkedKernels {
    by_key: HashMap<String, RawKernel>,
}

impl LinkedKernels {
    /// A table of kernels by code key.
    ///
    /// # Safety
    /// Each function is the kernel of its code key, compiled by
    /// `ouroc_codegen::cpu` for an ISA the running CPU has, and lives as
    /// long as the program (it is linked in).
    pub unsafe fn new(table: impl IntoIterator<Item = (String, RawKernel)>) -> LinkedKernels {
        LinkedKernels {
            by_key: table.into_iter().collect(),
        }
    }

    /// Kernels in the table.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl KernelSource for LinkedKernels {
    fn raw_kernel(&mut self, spec: &KernelSpec) -> Result<RawKernel, String> {
        let key = spec.code_key();
        self.by_key
            .get(&key)
            .copied()
            .ok_or_else(|| format!("kernel {} ({key}) is not linked into this executable", spec.name))
    }
}
