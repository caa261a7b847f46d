//! Graph → MLIR: one `func.func` whose arguments are the graph inputs and
//! the weights, the loop as `scf.for` (or `scf.while` under a threshold
//! policy), every op as `linalg.generic`s with their bodies and `tensor`
//! reshapes. See the module docs of [`super`] for the conventions.

use super::MlirError;
use super::builder::{Bb, Cx, It, Syms, V, amap, ds, elem_name, tensor_text};
use melior::ir::attribute::{StringAttribute, TypeAttribute};
use melior::ir::r#type::FunctionType;
use melior::ir::{Block, BlockLike, Location, Module, Region, RegionLike, Type, ValueLike};
use ouroc_ir::graph::{Block as IrBlock, NextNorm};
use ouroc_ir::{DType, Dim, ExitPolicy, Graph, Loop, Op, OpKind, Terminator, Type as IrType, ValueId};
use std::collections::HashMap;

/// Build the module of `g` (not yet verified).
pub(super) fn module<'c>(cx: &Cx<'c>, g: &Graph) -> Result<Module<'c>, MlirError> {
    let module = Module::new(cx.loc(&format!("graph @{}", g.name)));
    let mut lw = Lower {
        cx,
        g,
        syms: Syms::default(),
        vals: HashMap::new(),
    };

    // Arguments: the graph inputs, then one per distinct weight name (in the
    // order the graph names them), each tagged with what it is.
    let mut weights: Vec<(String, ValueId)> = Vec::new();
    let mut weight_of: HashMap<ValueId, usize> = HashMap::new();
    for op in g.walk() {
        if let OpKind::Weight { name } = &op.kind {
            let i = match weights.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    let ty = g.ty(op.result());
                    if ty.fixed_dims().is_none() {
                        return Err(MlirError::Unsupported(format!(
                            "weight \"{name}\" has symbolic dims ({ty})"
                        )));
                    }
                    weights.push((name.clone(), op.result()));
                    weights.len() - 1
                }
            };
            weight_of.insert(op.result(), i);
        }
    }
    let mut arg_types = Vec::new();
    let mut arg_attrs = Vec::new();
    for &v in g.inputs() {
        arg_types.push(lw.tensor_type(g.ty(v))?);
        arg_attrs.push(cx.attr(&format!("{{ouroc.input = \"{}\"}}", input_role(g, v)))?);
    }
    for (name, v) in &weights {
        arg_types.push(lw.tensor_type(g.ty(*v))?);
        arg_attrs.push(cx.attr(&format!("{{ouroc.weight = \"{}\"}}", escape(name)))?);
    }
    let result_types: Vec<Type> = g
        .outputs()
        .iter()
        .map(|v| lw.tensor_type(g.ty(*v)))
        .collect::<Result<_, _>>()?;

    let arg_locs: Vec<(Type, Location)> = arg_types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = match i.checked_sub(g.inputs().len()) {
                None => g.inputs()[i].to_string(),
                Some(w) => weights[w].0.clone(),
            };
            (*t, cx.loc(&name))
        })
        .collect();
    let block = Block::new(&arg_locs);
    {
        let bb = Bb::new(cx, &block, cx.loc(&format!("graph @{}", g.name)));
        for (i, &v) in g.inputs().iter().enumerate() {
            let a = bb.arg(i)?;
            lw.vals.insert(v, a);
            // The sizes of symbolic dims come from the first input that has them.
            for (d, dim) in g.ty(v).shape.iter().enumerate() {
                if let Dim::Sym(s) = dim
                    && !lw.syms.map.contains_key(s)
                {
                    let idx = bb.indexc(d)?;
                    let size = bb.op1("tensor.dim", &[a, idx], cx.index, &[])?;
                    lw.syms.map.insert(s.clone(), size);
                }
            }
        }
        for (&v, &w) in &weight_of {
            lw.vals.insert(v, bb.arg(g.inputs().len() + w)?);
        }
        lw.block(bb, &g.body)?;
        let Terminator::Return(outs) = &g.body.term else {
            return Err(MlirError::Unsupported(
                "a graph whose top block does not end in return".into(),
            ));
        };
        let outs: Vec<V> = outs.iter().map(|v| lw.val(*v)).collect::<Result<_, _>>()?;
        bb.at(cx.loc("return")).op0("func.return", &outs)?;
    }
    let region = Region::new();
    region.append_block(block);
    let fty = FunctionType::new(cx.ctx, &arg_types, &result_types);
    let func = melior::ir::operation::OperationBuilder::new("func.func", cx.loc(&format!("graph @{}", g.name)))
        .add_attributes(&[
            (cx.id("sym_name"), StringAttribute::new(cx.ctx, &g.name).into()),
            (cx.id("function_type"), TypeAttribute::new(fty.into()).into()),
            (cx.id("arg_attrs"), cx.array(&arg_attrs)),
            (cx.id("llvm.emit_c_interface"), melior::ir::Attribute::unit(cx.ctx)),
        ])
        .add_regions([region])
        .build()
        .map_err(|e| MlirError::Internal(format!("cannot build func.func: {e}")))?;
    module.body().append_operation(func);
    Ok(module)
}

/// What a graph input is, for the argument's `ouroc.input` tag.
fn input_role(g: &Graph, v: ValueId) -> String {
    for op in g.walk() {
        match op.kind {
            OpKind::Embedding if op.inputs.get(1) == Some(&v) => return "token_ids".into(),
            OpKind::RopeCos(_) | OpKind::RopeSin(_) if op.inputs.first() == Some(&v) => return "positions".into(),
            _ => {}
        }
    }
    v.to_string()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A float literal MLIR parses back to exactly `x` (17 significant digits of the f64).
fn float_lit(x: f32) -> String {
    format!("{:.16e}", x as f64)
}

struct Lower<'c, 'x> {
    cx: &'x Cx<'c>,
    g: &'x Graph,
    syms: Syms<'c>,
    vals: HashMap<ValueId, V<'c>>,
}

impl<'c> Lower<'c, '_> {
    fn val(&self, v: ValueId) -> Result<V<'c>, MlirError> {
        self.vals
            .get(&v)
            .copied()
            .ok_or_else(|| MlirError::Internal(format!("{v} is used before it is defined")))
    }

    fn ty(&self, v: ValueId) -> &IrType {
        self.g.ty(v)
    }

    fn tensor_type(&self, t: &IrType) -> Result<Type<'c>, MlirError> {
        self.cx.ty(&tensor_text(&t.shape, elem_name(t.dtype)))
    }

    fn block(&mut self, bb: Bb<'c, '_>, b: &IrBlock) -> Result<(), MlirError> {
        for op in &b.ops {
            let results: Vec<String> = op.results.iter().map(|r| r.to_string()).collect();
            let name = format!("{} = {}", results.join(", "), op.kind.name());
            let bb = bb.at(self.cx.loc(&name));
            let outs = self.op(bb, op).map_err(|e| e.in_op(&name))?;
            for (&r, v) in op.results.iter().zip(outs) {
                self.vals.insert(r, v);
            }
        }
        Ok(())
    }

    /// Elementwise `linalg.generic` over `out_shape`: each input reads the
    /// listed loop dims (all of them for a same-shaped input), the body gets
    /// every input widened to f32 and its result is narrowed to `out_elem`.
    fn ew(
        &self,
        bb: Bb<'c, '_>,
        ins: &[(V<'c>, Vec<usize>)],
        out_shape: &[Dim],
        out_elem: &str,
        f: impl FnOnce(&Bb<'c, '_>, &[V<'c>]) -> Result<V<'c>, MlirError>,
    ) -> Result<V<'c>, MlirError> {
        let n = out_shape.len();
        let init = bb.empty(out_shape, out_elem, &self.syms)?;
        let mut maps: Vec<String> = ins.iter().map(|(_, d)| amap(n, &ds(d.iter().copied()))).collect();
        maps.push(amap(n, &ds(0..n)));
        let vals: Vec<V<'c>> = ins.iter().map(|(v, _)| *v).collect();
        let out_t = self.cx.ty(out_elem)?;
        let r = bb.generic(&vals, &[init], &maps, &vec![It::Par; n], |b, a| {
            let args: Vec<V<'c>> = a[..a.len() - 1].iter().map(|x| b.widen(*x)).collect::<Result<_, _>>()?;
            let y = f(b, &args)?;
            Ok(vec![b.narrow(y, out_t)?])
        })?;
        Ok(r[0])
    }

    /// Reduce the last dim of `x` (of `shape`) into an f32 tensor of the
    /// leading dims, starting from `init` and combining with `f(acc, x_f32)`.
    fn reduce_last(
        &self,
        bb: Bb<'c, '_>,
        x: V<'c>,
        shape: &[Dim],
        init: f32,
        f: impl FnOnce(&Bb<'c, '_>, V<'c>, V<'c>) -> Result<V<'c>, MlirError>,
    ) -> Result<V<'c>, MlirError> {
        let r = shape.len();
        let acc = bb.fill(&shape[..r - 1], "f32", init, &self.syms)?;
        let mut iters = vec![It::Par; r - 1];
        iters.push(It::Red);
        let out = bb.generic(
            &[x],
            &[acc],
            &[amap(r, &ds(0..r)), amap(r, &ds(0..r - 1))],
            &iters,
            |b, a| {
                let v = b.widen(a[0])?;
                Ok(vec![f(b, a[1], v)?])
            },
        )?;
        Ok(out[0])
    }

    /// `rms_norm` (with a weight) or `rms_scale` (without): x * rsqrt(mean(x^2) + eps)
    /// rounded to the result dtype, times the weight, rounded again.
    fn rms(
        &self,
        bb: Bb<'c, '_>,
        x: V<'c>,
        xt: &IrType,
        w: Option<V<'c>>,
        eps: f64,
        out: &IrType,
    ) -> Result<V<'c>, MlirError> {
        let r = xt.rank();
        let n = last_fixed(xt)?;
        let ss = self.reduce_last(bb, x, &xt.shape, 0.0, |b, acc, v| b.addf(acc, b.mulf(v, v)?))?;
        let lead = &xt.shape[..r - 1];
        let inv = self.ew(bb, &[(ss, (0..r - 1).collect())], lead, "f32", |b, a| {
            let ms = b.divf(a[0], b.f32c(n as f32)?)?;
            let s = b.un("math.sqrt", b.addf(ms, b.f32c(eps as f32)?)?)?;
            b.divf(b.f32c(1.0)?, s)
        })?;
        let mut ins = vec![(x, (0..r).collect()), (inv, (0..r - 1).collect())];
        if let Some(w) = w {
            ins.push((w, vec![r - 1]));
        }
        let d = out.dtype;
        self.ew(bb, &ins, &out.shape, elem_name(d), |b, a| {
            let y = b.mulf(a[0], a[1])?;
            match a.get(2) {
                Some(&w) => b.mulf(w, b.rd(y, d)?),
                None => Ok(y),
            }
        })
    }

    /// `linear(x[.., in], w[out, in] [, bias[out]])`: accumulated in f32, rounded once.
    fn linear(
        &self,
        bb: Bb<'c, '_>,
        x: V<'c>,
        xt: &IrType,
        w: V<'c>,
        bias: Option<V<'c>>,
        out: &IrType,
    ) -> Result<V<'c>, MlirError> {
        let r = xt.rank();
        let acc = bb.fill(&out.shape, "f32", 0.0, &self.syms)?;
        let mut xd: Vec<usize> = (0..r - 1).collect();
        xd.push(r);
        let mut iters = vec![It::Par; r];
        iters.push(It::Red);
        let acc = bb.generic(
            &[x, w],
            &[acc],
            &[
                amap(r + 1, &ds(xd)),
                amap(r + 1, &ds([r - 1, r])),
                amap(r + 1, &ds(0..r)),
            ],
            &iters,
            |b, a| {
                let p = b.mulf(b.widen(a[0])?, b.widen(a[1])?)?;
                Ok(vec![b.addf(a[2], p)?])
            },
        )?[0];
        if bias.is_none() && out.dtype == DType::F32 {
            return Ok(acc);
        }
        let mut ins = vec![(acc, (0..r).collect())];
        if let Some(b) = bias {
            ins.push((b, vec![r - 1]));
        }
        self.ew(bb, &ins, &out.shape, elem_name(out.dtype), |b, a| match a.get(1) {
            Some(&bias) => b.addf(a[0], bias),
            None => Ok(a[0]),
        })
    }

    /// RoPE of `x[.., heads*hd]` with `cos/sin[.., hd]`: per head
    /// x*cos + rotate_half(x)*sin, each product and the sum rounded.
    fn rope(
        &self,
        bb: Bb<'c, '_>,
        x: V<'c>,
        xt: &IrType,
        cos: V<'c>,
        sin: V<'c>,
        hd: usize,
    ) -> Result<V<'c>, MlirError> {
        let r = xt.rank();
        let d = xt.dtype;
        let half = hd / 2;
        let init = bb.empty(&xt.shape, elem_name(d), &self.syms)?;
        let out_t = self.cx.elem(d)?;
        let out = bb.generic(
            &[x],
            &[init],
            &[amap(r, &ds(0..r)), amap(r, &ds(0..r))],
            &vec![It::Par; r],
            |b, a| {
                let idx: Vec<V<'c>> = (0..r).map(|i| b.linalg_index(i)).collect::<Result<_, _>>()?;
                let c = idx[r - 1];
                let j = b.bin("arith.remui", c, b.indexc(hd)?)?;
                let hc = b.indexc(half)?;
                let first = b.cmp("arith.cmpi", "ult", j, hc)?;
                let rot_idx = b.select(first, b.bin("arith.addi", c, hc)?, b.bin("arith.subi", c, hc)?)?;
                let mut at = idx[..r - 1].to_vec();
                at.push(rot_idx);
                let xr = b.widen(b.extract(x, &at)?)?;
                let rot = b.select(first, b.un("arith.negf", xr)?, xr)?;
                at[r - 1] = j;
                let cv = b.widen(b.extract(cos, &at)?)?;
                let sv = b.widen(b.extract(sin, &at)?)?;
                let xv = b.widen(a[0])?;
                let y = b.addf(b.rd(b.mulf(xv, cv)?, d)?, b.rd(b.mulf(rot, sv)?, d)?)?;
                Ok(vec![b.narrow(y, out_t)?])
            },
        )?;
        Ok(out[0])
    }

    fn op(&mut self, bb: Bb<'c, '_>, op: &Op) -> Result<Vec<V<'c>>, MlirError> {
        let ins: Vec<V<'c>> = match &op.kind {
            OpKind::Weight { .. } => return Ok(vec![self.val(op.result())?]),
            OpKind::Loop(l) => return Ok(vec![self.lower_loop(bb, op, l)?]),
            _ => op.inputs.iter().map(|v| self.val(*v)).collect::<Result<_, _>>()?,
        };
        let it = |i: usize| self.ty(op.inputs[i]);
        let out = self.ty(op.result());
        let d = out.dtype;
        let oe = elem_name(d);
        let r = out.rank();
        let all = || (0..r).collect::<Vec<usize>>();
        let one = match &op.kind {
            OpKind::Weight { .. } | OpKind::Loop(_) => unreachable!("handled above"),
            OpKind::Embedding => {
                let ri = it(1).rank();
                let init = bb.empty(&out.shape, oe, &self.syms)?;
                let out_t = self.cx.elem(d)?;
                let table = ins[0];
                bb.generic(
                    &[ins[1]],
                    &[init],
                    &[amap(ri + 1, &ds(0..ri)), amap(ri + 1, &ds(0..ri + 1))],
                    &vec![It::Par; ri + 1],
                    |b, a| {
                        let row = b.index_cast(a[0], b.cx.index)?;
                        let col = b.linalg_index(ri)?;
                        let v = b.extract(table, &[row, col])?;
                        let v = if v.r#type() == out_t {
                            v
                        } else {
                            b.narrow(b.widen(v)?, out_t)?
                        };
                        Ok(vec![v])
                    },
                )?[0]
            }
            OpKind::RmsNorm { eps } => self.rms(bb, ins[0], it(0), Some(ins[1]), *eps, out)?,
            OpKind::RmsScale { eps } => self.rms(bb, ins[0], it(0), None, *eps, out)?,
            OpKind::Linear => self.linear(bb, ins[0], it(0), ins[1], ins.get(2).copied(), out)?,
            OpKind::RopeCos(t) | OpKind::RopeSin(t) => {
                let half = t.head_dim / 2;
                let inv: Vec<String> = (0..half)
                    .map(|j| float_lit(1.0 / (t.theta as f32).powf((2 * j) as f32 / t.head_dim as f32)))
                    .collect();
                let tt = format!("tensor<{half}xf32>");
                let table = bb.op1(
                    "arith.constant",
                    &[],
                    self.cx.ty(&tt)?,
                    &[("value", self.cx.attr(&format!("dense<[{}]> : {tt}", inv.join(", ")))?)],
                )?;
                let f = if matches!(op.kind, OpKind::RopeCos(_)) {
                    "math.cos"
                } else {
                    "math.sin"
                };
                let rp = it(0).rank();
                let init = bb.empty(&out.shape, oe, &self.syms)?;
                let out_t = self.cx.elem(d)?;
                bb.generic(
                    &[ins[0]],
                    &[init],
                    &[amap(rp + 1, &ds(0..rp)), amap(rp + 1, &ds(0..rp + 1))],
                    &vec![It::Par; rp + 1],
                    |b, a| {
                        let p = b.widen(a[0])?;
                        let j = b.bin("arith.remui", b.linalg_index(rp)?, b.indexc(half)?)?;
                        let inv = b.extract(table, &[j])?;
                        let y = b.un(f, b.mulf(p, inv)?)?;
                        Ok(vec![b.narrow(y, out_t)?])
                    },
                )?[0]
            }
            OpKind::Rope { head_dim, .. } => self.rope(bb, ins[0], it(0), ins[1], ins[2], *head_dim)?,
            OpKind::Attention(a) => self.attention(bb, op, a, &ins)?,
            OpKind::Silu => self.ew(bb, &[(ins[0], all())], &out.shape, oe, |b, a| b.silu(a[0]))?,
            OpKind::Sigmoid => self.ew(bb, &[(ins[0], all())], &out.shape, oe, |b, a| b.sigmoid(a[0]))?,
            OpKind::Add => self.ew(bb, &[(ins[0], all()), (ins[1], all())], &out.shape, oe, |b, a| {
                b.addf(a[0], a[1])
            })?,
            OpKind::Mul => self.ew(bb, &[(ins[0], all()), (ins[1], all())], &out.shape, oe, |b, a| {
                b.mulf(a[0], a[1])
            })?,
            OpKind::ScaleCols => self.ew(bb, &[(ins[0], all()), (ins[1], vec![r - 1])], &out.shape, oe, |b, a| {
                b.mulf(a[0], a[1])
            })?,
            OpKind::Concat { axis } => {
                let mut acc = bb.empty(&out.shape, oe, &self.syms)?;
                let mut offset = 0;
                for (i, &v) in ins.iter().enumerate() {
                    let t = it(i);
                    let mut offs = vec![0; r];
                    offs[*axis] = offset;
                    acc = bb.insert_slice(v, acc, &offs, &t.shape, &self.syms)?;
                    offset += t.shape[*axis].fixed().ok_or_else(|| {
                        MlirError::Unsupported(format!("concat along the symbolic dim {}", t.shape[*axis]))
                    })?;
                }
                acc
            }
            OpKind::Slice { start, .. } => {
                let mut offs = vec![0; r];
                offs[r - 1] = *start;
                bb.extract_slice(ins[0], &offs, &out.shape, &self.syms, oe)?
            }
            OpKind::Swiglu => {
                let (g, u) = match ins.as_slice() {
                    [g, u] => (*g, *u),
                    [gu] => {
                        let half = last_fixed(out)?;
                        let mut offs = vec![0; r];
                        let g = bb.extract_slice(*gu, &offs, &out.shape, &self.syms, elem_name(it(0).dtype))?;
                        offs[r - 1] = half;
                        let u = bb.extract_slice(*gu, &offs, &out.shape, &self.syms, elem_name(it(0).dtype))?;
                        (g, u)
                    }
                    _ => return Err(MlirError::Internal("swiglu takes 1 or 2 operands".into())),
                };
                self.ew(bb, &[(g, all()), (u, all())], &out.shape, oe, |b, a| {
                    b.mulf(b.rd(b.silu(a[0])?, d)?, a[1])
                })?
            }
            OpKind::AddRmsNorm { eps } => {
                let s = self.ew(bb, &[(ins[0], all()), (ins[1], all())], &out.shape, oe, |b, a| {
                    b.addf(a[0], a[1])
                })?;
                let n = self.rms(bb, s, out, ins.get(2).copied(), *eps, self.ty(op.results[1]))?;
                return Ok(vec![s, n]);
            }
            OpKind::StepEnd { eps, next, gate } => {
                let hn = self.rms(bb, ins[0], it(0), Some(ins[1]), *eps, out)?;
                let mut res = vec![hn];
                if *gate {
                    let lt = self.ty(op.results[1]);
                    let logit = self.linear(bb, hn, out, ins[2], Some(ins[3]), lt)?;
                    let lam = self.ew(
                        bb,
                        &[(logit, (0..r).collect())],
                        &lt.shape,
                        elem_name(lt.dtype),
                        |b, a| b.sigmoid(a[0]),
                    )?;
                    res.push(lam);
                }
                let nt = self.ty(*op.results.last().expect("step_end has results"));
                match next {
                    NextNorm::None => {}
                    NextNorm::Scale => res.push(self.rms(bb, hn, out, None, *eps, nt)?),
                    NextNorm::Norm => res.push(self.rms(bb, hn, out, Some(ins[ins.len() - 1]), *eps, nt)?),
                }
                return Ok(res);
            }
            OpKind::ExitSelect { policy } => {
                let n = ins.len() / 2;
                let (outs, lams) = ins.split_at(n);
                let lam_t = it(n);
                let mut state = self.policy_init(bb, policy, out, lam_t)?;
                for s in 0..n {
                    let step = bb.indexc(s)?;
                    state = self.policy_step(bb, policy, &state, step, n, outs[s], out, Some(lams[s]), lam_t)?;
                }
                self.policy_result(bb, policy, &state, out)?
            }
        };
        Ok(vec![one])
    }

    /// Causal attention of the new tokens over themselves (prefill from an
    /// empty KV cache), with RoPE applied first when cos/sin are operands.
    fn attention(&self, bb: Bb<'c, '_>, op: &Op, a: &ouroc_ir::Attention, ins: &[V<'c>]) -> Result<V<'c>, MlirError> {
        let (qt, kt, out) = (self.ty(op.inputs[0]), self.ty(op.inputs[1]), self.ty(op.result()));
        if qt.rank() != 3 || kt.rank() != 3 {
            return Err(MlirError::Unsupported(format!(
                "attention on {qt} and {kt}: q, k and v must be [batch, seq, heads * head_dim]"
            )));
        }
        let (h, kvh, hd) = (a.heads, a.kv_heads, a.head_dim);
        let group = h / kvh;
        let d = out.dtype;
        let (mut q, mut k) = (ins[0], ins[1]);
        if let [_, _, _, cos, sin] = ins {
            q = self.rope(bb, q, qt, *cos, *sin, hd)?;
            k = self.rope(bb, k, kt, *cos, *sin, hd)?;
        }
        let ie = |i: usize| elem_name(self.ty(op.inputs[i]).dtype);
        let q4 = bb.expand_last(q, &qt.shape, &[h, hd], ie(0), &self.syms)?;
        let k4 = bb.expand_last(k, &kt.shape, &[kvh, hd], ie(1), &self.syms)?;
        let v4 = bb.expand_last(ins[2], &self.ty(op.inputs[2]).shape, &[kvh, hd], ie(2), &self.syms)?;
        let (b_, t_, j_) = (qt.shape[0].clone(), qt.shape[1].clone(), kt.shape[1].clone());
        let kv_head = |hdim: usize| {
            if group == 1 {
                format!("d{hdim}")
            } else {
                format!("d{hdim} floordiv {group}")
            }
        };
        // scores[b, h, t, j] = q[b, t, h, :] . k[b, j, h / group, :]
        let sshape = [b_.clone(), Dim::Fixed(h), t_.clone(), j_];
        let zero = bb.fill(&sshape, "f32", 0.0, &self.syms)?;
        let red5 = [It::Par, It::Par, It::Par, It::Par, It::Red];
        let dots = bb.generic(
            &[q4, k4],
            &[zero],
            &[
                amap(5, &ds([0, 2, 1, 4])),
                amap(5, &["d0".into(), "d3".into(), kv_head(1), "d4".into()]),
                amap(5, &ds(0..4)),
            ],
            &red5,
            |b, x| {
                let p = b.mulf(b.widen(x[0])?, b.widen(x[1])?)?;
                Ok(vec![b.addf(x[2], p)?])
            },
        )?[0];
        // Scaled, rounded where the reference rounds, -inf above the diagonal.
        let scale = (hd as f64).powf(-0.5) as f32;
        let init = bb.empty(&sshape, "f32", &self.syms)?;
        let scores = bb.generic(
            &[dots],
            &[init],
            &[amap(4, &ds(0..4)), amap(4, &ds(0..4))],
            &[It::Par; 4],
            |b, x| {
                let s = b.rd(b.mulf(b.rd(x[0], d)?, b.f32c(scale)?)?, d)?;
                let future = b.cmp("arith.cmpi", "ugt", b.linalg_index(3)?, b.linalg_index(2)?)?;
                Ok(vec![b.select(future, b.f32c(f32::NEG_INFINITY)?, s)?])
            },
        )?[0];
        let max = self.reduce_last(bb, scores, &sshape, f32::NEG_INFINITY, |b, acc, x| {
            b.bin("arith.maxnumf", acc, x)
        })?;
        let exps = self.ew(
            bb,
            &[(scores, (0..4).collect()), (max, (0..3).collect())],
            &sshape,
            "f32",
            |b, x| b.un("math.exp", b.subf(x[0], x[1])?),
        )?;
        let sum = self.reduce_last(bb, exps, &sshape, 0.0, |b, acc, x| b.addf(acc, x))?;
        // o[b, t, h, :] = sum_j rd(e / sum) * v[b, j, h / group, :]
        let oshape = [b_, t_, Dim::Fixed(h), Dim::Fixed(hd)];
        let zero = bb.fill(&oshape, "f32", 0.0, &self.syms)?;
        let o = bb.generic(
            &[exps, sum, v4],
            &[zero],
            &[
                amap(5, &ds([0, 2, 1, 4])),
                amap(5, &ds([0, 2, 1])),
                amap(5, &["d0".into(), "d4".into(), kv_head(2), "d3".into()]),
                amap(5, &ds(0..4)),
            ],
            &red5,
            |b, x| {
                let p = b.rd(b.divf(x[0], x[1])?, d)?;
                let pv = b.mulf(p, b.widen(x[2])?)?;
                Ok(vec![b.addf(x[3], pv)?])
            },
        )?[0];
        let o = if d == DType::F32 {
            o
        } else {
            self.ew(bb, &[(o, (0..4).collect())], &oshape, elem_name(d), |_, x| Ok(x[0]))?
        };
        bb.collapse_last(o, &oshape, 2, elem_name(d))
    }

    // ---- loops and exit policies ----

    /// The policy's state carried across steps, before the first step.
    fn policy_init(
        &self,
        bb: Bb<'c, '_>,
        policy: &ExitPolicy,
        out: &IrType,
        lam: &IrType,
    ) -> Result<Vec<V<'c>>, MlirError> {
        let s = &self.syms;
        Ok(match policy {
            // The selected output so far.
            ExitPolicy::Last | ExitPolicy::Step(_) => vec![bb.fill(&out.shape, elem_name(out.dtype), 0.0, s)?],
            // Survival, cumulative exit probability, decided, selected output.
            ExitPolicy::Threshold { .. } => vec![
                bb.fill(&lam.shape, "f32", 1.0, s)?,
                bb.fill(&lam.shape, "f32", 0.0, s)?,
                bb.fill(&lam.shape, "i1", 0.0, s)?,
                bb.fill(&out.shape, elem_name(out.dtype), 0.0, s)?,
            ],
            // Survival, expected output (f32).
            ExitPolicy::Weighted => vec![bb.fill(&lam.shape, "f32", 1.0, s)?, bb.fill(&out.shape, "f32", 0.0, s)?],
        })
    }

    /// The policy's state after step `step` (an index) of `steps`.
    #[allow(clippy::too_many_arguments)]
    fn policy_step(
        &self,
        bb: Bb<'c, '_>,
        policy: &ExitPolicy,
        state: &[V<'c>],
        step: V<'c>,
        steps: usize,
        out_v: V<'c>,
        out: &IrType,
        lam_v: Option<V<'c>>,
        lam: &IrType,
    ) -> Result<Vec<V<'c>>, MlirError> {
        let s = &self.syms;
        let r = out.rank();
        let is = |k: usize| bb.cmp("arith.cmpi", "eq", step, bb.indexc(k)?);
        let need_lam =
            || lam_v.ok_or_else(|| MlirError::Unsupported(format!("exit policy {policy} without an exit signal")));
        // Loop dims of `out` read by a per-token tensor (`lam`-shaped, last dim 1).
        let mut per_token = ds(0..r - 1);
        per_token.push("0".into());
        match policy {
            ExitPolicy::Last => Ok(vec![out_v]),
            ExitPolicy::Step(k) => Ok(vec![bb.select(is(*k)?, out_v, state[0])?]),
            ExitPolicy::Threshold { q, arith } => {
                let lam_v = need_lam()?;
                let arith = *arith;
                let last = is(steps - 1)?;
                let n = lam.rank();
                let id = amap(n, &ds(0..n));
                let inits = [
                    bb.empty(&lam.shape, "f32", s)?,
                    bb.empty(&lam.shape, "f32", s)?,
                    bb.empty(&lam.shape, "i1", s)?,
                ];
                let qr = arith.round(*q);
                let upd = bb.generic(
                    &[lam_v, state[0], state[1], state[2]],
                    &inits,
                    &vec![id; 7],
                    &vec![It::Par; n],
                    |b, a| {
                        let l = b.rd(b.widen(a[0])?, arith)?;
                        let (surv, acc, done) = (a[1], a[2], a[3]);
                        let p = b.select(last, surv, b.rd(b.mulf(l, surv)?, arith)?)?;
                        let surv2 = b.rd(b.mulf(surv, b.rd(b.subf(b.f32c(1.0)?, l)?, arith)?)?, arith)?;
                        let acc2 = b.addf(acc, p)?;
                        let hit = b.cmp("arith.cmpf", "oge", b.rd(acc2, arith)?, b.f32c(qr)?)?;
                        let hit = b.bin("arith.ori", hit, last)?;
                        Ok(vec![surv2, acc2, b.bin("arith.ori", done, hit)?])
                    },
                )?;
                // Tokens not decided before this step take its output.
                let init = bb.empty(&out.shape, elem_name(out.dtype), s)?;
                let sel = bb.generic(
                    &[state[2], out_v, state[3]],
                    &[init],
                    &[
                        amap(r, &per_token),
                        amap(r, &ds(0..r)),
                        amap(r, &ds(0..r)),
                        amap(r, &ds(0..r)),
                    ],
                    &vec![It::Par; r],
                    |b, a| Ok(vec![b.select(a[0], a[2], a[1])?]),
                )?[0];
                Ok(vec![upd[0], upd[1], upd[2], sel])
            }
            ExitPolicy::Weighted => {
                let lam_v = need_lam()?;
                let last = is(steps - 1)?;
                let n = lam.rank();
                let id = amap(n, &ds(0..n));
                let inits = [bb.empty(&lam.shape, "f32", s)?, bb.empty(&lam.shape, "f32", s)?];
                let pv = bb.generic(&[lam_v, state[0]], &inits, &vec![id; 4], &vec![It::Par; n], |b, a| {
                    let l = b.widen(a[0])?;
                    let p = b.select(last, a[1], b.mulf(l, a[1])?)?;
                    let surv2 = b.mulf(a[1], b.subf(b.f32c(1.0)?, l)?)?;
                    Ok(vec![p, surv2])
                })?;
                // The probability is per token: the last dim of `out` reads its index 0.
                let init = bb.empty(&out.shape, "f32", s)?;
                let acc = bb.generic(
                    &[pv[0], out_v, state[1]],
                    &[init],
                    &[
                        amap(r, &per_token),
                        amap(r, &ds(0..r)),
                        amap(r, &ds(0..r)),
                        amap(r, &ds(0..r)),
                    ],
                    &vec![It::Par; r],
                    |b, a| {
                        let x = b.widen(a[1])?;
                        Ok(vec![b.addf(a[2], b.mulf(a[0], x)?)?])
                    },
                )?[0];
                Ok(vec![pv[1], acc])
            }
        }
    }

    /// The loop's (or exit_select's) result from the final policy state.
    fn policy_result(
        &self,
        bb: Bb<'c, '_>,
        policy: &ExitPolicy,
        state: &[V<'c>],
        out: &IrType,
    ) -> Result<V<'c>, MlirError> {
        match policy {
            ExitPolicy::Last | ExitPolicy::Step(_) => Ok(state[0]),
            ExitPolicy::Threshold { .. } => Ok(state[3]),
            ExitPolicy::Weighted => {
                let r = out.rank();
                self.ew(
                    bb,
                    &[(state[1], (0..r).collect())],
                    &out.shape,
                    elem_name(out.dtype),
                    |_, a| Ok(a[0]),
                )
            }
        }
    }

    /// `scf.for` over the steps (`scf.while` under a threshold policy, which
    /// stops once every token has exited), carrying the loop's carried values
    /// and the policy's state as iter_args.
    fn lower_loop(&mut self, bb: Bb<'c, '_>, op: &Op, l: &Loop) -> Result<V<'c>, MlirError> {
        let cx = self.cx;
        let Terminator::Yield { next, out, exit } = &l.body.term else {
            return Err(MlirError::Internal("a loop body must end in yield".into()));
        };
        let out_t = self.ty(*out).clone();
        let lam_t = match exit {
            Some(e) => self.ty(*e).clone(),
            None => out_t.with_last(Dim::Fixed(1)).with_dtype(out_t.dtype),
        };
        let policy = l.policy;
        let carried: Vec<V<'c>> = op.inputs.iter().map(|v| self.val(*v)).collect::<Result<_, _>>()?;
        let nc = carried.len();
        // Under `last`, when the output is itself carried, the loop's result is that carried value.
        let out_carried = match policy {
            ExitPolicy::Last => next.iter().position(|v| v == out),
            _ => None,
        };
        let state = match out_carried {
            Some(_) => Vec::new(),
            None => self.policy_init(bb, &policy, &out_t, &lam_t)?,
        };
        let early = matches!(policy, ExitPolicy::Threshold { .. });
        let mut inits: Vec<V<'c>> = Vec::new();
        if early {
            inits.push(bb.indexc(0)?);
            inits.push(bb.boolc(true)?);
        }
        inits.extend_from_slice(&carried);
        inits.extend_from_slice(&state);
        let types: Vec<Type<'c>> = inits.iter().map(|v| v.r#type()).collect();
        let pre = if early { 2 } else { 0 };

        // The body: block args (step, carried.., state..), or with `scf.while`
        // (step, go, carried.., state..).
        let mut arg_types: Vec<(Type<'c>, Location<'c>)> = Vec::new();
        if !early {
            arg_types.push((cx.index, bb.loc));
        }
        arg_types.extend(types.iter().map(|t| (*t, bb.loc)));
        let body = Block::new(&arg_types);
        {
            let ib = Bb::new(cx, &body, bb.loc);
            let step = ib.arg(0)?;
            let base = if early { pre } else { 1 };
            for (i, &a) in l.body.args[1..].iter().enumerate() {
                self.vals.insert(a, ib.arg(base + i)?);
            }
            let state: Vec<V<'c>> = (0..state.len())
                .map(|i| ib.arg(base + nc + i))
                .collect::<Result<_, _>>()?;
            if uses(&l.body, l.body.args[0]) {
                let s32 = ib.index_cast(step, cx.i32)?;
                let t = ib.op1("tensor.from_elements", &[s32], cx.ty("tensor<i32>")?, &[])?;
                self.vals.insert(l.body.args[0], t);
            }
            self.block(ib, &l.body)?;
            let yb = ib.at(cx.loc("yield"));
            let next_v: Vec<V<'c>> = next.iter().map(|v| self.val(*v)).collect::<Result<_, _>>()?;
            let out_v = self.val(*out)?;
            let lam_v = exit.map(|e| self.val(e)).transpose()?;
            let state2 = match out_carried {
                Some(_) => Vec::new(),
                None => self.policy_step(yb, &policy, &state, step, l.steps, out_v, &out_t, lam_v, &lam_t)?,
            };
            let mut ys = Vec::new();
            if early {
                let step1 = yb.bin("arith.addi", step, yb.indexc(1)?)?;
                let more = yb.cmp("arith.cmpi", "ult", step1, yb.indexc(l.steps)?)?;
                let undecided = self.any_undecided(yb, state2[2], &lam_t)?;
                ys.push(step1);
                ys.push(yb.bin("arith.andi", more, undecided)?);
            }
            ys.extend(next_v);
            ys.extend(state2);
            yb.op0("scf.yield", &ys)?;
        }
        let region = Region::new();
        region.append_block(body);
        let loop_attrs = [
            ("ouroc.steps", cx.i64_attr(l.steps as i64)?),
            ("ouroc.policy", cx.str_attr(&policy.to_string())),
        ];
        let results = if early {
            // before: continue while `go`, forwarding every value.
            let before = Block::new(&types.iter().map(|t| (*t, bb.loc)).collect::<Vec<_>>());
            {
                let b0 = Bb::new(cx, &before, bb.loc);
                let args: Vec<V<'c>> = (0..types.len()).map(|i| b0.arg(i)).collect::<Result<_, _>>()?;
                let mut ops = vec![args[1]];
                ops.extend_from_slice(&args);
                b0.op0("scf.condition", &ops)?;
            }
            let before_region = Region::new();
            before_region.append_block(before);
            bb.op("scf.while", &inits, &types, &loop_attrs, vec![before_region, region])?
        } else {
            let mut ops = vec![bb.indexc(0)?, bb.indexc(l.steps)?, bb.indexc(1)?];
            ops.extend_from_slice(&inits);
            bb.op("scf.for", &ops, &types, &loop_attrs, vec![region])?
        };
        let results = &results[pre..];
        match out_carried {
            Some(k) => Ok(results[k]),
            None => self.policy_result(bb, &policy, &results[nc..], &out_t),
        }
    }

    /// Whether any token's exit is still undecided: an `i1` scalar.
    fn any_undecided(&self, bb: Bb<'c, '_>, done: V<'c>, lam: &IrType) -> Result<V<'c>, MlirError> {
        let n = lam.rank();
        let init = bb.fill(&[], "i1", 0.0, &self.syms)?;
        let any = bb.generic(
            &[done],
            &[init],
            &[amap(n, &ds(0..n)), amap(n, &[])],
            &vec![It::Red; n],
            |b, a| {
                let not_done = b.bin("arith.xori", a[0], b.boolc(true)?)?;
                Ok(vec![b.bin("arith.ori", a[1], not_done)?])
            },
        )?[0];
        bb.extract(any, &[])
    }
}

fn last_fixed(t: &IrType) -> Result<usize, MlirError> {
    t.last()
        .and_then(Dim::fixed)
        .ok_or_else(|| MlirError::Unsupported(format!("a reduction over a symbolic last dim ({t})")))
}

/// Whether `v` is an operand of any op of `b` (or of its nested loops) or of its terminator.
fn uses(b: &IrBlock, v: ValueId) -> bool {
    b.ops.iter().any(|op| {
        op.inputs.contains(&v)
            || match &op.kind {
                OpKind::Loop(l) => uses(&l.body, v),
                _ => false,
            }
    }) || match &b.term {
        Terminator::Return(vs) => vs.contains(&v),
        Terminator::Yield { next, out, exit } => next.contains(&v) || *out == v || *exit == Some(v),
    }
}
