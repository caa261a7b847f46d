//! Memory planning of the activations: buffer lifetimes, in-place reuse and
//! the arena size for a given (batch, seq).
//!
//! An analysis, not a pass: [`plan`] reads a graph and changes nothing, so
//! it is not in the pipeline (a plan kept beside a graph would go stale at
//! the next rewrite). Its users call it on the graph they have:
//! `ouroc_kernels::lower` for the Program's arena (batch = seq = 1), and
//! `ouroc compile --stats` for the summary it prints.
//!
//! Activations are the graph inputs and every op result except weights and
//! values computed from weights only (folded/merged weights live with the
//! weights, made once at load). A `slice` is a view of its input: it has no
//! buffer and keeps its input alive. KV caches are not activations.
//!
//! Time: ops are numbered in textual order with loop bodies inlined once.
//! A loop at time `s` spans `s..=e`, its body's ops in between and its
//! `yield` at `e`; it reads its initial values and defines its result and
//! carried values at `s`. Since every step re-reads them:
//! - a value defined outside a loop and used inside lives until `e`;
//! - carried values (block arguments) live across the whole loop;
//!   each step's yielded next values are copied into them at `e`;
//! - the loop's result (the policy's choice, written as steps finish)
//!   lives from `s` to its last use.
//!
//! A value's buffer is live from its definition to its last use
//! (inclusive). In-place: the result of an elementwise or row-wise op
//! (`add`, `mul`, `silu`, `sigmoid`, two-operand `swiglu`, `rms_norm`,
//! `rms_scale`, both results of `add_rms_norm`, result 0 of `step_end`)
//! takes the buffer of an operand of the same size that dies at that op,
//! and a carried value takes its initial value's buffer when that dies at
//! the loop. Buffers are then placed greedily, largest first, each at the
//! lowest offset not overlapping a placed buffer whose lifetime overlaps
//! its own (first fit by size). Sizes are rounded up to 64 bytes.

use crate::ssa::{constants, defs, term_uses};
use ouroc_ir::{Block, Dim, Graph, OpKind, Type, ValueId};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Alignment of every buffer (a cache line; enough for 128-bit loads).
pub const ALIGN: u64 = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// The values stored in it, in definition order (more than one after
    /// in-place reuse).
    pub values: Vec<ValueId>,
    /// Size in bytes, aligned.
    pub bytes: u64,
    pub offset: u64,
    /// Live interval in op time, inclusive.
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub batch: usize,
    pub seq: usize,
    /// Size of the activation arena.
    pub arena_bytes: u64,
    /// Every activation in its own buffer (no reuse), for comparison.
    pub naive_bytes: u64,
    pub buffers: Vec<Buffer>,
    /// Arena offset of every activation (a view: its input's offset).
    pub offsets: BTreeMap<ValueId, u64>,
    /// (view, the value whose buffer it reads).
    pub views: Vec<(ValueId, ValueId)>,
    /// (result, operand whose buffer it took): in-place reuse.
    pub in_place: Vec<(ValueId, ValueId)>,
}

impl MemoryPlan {
    /// One line: arena vs naive bytes.
    pub fn summary(&self) -> String {
        format!(
            "activation arena {} bytes at batch {} seq {} (naive {} bytes, {} buffers, {} in place)",
            self.arena_bytes,
            self.batch,
            self.seq,
            self.naive_bytes,
            self.buffers.len(),
            self.in_place.len()
        )
    }
}

/// Bytes of a value with `batch` and `seq` bound (other symbolic dims count 1).
pub fn value_bytes(t: &Type, batch: usize, seq: usize) -> u64 {
    let n: u64 = t
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as u64,
            Dim::Sym(s) if s == "batch" => batch as u64,
            Dim::Sym(s) if s == "seq" => seq as u64,
            Dim::Sym(_) => 1,
        })
        .product();
    n * t.dtype.size_bytes() as u64
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Time slots a block takes (a loop: its body plus its start and yield).
fn span(b: &Block) -> usize {
    b.ops
        .iter()
        .map(|op| match &op.kind {
            OpKind::Loop(l) => span(&l.body) + 2,
            _ => 1,
        })
        .sum()
}

struct Walk {
    consts: HashSet<ValueId>,
    t: usize,
    /// Activations in definition order with their definition time.
    order: Vec<(ValueId, usize)>,
    last: HashMap<ValueId, usize>,
    /// View -> the value it reads (its root).
    alias: HashMap<ValueId, ValueId>,
    views: Vec<(ValueId, ValueId)>,
    /// Result -> operands whose buffer it may take, in preference order.
    reuse: HashMap<ValueId, Vec<ValueId>>,
    /// Enclosing loops: the values each body defines and its end time.
    stack: Vec<(HashSet<ValueId>, usize)>,
}

impl Walk {
    fn root(&self, v: ValueId) -> ValueId {
        *self.alias.get(&v).unwrap_or(&v)
    }

    fn define(&mut self, v: ValueId, t: usize) {
        if !self.consts.contains(&v) {
            self.order.push((v, t));
            self.last.insert(v, t);
        }
    }

    /// `v` is read at time `t`: inside a loop it defines nothing of, that is
    /// at the end of the outermost such loop.
    fn use_at(&mut self, v: ValueId, t: usize) {
        let t = self
            .stack
            .iter()
            .find(|(inner, _)| !inner.contains(&v))
            .map_or(t, |(_, end)| *end);
        let r = self.root(v);
        if let Some(l) = self.last.get_mut(&r) {
            *l = (*l).max(t);
        }
    }

    fn block(&mut self, b: &Block) {
        for op in &b.ops {
            let t = self.t;
            match &op.kind {
                OpKind::Loop(l) => {
                    let e = t + 1 + span(&l.body);
                    for &i in &op.inputs {
                        self.use_at(i, t);
                    }
                    self.define(op.result(), t);
                    for (&arg, &init) in l.body.args[1..].iter().zip(&op.inputs) {
                        self.define(arg, t);
                        self.last.insert(arg, e);
                        self.reuse.insert(arg, vec![self.root(init)]);
                    }
                    self.t = t + 1;
                    self.stack.push((defs(&l.body), e));
                    self.block(&l.body);
                    for v in term_uses(&l.body.term) {
                        self.use_at(v, e);
                    }
                    self.stack.pop();
                    self.t = e + 1;
                    continue;
                }
                OpKind::Slice { .. } if !self.consts.contains(&op.result()) => {
                    let root = self.root(op.inputs[0]);
                    self.alias.insert(op.result(), root);
                    self.views.push((op.result(), root));
                    self.use_at(op.inputs[0], t);
                }
                kind => {
                    for &i in &op.inputs {
                        self.use_at(i, t);
                    }
                    for &r in &op.results {
                        self.define(r, t);
                    }
                    let ins = |n: usize| op.inputs.iter().take(n).map(|&i| self.root(i)).collect::<Vec<_>>();
                    let cands = match kind {
                        OpKind::Add | OpKind::Mul | OpKind::Swiglu => ins(2),
                        OpKind::Silu | OpKind::Sigmoid | OpKind::RmsNorm { .. } | OpKind::RmsScale { .. } => ins(1),
                        OpKind::StepEnd { .. } => ins(1),
                        // Result 1 may take whichever operand result 0 did not (below).
                        OpKind::AddRmsNorm { .. } => ins(2),
                        _ => vec![],
                    };
                    if !cands.is_empty() && !self.consts.contains(&op.result()) {
                        if let OpKind::AddRmsNorm { .. } = kind {
                            self.reuse.insert(op.results[1], cands.clone());
                        }
                        self.reuse.insert(op.result(), cands);
                    }
                }
            }
            self.t = t + 1;
        }
    }
}

/// Plan the activation buffers of `g` for `batch` sequences of `seq` new
/// tokens.
pub fn plan(g: &Graph, batch: usize, seq: usize) -> MemoryPlan {
    let mut w = Walk {
        consts: constants(g),
        t: 1,
        order: Vec::new(),
        last: HashMap::new(),
        alias: HashMap::new(),
        views: Vec::new(),
        reuse: HashMap::new(),
        stack: Vec::new(),
    };
    for &a in g.inputs() {
        w.define(a, 0);
    }
    w.block(&g.body);
    let end = w.t;
    for v in term_uses(&g.body.term) {
        w.use_at(v, end);
    }

    // Buffers, in definition order, with in-place reuse.
    let size = |v: ValueId| align(value_bytes(g.ty(v), batch, seq));
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut buf_of: HashMap<ValueId, usize> = HashMap::new();
    let mut in_place = Vec::new();
    let mut naive = 0;
    for &(v, t) in &w.order {
        let bytes = size(v);
        naive += bytes;
        let taken = w.reuse.get(&v).and_then(|cands| {
            cands.iter().copied().find(|x| {
                buf_of.get(x).is_some_and(|&b| {
                    let b = &buffers[b];
                    // The operand's buffer dies here, and no other result took it.
                    b.end == t && b.bytes == bytes && b.values.last() == Some(x)
                })
            })
        });
        match taken {
            Some(x) => {
                let b = buf_of[&x];
                buffers[b].values.push(v);
                buffers[b].end = w.last[&v].max(t);
                buf_of.insert(v, b);
                in_place.push((v, x));
            }
            None => {
                buf_of.insert(v, buffers.len());
                buffers.push(Buffer {
                    values: vec![v],
                    bytes,
                    offset: 0,
                    start: t,
                    end: w.last[&v],
                });
            }
        }
    }

    // Placement: largest first, lowest offset clear of overlapping lifetimes.
    let mut idx: Vec<usize> = (0..buffers.len()).collect();
    idx.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes), buffers[i].start));
    let mut placed: Vec<usize> = Vec::new();
    let mut arena = 0;
    for i in idx {
        let (start, end, bytes) = (buffers[i].start, buffers[i].end, buffers[i].bytes);
        let mut live: Vec<(u64, u64)> = placed
            .iter()
            .map(|&p| &buffers[p])
            .filter(|p| p.start <= end && start <= p.end)
            .map(|p| (p.offset, p.offset + p.bytes))
            .collect();
        live.sort_unstable();
        let mut off = 0;
        for (lo, hi) in live {
            if off + bytes <= lo {
                break;
            }
            off = off.max(hi);
        }
        buffers[i].offset = off;
        arena = arena.max(off + bytes);
        placed.push(i);
    }

    let mut offsets = BTreeMap::new();
    for b in &buffers {
        for &v in &b.values {
            offsets.insert(v, b.offset);
        }
    }
    for &(v, root) in &w.views {
        if let Some(&o) = offsets.get(&root) {
            offsets.insert(v, o);
        }
    }
    MemoryPlan {
        batch,
        seq,
        arena_bytes: arena,
        naive_bytes: naive,
        buffers,
        offsets,
        views: w.views,
        in_place,
    }
}
