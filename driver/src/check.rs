//! What a Program must satisfy before the driver runs it, beyond
//! [`Program::check`]'s structure: a language model's inputs and outputs,
//! and dtypes that let the loop copy rows between its values.

use ouroc_ir::{DType, ExitPolicy};
use ouroc_kernels::Program;

/// Check `p` for running; returns the loop's exit policy.
pub fn runnable(p: &Program) -> Result<Option<ExitPolicy>, String> {
    p.check()?;
    if p.inputs.len() != 2 {
        return Err(format!(
            "a language-model program takes (ids, positions); this one has {} inputs",
            p.inputs.len()
        ));
    }
    if p.outputs.is_empty() {
        return Err("the program returns nothing".into());
    }
    for &i in &p.inputs {
        match p.value(i) {
            Some(v) if v.dtype == DType::I32 && v.width == 1 => {}
            _ => return Err(format!("input %{i} must be an i32 [1] per token in the arena")),
        }
    }
    let Some(l) = &p.loop_ else { return Ok(None) };
    let dtype = |v: u32| p.value(v).map(|v| v.dtype);
    for c in &l.carried {
        if dtype(c.init.value) != dtype(c.arg) || dtype(c.next.value) != dtype(c.arg) {
            return Err(format!("carried %{}: init, next and arg differ in dtype", c.arg));
        }
    }
    if dtype(l.out.value) != dtype(l.result) {
        return Err("the loop's out and result differ in dtype".into());
    }
    if l.steps == 0 {
        return Err("the loop has no steps".into());
    }
    ExitPolicy::parse(&l.policy).map(Some)
}
