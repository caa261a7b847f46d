//! A thin layer over melior's `OperationBuilder`: one call per MLIR op, the
//! element-type conversions the IR's rounding points need, and
//! `linalg.generic` with a body built by a closure.
//!
//! Types and attribute literals (affine maps, iterator types) are written in
//! MLIR's own syntax and parsed by MLIR; ops, blocks and regions are built
//! through the API.

use super::MlirError;
use melior::Context;
use melior::ir::attribute::{ArrayAttribute, FloatAttribute, IntegerAttribute, StringAttribute};
use melior::ir::r#type::RankedTensorType;
use melior::ir::{
    Attribute, Block, BlockLike, Identifier, Location, Operation, OperationRef, Region, RegionLike, ShapedTypeLike,
    Type, Value, ValueLike,
};
use ouroc_ir::{DType, Dim};
use std::collections::HashMap;

/// An SSA value of the module being built. melior ties a value's lifetime to
/// a borrow of the block that defines it, which nested regions (a loop body,
/// a `linalg.generic` body using values from outside) cannot express; every
/// block built here ends up owned by the module before [`super::export`]
/// returns, and no value is used after the module is printed.
pub(super) type V<'c> = Value<'c, 'static>;

fn erase<'c>(v: Value<'c, '_>) -> V<'c> {
    // SAFETY: an MLIR value is a handle into its block or operation, which stays
    // alive as long as the module (see `V`).
    unsafe { Value::from_raw(v.to_raw()) }
}

/// `linalg.generic` iterator kinds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum It {
    Par,
    Red,
}

/// The MLIR element type of a dtype.
pub(super) fn elem_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
    }
}

/// `tensor<?x?x32xf32>` for a shape (symbolic dims are dynamic) and element type.
pub(super) fn tensor_text(shape: &[Dim], elem: &str) -> String {
    let mut s = String::from("tensor<");
    for d in shape {
        match d {
            Dim::Fixed(n) => s += &format!("{n}x"),
            Dim::Sym(_) => s += "?x",
        }
    }
    s + elem + ">"
}

/// `affine_map<(d0, d1, d2) -> (d0, d2)>` over `n` loop dims.
pub(super) fn amap(n: usize, results: &[String]) -> String {
    let dims: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    format!("affine_map<({}) -> ({})>", dims.join(", "), results.join(", "))
}

/// `d{i}` for each listed loop dim.
pub(super) fn ds(dims: impl IntoIterator<Item = usize>) -> Vec<String> {
    dims.into_iter().map(|i| format!("d{i}")).collect()
}

/// The context: parses types and attributes, caches the common ones.
pub(super) struct Cx<'c> {
    pub ctx: &'c Context,
    pub f32: Type<'c>,
    pub i1: Type<'c>,
    pub i32: Type<'c>,
    pub index: Type<'c>,
    types: std::cell::RefCell<HashMap<String, Type<'c>>>,
}

impl<'c> Cx<'c> {
    pub fn new(ctx: &'c Context) -> Result<Self, MlirError> {
        let parse = |s: &str| Type::parse(ctx, s).ok_or_else(|| MlirError::Internal(format!("cannot parse type {s}")));
        Ok(Cx {
            ctx,
            f32: Type::float32(ctx),
            i1: parse("i1")?,
            i32: parse("i32")?,
            index: Type::index(ctx),
            types: Default::default(),
        })
    }

    pub fn ty(&self, text: &str) -> Result<Type<'c>, MlirError> {
        if let Some(t) = self.types.borrow().get(text) {
            return Ok(*t);
        }
        let t = Type::parse(self.ctx, text).ok_or_else(|| MlirError::Internal(format!("cannot parse type {text}")))?;
        self.types.borrow_mut().insert(text.to_string(), t);
        Ok(t)
    }

    pub fn elem(&self, d: DType) -> Result<Type<'c>, MlirError> {
        self.ty(elem_name(d))
    }

    pub fn attr(&self, text: &str) -> Result<Attribute<'c>, MlirError> {
        Attribute::parse(self.ctx, text).ok_or_else(|| MlirError::Internal(format!("cannot parse attribute {text}")))
    }

    pub fn str_attr(&self, s: &str) -> Attribute<'c> {
        StringAttribute::new(self.ctx, s).into()
    }

    pub fn i64_attr(&self, v: i64) -> Result<Attribute<'c>, MlirError> {
        Ok(IntegerAttribute::new(self.ty("i64")?, v).into())
    }

    pub fn array(&self, items: &[Attribute<'c>]) -> Attribute<'c> {
        ArrayAttribute::new(self.ctx, items).into()
    }

    pub fn id(&self, name: &str) -> Identifier<'c> {
        Identifier::new(self.ctx, name)
    }

    /// A location named after the IR op it comes from: a verifier message
    /// points at `loc("%50 = add_rms_norm")`.
    pub fn loc(&self, name: &str) -> Location<'c> {
        Location::name(self.ctx, name, Location::unknown(self.ctx))
    }
}

/// The element type of a tensor value (the value's type itself otherwise).
pub(super) fn elem_of<'c>(v: V<'c>) -> Type<'c> {
    let t = v.r#type();
    RankedTensorType::try_from(t).map(|r| r.element()).unwrap_or(t)
}

/// An insertion point: appends ops to one block, all at one location.
#[derive(Clone, Copy)]
pub(super) struct Bb<'c, 'a> {
    pub cx: &'a Cx<'c>,
    pub block: &'a Block<'c>,
    pub loc: Location<'c>,
}

impl<'c, 'a> Bb<'c, 'a> {
    pub fn new(cx: &'a Cx<'c>, block: &'a Block<'c>, loc: Location<'c>) -> Self {
        Bb { cx, block, loc }
    }

    pub fn at(self, loc: Location<'c>) -> Self {
        Bb { loc, ..self }
    }

    pub fn arg(&self, i: usize) -> Result<V<'c>, MlirError> {
        Ok(erase(
            self.block
                .argument(i)
                .map_err(|e| MlirError::Internal(e.to_string()))?
                .into(),
        ))
    }

    pub fn append(&self, op: Operation<'c>) -> OperationRef<'c, 'a> {
        self.block.append_operation(op)
    }

    /// Build and append `name(operands) {attrs} (regions) : results`.
    pub fn op(
        &self,
        name: &str,
        operands: &[V<'c>],
        results: &[Type<'c>],
        attrs: &[(&str, Attribute<'c>)],
        regions: Vec<Region<'c>>,
    ) -> Result<Vec<V<'c>>, MlirError> {
        let attrs: Vec<(Identifier<'c>, Attribute<'c>)> = attrs.iter().map(|(k, v)| (self.cx.id(k), *v)).collect();
        let op = melior::ir::operation::OperationBuilder::new(name, self.loc)
            .add_operands(operands)
            .add_results(results)
            .add_attributes(&attrs)
            .add_regions_vec(regions)
            .build()
            .map_err(|e| MlirError::Internal(format!("cannot build {name}: {e}")))?;
        let op = self.append(op);
        (0..results.len())
            .map(|i| {
                op.result(i)
                    .map(|r| erase(r.into()))
                    .map_err(|e| MlirError::Internal(e.to_string()))
            })
            .collect()
    }

    pub fn op1(
        &self,
        name: &str,
        operands: &[V<'c>],
        result: Type<'c>,
        attrs: &[(&str, Attribute<'c>)],
    ) -> Result<V<'c>, MlirError> {
        Ok(self.op(name, operands, &[result], attrs, vec![])?[0])
    }

    pub fn op0(&self, name: &str, operands: &[V<'c>]) -> Result<(), MlirError> {
        self.op(name, operands, &[], &[], vec![]).map(|_| ())
    }

    // ---- scalars ----

    pub fn f32c(&self, x: f32) -> Result<V<'c>, MlirError> {
        let a: Attribute = FloatAttribute::new(self.cx.ctx, self.cx.f32, x as f64).into();
        self.op1("arith.constant", &[], self.cx.f32, &[("value", a)])
    }

    pub fn indexc(&self, n: usize) -> Result<V<'c>, MlirError> {
        let a: Attribute = IntegerAttribute::new(self.cx.index, n as i64).into();
        self.op1("arith.constant", &[], self.cx.index, &[("value", a)])
    }

    pub fn boolc(&self, b: bool) -> Result<V<'c>, MlirError> {
        let a: Attribute = IntegerAttribute::new(self.cx.i1, b as i64).into();
        self.op1("arith.constant", &[], self.cx.i1, &[("value", a)])
    }

    /// A binary arith/math op whose result has the type of `a`.
    pub fn bin(&self, name: &str, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.op1(name, &[a, b], a.r#type(), &[])
    }

    pub fn un(&self, name: &str, a: V<'c>) -> Result<V<'c>, MlirError> {
        self.op1(name, &[a], a.r#type(), &[])
    }

    pub fn addf(&self, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.bin("arith.addf", a, b)
    }

    pub fn subf(&self, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.bin("arith.subf", a, b)
    }

    pub fn mulf(&self, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.bin("arith.mulf", a, b)
    }

    pub fn divf(&self, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.bin("arith.divf", a, b)
    }

    /// `arith.cmpf`/`arith.cmpi` with a predicate name (`oge`, `ult`, `eq`, ...).
    pub fn cmp(&self, name: &str, pred: &str, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        // The predicates are i64 enum attributes, in the order of ArithBase.td.
        const CMPI: [&str; 10] = ["eq", "ne", "slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge"];
        const CMPF: [&str; 16] = [
            "false", "oeq", "ogt", "oge", "olt", "ole", "one", "ord", "ueq", "ugt", "uge", "ult", "ule", "une", "uno",
            "true",
        ];
        let table: &[&str] = if name == "arith.cmpf" { &CMPF } else { &CMPI };
        let p = table
            .iter()
            .position(|p| *p == pred)
            .ok_or_else(|| MlirError::Internal(format!("no {name} predicate {pred}")))?;
        self.op1(name, &[a, b], self.cx.i1, &[("predicate", self.cx.i64_attr(p as i64)?)])
    }

    pub fn select(&self, c: V<'c>, a: V<'c>, b: V<'c>) -> Result<V<'c>, MlirError> {
        self.op1("arith.select", &[c, a, b], a.r#type(), &[])
    }

    /// `1 / (1 + exp(-x))`, as the interpreter computes a sigmoid.
    pub fn sigmoid(&self, x: V<'c>) -> Result<V<'c>, MlirError> {
        let one = self.f32c(1.0)?;
        let e = self.un("math.exp", self.un("arith.negf", x)?)?;
        self.divf(one, self.addf(one, e)?)
    }

    /// `x / (1 + exp(-x))`.
    pub fn silu(&self, x: V<'c>) -> Result<V<'c>, MlirError> {
        let one = self.f32c(1.0)?;
        let e = self.un("math.exp", self.un("arith.negf", x)?)?;
        self.divf(x, self.addf(one, e)?)
    }

    /// A scalar widened to f32 (floats by `extf`, integers by `sitofp`).
    pub fn widen(&self, x: V<'c>) -> Result<V<'c>, MlirError> {
        let t = x.r#type();
        if t == self.cx.f32 {
            Ok(x)
        } else if t == self.cx.i32 {
            self.op1("arith.sitofp", &[x], self.cx.f32, &[])
        } else {
            self.op1("arith.extf", &[x], self.cx.f32, &[])
        }
    }

    /// An f32 scalar narrowed to `t` (rounding to nearest even).
    pub fn narrow(&self, x: V<'c>, t: Type<'c>) -> Result<V<'c>, MlirError> {
        if t == self.cx.f32 {
            Ok(x)
        } else if t == self.cx.i32 {
            self.op1("arith.fptosi", &[x], t, &[])
        } else {
            self.op1("arith.truncf", &[x], t, &[])
        }
    }

    /// Round an f32 to `d` and widen it back: a rounding point of the reference.
    pub fn rd(&self, x: V<'c>, d: DType) -> Result<V<'c>, MlirError> {
        match d {
            DType::F32 | DType::I32 => Ok(x),
            _ => self.widen(self.narrow(x, self.cx.elem(d)?)?),
        }
    }

    pub fn linalg_index(&self, dim: usize) -> Result<V<'c>, MlirError> {
        self.op1(
            "linalg.index",
            &[],
            self.cx.index,
            &[("dim", self.cx.i64_attr(dim as i64)?)],
        )
    }

    pub fn index_cast(&self, x: V<'c>, t: Type<'c>) -> Result<V<'c>, MlirError> {
        self.op1("arith.index_cast", &[x], t, &[])
    }

    pub fn extract(&self, t: V<'c>, idx: &[V<'c>]) -> Result<V<'c>, MlirError> {
        let mut ops = vec![t];
        ops.extend_from_slice(idx);
        self.op1("tensor.extract", &ops, elem_of(t), &[])
    }

    // ---- tensors ----

    /// `tensor.empty(dynamic sizes) : tensor<...>`.
    pub fn empty(&self, shape: &[Dim], elem: &str, syms: &Syms<'c>) -> Result<V<'c>, MlirError> {
        let dyn_sizes = syms.dynamic(shape)?;
        self.op1("tensor.empty", &dyn_sizes, self.cx.ty(&tensor_text(shape, elem))?, &[])
    }

    /// A tensor filled with one f32 value (converted to `elem`).
    pub fn fill(&self, shape: &[Dim], elem: &str, value: f32, syms: &Syms<'c>) -> Result<V<'c>, MlirError> {
        let init = self.empty(shape, elem, syms)?;
        let n = shape.len();
        let t = self.cx.ty(elem)?;
        let out = self.generic(&[], &[init], &[amap(n, &ds(0..n))], &vec![It::Par; n], |b, _| {
            let c = if t == self.cx.i1 {
                b.boolc(value != 0.0)?
            } else {
                b.narrow(b.f32c(value)?, t)?
            };
            Ok(vec![c])
        })?;
        Ok(out[0])
    }

    /// `linalg.generic ins(ins) outs(outs)` with `maps` (ins then outs),
    /// iterator kinds, and a body computing the yielded values from the block
    /// arguments (one scalar per operand).
    pub fn generic(
        &self,
        ins: &[V<'c>],
        outs: &[V<'c>],
        maps: &[String],
        iters: &[It],
        body: impl FnOnce(&Bb<'c, '_>, &[V<'c>]) -> Result<Vec<V<'c>>, MlirError>,
    ) -> Result<Vec<V<'c>>, MlirError> {
        let cx = self.cx;
        let arg_types: Vec<(Type<'c>, Location<'c>)> =
            ins.iter().chain(outs).map(|v| (elem_of(*v), self.loc)).collect();
        let block = Block::new(&arg_types);
        {
            let bb = Bb::new(cx, &block, self.loc);
            let args: Vec<V<'c>> = (0..arg_types.len()).map(|i| bb.arg(i)).collect::<Result<_, _>>()?;
            let ys = body(&bb, &args)?;
            bb.op0("linalg.yield", &ys)?;
        }
        let region = Region::new();
        region.append_block(block);
        let maps: Vec<Attribute<'c>> = maps.iter().map(|m| cx.attr(m)).collect::<Result<_, _>>()?;
        let iters: Vec<Attribute<'c>> = iters
            .iter()
            .map(|i| {
                cx.attr(match i {
                    It::Par => "#linalg.iterator_type<parallel>",
                    It::Red => "#linalg.iterator_type<reduction>",
                })
            })
            .collect::<Result<_, _>>()?;
        let mut operands = ins.to_vec();
        operands.extend_from_slice(outs);
        let results: Vec<Type<'c>> = outs.iter().map(|v| v.r#type()).collect();
        let seg = cx.attr(&format!("array<i32: {}, {}>", ins.len(), outs.len()))?;
        self.op(
            "linalg.generic",
            &operands,
            &results,
            &[
                ("indexing_maps", cx.array(&maps)),
                ("iterator_types", cx.array(&iters)),
                ("operandSegmentSizes", seg),
            ],
            vec![region],
        )
    }

    /// `tensor.extract_slice src[offsets][sizes][1..]` with static offsets.
    pub fn extract_slice(
        &self,
        src: V<'c>,
        offsets: &[usize],
        sizes: &[Dim],
        syms: &Syms<'c>,
        elem: &str,
    ) -> Result<V<'c>, MlirError> {
        let dyn_sizes = syms.dynamic(sizes)?;
        let cx = self.cx;
        let mut operands = vec![src];
        operands.extend_from_slice(&dyn_sizes);
        let attrs = [
            (
                "static_offsets",
                cx.attr(&i64_array(offsets.iter().map(|&o| o as i64)))?,
            ),
            ("static_sizes", cx.attr(&i64_array(sizes.iter().map(static_size)))?),
            ("static_strides", cx.attr(&i64_array(sizes.iter().map(|_| 1)))?),
            (
                "operandSegmentSizes",
                cx.attr(&format!("array<i32: 1, 0, {}, 0>", dyn_sizes.len()))?,
            ),
        ];
        self.op1(
            "tensor.extract_slice",
            &operands,
            cx.ty(&tensor_text(sizes, elem))?,
            &attrs,
        )
    }

    /// `tensor.insert_slice src into dst[offsets][sizes][1..]` with static offsets.
    pub fn insert_slice(
        &self,
        src: V<'c>,
        dst: V<'c>,
        offsets: &[usize],
        sizes: &[Dim],
        syms: &Syms<'c>,
    ) -> Result<V<'c>, MlirError> {
        let dyn_sizes = syms.dynamic(sizes)?;
        let cx = self.cx;
        let mut operands = vec![src, dst];
        operands.extend_from_slice(&dyn_sizes);
        let attrs = [
            (
                "static_offsets",
                cx.attr(&i64_array(offsets.iter().map(|&o| o as i64)))?,
            ),
            ("static_sizes", cx.attr(&i64_array(sizes.iter().map(static_size)))?),
            ("static_strides", cx.attr(&i64_array(sizes.iter().map(|_| 1)))?),
            (
                "operandSegmentSizes",
                cx.attr(&format!("array<i32: 1, 1, 0, {}, 0>", dyn_sizes.len()))?,
            ),
        ];
        self.op1("tensor.insert_slice", &operands, dst.r#type(), &attrs)
    }

    /// `tensor.expand_shape` splitting the last dim of `src` into `split`.
    pub fn expand_last(
        &self,
        src: V<'c>,
        shape: &[Dim],
        split: &[usize],
        elem: &str,
        syms: &Syms<'c>,
    ) -> Result<V<'c>, MlirError> {
        let r = shape.len();
        let mut out: Vec<Dim> = shape[..r - 1].to_vec();
        out.extend(split.iter().map(|&n| Dim::Fixed(n)));
        let mut groups: Vec<String> = (0..r - 1).map(|i| format!("[{i}]")).collect();
        groups.push(format!(
            "[{}]",
            (r - 1..r - 1 + split.len())
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let dyn_sizes = syms.dynamic(&out)?;
        let mut operands = vec![src];
        operands.extend_from_slice(&dyn_sizes);
        let cx = self.cx;
        self.op1(
            "tensor.expand_shape",
            &operands,
            cx.ty(&tensor_text(&out, elem))?,
            &[
                ("reassociation", cx.attr(&format!("[{}]", groups.join(", ")))?),
                ("static_output_shape", cx.attr(&i64_array(out.iter().map(static_size)))?),
            ],
        )
    }

    /// `tensor.collapse_shape` merging the last `n` dims of `src` (of `shape`).
    pub fn collapse_last(&self, src: V<'c>, shape: &[Dim], n: usize, elem: &str) -> Result<V<'c>, MlirError> {
        let r = shape.len();
        let keep = r - n;
        let merged: usize = shape[keep..]
            .iter()
            .map(|d| {
                d.fixed()
                    .ok_or_else(|| MlirError::Internal("collapsing a symbolic dim".into()))
            })
            .product::<Result<usize, _>>()?;
        let mut out: Vec<Dim> = shape[..keep].to_vec();
        out.push(Dim::Fixed(merged));
        let mut groups: Vec<String> = (0..keep).map(|i| format!("[{i}]")).collect();
        groups.push(format!(
            "[{}]",
            (keep..r).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        ));
        let cx = self.cx;
        self.op1(
            "tensor.collapse_shape",
            &[src],
            cx.ty(&tensor_text(&out, elem))?,
            &[("reassociation", cx.attr(&format!("[{}]", groups.join(", ")))?)],
        )
    }
}

fn static_size(d: &Dim) -> i64 {
    match d {
        Dim::Fixed(n) => *n as i64,
        Dim::Sym(_) => i64::MIN, // ShapedType::kDynamic
    }
}

fn i64_array(v: impl Iterator<Item = i64>) -> String {
    let items: Vec<String> = v.map(|x| x.to_string()).collect();
    if items.is_empty() {
        "array<i64>".to_string()
    } else {
        format!("array<i64: {}>", items.join(", "))
    }
}

/// The runtime sizes (`index` values) of the symbolic dims (`batch`, `seq`),
/// read from the function's arguments.
#[derive(Default)]
pub(super) struct Syms<'c> {
    pub map: HashMap<String, V<'c>>,
}

impl<'c> Syms<'c> {
    pub fn get(&self, name: &str) -> Result<V<'c>, MlirError> {
        self.map.get(name).copied().ok_or_else(|| {
            MlirError::Unsupported(format!(
                "symbolic dim `{name}` is not a dim of any graph input, so its size is unknown"
            ))
        })
    }

    /// The sizes of the symbolic dims of `shape`, in order.
    pub fn dynamic(&self, shape: &[Dim]) -> Result<Vec<V<'c>>, MlirError> {
        shape
            .iter()
            .filter_map(|d| match d {
                Dim::Sym(s) => Some(self.get(s)),
                Dim::Fixed(_) => None,
            })
            .collect()
    }
}
