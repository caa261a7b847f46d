//! Binding a Program kernel to its arguments (arena offsets, column
//! windows, row strides, weight pointers, the microkernel or the row and
//! token splits) and launching it over the threads (see the module docs
//! of [`crate::cpu`]).

use super::device::CpuDevice;
use crate::attention::{self, AttendArgs};
use crate::gemm;
use crate::qlinear::{self, QLinearArgs};
use ouroc_driver::{CallShape, DeviceError, KvArg};
use ouroc_ir::DType;
use ouroc_kernels::abi::{AttentionPhase, KvSeq, RawKernel, extra_args};
use ouroc_kernels::quant::QuantFormat;
use ouroc_kernels::spec::{Family, LinearSpec, operand_dtypes, operand_encodings};
use ouroc_kernels::{ActValue, Kernel, Operand};
use std::collections::HashMap;
use std::ops::Range;

/// Where one kernel argument lives.
#[derive(Clone, Copy, Debug)]
enum Arg {
    /// An activation: byte `offset * tokens + col_bytes` of the arena, row
    /// stride `stride` elements of `elem` bytes.
    Act {
        offset: usize,
        col_bytes: usize,
        stride: usize,
        elem: usize,
    },
    /// A weight (read only), kept alive by the driver's weights.
    Weight(*const u8),
}

impl Arg {
    /// Bytes from one token's row to the next (0 for a weight).
    fn row_bytes(&self) -> usize {
        match *self {
            Arg::Act { stride, elem, .. } => stride * elem,
            Arg::Weight(_) => 0,
        }
    }
}

/// A `Linear` split over its output rows (see the module docs).
struct Split {
    /// Per chunk, in task order: its output rows `row0 .. row1`.
    chunks: Vec<(usize, usize)>,
    /// Bytes of one activation element.
    act_elem: usize,
    /// The result overlaps `x`: copy `x`'s rows (this many bytes) first.
    copy_x: Option<usize>,
}

/// A `Linear` launch run by [`crate::gemm::linear`] instead of its kernel.
#[derive(Clone, Copy)]
struct Gemm {
    n: usize,
    k: usize,
    act: DType,
    weight: DType,
    bias: bool,
    /// Row chunks start at multiples of this (the microkernel's row tile).
    tile: usize,
}

/// A quantised `Linear`, run by [`crate::qlinear`] (it has no kernel of
/// its own: the format's arithmetic is the runtime's).
#[derive(Clone, Copy)]
struct QLin {
    n: usize,
    k: usize,
    format: QuantFormat,
    act: DType,
    /// The bias's dtype, if it has one.
    bias: Option<DType>,
}

/// The shape of an `Attention` attended by [`crate::attention`].
#[derive(Clone, Copy)]
struct Attend {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: bool,
    act: DType,
}

/// One pre-bound kernel launch (the CPU device's bound kernel).
pub struct Launch {
    /// None for a quantised Linear ([`QLin`]).
    f: Option<RawKernel>,
    gemm: Option<Gemm>,
    qlin: Option<QLin>,
    /// Operands then results.
    args: Vec<Arg>,
    /// An `Attention` (takes the KV arguments).
    attention: bool,
    /// An `Attention` whose attend phase runs on [`crate::attention`].
    attend: Option<Attend>,
    /// `Linear`: its output rows `n` (the row-range arguments `0 .. n`).
    rows: Option<usize>,
    split: Option<Split>,
    /// Families computed token by token (all but Attention and Linear):
    /// each argument's row bytes, to split a prompt by tokens.
    token_rows: Option<Vec<usize>>,
}

impl Launch {
    /// Run by a std::arch microkernel.
    pub(super) fn on_microkernel(&self) -> bool {
        self.gemm.is_some() || self.qlin.is_some()
    }

    /// Split over the threads by output rows.
    pub(super) fn row_split(&self) -> bool {
        self.split.as_ref().is_some_and(|s| s.chunks.len() > 1)
    }
}

impl CpuDevice {
    pub(super) fn bind_kernel(&mut self, k: &Kernel) -> Result<Launch, DeviceError> {
        let threads = self.pool.threads();
        let values = &self.values;
        let qlin = match &k.spec.family {
            Family::Linear(l) => l.quant.map(|format| QLin {
                n: l.n,
                k: l.k,
                format,
                act: k.spec.act,
                bias: l.bias.then_some(l.weight),
            }),
            _ => None,
        };
        let gemm = match &k.spec.family {
            _ if qlin.is_some() => None,
            Family::Linear(l) if self.microkernels && gemm::microkernel(k.spec.act, l.weight) => Some(Gemm {
                n: l.n,
                k: l.k,
                act: k.spec.act,
                weight: l.weight,
                bias: l.bias,
                tile: gemm::Variant::best().tile(k.spec.act, l.weight).0,
            }),
            _ => None,
        };
        let (split, rows) = match &k.spec.family {
            Family::Linear(l) if qlin.is_some() => (None, Some(l.n)),
            Family::Linear(l) if gemm.is_none() => (split_linear(k, l, values, threads), Some(l.n)),
            Family::Linear(l) => (None, Some(l.n)),
            _ => (None, None),
        };
        let f = match qlin {
            Some(_) => None,
            None => Some(self.kernels.raw_kernel(&k.spec).map_err(DeviceError::Program)?),
        };
        let dtypes = operand_dtypes(&k.spec);
        let encodings = operand_encodings(&k.spec);
        let mut args = Vec::new();
        for ((op, d), e) in k.inputs.iter().zip(&dtypes).zip(&encodings) {
            args.push(match op {
                Operand::Act(r) => {
                    let v = &values[&r.value];
                    if v.dtype != *d {
                        return Err(DeviceError::Program(format!(
                            "kernel {} reads %{} of dtype {} as {d}",
                            k.spec.name, r.value, v.dtype
                        )));
                    }
                    Arg::Act {
                        offset: v.offset as usize,
                        col_bytes: r.col * v.dtype.size_bytes(),
                        stride: v.width,
                        elem: v.dtype.size_bytes(),
                    }
                }
                Operand::Weight(w) => Arg::Weight(*self.weights.get(&(*w, *e)).ok_or_else(|| {
                    DeviceError::Program(format!(
                        "kernel {} reads weight %{w} as {e}, which is not loaded",
                        k.spec.name
                    ))
                })?),
            });
        }
        for o in &k.outputs {
            let v = &values[o];
            if v.dtype != k.spec.act {
                return Err(DeviceError::Program(format!(
                    "kernel {} writes %{o} of dtype {} as {}",
                    k.spec.name, v.dtype, k.spec.act
                )));
            }
            args.push(Arg::Act {
                offset: v.offset as usize,
                col_bytes: 0,
                stride: v.width,
                elem: v.dtype.size_bytes(),
            });
        }
        let attention = matches!(&k.spec.family, Family::Attention(_));
        let attend = match &k.spec.family {
            Family::Attention(a) if self.microkernels && attention::microkernel(k.spec.act) => Some(Attend {
                heads: a.heads,
                kv_heads: a.kv_heads,
                head_dim: a.head_dim,
                rope: a.rope,
                act: k.spec.act,
            }),
            _ => None,
        };
        debug_assert_eq!(extra_args(&k.spec), if attention || rows.is_some() { 2 } else { 0 });
        let token_rows = match &k.spec.family {
            Family::Attention(_) | Family::Linear(_) => None,
            _ => Some(args.iter().map(Arg::row_bytes).collect()),
        };
        Ok(Launch {
            f,
            gemm,
            qlin,
            args,
            attention,
            attend,
            rows,
            split,
            token_rows,
        })
    }
    /// Run one pre-bound launch on rows `rows` of the call's `shape.tokens`
    /// (all of them but for [`ouroc_driver::Device::launch_rows`]).
    pub(super) fn run_launch(
        &mut self,
        l: &Launch,
        shape: CallShape,
        kv: &[KvArg],
        rows: Range<usize>,
    ) -> Result<(), DeviceError> {
        if rows.end > shape.tokens || rows.is_empty() {
            return Err(DeviceError::Failed(format!(
                "rows {rows:?} of a call of {} tokens",
                shape.tokens
            )));
        }
        if l.attention && rows.len() != shape.tokens {
            return Err(DeviceError::Program(
                "an attention kernel runs on every row of a call".into(),
            ));
        }
        let (tokens, seq) = (rows.len(), shape.seq);
        let base = self.arena.as_mut_ptr() as *mut u8;
        let mut args: Vec<*mut u8> = Vec::with_capacity(l.args.len() + 2);
        let mut strides: Vec<usize> = Vec::with_capacity(l.args.len() + 2);
        for a in &l.args {
            match *a {
                Arg::Act {
                    offset,
                    col_bytes,
                    stride,
                    elem,
                } => {
                    // SAFETY: inside the arena sized for `shape.tokens`
                    // (value at `offset * shape.tokens`), from row rows.start.
                    args.push(unsafe { base.add(offset * shape.tokens + col_bytes + rows.start * stride * elem) });
                    strides.push(stride);
                }
                Arg::Weight(p) => {
                    args.push(p as *mut u8);
                    strides.push(0);
                }
            }
        }
        if let Some(q) = l.qlin {
            // Activations quantised once for every thread (and before y,
            // which may share x's rows, is written).
            // SAFETY: x is the launch's arena rows for `tokens` tokens.
            unsafe { self.xq.fill(args[0], q.act, strides[0], tokens, q.k) };
            let res = 2 + q.bias.is_some() as usize;
            let p = QLinearArgs {
                tokens,
                n: q.n,
                k: q.k,
                format: q.format,
                x: &self.xq,
                w: args[1],
                bias: if q.bias.is_some() { args[2] } else { std::ptr::null() },
                bias_dtype: q.bias.unwrap_or(DType::F32),
                act: q.act,
                y: args[res],
                y_stride: strides[res],
            };
            // Whole tiles of 16 rows, four chunks per thread taken in turn
            // (one each left the faster thread waiting for the other: about
            // a tenth of q8 decode, memory-bound on both).
            let tiles = ouroc_kernels::quant::tiles(q.n);
            let parts = (4 * self.pool.threads()).min(tiles).max(1);
            let per = tiles.div_ceil(parts);
            self.pool.run(tiles.div_ceil(per), &|c| {
                // SAFETY: the launch's arena rows and encoded weights; chunks
                // write disjoint output columns.
                unsafe { qlinear::qlinear(&p, c * per..((c + 1) * per).min(tiles)) }
            });
            return Ok(());
        }
        let f =
            l.f.ok_or_else(|| DeviceError::Program("a launch without its kernel".into()))?;
        if let Some(g) = l.gemm {
            let res = 2 + g.bias as usize;
            let p = gemm::LinearArgs {
                tokens,
                n: g.n,
                k: g.k,
                act: g.act,
                weight: g.weight,
                x: args[0],
                x_stride: strides[0],
                w: args[1],
                bias: if g.bias { args[2] } else { std::ptr::null() },
                y: args[res],
                y_stride: strides[res],
            };
            // Equal row chunks, one per thread, cut at the microkernel's row
            // tile; an in-place launch (y over x) runs whole on this thread.
            let parts = if p.aliased() { 1 } else { self.pool.threads() };
            let rows = g.n.div_ceil(parts).next_multiple_of(g.tile.max(1));
            let chunks = g.n.div_ceil(rows);
            self.pool.run(chunks, &|c| {
                let range = c * rows..((c + 1) * rows).min(g.n);
                // SAFETY: the pointers are the launch's arena rows for
                // `tokens` tokens and its encoded weights (the same the
                // kernel would get); chunks write disjoint result columns.
                unsafe { gemm::linear(&p, range) }
            });
            return Ok(());
        }
        if let Some(sp) = &l.split {
            if let Some(row) = sp.copy_x {
                // In place: the chunks read x from a private copy.
                let need = (tokens * row).div_ceil(8);
                if self.x_copy.len() < need {
                    self.x_copy.resize(need, 0);
                }
                let dst = self.x_copy.as_mut_ptr() as *mut u8;
                let act_elem = sp.act_elem;
                for t in 0..tokens {
                    // SAFETY: row t of x (stride strides[0] elements) lies
                    // in the arena; the copy holds tokens * row bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(args[0].add(t * strides[0] * act_elem), dst.add(t * row), row)
                    };
                }
                args[0] = dst;
                strides[0] = row / act_elem;
            }
            // Every chunk: the same arguments, its own row range.
            args.extend([std::ptr::null_mut(); 2]);
            let na = strides.len() + 2;
            let mut chunk_strides: Vec<usize> = Vec::with_capacity(na * sp.chunks.len());
            for &(row0, row1) in &sp.chunks {
                chunk_strides.extend_from_slice(&strides);
                chunk_strides.extend([row0, row1]);
            }
            let args = args.iter().map(|&p| p as usize).collect::<Vec<usize>>();
            self.pool.run(sp.chunks.len(), &|c| {
                let a = args.as_ptr() as *const *mut u8;
                // SAFETY: the kernel ABI as for the whole kernel (below);
                // each chunk writes only its own rows of the result.
                unsafe { f(a, chunk_strides[c * na..].as_ptr(), tokens) }
            });
            return Ok(());
        }
        if let Some(n) = l.rows {
            // The whole Linear: rows 0 .. n.
            args.extend([std::ptr::null_mut(); 2]);
            strides.extend([0, n]);
        }
        if let Some(row_bytes) = &l.token_rows {
            let chunks = token_chunks(tokens, self.pool.threads());
            if chunks > 1 {
                // Each token is computed from that token's rows alone:
                // chunks of tokens are independent launches of the same
                // kernel on row-offset pointers.
                let per = tokens.div_ceil(chunks);
                self.token_split_launches += 1;
                let args = args.iter().map(|&p| p as usize).collect::<Vec<usize>>();
                self.pool.run(tokens.div_ceil(per), &|c| {
                    let t0 = c * per;
                    let a: Vec<*mut u8> = args
                        .iter()
                        .zip(row_bytes)
                        .map(|(&p, &rb)| (p + t0 * rb) as *mut u8)
                        .collect();
                    // SAFETY: as for the whole launch below, on tokens
                    // t0 .. t0 + n of every activation; chunks write
                    // disjoint token rows.
                    unsafe { f(a.as_ptr(), strides.as_ptr(), per.min(tokens - t0)) };
                });
                return Ok(());
            }
        }
        let mut seqs: Vec<KvSeq> = Vec::new();
        if l.attention {
            let mut need = 0;
            for a in kv {
                let s = self
                    .stores
                    .get_mut(a.store.0)
                    .and_then(|s| s.as_mut())
                    .ok_or_else(|| DeviceError::Failed(format!("KV store {} is not allocated", a.store.0)))?;
                if s.rows() < a.past + seq {
                    return Err(DeviceError::Failed(format!(
                        "KV store {} holds {} positions, the launch needs {}",
                        a.store.0,
                        s.rows(),
                        a.past + seq
                    )));
                }
                seqs.push(KvSeq {
                    k: s.k.as_mut_ptr(),
                    v: s.v.as_mut_ptr(),
                    past: a.past,
                });
                need = need.max(a.past + seq);
            }
            if let Some(at) = l.attend {
                // K/V appended by the kernel, then the microkernel attends.
                self.append_kv(l, &args, &strides, &seqs, seq);
                let n_ops = 3 + 2 * at.rope as usize;
                let row = |i: usize| (args[i] as usize, strides[i]);
                let ((q, qs), (o, os)) = (row(0), row(n_ops));
                let ((c, cs), (sn, ss)) = if at.rope { (row(3), row(4)) } else { ((0, 0), (0, 0)) };
                let elem = at.act.size_bytes();
                for (b, kv) in seqs.iter().enumerate() {
                    let whole = AttendArgs {
                        heads: at.heads,
                        head_from: 0,
                        head_to: at.heads,
                        kv_heads: at.kv_heads,
                        head_dim: at.head_dim,
                        act: at.act,
                        tokens: seq,
                        past: kv.past,
                        q: (q + b * seq * qs * elem) as *const u8,
                        q_stride: qs,
                        cos: if at.rope {
                            (c + b * seq * cs * elem) as *const u8
                        } else {
                            std::ptr::null()
                        },
                        cos_stride: cs,
                        sin: if at.rope {
                            (sn + b * seq * ss * elem) as *const u8
                        } else {
                            std::ptr::null()
                        },
                        sin_stride: ss,
                        out: (o + b * seq * os * elem) as *mut u8,
                        out_stride: os,
                        k: kv.k,
                        v: kv.v,
                    };
                    let blocks = attention_blocks(kv.past, seq, self.pool.threads());
                    if blocks.len() > 1 {
                        self.token_split_launches += 1;
                    }
                    if blocks.is_empty() {
                        // A short call (decode): its query heads split over
                        // the threads once the context makes it worth a job.
                        let parts = if kv.past + seq >= MIN_HEAD_SPLIT_POSITIONS {
                            self.pool.threads().min(at.heads)
                        } else {
                            1
                        };
                        let per = at.heads.div_ceil(parts);
                        self.pool.run(at.heads.div_ceil(per), &|i| {
                            let (h0, h1) = (i * per, ((i + 1) * per).min(at.heads));
                            // SAFETY: as below; tasks write disjoint heads
                            // of the output rows.
                            unsafe { attention::attend(&whole.heads(h0, h1)) };
                        });
                        continue;
                    }
                    self.pool.run(blocks.len(), &|i| {
                        let (t0, len) = blocks[i];
                        // SAFETY: tokens t0 .. t0 + len of this sequence's
                        // rows (the launch's arena rows), its store filled
                        // to past + seq above; blocks write disjoint output
                        // rows and only read the store.
                        unsafe { attention::attend(&whole.block(t0, len)) };
                    });
                }
                return Ok(());
            }
            let blocks = match seqs.as_slice() {
                [one] if seq == tokens => attention_blocks(one.past, seq, self.pool.threads()),
                _ => Vec::new(),
            };
            let scratch = need * blocks.len().max(1);
            if self.scratch.len() < scratch {
                self.scratch.resize(scratch.next_power_of_two(), 0.0);
            }
            if blocks.len() > 1 {
                // One sequence's prompt: append its K/V rows here, then
                // attend blocks of its tokens on every thread (each block
                // reads the stores only and writes its own output rows).
                self.token_split_launches += 1;
                let (kv_k, kv_v, past) = (seqs[0].k as usize, seqs[0].v as usize, seqs[0].past);
                self.append_kv(l, &args, &strides, &seqs, seq);
                let (na, row_bytes) = (l.args.len(), l.args.iter().map(Arg::row_bytes).collect::<Vec<_>>());
                let base: Vec<usize> = args[..na].iter().map(|&p| p as usize).collect();
                let scratch = self.scratch.as_mut_ptr() as usize;
                let strides = &strides[..na];
                self.pool.run(blocks.len(), &|c| {
                    let (t0, len) = blocks[c];
                    let mut seqs = [KvSeq {
                        k: kv_k as *mut u8,
                        v: kv_v as *mut u8,
                        past: past + t0,
                    }];
                    let mut a: Vec<*mut u8> = base
                        .iter()
                        .zip(&row_bytes)
                        .map(|(&p, &rb)| (p + t0 * rb) as *mut u8)
                        .collect();
                    a.push(seqs.as_mut_ptr() as *mut u8);
                    a.push((scratch + c * need * 4) as *mut u8);
                    let mut st = strides.to_vec();
                    st.extend([len, AttentionPhase::Attend as usize]);
                    // SAFETY: tokens t0 .. t0 + len of every activation, the
                    // store rows appended above (read only), this block's
                    // own `need` f32 of the scratch; blocks write disjoint
                    // output rows.
                    unsafe { f(a.as_ptr(), st.as_ptr(), len) };
                });
                return Ok(());
            }
            args.push(seqs.as_mut_ptr() as *mut u8);
            strides.push(seq);
            args.push(self.scratch.as_mut_ptr() as *mut u8);
            strides.push(AttentionPhase::Both as usize);
        }
        // SAFETY: the arguments follow the kernel ABI of ouroc_codegen::cpu:
        // one pointer per operand and result (arena rows for `tokens`
        // tokens, weights encoded in their operand dtype), then for
        // attention the KvSeq array (capacity >= past + seq) and a scratch
        // of at least past + seq f32.
        unsafe { f(args.as_ptr(), strides.as_ptr(), tokens) };
        Ok(())
    }
}

impl CpuDevice {
    /// An attention launch's append phase (`AttentionPhase::Append`): each
    /// new token's K (rotated) and V rows into its sequence's store. `args`
    /// and `strides` are the operands' and results'. One sequence's prompt
    /// is appended in blocks of tokens over the threads (a block's rows go
    /// to positions `past + t0 ..`, nothing else is written), as the
    /// per-token kernels are split.
    fn append_kv(&mut self, l: &Launch, args: &[*mut u8], strides: &[usize], seqs: &[KvSeq], seq: usize) {
        let tokens = seq * seqs.len();
        let chunks = if seqs.len() == 1 {
            token_chunks(seq, self.pool.threads())
        } else {
            1
        };
        let per = tokens.div_ceil(chunks);
        let base: Vec<usize> = args.iter().map(|&p| p as usize).collect();
        let descs: Vec<(usize, usize, usize)> = seqs.iter().map(|s| (s.k as usize, s.v as usize, s.past)).collect();
        let row_bytes: Vec<usize> = l.args.iter().map(Arg::row_bytes).collect();
        let Some(f) = l.f else {
            return;
        };
        self.pool.run(tokens.div_ceil(per), &|c| {
            let (t0, n) = if chunks == 1 {
                (0, tokens)
            } else {
                (c * per, per.min(tokens - c * per))
            };
            let mut kv: Vec<KvSeq> = descs
                .iter()
                .map(|&(k, v, past)| KvSeq {
                    k: k as *mut u8,
                    v: v as *mut u8,
                    past: past + t0,
                })
                .collect();
            let mut a: Vec<*mut u8> = base
                .iter()
                .zip(&row_bytes)
                .map(|(&p, &rb)| (p + t0 * rb) as *mut u8)
                .collect();
            a.extend([kv.as_mut_ptr() as *mut u8, std::ptr::null_mut()]);
            let mut st = strides.to_vec();
            st.extend([if chunks == 1 { seq } else { n }, AttentionPhase::Append as usize]);
            // SAFETY: the kernel ABI on tokens t0 .. t0 + n of every
            // activation (all of them but for one sequence's prompt in
            // blocks); the append phase reads no scratch and writes store
            // rows past + t0 .. past + t0 + n of each sequence only, disjoint
            // between blocks.
            unsafe { f(a.as_ptr(), st.as_ptr(), n) };
        });
    }
}

/// The row split of a Linear on `threads` threads (None: one chunk).
fn split_linear(k: &Kernel, l: &LinearSpec, values: &HashMap<u32, ActValue>, threads: usize) -> Option<Split> {
    let parts = row_chunks(l.n, threads);
    if parts.len() < 2 {
        return None;
    }
    let act_elem = k.spec.act.size_bytes();
    let y = &values[&k.outputs[0]];
    let copy_x = match &k.inputs[0] {
        Operand::Act(r) if overlap(&values[&r.value], y) => Some(l.k * act_elem),
        _ => None,
    };
    Some(Split {
        chunks: parts.into_iter().map(|(row0, rows)| (row0, row0 + rows)).collect(),
        act_elem,
        copy_x,
    })
}

/// The chunks (first row, rows) a Linear of `n` rows is split into on
/// `threads` threads: none (one chunk) under 8 rows or on one thread.
fn row_chunks(n: usize, threads: usize) -> Vec<(usize, usize)> {
    if threads <= 1 || n < 8 {
        return vec![(0, n)];
    }
    let size = n.div_ceil(threads).next_multiple_of(4);
    (0..n.div_ceil(size))
        .map(|c| (c * size, size.min(n - c * size)))
        .collect()
}

/// Fewest tokens a task of a token-split launch gets: below that the
/// fork/join of the pool costs more than the kernel saves.
const MIN_TOKENS_PER_TASK: usize = 4;

/// Chunks of tokens a per-token kernel (`Launch::token_rows`) is split
/// into on `threads` threads: one in decode and for short prompts.
fn token_chunks(tokens: usize, threads: usize) -> usize {
    threads.min(tokens / MIN_TOKENS_PER_TASK).max(1)
}

/// Fewest positions (past + new tokens) at which a short call's attention
/// is split over the threads by query heads.
const MIN_HEAD_SPLIT_POSITIONS: usize = 128;

/// Fewest tokens a block of a split attention gets.
const MIN_ATTENTION_BLOCK: usize = 4;

/// The blocks `(first token, tokens)` a prompt of `seq` tokens after `past`
/// positions is attended in on `threads` threads: about equal work each
/// (token t reads `past + t + 1` positions), several per thread so that
/// the threads claiming them finish together; none (one launch) on one
/// thread or under [`MIN_TOKENS_PER_TASK`] tokens per thread.
fn attention_blocks(past: usize, seq: usize, threads: usize) -> Vec<(usize, usize)> {
    if threads <= 1 || seq < 2 * MIN_TOKENS_PER_TASK {
        return Vec::new();
    }
    let count = (4 * threads).min(seq / MIN_ATTENTION_BLOCK);
    let work = |t: usize| past + t + 1;
    let total: usize = (0..seq).map(work).sum();
    let mut blocks = Vec::with_capacity(count);
    let (mut t0, mut done) = (0, 0);
    for t in 0..seq {
        done += work(t);
        let ends_block = done * count >= total * (blocks.len() + 1) && t + 1 - t0 >= MIN_ATTENTION_BLOCK;
        if ends_block || t + 1 == seq {
            blocks.push((t0, t + 1 - t0));
            t0 = t + 1;
        }
    }
    blocks
}

/// Whether the per-token byte ranges of two arena values overlap.
fn overlap(a: &ActValue, b: &ActValue) -> bool {
    let range = |v: &ActValue| (v.offset as usize, v.offset as usize + v.width * v.dtype.size_bytes());
    let ((a0, a1), (b0, b1)) = (range(a), range(b));
    a0 < b1 && b0 < a1
}
