//! Result type of each op from its input types: used by the builder to type
//! new values and by the verifier to check declared types.

use crate::graph::{NextNorm, OpKind};
use crate::types::{DType, Dim, Type};

/// Infer the result types (one per result). `dtype` is the result dtype for
/// ops whose inputs do not determine it (RoPE tables); other ops ignore it.
/// Loops and weights are typed by their definition and are not handled here.
pub fn infer(kind: &OpKind, inputs: &[&Type], dtype: DType) -> Result<Vec<Type>, String> {
    match kind {
        OpKind::AddRmsNorm { eps } => {
            if !(inputs.len() == 2 || inputs.len() == 3) {
                return Err(format!(
                    "add_rms_norm takes 2 or 3 operands (h, a[, w]), got {}",
                    inputs.len()
                ));
            }
            check_eps(*eps)?;
            let (h, a) = (inputs[0], inputs[1]);
            if !h.dtype.is_float() || h != a {
                return Err(format!("add_rms_norm operands must be equal float types: {h} vs {a}"));
            }
            if let Some(w) = inputs.get(2) {
                norm_weight(h, w)?;
            }
            Ok(vec![h.clone(), h.clone()])
        }
        OpKind::StepEnd { eps, next, gate } => {
            let want = 2 + if *gate { 2 } else { 0 } + usize::from(*next == NextNorm::Norm);
            if inputs.len() != want {
                return Err(format!(
                    "step_end with next = {}{} takes {want} operands (h, norm_w{}{}), got {}",
                    next.name(),
                    if *gate { "" } else { " and no gate" },
                    if *gate { ", gate_w, gate_b" } else { "" },
                    if *next == NextNorm::Norm { ", next_w" } else { "" },
                    inputs.len()
                ));
            }
            check_eps(*eps)?;
            let h = inputs[0];
            if !h.dtype.is_float() {
                return Err(format!("step_end input must be float, got {h}"));
            }
            norm_weight(h, inputs[1])?;
            let hd = h.last().cloned().unwrap_or(Dim::Fixed(0));
            if *gate && (inputs[2].shape != vec![Dim::Fixed(1), hd.clone()] || inputs[3].shape != vec![Dim::Fixed(1)]) {
                return Err(format!(
                    "step_end gate must be weight [1, {hd}] and bias [1], got {} and {}",
                    inputs[2], inputs[3]
                ));
            }
            if *next == NextNorm::Norm {
                norm_weight(h, inputs[want - 1])?;
            }
            let mut out = vec![h.clone()];
            if *gate {
                out.push(h.with_last(Dim::Fixed(1)));
            }
            if *next != NextNorm::None {
                out.push(h.clone());
            }
            Ok(out)
        }
        _ => infer_single(kind, inputs, dtype).map(|t| vec![t]),
    }
}

fn check_eps(eps: f64) -> Result<(), String> {
    // Written so that NaN is rejected too.
    if !eps.is_finite() || eps <= 0.0 {
        return Err(format!("eps must be positive, got {eps}"));
    }
    Ok(())
}

fn norm_weight(x: &Type, w: &Type) -> Result<(), String> {
    if w.rank() != 1 || x.last() != Some(&w.shape[0]) {
        return Err(format!("norm weight {w} does not match the last dim of input {x}"));
    }
    Ok(())
}

fn infer_single(kind: &OpKind, inputs: &[&Type], dtype: DType) -> Result<Type, String> {
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
        OpKind::Weight { .. } | OpKind::Loop(_) | OpKind::AddRmsNorm { .. } | OpKind::StepEnd { .. } => {
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
            check_eps(*eps)?;
            norm_weight(x, w)?;
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
            if !(inputs.len() == 3 || inputs.len() == 5) {
                return Err(format!(
                    "attention takes 3 operands (q, k, v) or 5 (q, k, v, cos, sin), got {}",
                    inputs.len()
                ));
            }
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            let table = q.with_last(Dim::Fixed(a.head_dim));
            for t in inputs.iter().skip(3) {
                if t.shape != table.shape {
                    return Err(format!("attention rope table {t} does not match {table}"));
                }
            }
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
        OpKind::RmsScale { eps } => {
            arity(1)?;
            float(inputs[0], "rms_scale input")?;
            check_eps(*eps)?;
            Ok(inputs[0].clone())
        }
        OpKind::ScaleCols => {
            arity(2)?;
            let (w, s) = (inputs[0], inputs[1]);
            float(w, "scale_cols weight")?;
            if w.rank() != 2 || s.rank() != 1 || w.shape[1] != s.shape[0] {
                return Err(format!("scale_cols needs w [out, in] and s [in], got {w} and {s}"));
            }
            Ok(w.clone())
        }
        OpKind::Concat { axis } => {
            let first = inputs.first().ok_or("concat needs at least one operand")?;
            float(first, "concat operand")?;
            if *axis >= first.rank() {
                return Err(format!("concat axis {axis} is out of range for {first}"));
            }
            let mut total = 0usize;
            for t in inputs {
                let same_elsewhere = t.rank() == first.rank()
                    && t.dtype == first.dtype
                    && t.shape
                        .iter()
                        .zip(&first.shape)
                        .enumerate()
                        .all(|(i, (a, b))| i == *axis || a == b);
                if !same_elsewhere {
                    return Err(format!("concat operands {first} and {t} differ outside axis {axis}"));
                }
                total += t.shape[*axis]
                    .fixed()
                    .ok_or_else(|| format!("concat axis {axis} of {t} must be fixed"))?;
            }
            let mut shape = first.shape.clone();
            shape[*axis] = Dim::Fixed(total);
            Ok(Type::new(first.dtype, shape))
        }
        OpKind::Slice { start, len } => {
            arity(1)?;
            let x = inputs[0];
            let width = x
                .last()
                .and_then(Dim::fixed)
                .ok_or_else(|| format!("slice needs a fixed last dim, got {x}"))?;
            if *len == 0 || start + len > width {
                return Err(format!("slice [{start}, {}) is out of range for {x}", start + len));
            }
            Ok(x.with_last(Dim::Fixed(*len)))
        }
        OpKind::Swiglu => match inputs {
            [g, u] => {
                float(g, "swiglu operand")?;
                if g != u {
                    return Err(format!("swiglu operands differ: {g} vs {u}"));
                }
                Ok((*g).clone())
            }
            [gu] => {
                float(gu, "swiglu operand")?;
                match gu.last().and_then(Dim::fixed) {
                    Some(w) if w % 2 == 0 => Ok(gu.with_last(Dim::Fixed(w / 2))),
                    _ => Err(format!("one-operand swiglu needs an even fixed last dim, got {gu}")),
                }
            }
            _ => Err(format!("swiglu takes 1 or 2 operands, got {}", inputs.len())),
        },
        OpKind::ExitSelect { policy } => {
            let n = inputs.len();
            if n == 0 || !n.is_multiple_of(2) {
                return Err(format!(
                    "exit_select takes R outputs and R exit signals, got {n} operands"
                ));
            }
            let steps = n / 2;
            policy.check(steps)?;
            let out = inputs[0];
            float(out, "exit_select output")?;
            let lam = out.with_last(Dim::Fixed(1));
            for (i, t) in inputs.iter().enumerate() {
                let ok = if i < steps {
                    t == &out
                } else {
                    t.dtype.is_float() && t.shape == lam.shape
                };
                if !ok {
                    let want = if i < steps { out.to_string() } else { lam.to_string() };
                    return Err(format!("exit_select operand {i} is {t}, expected {want}"));
                }
            }
            Ok(out.clone())
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
