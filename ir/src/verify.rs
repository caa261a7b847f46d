//! The verifier: rejects malformed graphs with a message naming the
//! offending value, so a pass that breaks the IR is caught where it breaks it.

use crate::graph::{Block, Graph, OpKind, Terminator, ValueId};
use crate::infer::infer;
use crate::policy::ExitPolicy;
use crate::types::{DType, Dim, Type};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{msg}")]
pub struct VerifyError {
    /// The value at fault, when there is one.
    pub value: Option<ValueId>,
    pub msg: String,
}

fn fail<T>(value: Option<ValueId>, msg: String) -> Result<T, VerifyError> {
    Err(VerifyError { value, msg })
}

pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut v = Verifier {
        g,
        defined: vec![false; g.types.len()],
        layers: HashMap::new(),
    };
    if g.outputs().is_empty() {
        return fail(None, "graph must end in `return` with at least one value".into());
    }
    v.block(&g.body, &mut Vec::new(), 0)
}

struct Verifier<'g> {
    g: &'g Graph,
    defined: Vec<bool>,
    /// Attention layer index -> value that uses it (each KV slot has one owner).
    layers: HashMap<usize, ValueId>,
}

impl Verifier<'_> {
    fn define(&mut self, v: ValueId, what: &str) -> Result<(), VerifyError> {
        match self.defined.get_mut(v.index()) {
            None => fail(
                Some(v),
                format!("{v} ({what}) has no type: the graph has {} values", self.g.types.len()),
            ),
            Some(true) => fail(Some(v), format!("{v} ({what}) is defined more than once")),
            Some(d) => {
                *d = true;
                Ok(())
            }
        }
    }

    fn check_use(&self, user: &str, v: ValueId, visible: &[ValueId]) -> Result<(), VerifyError> {
        if !visible.contains(&v) {
            return fail(
                Some(v),
                format!("{user} uses {v}, which is not defined before it in scope"),
            );
        }
        Ok(())
    }

    /// `visible`: values in scope (outer blocks' values defined so far).
    fn block(&mut self, b: &Block, visible: &mut Vec<ValueId>, depth: usize) -> Result<(), VerifyError> {
        let scope_start = visible.len();
        for &a in &b.args {
            self.define(a, "block argument")?;
            visible.push(a);
        }
        for op in &b.ops {
            let Some(&r) = op.results.first() else {
                return fail(None, format!("a {} op has no results", op.kind.name()));
            };
            let what = format!("{r} ({})", op.kind.name());
            if op.results.len() > 1 && matches!(op.kind, OpKind::Weight { .. } | OpKind::Loop(_)) {
                return fail(Some(r), format!("{what} must have exactly one result"));
            }
            if let Some(bad) = op.results.iter().find(|v| v.index() >= self.g.types.len()) {
                return fail(Some(*bad), format!("{what}: result {bad} has no type"));
            }
            for &i in &op.inputs {
                self.check_use(&what, i, visible)?;
            }
            let declared = self.g.types.get(r.index()).cloned();
            let Some(declared) = declared else {
                return fail(Some(r), format!("{what} has no type"));
            };
            match &op.kind {
                OpKind::Weight { name } => {
                    if declared.fixed_dims().is_none() || !declared.dtype.is_float() {
                        return fail(
                            Some(r),
                            format!("{what} \"{name}\" must be a float tensor with fixed dims, got {declared}"),
                        );
                    }
                }
                OpKind::Loop(l) => {
                    if depth > 0 {
                        return fail(Some(r), format!("{what}: nested loops are not supported"));
                    }
                    if l.steps == 0 {
                        return fail(Some(r), format!("{what}: steps must be at least 1"));
                    }
                    l.policy.check(l.steps).map_err(|m| VerifyError {
                        value: Some(r),
                        msg: format!("{what}: {m}"),
                    })?;
                    let args = &l.body.args;
                    if args.len() != op.inputs.len() + 1 {
                        return fail(
                            Some(r),
                            format!(
                                "{what}: body takes {} arguments but the loop carries {} values (plus the step index)",
                                args.len(),
                                op.inputs.len()
                            ),
                        );
                    }
                    if self.g.ty(args[0]) != &Type::scalar(DType::I32) {
                        return fail(
                            Some(args[0]),
                            format!(
                                "{what}: step index {} must be i32[], got {}",
                                args[0],
                                self.g.ty(args[0])
                            ),
                        );
                    }
                    for (init, arg) in op.inputs.iter().zip(&args[1..]) {
                        if self.g.ty(*init) != self.g.ty(*arg) {
                            return fail(
                                Some(*arg),
                                format!(
                                    "{what}: carried {arg} has type {} but its initial value {init} has {}",
                                    self.g.ty(*arg),
                                    self.g.ty(*init)
                                ),
                            );
                        }
                    }
                    // The body is checked with outer values visible; its own values go out of scope after.
                    let mark = visible.len();
                    self.block(&l.body, visible, depth + 1)?;
                    let Terminator::Yield { next, out, exit } = &l.body.term else {
                        return fail(Some(r), format!("{what}: body must end in `yield`"));
                    };
                    for &y in next.iter().chain([out]).chain(exit.as_ref()) {
                        self.check_use(&format!("{what} yield"), y, visible)?;
                    }
                    if next.len() != op.inputs.len() {
                        return fail(
                            Some(r),
                            format!(
                                "{what}: yields {} next values for {} carried",
                                next.len(),
                                op.inputs.len()
                            ),
                        );
                    }
                    for (n, arg) in next.iter().zip(&args[1..]) {
                        if self.g.ty(*n) != self.g.ty(*arg) {
                            return fail(
                                Some(*n),
                                format!(
                                    "{what}: next value {n} has type {} but carried {arg} has {}",
                                    self.g.ty(*n),
                                    self.g.ty(*arg)
                                ),
                            );
                        }
                    }
                    let out_t = self.g.ty(*out);
                    match exit {
                        Some(exit) => {
                            let exit_t = self.g.ty(*exit);
                            let want_exit = out_t.with_last(Dim::Fixed(1));
                            if !exit_t.dtype.is_float() || exit_t.shape != want_exit.shape {
                                return fail(
                                    Some(*exit),
                                    format!(
                                        "{what}: exit signal {exit} has type {exit_t}, expected shape like {want_exit}"
                                    ),
                                );
                            }
                        }
                        None if !matches!(l.policy, ExitPolicy::Last | ExitPolicy::Step(_)) => {
                            return fail(
                                Some(r),
                                format!(
                                    "{what}: policy {} reads the exit signal, but the body yields none",
                                    l.policy
                                ),
                            );
                        }
                        None => {}
                    }
                    if &declared != out_t {
                        return fail(
                            Some(r),
                            format!("{what} is declared {declared} but its output {out} has type {out_t}"),
                        );
                    }
                    visible.truncate(mark);
                }
                kind => {
                    if let OpKind::Attention(a) = kind
                        && let Some(prev) = self.layers.insert(a.layer, r)
                    {
                        return fail(
                            Some(r),
                            format!("{what} uses KV layer {} already used by {prev}", a.layer),
                        );
                    }
                    let tys: Vec<&Type> = op.inputs.iter().map(|i| self.g.ty(*i)).collect();
                    let inferred = infer(kind, &tys, declared.dtype).map_err(|m| VerifyError {
                        value: Some(r),
                        msg: format!("{what}: {m}"),
                    })?;
                    if inferred.len() != op.results.len() {
                        return fail(
                            Some(r),
                            format!(
                                "{what} has {} results but its operands give {}",
                                op.results.len(),
                                inferred.len()
                            ),
                        );
                    }
                    for (&res, inf) in op.results.iter().zip(&inferred) {
                        let declared = self.g.ty(res);
                        if inf != declared {
                            return fail(
                                Some(res),
                                format!("{what}: result {res} is declared {declared} but its operands give {inf}"),
                            );
                        }
                    }
                }
            }
            for &res in &op.results {
                self.define(res, op.kind.name())?;
                visible.push(res);
            }
        }
        match &b.term {
            Terminator::Return(vs) => {
                if depth > 0 {
                    return fail(None, "`return` inside a loop body".into());
                }
                for &v in vs {
                    self.check_use("return", v, visible)?;
                }
            }
            Terminator::Yield { .. } if depth == 0 => return fail(None, "`yield` outside a loop body".into()),
            Terminator::Yield { .. } => {}
        }
        if depth == 0 {
            visible.truncate(scope_start);
        }
        Ok(())
    }
}
