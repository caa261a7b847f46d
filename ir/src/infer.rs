//! Result type of each op from its input types: used by the builder to type
//! new values and by the verifier to check declared types.

use crate::graph::OpKind;
use crate::types::{DType, Dim, Type};

/// Infer the result type. `dtype` is the result dtype for ops whose inputs do
/// not determine it (RoPE tables); other ops ignore it. Loops and weights are
/// typed by their definition and are not handled here.
pub fn infer(kind: &OpKind, inputs: &[&Type], dtype: DType) -> Result<Type, String> {
    let arity = |n: usize| -> Result<(), String> {
        if inputs.len() == n {
            Ok(())
        } else {
            Err(format!("{} takes {n} operands, got {}", kind.name(), inputs.len()))
        }
    };
    let float = |t: &Type, what: &str| -> Result<(), String> {
        if t.dtype.is_float() {
            Ok(())
        } else {
            Err(format!("{what} must be a float tensor, got {t}"))
        }
    };
    match kind {
        OpKind::Weight { .. } | OpKind::Loop(_) => {
            Err(format!("{} is typed by its definition, not inferred", kind.name()))
        }
        OpKind::Embedding => {
            arity(2)?;
            let (table, ids) = (inputs[0], inputs[1]);
            float(table, "embedding table")?;
            if table.rank() != 2 {
                return Err(format!("embedding table must be [vocab, hidden], got {table}"));
            }
            if ids.dtype != DType::I32 {
                return Err(format!("embedding ids must be i32, got {ids}"));
            }
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1].clone());
            Ok(Type::new(table.dtype, shape))
        }
        OpKind::RmsNorm { eps } => {
            arity(2)?;
            let (x, w) = (inputs[0], inputs[1]);
            float(x, "rms_norm input")?;
            // Written so that NaN is rejected too.
            if !eps.is_finite() || *eps <= 0.0 {
                return Err(format!("rms_norm eps must be positive, got {eps}"));
            }
            if w.rank() != 1 || x.last() != Some(&w.shape[0]) {
                return Err(format!("rms_norm weight {w} does not match the last dim of input {x}"));
            }
            Ok(x.clone())
        }
        OpKind::Linear => {
            if !(inputs.len() == 2 || inputs.len() == 3) {
                return Err(format!(
                    "linear takes 2 or 3 operands (x, w[, bias]), got {}",
                    inputs.len()
                ));
            }
            let (x, w) = (inputs[0], inputs[1]);
            float(x, "linear input")?;
            if w.rank() != 2 {
                return Err(format!("linear weight must be [out, in], got {w}"));
            }
            if x.last() != Some(&w.shape[1]) {
                return Err(format!(
                    "linear input {x} has {} features but weight {w} expects {}",
                    x.last().map(|d| d.to_string()).unwrap_or_default(),
                    w.shape[1]
                ));
            }
            if let Some(b) = inputs.get(2)
                && b.shape != vec![w.shape[0].clone()]
            {
                return Err(format!("linear bias {b} does not match out features of weight {w}"));
            }
            Ok(x.with_last(w.shape[0].clone()))
        }
        OpKind::RopeCos(t) | OpKind::RopeSin(t) => {
            arity(1)?;
            let pos = inputs[0];
            if pos.dtype != DType::I32 {
                return Err(format!("{} positions must be i32, got {pos}", kind.name()));
            }
            if t.head_dim == 0 || t.head_dim % 2 != 0 {
                return Err(format!(
                    "{} head_dim must be even and positive, got {}",
                    kind.name(),
                    t.head_dim
                ));
            }
            if !dtype.is_float() {
                return Err(format!("{} result must be float, got {dtype}", kind.name()));
            }
            let mut shape = pos.shape.clone();
            shape.push(Dim::Fixed(t.head_dim));
            Ok(Type::new(dtype, shape))
        }
        OpKind::Rope { heads, head_dim } => {
            arity(3)?;
            let (x, cos, sin) = (inputs[0], inputs[1], inputs[2]);
            float(x, "rope input")?;
            if x.last() != Some(&Dim::Fixed(heads * head_dim)) {
                return Err(format!(
                    "rope input {x} must have last dim heads*head_dim = {}",
                    heads * head_dim
                ));
            }
            let table = x.with_last(Dim::Fixed(*head_dim));
            for (name, t) in [("cos", cos), ("sin", sin)] {
                if t.shape != table.shape {
                    return Err(format!("rope {name} table {t} does not match {}", table));
                }
            }
            Ok(x.clone())
        }
        OpKind::Attention(a) => {
            arity(3)?;
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            float(q, "attention query")?;
            if a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
                return Err(format!(
                    "attention heads {} is not a multiple of kv_heads {}",
                    a.heads, a.kv_heads
                ));
            }
            let qt = q.with_last(Dim::Fixed(a.heads * a.head_dim));
            let kvt = q.with_last(Dim::Fixed(a.kv_heads * a.head_dim));
            if q.shape != qt.shape {
                return Err(format!("attention query {q} must be {qt}"));
            }
            for (name, t) in [("key", k), ("value", v)] {
                if t.shape != kvt.shape {
                    return Err(format!(
                        "attention {name} {t} must have shape {:?} like {kvt}",
                        kvt.shape
                    ));
                }
            }
            Ok(q.clone())
        }
        OpKind::Silu | OpKind::Sigmoid => {
            arity(1)?;
            float(inputs[0], kind.name())?;
            Ok(inputs[0].clone())
        }
        OpKind::Add | OpKind::Mul => {
            arity(2)?;
            float(inputs[0], kind.name())?;
            if inputs[0] != inputs[1] {
                return Err(format!(
                    "{} operands differ: {} vs {}",
                    kind.name(),
                    inputs[0],
                    inputs[1]
                ));
            }
            Ok(inputs[0].clone())
        }
    }
}
