//! The one-entry families: Gather, RopeTable, Rope, Elementwise,
//! RowReduce, and the argmax of greedy sampling. A CTA per token row
//! (grid.x = tokens) except Elementwise, which also splits the row.

use super::asm::{Body, Kind, Red, Reg, f32_imm, ins, size};
use super::{Dim, Emitted, Launch, When};
use ouroc_ir::DType;
use ouroc_kernels::spec::{ElementwiseSpec, GatherSpec, RopeSpec, RopeTableSpec, RowReduceSpec, Trig};
use ouroc_kernels::{Expr, NormWeight};

/// Threads of a block working on `n` items: a multiple of 32, at most 256.
pub(crate) fn threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// A launch with one CTA per token.
fn per_token(block: u32) -> Launch {
    Launch {
        grid: [Dim::Tokens { per: 1 }, Dim::Fixed(1), Dim::Fixed(1)],
        block,
        shared_bytes: 0,
    }
}

/// `%ctaid.x` (the token) and `%tid.x`.
fn token_and_tid(b: &mut Body) -> (Reg, Reg) {
    (b.mov_u32(&"%ctaid.x"), b.mov_u32(&"%tid.x"))
}

/// Row `t` of the activation parameter `name` (its pointer and stride).
pub(crate) fn act_row(b: &mut Body, name: &str, t: Reg, dtype: DType) -> Reg {
    let p = b.param_ptr(name);
    let s = b.param_u32(&format!("{name}_stride"));
    b.row(p, &t, s, dtype)
}

/// The rotate-half RoPE of one pair (`x[j]`, `x[j + half]`) with the
/// reference's roundings: `round(round(x cos) + round(rot sin))`, `rot` =
/// `-x[j + half]` for the low element and `x[j]` for the high one.
pub(crate) fn rope_pair(b: &mut Body, act: DType, x: [Reg; 2], cos: [Reg; 2], sin: [Reg; 2]) -> [Reg; 2] {
    let neg = b.def(Kind::F, "neg.f32", &[&x[1]]);
    let rot = [neg, x[0]];
    [0, 1].map(|i| {
        let a = b.def(Kind::F, "mul.rn.f32", &[&x[i], &cos[i]]);
        let a = b.round(act, a);
        let c = b.def(Kind::F, "mul.rn.f32", &[&rot[i], &sin[i]]);
        let c = b.round(act, c);
        let s = b.def(Kind::F, "add.rn.f32", &[&a, &c]);
        b.round(act, s)
    })
}

pub(crate) fn gather(act: DType, g: &GatherSpec) -> Emitted {
    let mut b = Body::default();
    let (ts, asz) = (size(g.table), size(act));
    let vector = g.table == act && (g.width as u32 * asz).is_multiple_of(16);
    let items = if vector { g.width * asz as usize / 16 } else { g.width };
    let block = threads(items);
    let (t, tid) = token_and_tid(&mut b);
    let table = b.param_ptr("table");
    let idrow = act_row(&mut b, "ids", t, DType::I32);
    let dst = act_row(&mut b, "out", t, act);
    let id = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{idrow}]")]);
    let src = b.addr(table, &id, g.width as u32 * ts);
    if vector {
        b.comment("copy the row 16 bytes at a time");
        b.for_range(tid, &items, &block, |b, i| {
            let s = b.addr(src, &i, 16);
            let v = b.load_v4(".global.nc", s, 0);
            let d = b.addr(dst, &i, 16);
            ins!(b, "st.global.v4.u32 [{d}], {{{}, {}, {}, {}}}", v[0], v[1], v[2], v[3]);
        });
    } else {
        b.for_range(tid, &items, &block, |b, i| {
            let s = b.addr(src, &i, ts);
            let v = b.load(g.table, s, 0, true);
            let d = b.addr(dst, &i, asz);
            b.store(act, d, 0, v, None);
        });
    }
    Emitted::new("gather", When::Always, per_token(block), b)
}

pub(crate) fn rope_table(act: DType, s: &RopeTableSpec, base: &str) -> Emitted {
    let mut b = Body::default();
    let (hd, half) = (s.head_dim as u32, s.head_dim / 2);
    let inv: Vec<String> = (0..half)
        .map(|j| f32_imm(1.0 / (s.theta as f32).powf((2 * j) as f32 / s.head_dim as f32)))
        .collect();
    let table = format!("{base}_inv_freq");
    let globals = format!(".const .align 4 .b32 {table}[{half}] = {{{}}};\n", inv.join(", "));
    let block = hd.div_ceil(32) * 32;
    let (t, j) = token_and_tid(&mut b);
    let out = act_row(&mut b, "out", t, act);
    let posrow = act_row(&mut b, "pos", t, DType::I32);
    let off = b.p();
    ins!(b, "setp.ge.u32 {off}, {j}, {hd}");
    b.skip_if(off, |b| {
        let pos = b.def(Kind::R, "ld.global.nc.u32", &[&format!("[{posrow}]")]);
        let pf = b.def(Kind::F, "cvt.rn.f32.s32", &[&pos]);
        let jj = b.def(Kind::R, "rem.u32", &[&j, &half]);
        let tb = b.def(Kind::D, "mov.u64", &[&table]);
        let a = b.addr(tb, &jj, 4);
        let f = b.def(Kind::F, "ld.const.f32", &[&format!("[{a}]")]);
        let x = b.def(Kind::F, "mul.rn.f32", &[&pf, &f]);
        let v = b.sincos(x, s.func == Trig::Cos);
        let d = b.addr(out, &j, size(act));
        b.store(act, d, 0, v, None);
    });
    let mut e = Emitted::new("rope_table", When::Always, per_token(block), b);
    e.globals = globals;
    e
}

pub(crate) fn rope(act: DType, r: &RopeSpec) -> Emitted {
    let mut b = Body::default();
    let (half, asz) = (r.head_dim / 2, size(act));
    let pairs = r.heads * half;
    let block = threads(pairs);
    let (t, tid) = token_and_tid(&mut b);
    let [x, cos, sin, out] = ["x", "cos", "sin", "out"].map(|n| act_row(&mut b, n, t, act));
    let hoff = half as u32 * asz;
    b.comment("a thread per (head, j < half) pair: element e = head * head_dim + j");
    b.for_range(tid, &pairs, &block, |b, i| {
        let h = b.def(Kind::R, "div.u32", &[&i, &half]);
        let j = b.def(Kind::R, "rem.u32", &[&i, &half]);
        let e = b.def(Kind::R, "mad.lo.u32", &[&h, &half, &i]);
        let xa = b.addr(x, &e, asz);
        let ca = b.addr(cos, &j, asz);
        let sa = b.addr(sin, &j, asz);
        let xs = [b.load(act, xa, 0, false), b.load(act, xa, hoff, false)];
        let cs = [b.load(act, ca, 0, true), b.load(act, ca, hoff, true)];
        let ss = [b.load(act, sa, 0, true), b.load(act, sa, hoff, true)];
        let o = rope_pair(b, act, xs, cs, ss);
        let oa = b.addr(out, &e, asz);
        b.store(act, oa, 0, o[0], None);
        b.store(act, oa, hoff, o[1], None);
    });
    Emitted::new("rope", When::Always, per_token(block), b)
}

/// The PTX instruction of each binary expression node.
fn binary(e: &Expr) -> Option<(&'static str, &Expr, &Expr)> {
    match e {
        Expr::Add(a, b) => Some(("add.rn.f32", a, b)),
        Expr::Mul(a, b) => Some(("mul.rn.f32", a, b)),
        _ => None,
    }
}

/// The f32 value of node `e` before its rounding point (the store rounds
/// the root); operands that are nodes are rounded first.
fn expr(b: &mut Body, act: DType, e: &Expr, xs: &[Option<Reg>]) -> Reg {
    let operand = |b: &mut Body, e: &Expr| match e {
        Expr::Input(i) => xs[*i].expect("loaded"),
        _ => {
            let v = expr(b, act, e, xs);
            b.round(act, v)
        }
    };
    match e {
        Expr::Input(i) => xs[*i].expect("loaded"),
        Expr::Silu(a) => {
            let a = operand(b, a);
            b.silu(a)
        }
        Expr::Sigmoid(a) => {
            let a = operand(b, a);
            b.sigmoid(a)
        }
        _ => {
            let (op, x, y) = binary(e).expect("a binary node");
            let (x, y) = (operand(b, x), operand(b, y));
            b.def(Kind::F, op, &[&x, &y])
        }
    }
}

fn inputs_of(e: &Expr, used: &mut [bool]) {
    match e {
        Expr::Input(i) => used[*i] = true,
        Expr::Silu(a) | Expr::Sigmoid(a) => inputs_of(a, used),
        Expr::Add(a, b) | Expr::Mul(a, b) => {
            inputs_of(a, used);
            inputs_of(b, used);
        }
    }
}

pub(crate) fn elementwise(act: DType, s: &ElementwiseSpec) -> Emitted {
    let mut b = Body::default();
    let asz = size(act);
    let block = threads(s.width);
    let (t, tid) = token_and_tid(&mut b);
    let by = b.mov_u32(&"%ctaid.y");
    let e = b.def(Kind::R, "mad.lo.u32", &[&by, &block, &tid]);
    let off = b.p();
    ins!(b, "setp.ge.u32 {off}, {e}, {}", s.width);
    let mut used = vec![false; s.inputs];
    inputs_of(&s.expr, &mut used);
    b.skip_if(off, |b| {
        let xs: Vec<Option<Reg>> = (0..s.inputs)
            .map(|i| {
                used[i].then(|| {
                    let row = act_row(b, &format!("x{i}"), t, act);
                    let a = b.addr(row, &e, asz);
                    b.load(act, a, 0, false)
                })
            })
            .collect();
        let v = expr(b, act, &s.expr, &xs);
        let row = act_row(b, "out", t, act);
        let a = b.addr(row, &e, asz);
        b.store(act, a, 0, v, None);
    });
    let launch = Launch {
        grid: [
            Dim::Tokens { per: 1 },
            Dim::Fixed(s.width.div_ceil(block as usize) as u32),
            Dim::Fixed(1),
        ],
        block,
        shared_bytes: 0,
    };
    Emitted::new("elementwise", When::Always, launch, b)
}

/// `1 / sqrt(sum / width + eps)`, the reference's f32 steps.
fn inv_rms(b: &mut Body, sum: Reg, width: usize, eps: f32) -> Reg {
    let ms = b.def(Kind::F, "div.rn.f32", &[&sum, &f32_imm(width as f32)]);
    let ms = b.def(Kind::F, "add.rn.f32", &[&ms, &f32_imm(eps)]);
    let r = b.def(Kind::F, "sqrt.rn.f32", &[&ms]);
    b.def(Kind::F, "rcp.rn.f32", &[&r])
}

pub(crate) fn row_reduce(act: DType, r: &RowReduceSpec) -> Emitted {
    let mut b = Body::default();
    let asz = size(act);
    let block = threads(r.width);
    let (warps, per) = (block / 32, r.width.div_ceil(block as usize));
    let tail = r.width - (per - 1) * block as usize;
    let (t, tid) = token_and_tid(&mut b);
    let eps = r.eps as f32;
    // Element i of this thread is tid + i * block; the last may be past the row.
    let guard = (tail < block as usize).then(|| {
        let p = b.p();
        ins!(b, "setp.lt.u32 {p}, {tid}, {tail}");
        p
    });
    let pred = |i: usize| if i + 1 == per { guard } else { None };
    let off = |i: usize| (i * block as usize) as u32 * asz;
    let row_ptr = |b: &mut Body, name: &str| {
        let row = act_row(b, name, t, act);
        b.addr(row, &tid, asz)
    };
    let weight_ptr = |b: &mut Body, name: &str| {
        let w = b.param_ptr(name);
        b.addr(w, &tid, asz)
    };
    // Activation rows may share memory with results (in place): no `.nc` for them.
    let load_row = |b: &mut Body, p: Reg, nc: bool| -> Vec<Reg> {
        (0..per)
            .map(|i| match pred(i) {
                Some(g) => b.load_if(g, act, p, off(i), nc),
                None => b.load(act, p, off(i), nc),
            })
            .collect()
    };
    let store_row = |b: &mut Body, p: Reg, v: &[Reg]| {
        for (i, &x) in v.iter().enumerate() {
            b.store(act, p, off(i), x, pred(i));
        }
    };
    let sum_sq = |b: &mut Body, v: &[Reg], w: &[Reg]| {
        let mut acc = b.mov_f32(0.0);
        for (x, y) in v.iter().zip(w) {
            acc = b.def(Kind::F, "fma.rn.f32", &[x, y, &acc]);
        }
        acc
    };
    let x0 = row_ptr(&mut b, "x0");
    let mut s = load_row(&mut b, x0, false);
    if r.add {
        let x1 = row_ptr(&mut b, "x1");
        let y = load_row(&mut b, x1, false);
        b.comment("s = x0 + x1, rounded");
        s = s
            .iter()
            .zip(&y)
            .map(|(a, c)| {
                let v = b.def(Kind::F, "add.rn.f32", &[a, c]);
                b.round(act, v)
            })
            .collect();
        let sp = row_ptr(&mut b, "s");
        store_row(&mut b, sp, &s);
    }
    let ss = sum_sq(&mut b, &s, &s);
    let tot = b.block_reduce(Red::Sum, &[ss], warps, "red0", tid)[0];
    if warps > 1 {
        b.shared("red0", 4 * warps);
    }
    let inv = inv_rms(&mut b, tot, r.width, eps);
    let norm = |b: &mut Body, v: &[Reg], inv: Reg, w: Option<&str>| -> Vec<Reg> {
        let ws = w.map(|w| {
            let p = weight_ptr(b, w);
            load_row(b, p, true)
        });
        v.iter()
            .enumerate()
            .map(|(i, x)| {
                let n = b.def(Kind::F, "mul.rn.f32", &[x, &inv]);
                let n = b.round(act, n);
                match &ws {
                    Some(ws) => {
                        let n = b.def(Kind::F, "mul.rn.f32", &[&ws[i], &n]);
                        b.round(act, n)
                    }
                    None => n,
                }
            })
            .collect()
    };
    b.comment("n = rms(s) (times w)");
    let n = norm(&mut b, &s, inv, (r.norm == NormWeight::Weighted).then_some("w"));
    let np = row_ptr(&mut b, "n");
    store_row(&mut b, np, &n);
    let mut partial = Vec::new();
    if r.gate {
        let gp = weight_ptr(&mut b, "gate_w");
        let gw = load_row(&mut b, gp, true);
        partial.push(sum_sq(&mut b, &n, &gw));
    }
    if r.next.is_some() {
        partial.push(sum_sq(&mut b, &n, &n));
    }
    if partial.is_empty() {
        return Emitted::new("row_reduce", When::Always, per_token(block), b);
    }
    let red = b.block_reduce(Red::Sum, &partial, warps, "red1", tid);
    if warps > 1 {
        b.shared("red1", 4 * warps * partial.len() as u32);
    }
    if r.gate {
        b.comment("lambda = sigmoid(round(n . gate_w + gate_b)), rounded; thread 0 stores");
        let gb = b.param_ptr("gate_b");
        let gb = b.load(act, gb, 0, true);
        let z = b.def(Kind::F, "add.rn.f32", &[&red[0], &gb]);
        let z = b.round(act, z);
        let lam = b.sigmoid(z);
        let first = b.p();
        ins!(b, "setp.eq.u32 {first}, {tid}, 0");
        let lp = act_row(&mut b, "lambda", t, act);
        b.store(act, lp, 0, lam, Some(first));
    }
    if let Some(next) = r.next {
        b.comment("next = rms(n) (times next_w)");
        let inv2 = inv_rms(&mut b, *red.last().expect("next's sum"), r.width, eps);
        let nx = norm(&mut b, &n, inv2, (next == NormWeight::Weighted).then_some("next_w"));
        let xp = row_ptr(&mut b, "next");
        store_row(&mut b, xp, &nx);
    }
    Emitted::new("row_reduce", When::Always, per_token(block), b)
}

pub(crate) fn argmax(vocab: usize, act: DType) -> Emitted {
    let mut b = Body::default();
    let block = 256;
    let (t, tid) = token_and_tid(&mut b);
    let row = act_row(&mut b, "logits", t, act);
    let bv = b.mov_f32(f32::NEG_INFINITY);
    let bi = b.mov_u32(&vocab);
    b.comment("this thread's first maximum (NaN never wins)");
    b.for_range(tid, &vocab, &block, |b, i| {
        let a = b.addr(row, &i, size(act));
        let v = b.load(act, a, 0, true);
        let take = b.def(Kind::Pred, "setp.gt.f32", &[&v, &bv]);
        ins!(b, "selp.f32 {bv}, {v}, {bv}, {take}");
        ins!(b, "selp.b32 {bi}, {i}, {bi}, {take}");
    });
    // (ov, oi) beats (bv, bi): greater, or equal at a lower index.
    let merge = |b: &mut Body, ov: Reg, oi: Reg| {
        let gt = b.def(Kind::Pred, "setp.gt.f32", &[&ov, &bv]);
        let eq = b.def(Kind::Pred, "setp.eq.f32", &[&ov, &bv]);
        let lo = b.def(Kind::Pred, "setp.lt.u32", &[&oi, &bi]);
        ins!(b, "and.pred {eq}, {eq}, {lo}");
        ins!(b, "or.pred {gt}, {gt}, {eq}");
        ins!(b, "selp.f32 {bv}, {ov}, {bv}, {gt}");
        ins!(b, "selp.b32 {bi}, {oi}, {bi}, {gt}");
    };
    for off in [16, 8, 4, 2, 1] {
        let ov = b.def(Kind::F, "shfl.sync.bfly.b32", &[&bv, &off, &31, &"-1"]);
        let oi = b.def(Kind::R, "shfl.sync.bfly.b32", &[&bi, &off, &31, &"-1"]);
        merge(&mut b, ov, oi);
    }
    b.shared("best", 8 * block / 32);
    let lane = b.def(Kind::R, "and.b32", &[&tid, &31]);
    let first = b.def(Kind::Pred, "setp.eq.u32", &[&lane, &0]);
    let base = b.mov_u32(&"best");
    let slot = b.def(Kind::R, "shr.u32", &[&tid, &2]);
    let slot = b.def(Kind::R, "add.u32", &[&slot, &base]);
    ins!(b, "@{first} st.shared.v2.b32 [{slot}], {{{bv}, {bi}}}");
    ins!(b, "bar.sync 0");
    let not0 = b.def(Kind::Pred, "setp.ne.u32", &[&tid, &0]);
    b.skip_if(not0, |b| {
        for w in 1..block / 32 {
            let (ov, oi) = (b.f(), b.r());
            ins!(b, "ld.shared.v2.b32 {{{ov}, {oi}}}, [{base}+{}]", 8 * w);
            merge(b, ov, oi);
        }
        let none = b.def(Kind::Pred, "setp.eq.u32", &[&bi, &vocab]);
        let id = b.def(Kind::R, "selp.b32", &[&0, &bi, &none]);
        let out = act_row(b, "ids", t, DType::I32);
        ins!(b, "st.global.b32 [{out}], {id}");
    });
    Emitted::new("argmax", When::Always, per_token(block), b)
}
