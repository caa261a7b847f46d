//! A [`Forward`] that executes a lowered [`Program`] with the Cranelift
//! JIT-compiled kernels of `ouroc_codegen::cpu`.
//!
//! It follows the Program contract (`ouroc_kernels`, and its reference
//! executor `ouroc_kernels::exec`) for one sequence per call:
//!
//! - **weights**, once at construction: the weight table walked in order
//!   (checkpoint tensors converted to the entry's dtype, recipes computed
//!   in f32 and rounded to the entry's dtype), then each resident weight
//!   encoded in the dtype its kernels read it in
//!   (`ouroc_codegen::cpu::operand_dtypes`: f32, or bf16 as its 16 bits);
//! - **kernels**: each distinct kernel compiled once ([`Jit::compile`]
//!   dedups by code key); every launch pre-bound to its operands (arena
//!   offsets per token, column windows, row strides, weight pointers);
//! - **arena**, per call of T tokens: `bytes_per_token * T` bytes, value v
//!   at `offset * T` (a buffer kept across calls, grown when needed);
//! - **KV cache**: one store per (loop step, layer) slot, each a K and a V
//!   byte buffer of rows of `kv_heads * head_dim` activation-dtype elements,
//!   grown before each call to hold `past + seq` rows; an attention kernel
//!   gets a one-element [`KvSeq`] array and an f32 score scratch, and the
//!   slot's `past` is advanced by `seq` after it ran;
//! - **loop**: carried values set from their inits, the body per step,
//!   the exit policy per token at the end of each step (as the reference:
//!   `ExitPolicy::decided_exit` for `last` / `step:K` / `threshold`, the
//!   f32 `p_r * out_r` accumulation for `weighted`), then the carried
//!   values set from their nexts (a parallel copy);
//! - **early exit** (option `early_exit`): in decode (one new token), once
//!   the token's exit is decided the later steps do not run, and the KV
//!   rows the exit step appended are copied to the slots of every later
//!   step (so later tokens see a full cache), as `ExecOptions::exit_skips`.
//!
//! Batch is 1 (the [`Forward`] trait runs one sequence); kernels run on
//! the calling thread.

use crate::generate::{Forward, Step};
use ouroc_codegen::cpu::{Jit, KvSeq, RawKernel, extra_args, operand_dtypes};
use ouroc_ir::{DType, ExitPolicy, WeightSource};
use ouroc_kernels::spec::Family;
use ouroc_kernels::{ActRef, ActValue, Kernel, LoopSpec, Operand, Program};
use std::collections::HashMap;

/// Where one kernel argument lives.
#[derive(Clone, Copy, Debug)]
enum Arg {
    /// An activation: byte `offset * tokens + col_bytes` of the arena, row
    /// stride `stride` elements.
    Act {
        offset: usize,
        col_bytes: usize,
        stride: usize,
    },
    /// A weight (read only), kept alive by `CpuForward::weights`.
    Weight(*const u8),
}

/// One pre-bound kernel launch.
struct Launch {
    f: RawKernel,
    /// Operands then results.
    args: Vec<Arg>,
    /// `Attention`: its layer.
    attention: Option<usize>,
}

/// One KV slot (loop step, layer) of the single sequence.
#[derive(Default)]
struct KvStore {
    k: Vec<u8>,
    v: Vec<u8>,
    /// Positions stored.
    len: usize,
    row_bytes: usize,
}

impl KvStore {
    fn reserve_rows(&mut self, rows: usize) {
        let need = rows * self.row_bytes;
        if self.k.len() < need {
            let cap = need.max(self.k.len() * 2);
            self.k.resize(cap, 0);
            self.v.resize(cap, 0);
        }
    }
}

/// A model compiled to CPU machine code, run through its KV cache.
pub struct CpuForward {
    program: Program,
    values: HashMap<u32, ActValue>,
    policy: Option<ExitPolicy>,
    early_exit: bool,
    max_positions: usize,
    /// Encoded resident weights by (id, dtype); launches point into them.
    #[allow(dead_code)]
    weights: HashMap<(u32, DType), Vec<u8>>,
    before: Vec<Launch>,
    body: Vec<Launch>,
    after: Vec<Launch>,
    /// Largest gather table (token ids must be below it).
    vocab: Option<usize>,
    /// The arena, as u64 cells (8-byte aligned); grown per call.
    arena: Vec<u64>,
    kv: HashMap<(usize, usize), KvStore>,
    scratch: Vec<f32>,
    past: usize,
    /// Kernel launches so far (all calls).
    pub launches: usize,
    // Dropped last: the launches' function pointers live in it.
    _jit: Jit,
}

/// f32 value of the element at `p` of dtype `d`.
///
/// # Safety
/// `p` is valid for `d.size_bytes()` bytes.
unsafe fn load(p: *const u8, d: DType) -> f32 {
    unsafe {
        match d {
            DType::F32 => f32::from_le_bytes(*(p as *const [u8; 4])),
            DType::BF16 => f32::from_bits((u16::from_le_bytes(*(p as *const [u8; 2])) as u32) << 16),
            // No kernel reads or writes f16 activations (Jit::compile rejects them).
            DType::F16 => unreachable!("f16 activation"),
            DType::I32 => i32::from_le_bytes(*(p as *const [u8; 4])) as f32,
        }
    }
}

/// Store `x` (rounded to `d`) at `p`.
///
/// # Safety
/// `p` is valid for `d.size_bytes()` bytes.
unsafe fn store(p: *mut u8, d: DType, x: f32) {
    let bytes = encode_one(x, d);
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
}

fn encode_one(x: f32, d: DType) -> Vec<u8> {
    match d {
        DType::F32 => x.to_le_bytes().to_vec(),
        DType::BF16 => (((d.round(x)).to_bits() >> 16) as u16).to_le_bytes().to_vec(),
        DType::F16 => unreachable!("f16 activation"),
        DType::I32 => (x as i32).to_le_bytes().to_vec(),
    }
}

fn encode(v: &[f32], d: DType) -> Result<Vec<u8>, String> {
    match d {
        DType::F32 => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => Ok(v
            .iter()
            .flat_map(|&x| (((d.round(x)).to_bits() >> 16) as u16).to_le_bytes())
            .collect()),
        d => Err(format!("weights of dtype {d} are not supported by the CPU backend")),
    }
}

/// The resident weights after their recipes, rounded to their dtypes (the
/// Program's one definition, shared with the reference executor).
fn materialise(p: &Program, src: &dyn WeightSource) -> Result<HashMap<u32, Vec<f32>>, String> {
    p.materialise_weights(src, true)
        .map_err(|(id, msg)| format!("weight %{id}: {msg}"))
}

impl CpuForward {
    /// Check `program`, load its weights from `weights`, JIT-compile its
    /// kernels. `max_positions`: the context length (prompt + generated)
    /// accepted. `early_exit`: in decode, skip the steps after a token's exit.
    pub fn new(
        program: Program,
        weights: &dyn WeightSource,
        max_positions: usize,
        early_exit: bool,
    ) -> Result<CpuForward, String> {
        program.check()?;
        if program.inputs.len() != 2 {
            return Err(format!(
                "a language-model program takes (ids, positions); this one has {} inputs",
                program.inputs.len()
            ));
        }
        if program.outputs.is_empty() {
            return Err("the program returns nothing".into());
        }
        let values: HashMap<u32, ActValue> = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        for &i in &program.inputs {
            match values.get(&i) {
                Some(v) if v.dtype == DType::I32 && v.width == 1 => {}
                _ => return Err(format!("input %{i} must be an i32 [1] per token in the arena")),
            }
        }
        let policy = program
            .loop_
            .as_ref()
            .map(|l| ExitPolicy::parse(&l.policy))
            .transpose()?;
        if let Some(l) = &program.loop_ {
            for c in &l.carried {
                if values[&c.init.value].dtype != values[&c.arg].dtype
                    || values[&c.next.value].dtype != values[&c.arg].dtype
                {
                    return Err(format!("carried %{}: init, next and arg differ in dtype", c.arg));
                }
            }
        }
        let resident = materialise(&program, weights)?;
        let mut jit = Jit::new().map_err(|e| e.to_string())?;
        // Encode each weight in every dtype a kernel reads it in.
        let mut enc: HashMap<(u32, DType), Vec<u8>> = HashMap::new();
        for k in program.kernels() {
            for (op, d) in k.inputs.iter().zip(operand_dtypes(&k.spec)) {
                if let Operand::Weight(w) = op
                    && !enc.contains_key(&(*w, d))
                {
                    let data = resident
                        .get(w)
                        .ok_or_else(|| format!("kernel {} reads weight %{w}, which is not resident", k.spec.name))?;
                    enc.insert((*w, d), encode(data, d).map_err(|e| format!("weight %{w}: {e}"))?);
                }
            }
        }
        drop(resident);
        let mut bind = |ks: &[Kernel]| -> Result<Vec<Launch>, String> {
            ks.iter()
                .map(|k| {
                    let id = jit.compile(&k.spec).map_err(|e| e.to_string())?;
                    let f = jit.kernel(id).raw();
                    let dtypes = operand_dtypes(&k.spec);
                    let mut args = Vec::new();
                    for (op, d) in k.inputs.iter().zip(&dtypes) {
                        args.push(match op {
                            Operand::Act(r) => {
                                let v = &values[&r.value];
                                if v.dtype != *d {
                                    return Err(format!(
                                        "kernel {} reads %{} of dtype {} as {d}",
                                        k.spec.name, r.value, v.dtype
                                    ));
                                }
                                Arg::Act {
                                    offset: v.offset as usize,
                                    col_bytes: r.col * v.dtype.size_bytes(),
                                    stride: v.width,
                                }
                            }
                            Operand::Weight(w) => Arg::Weight(enc[&(*w, *d)].as_ptr()),
                        });
                    }
                    for o in &k.outputs {
                        let v = &values[o];
                        if v.dtype != k.spec.act {
                            return Err(format!(
                                "kernel {} writes %{o} of dtype {} as {}",
                                k.spec.name, v.dtype, k.spec.act
                            ));
                        }
                        args.push(Arg::Act {
                            offset: v.offset as usize,
                            col_bytes: 0,
                            stride: v.width,
                        });
                    }
                    let attention = match &k.spec.family {
                        Family::Attention(a) => Some(a.layer),
                        _ => None,
                    };
                    debug_assert_eq!(extra_args(&k.spec), if attention.is_some() { 2 } else { 0 });
                    Ok(Launch { f, args, attention })
                })
                .collect()
        };
        let before = bind(&program.before)?;
        let body = match &program.loop_ {
            Some(l) => bind(&l.body)?,
            None => Vec::new(),
        };
        let after = bind(&program.after)?;
        let vocab = program
            .kernels()
            .filter_map(|k| match &k.spec.family {
                Family::Gather(g) => Some(g.rows),
                _ => None,
            })
            .min();
        // KV stores: one per (step, layer) attention slot, in the act dtype.
        let mut kv = HashMap::new();
        let mut add_slots = |ks: &[Kernel], steps: usize| {
            for k in ks {
                if let Family::Attention(a) = &k.spec.family {
                    for s in 0..steps {
                        kv.insert(
                            (s, a.layer),
                            KvStore {
                                row_bytes: a.kv_heads * a.head_dim * k.spec.act.size_bytes(),
                                ..KvStore::default()
                            },
                        );
                    }
                }
            }
        };
        add_slots(&program.before, 1);
        add_slots(&program.after, 1);
        if let Some(l) = &program.loop_ {
            add_slots(&l.body, l.steps);
        }
        Ok(CpuForward {
            values,
            policy,
            early_exit,
            max_positions,
            weights: enc,
            before,
            body,
            after,
            vocab,
            arena: Vec::new(),
            kv,
            scratch: Vec::new(),
            past: 0,
            launches: 0,
            program,
            _jit: jit,
        })
    }

    /// Positions in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forget the KV cache.
    pub fn reset(&mut self) {
        for s in self.kv.values_mut() {
            s.len = 0;
        }
        self.past = 0;
    }

    fn base(&mut self) -> *mut u8 {
        self.arena.as_mut_ptr() as *mut u8
    }

    /// Pointer to row `t` of an activation reference.
    fn row_ptr(&mut self, r: &ActRef, tokens: usize, t: usize) -> (*mut u8, DType) {
        let v = &self.values[&r.value];
        let (d, off) = (
            v.dtype,
            v.offset as usize * tokens + (t * v.width + r.col) * v.dtype.size_bytes(),
        );
        // SAFETY: the arena holds bytes_per_token * tokens bytes; the
        // Program check guarantees the reference lies inside its value.
        (unsafe { self.base().add(off) }, d)
    }

    /// Row `t` of `r` as f32.
    fn read_row(&mut self, r: &ActRef, tokens: usize, t: usize) -> Vec<f32> {
        let (p, d) = self.row_ptr(r, tokens, t);
        (0..r.len)
            // SAFETY: inside the arena (see row_ptr).
            .map(|j| unsafe { load(p.add(j * d.size_bytes()), d) })
            .collect()
    }

    fn write_row(&mut self, value: u32, tokens: usize, t: usize, row: &[f32]) {
        let width = self.values[&value].width;
        let (p, d) = self.row_ptr(&ActRef::whole(value, width), tokens, t);
        for (j, &x) in row.iter().enumerate() {
            // SAFETY: inside the arena (see row_ptr).
            unsafe { store(p.add(j * d.size_bytes()), d, x) }
        }
    }

    /// The raw bytes of every row of `r`.
    fn read_bytes(&mut self, r: &ActRef, tokens: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for t in 0..tokens {
            let (p, d) = self.row_ptr(r, tokens, t);
            // SAFETY: inside the arena (see row_ptr).
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, r.len * d.size_bytes()) });
        }
        out
    }

    fn write_bytes(&mut self, value: u32, tokens: usize, data: &[u8]) {
        let width = self.values[&value].width;
        let row_bytes = width * self.values[&value].dtype.size_bytes();
        for t in 0..tokens {
            let (p, _) = self.row_ptr(&ActRef::whole(value, width), tokens, t);
            // SAFETY: inside the arena; `data` is a separate buffer.
            unsafe { std::ptr::copy_nonoverlapping(data[t * row_bytes..].as_ptr(), p, row_bytes) }
        }
    }

    /// Run one pre-bound launch (which = 0 before, 1 body, 2 after).
    fn launch(&mut self, which: usize, i: usize, step: usize, tokens: usize, seq: usize) {
        let base = self.base();
        let list = match which {
            0 => &self.before,
            1 => &self.body,
            _ => &self.after,
        };
        let l = &list[i];
        let mut args: Vec<*mut u8> = Vec::with_capacity(l.args.len() + 2);
        let mut strides: Vec<usize> = Vec::with_capacity(l.args.len() + 2);
        for a in &l.args {
            match *a {
                Arg::Act {
                    offset,
                    col_bytes,
                    stride,
                } => {
                    // SAFETY: inside the arena sized for `tokens`.
                    args.push(unsafe { base.add(offset * tokens + col_bytes) });
                    strides.push(stride);
                }
                Arg::Weight(p) => {
                    args.push(p as *mut u8);
                    strides.push(0);
                }
            }
        }
        let f = l.f;
        let mut seqs = [KvSeq {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            past: 0,
        }];
        let layer = l.attention;
        if let Some(layer) = layer {
            let slot = self.kv.get_mut(&(step, layer)).expect("a slot per (step, layer)");
            slot.reserve_rows(slot.len + seq);
            seqs[0] = KvSeq {
                k: slot.k.as_mut_ptr(),
                v: slot.v.as_mut_ptr(),
                past: slot.len,
            };
            let need = slot.len + seq;
            if self.scratch.len() < need {
                self.scratch.resize(need.next_power_of_two(), 0.0);
            }
            args.push(seqs.as_mut_ptr() as *mut u8);
            strides.push(seq);
            args.push(self.scratch.as_mut_ptr() as *mut u8);
            strides.push(0);
        }
        // SAFETY: the arguments follow the kernel ABI of ouroc_codegen::cpu:
        // one pointer per operand and result (arena rows for `tokens`
        // tokens, weights encoded in their operand dtype), then for
        // attention the KvSeq array (capacity >= past + seq) and a scratch
        // of at least past + seq f32.
        unsafe { f(args.as_ptr(), strides.as_ptr(), tokens) };
        if let Some(layer) = layer {
            self.kv.get_mut(&(step, layer)).expect("slot").len += seq;
        }
        self.launches += 1;
    }

    /// After stopping at step `last`, append step `last`'s K/V rows of the
    /// `seq` new positions to the slots of every later step.
    fn fill_skipped_slots(&mut self, l_steps: usize, last: usize, seq: usize) {
        let layers: Vec<usize> = self.body.iter().filter_map(|l| l.attention).collect();
        for layer in layers {
            let src = &self.kv[&(last, layer)];
            let rb = src.row_bytes;
            let (k, v) = (
                src.k[(src.len - seq) * rb..src.len * rb].to_vec(),
                src.v[(src.len - seq) * rb..src.len * rb].to_vec(),
            );
            for s in last + 1..l_steps {
                let dst = self.kv.get_mut(&(s, layer)).expect("slot");
                dst.reserve_rows(dst.len + seq);
                dst.k[dst.len * rb..(dst.len + seq) * rb].copy_from_slice(&k);
                dst.v[dst.len * rb..(dst.len + seq) * rb].copy_from_slice(&v);
                dst.len += seq;
            }
        }
    }

    /// Run `ids` after the cache: the last position's row of the program's
    /// first output (the logits), its exit depth and the loop steps run.
    pub fn run(&mut self, ids: &[u32]) -> Result<Step, String> {
        let seq = ids.len();
        if seq == 0 {
            return Err("no tokens given".into());
        }
        if self.past + seq > self.max_positions {
            return Err(format!(
                "{} positions exceed the context of {}",
                self.past + seq,
                self.max_positions
            ));
        }
        if let Some(vocab) = self.vocab
            && let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab)
        {
            return Err(format!("token id {bad} is out of the vocabulary (0..{vocab})"));
        }
        let tokens = seq;
        let bytes = self.program.arena.bytes_per_token as usize * tokens;
        let cells = bytes.div_ceil(8);
        if self.arena.len() < cells {
            self.arena.resize(cells, 0);
        }
        let (ids_v, pos_v) = (self.program.inputs[0], self.program.inputs[1]);
        for (t, &id) in ids.iter().enumerate() {
            let (p, _) = self.row_ptr(&ActRef::whole(ids_v, 1), tokens, t);
            // SAFETY: an i32 [1] row inside the arena.
            unsafe { std::ptr::copy_nonoverlapping((id as i32).to_le_bytes().as_ptr(), p, 4) };
            let (p, _) = self.row_ptr(&ActRef::whole(pos_v, 1), tokens, t);
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(((self.past + t) as i32).to_le_bytes().as_ptr(), p, 4) };
        }
        for i in 0..self.before.len() {
            self.launch(0, i, 0, tokens, seq);
        }
        let mut depth = 1;
        let mut steps_run = 1;
        if let Some(l) = self.program.loop_.take() {
            let (d, s) = self.run_loop(&l, tokens, seq);
            self.program.loop_ = Some(l);
            depth = d;
            steps_run = s;
        }
        for i in 0..self.after.len() {
            self.launch(2, i, 0, tokens, seq);
        }
        let out = self.program.outputs[0];
        let logits = self.read_row(&out, tokens, tokens - 1);
        self.past += seq;
        Ok(Step {
            logits,
            depth,
            steps_run,
        })
    }

    /// The loop; returns the last token's exit depth and the steps run.
    fn run_loop(&mut self, l: &LoopSpec, tokens: usize, seq: usize) -> (usize, usize) {
        let policy = self.policy.expect("parsed with the loop");
        let inits: Vec<Vec<u8>> = l.carried.iter().map(|c| self.read_bytes(&c.init, tokens)).collect();
        for (c, data) in l.carried.iter().zip(&inits) {
            self.write_bytes(c.arg, tokens, data);
        }
        let width = l.out.len;
        let mut lambdas: Vec<Vec<f32>> = vec![Vec::new(); tokens];
        let mut decided: Vec<Option<usize>> = vec![None; tokens];
        let weighted = matches!(policy, ExitPolicy::Weighted);
        let mut acc = if weighted {
            vec![0.0f32; tokens * width]
        } else {
            Vec::new()
        };
        let mut survive = vec![1.0f32; tokens];
        let mut steps_run = 0;
        for r in 0..l.steps {
            for i in 0..self.body.len() {
                self.launch(1, i, r, tokens, seq);
            }
            steps_run = r + 1;
            for (t, ls) in lambdas.iter_mut().enumerate() {
                let lam = match &l.exit {
                    Some(e) => self.read_row(e, tokens, t)[0],
                    None => 0.0,
                };
                ls.push(lam);
            }
            if weighted {
                for t in 0..tokens {
                    let lam = lambdas[t][r];
                    let pr = if r + 1 < l.steps {
                        let pr = lam * survive[t];
                        survive[t] *= 1.0 - lam;
                        pr
                    } else {
                        survive[t]
                    };
                    let row = self.read_row(&l.out, tokens, t);
                    for (a, x) in acc[t * width..(t + 1) * width].iter_mut().zip(&row) {
                        *a += pr * x;
                    }
                }
            } else {
                for t in 0..tokens {
                    if decided[t].is_some() {
                        continue;
                    }
                    if let Some(s) = policy.decided_exit(&lambdas[t], l.steps) {
                        debug_assert_eq!(s, r, "policy {policy} decided step {s} only at step {r}");
                        let row = self.read_row(&l.out, tokens, t);
                        self.write_row(l.result, tokens, t, &row);
                        decided[t] = Some(s);
                    }
                }
            }
            if r + 1 == l.steps {
                break;
            }
            let all_decided = lambdas.iter().all(|ls| policy.decided_exit(ls, l.steps).is_some());
            if self.early_exit && seq == 1 && all_decided {
                self.fill_skipped_slots(l.steps, r, seq);
                break;
            }
            let nexts: Vec<Vec<u8>> = l.carried.iter().map(|c| self.read_bytes(&c.next, tokens)).collect();
            for (c, data) in l.carried.iter().zip(&nexts) {
                self.write_bytes(c.arg, tokens, data);
            }
        }
        if weighted {
            for t in 0..tokens {
                let row = acc[t * width..(t + 1) * width].to_vec();
                self.write_row(l.result, tokens, t, &row);
            }
        }
        let t = tokens - 1;
        let exit = decided[t].unwrap_or_else(|| policy.exit_step(&lambdas[t]));
        (exit + 1, steps_run)
    }
}

impl Forward for CpuForward {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        self.run(ids)
    }

    fn loop_steps(&self) -> usize {
        self.program.loop_.as_ref().map_or(1, |l| l.steps)
    }
}
