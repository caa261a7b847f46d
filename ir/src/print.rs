//! The stable text form. One op per line:
//! `%5 = linear(%3, %4) : bf16[batch, seq, 64]`, attributes in braces,
//! a loop's body indented under `^body(...)`. Floats print in Rust's
//! shortest round-trip form, so printing then parsing loses nothing.

use crate::graph::{Block, Graph, Op, OpKind, Terminator, ValueId};
use std::fmt::Write;

pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    write!(s, "graph @{}(", g.name).unwrap();
    args(&mut s, g, &g.body.args);
    s.push_str(") {\n");
    block(&mut s, g, &g.body, 1);
    s.push_str("}\n");
    s
}

fn args(s: &mut String, g: &Graph, vs: &[ValueId]) {
    for (i, v) in vs.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        write!(s, "{v}: {}", g.ty(*v)).unwrap();
    }
}

fn list(vs: &[ValueId]) -> String {
    vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

/// Attributes of an op as `key = value` pairs, in a fixed order.
pub fn attrs(kind: &OpKind) -> Vec<(&'static str, String)> {
    match kind {
        OpKind::RmsNorm { eps } | OpKind::RmsScale { eps } | OpKind::AddRmsNorm { eps } => {
            vec![("eps", format!("{eps:?}"))]
        }
        OpKind::StepEnd { eps, next, gate } => {
            let mut a = vec![("eps", format!("{eps:?}")), ("next", format!("\"{}\"", next.name()))];
            if !gate {
                a.push(("gate", "\"none\"".to_string()));
            }
            a
        }
        OpKind::Concat { axis } => vec![("axis", axis.to_string())],
        OpKind::Slice { start, len } => vec![("start", start.to_string()), ("len", len.to_string())],
        OpKind::ExitSelect { policy } => vec![("policy", format!("\"{policy}\""))],
        OpKind::RopeCos(t) | OpKind::RopeSin(t) => {
            vec![
                ("head_dim", t.head_dim.to_string()),
                ("theta", format!("{:?}", t.theta)),
            ]
        }
        OpKind::Rope { heads, head_dim } => vec![("heads", heads.to_string()), ("head_dim", head_dim.to_string())],
        OpKind::Attention(a) => vec![
            ("layer", a.layer.to_string()),
            ("heads", a.heads.to_string()),
            ("kv_heads", a.kv_heads.to_string()),
            ("head_dim", a.head_dim.to_string()),
        ],
        OpKind::Loop(l) => vec![("steps", l.steps.to_string()), ("policy", format!("\"{}\"", l.policy))],
        OpKind::Weight { .. }
        | OpKind::Embedding
        | OpKind::Linear
        | OpKind::Silu
        | OpKind::Sigmoid
        | OpKind::Add
        | OpKind::Mul
        | OpKind::ScaleCols
        | OpKind::Swiglu => vec![],
    }
}

fn op(s: &mut String, g: &Graph, op: &Op, depth: usize) {
    let pad = "  ".repeat(depth);
    write!(s, "{pad}{} = {}", list(&op.results), op.kind.name()).unwrap();
    if let OpKind::Weight { name } = &op.kind {
        // Only `"` and `\` are escaped; the parser reads `\x` as `x`.
        write!(s, " \"{}\"", name.replace('\\', "\\\\").replace('"', "\\\"")).unwrap();
    } else {
        write!(s, "({})", list(&op.inputs)).unwrap();
    }
    let a = attrs(&op.kind);
    if !a.is_empty() {
        let inner: Vec<String> = a.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        write!(s, " {{{}}}", inner.join(", ")).unwrap();
    }
    let types: Vec<String> = op.results.iter().map(|r| g.ty(*r).to_string()).collect();
    write!(s, " : {}", types.join(", ")).unwrap();
    if let OpKind::Loop(l) = &op.kind {
        write!(s, " {{\n{pad}^body(").unwrap();
        args(s, g, &l.body.args);
        s.push_str("):\n");
        block(s, g, &l.body, depth + 1);
        write!(s, "{pad}}}").unwrap();
    }
    s.push('\n');
}

fn block(s: &mut String, g: &Graph, b: &Block, depth: usize) {
    for o in &b.ops {
        op(s, g, o, depth);
    }
    let pad = "  ".repeat(depth);
    match &b.term {
        Terminator::Return(vs) => writeln!(s, "{pad}return {}", list(vs)).unwrap(),
        Terminator::Yield { next, out, exit } => {
            write!(s, "{pad}yield next({}) out({out})", list(next)).unwrap();
            match exit {
                Some(e) => writeln!(s, " exit({e})").unwrap(),
                None => s.push('\n'),
            }
        }
    }
}

impl std::fmt::Display for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&print(self))
    }
}
