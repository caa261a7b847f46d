//! MLIR export (cargo feature `mlir`): the graph IR, rolled loop intact, as
//! an MLIR module in upstream dialects, built through melior (LLVM/MLIR 19)
//! and checked by MLIR's verifier before it is printed.
//!
//! The module has one `func.func @<graph name>`:
//! - arguments: the graph inputs (`token_ids`, `positions`: `tensor<?x?xi32>`,
//!   batch and seq dynamic), then every weight once, in the order the graph
//!   names them, tagged `{ouroc.weight = "<checkpoint tensor name>"}`; weights
//!   are arguments, never inlined constants, so the module is as large as
//!   the model's code, not its parameters;
//! - results: the graph outputs (the logits).
//!
//! Inside, the `loop` region is an `scf.for` over its steps whose
//! `iter_args` are the carried values (the hidden state and, after `rotate`,
//! the next step's normalised input) plus the exit policy's state; under a
//! `threshold` policy it is an `scf.while` that stops as soon as every
//! token's exit step is decided. The policy itself (exit probabilities,
//! cumulative sum in f32 or bf16 arithmetic, per-token selection, or the
//! expected output under `weighted`) is written out as `linalg.generic`s.
//! Both loops carry `ouroc.steps` and `ouroc.policy` attributes.
//!
//! Every op, fused ones included (`rms_scale`, `add_rms_norm`, `swiglu`,
//! `step_end`, attention with RoPE fused in, `scale_cols`, `exit_select`),
//! becomes `linalg.generic`s whose bodies use `arith` and `math`, plus
//! `tensor` ops for shapes (`empty`, `extract_slice`, `insert_slice`,
//! `expand_shape`, `collapse_shape`) and `tensor.extract` for gathers
//! (embedding rows, RoPE's rotated half). Arithmetic is in f32 and every
//! value of a bf16/f16 type is rounded (`truncf`, then `extf` where it is
//! used again) exactly where the interpreter rounds, so the module computes
//! what `ouroc_ir::interp` computes.
//!
//! Attention is prefill from an empty KV cache: each token attends causally
//! to the tokens of the same call (positions 0..seq-1); the cache itself is
//! not modelled, so the module is the prompt pass of `ouroc logits`, not a
//! decode step. Each MLIR op's location names the IR op it comes from
//! (`loc("%50, %51 = add_rms_norm")`, printed with `--mlir-print-debuginfo`),
//! and so does a verification failure.

mod builder;
mod lower;

use melior::Context;
use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::ir::operation::OperationPrintingFlags;
use ouroc_ir::Graph;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MlirError {
    #[error("MLIR export does not support {0}")]
    Unsupported(String),
    #[error("the MLIR module fails verification:\n{0}")]
    Verify(String),
    #[error("building MLIR: {0}")]
    Internal(String),
}

impl MlirError {
    /// The same error, saying which IR op it came from.
    fn in_op(self, op: &str) -> MlirError {
        match self {
            MlirError::Unsupported(m) if !m.starts_with('`') => MlirError::Unsupported(format!("`{op}`: {m}")),
            MlirError::Internal(m) if !m.starts_with('`') => MlirError::Internal(format!("`{op}`: {m}")),
            e => e,
        }
    }
}

/// How to print the module.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrintOptions {
    /// Print each op's location (`loc("%50 = add_rms_norm")`), the IR op it comes from.
    pub locations: bool,
}

/// The MLIR text of `graph` (verified by MLIR first).
pub fn export(graph: &Graph) -> Result<String, MlirError> {
    export_with(graph, PrintOptions::default())
}

/// [`export`] with printing options.
pub fn export_with(graph: &Graph, opts: PrintOptions) -> Result<String, MlirError> {
    ouroc_ir::verify(graph).map_err(|e| MlirError::Unsupported(format!("an invalid graph: {e}")))?;
    let ctx = context();
    let diags: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = Arc::clone(&diags);
    ctx.attach_diagnostic_handler(move |d| {
        let mut text = format!("{}: {d}", d.location());
        for i in 0..d.note_count() {
            if let Ok(n) = d.note(i) {
                text += &format!("\n  note: {}: {n}", n.location());
            }
        }
        sink.lock().expect("diagnostics lock").push(text);
        true
    });
    let cx = builder::Cx::new(&ctx)?;
    let module = lower::module(&cx, graph)?;
    verified_text(&module, &diags, opts)
}

/// Run MLIR's verifier on `module`, then print it; a failure carries every
/// diagnostic with its location (the IR op it comes from).
fn verified_text(module: &Module, diags: &Mutex<Vec<String>>, opts: PrintOptions) -> Result<String, MlirError> {
    if !module.as_operation().verify() {
        let msgs = diags.lock().expect("diagnostics lock").join("\n");
        return Err(MlirError::Verify(if msgs.is_empty() {
            "(no diagnostic)".into()
        } else {
            msgs
        }));
    }
    let flags = OperationPrintingFlags::new().enable_debug_info(opts.locations, false);
    module
        .as_operation()
        .to_string_with_flags(flags)
        .map_err(|e| MlirError::Internal(format!("printing the module: {e}")))
}

/// A context with every upstream dialect loaded.
fn context() -> Context {
    let registry = DialectRegistry::new();
    melior::utility::register_all_dialects(&registry);
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use melior::ir::{Block, BlockLike, Location, Region, RegionLike};

    #[test]
    fn a_verification_failure_names_the_ir_op() {
        let ctx = context();
        let diags: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&diags);
        ctx.attach_diagnostic_handler(move |d| {
            sink.lock().unwrap().push(format!("{}: {d}", d.location()));
            true
        });
        let cx = builder::Cx::new(&ctx).unwrap();
        let module = Module::new(Location::unknown(&ctx));
        // An f32 addition claiming an i32 result, as if lowered from IR op `%7 = add`.
        let block = Block::new(&[]);
        {
            let bb = builder::Bb::new(&cx, &block, cx.loc("%7 = add"));
            let one = bb.f32c(1.0).unwrap();
            bb.op1("arith.addf", &[one, one], cx.i32, &[]).unwrap();
        }
        let region = Region::new();
        region.append_block(block);
        let op = melior::ir::operation::OperationBuilder::new("builtin.module", Location::unknown(&ctx))
            .add_regions([region])
            .build()
            .unwrap();
        module.body().append_operation(op);
        let err = verified_text(&module, &diags, PrintOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, MlirError::Verify(_)), "{msg}");
        assert!(msg.contains("loc(\"%7 = add\")") && msg.contains("arith.addf"), "{msg}");
    }
}
