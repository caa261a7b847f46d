//! The `Program`: the kernels of a model in launch order, the loop that
//! repeats the body with its exit policy, the activation arena, the weight
//! table with its load-time recipes and the KV-cache slots. Plain data
//! (serde); [`Program::check`] validates one read from a file.
//!
//! Identifiers are the IR's value numbers (`%45`), so a program can be read
//! next to `ouroc emit ir --after dce` (the optimised graph).

use crate::quant::QuantFormat;
use crate::spec::{Encoding, Family, KernelSpec, dtype_serde, operand_encodings};
use ouroc_ir::{DType, WeightSource};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A lowered model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    /// The graph inputs, activations of `[1]` i32 per token: token ids, then
    /// absolute positions (`past + s` for the s-th new token of a sequence).
    pub inputs: Vec<u32>,
    /// What a run returns (the logits), `[len]` per token each.
    pub outputs: Vec<ActRef>,
    /// In dependency order: an entry's recipe only names earlier entries.
    pub weights: Vec<WeightEntry>,
    pub arena: Arena,
    /// One slot per (loop step, attention layer), sorted.
    pub kv: Vec<KvSlot>,
    /// Kernels of the top block before the loop (all of them without one).
    pub before: Vec<Kernel>,
    #[serde(rename = "loop")]
    pub loop_: Option<LoopSpec>,
    /// Kernels of the top block after the loop.
    pub after: Vec<Kernel>,
}

/// One kernel launch: the spec and the operands it is bound to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub spec: KernelSpec,
    /// In the order the family documents.
    pub inputs: Vec<Operand>,
    /// Activation values written, in the order the family documents; each
    /// whole (row length = the value's width).
    pub outputs: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operand {
    Act(ActRef),
    /// An entry of the weight table.
    Weight(u32),
}

/// Columns `col..col + len` of every row of activation `value`: the whole
/// value, or a view (an IR `slice`, which has no buffer of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActRef {
    pub value: u32,
    pub col: usize,
    pub len: usize,
}

/// The activation arena, planned by `ouroc_passes::memplan::plan` at
/// batch = seq = 1 (a value that plan puts in place of an operand with a
/// different row layout, which 64-byte alignment allows at one token, gets
/// its own region at the end instead). Every activation is `[width]` per
/// token, so the plan scales: for a call with T = batch x seq new tokens the arena is
/// `bytes_per_token * T` bytes and a value starts at byte `offset * T`;
/// its row t (token t = b * seq + s) starts `t * width * dtype size` bytes
/// further. Scaling keeps disjoint buffers disjoint and offsets aligned.
/// Values sharing an offset share a buffer (in-place reuse): a kernel whose
/// output has the offset of one of its inputs must be correct when output
/// row t is the same memory as input row t.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arena {
    pub bytes_per_token: u64,
    /// Alignment of every offset (and of `bytes_per_token`).
    pub align: u64,
    /// Every activation with a buffer, by value number.
    pub values: Vec<ActValue>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActValue {
    pub id: u32,
    #[serde(with = "dtype_serde")]
    pub dtype: DType,
    /// Elements per token (the product of the dims after `[batch, seq]`).
    pub width: usize,
    /// Byte offset per token (multiply by the number of tokens).
    pub offset: u64,
}

/// A weight the kernels read, or an input of a load-time transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightEntry {
    pub id: u32,
    #[serde(with = "dtype_serde")]
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub recipe: Recipe,
    /// Read by a kernel (else only an input of another entry's recipe, and a
    /// runtime may drop it after load).
    pub resident: bool,
}

/// How a weight is made, once, at load. Every result is rounded to the
/// entry's dtype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// A checkpoint tensor, converted to the entry's dtype.
    Checkpoint { tensor: String },
    /// `w[o, i] * s[i]` (a norm weight folded into the linear after it).
    ScaleCols { w: u32, s: u32 },
    /// Concatenation along `axis` (merged projections: axis 0).
    Concat { axis: usize, parts: Vec<u32> },
    /// Columns `start..start + len` of the last dim.
    Slice { of: u32, start: usize, len: usize },
}

/// KV cache slot of (loop step, layer): for each sequence, the K and V rows
/// (`kv_heads * head_dim` elements of `dtype` each) of every position seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvSlot {
    pub step: usize,
    pub layer: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    #[serde(with = "dtype_serde")]
    pub dtype: DType,
}

/// The loop: `steps` runs of `body`, the exit policy choosing per token.
///
/// Contract, per call:
/// 1. at the start, each carried `arg` gets its `init` (a copy unless they
///    share a buffer);
/// 2. step r runs the body kernels in order (attention uses KV slot
///    (r, layer));
/// 3. at the end of step r the policy reads `out` and `exit` (lambda, one
///    per token) and writes `result` (see [`LoopSpec::policy`]); then, if
///    another step follows, every carried `arg` gets its `next`: a parallel
///    copy (all nexts read before any arg is written), skipped where they
///    share a buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopSpec {
    pub steps: usize,
    /// The exit policy in its text form (`ouroc_ir::ExitPolicy::parse`).
    /// Per token with lambdas l_0..l_r so far: `last`, `step:K`,
    /// `threshold:Q[:bf16]` copy the `out` row of the step
    /// `ExitPolicy::decided_exit` returns, at that step, into `result`;
    /// `weighted` accumulates `p_r * out_r` in f32 (p from
    /// `exit_distribution`, f32 arithmetic) and writes the rounded sum after
    /// the last step. In decode a runtime may stop after step r once every
    /// token's exit is decided; it must then append step r's new K/V rows to
    /// the slots (r', layer) of every later step r' (copy the exit step's
    /// K/V forward), so later tokens see a full cache.
    pub policy: String,
    /// The step index (an `i32` scalar, not in the arena; only attention's
    /// KV slot depends on it).
    pub step_index: u32,
    pub carried: Vec<Carried>,
    pub body: Vec<Kernel>,
    pub out: ActRef,
    /// Absent when the policy never reads it (`last`, `step:K`).
    pub exit: Option<ActRef>,
    /// The loop's value (the policy's choice), read by the kernels after.
    pub result: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Carried {
    pub arg: u32,
    pub init: ActRef,
    pub next: ActRef,
}

impl Program {
    /// Every kernel: before, body (once), after.
    pub fn kernels(&self) -> impl Iterator<Item = &Kernel> {
        self.before
            .iter()
            .chain(self.loop_.iter().flat_map(|l| l.body.iter()))
            .chain(&self.after)
    }

    /// Launches per call when every loop step runs: before + steps x body + after.
    pub fn kernels_per_token(&self) -> usize {
        self.before.len() + self.loop_.as_ref().map_or(0, |l| l.steps * l.body.len()) + self.after.len()
    }

    pub fn value(&self, id: u32) -> Option<&ActValue> {
        self.arena.values.iter().find(|v| v.id == id)
    }

    pub fn weight(&self, id: u32) -> Option<&WeightEntry> {
        self.weights.iter().find(|w| w.id == id)
    }

    /// Every encoding the kernels read weight `id` in, sorted.
    pub fn read_encodings(&self, id: u32) -> Vec<Encoding> {
        let mut e: Vec<Encoding> = self
            .kernels()
            .flat_map(|k| k.inputs.iter().zip(operand_encodings(&k.spec)))
            .filter_map(|(op, e)| (*op == Operand::Weight(id)).then_some(e))
            .collect();
        e.sort();
        e.dedup();
        e
    }

    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels().find(|k| k.spec.name == name)
    }

    /// Weight bytes read for one token: (by the kernels outside the loop, by
    /// one loop step). A weight counts in the encoding its kernel reads it
    /// in (its table dtype, or a quantised format); a gather reads one row
    /// of its table. Decode reads `outside + steps_run * per_step`.
    pub fn weight_bytes_read(&self) -> (u64, u64) {
        let read = |ks: &[Kernel]| -> u64 {
            let mut total: u64 = 0;
            for k in ks {
                for (op, enc) in k.inputs.iter().zip(operand_encodings(&k.spec)) {
                    if let Operand::Weight(id) = op
                        && let Some(w) = self.weight(*id)
                    {
                        let bytes = match &k.spec.family {
                            Family::Gather(g) => g.width.saturating_mul(w.dtype.size_bytes()),
                            _ => enc.bytes(&w.shape).unwrap_or(usize::MAX),
                        };
                        total = total.saturating_add(bytes as u64);
                    }
                }
            }
            total
        };
        let outside = read(&self.before) + read(&self.after);
        (outside, self.loop_.as_ref().map_or(0, |l| read(&l.body)))
    }

    /// Read the weights of Linears in quantised formats (`--weights`): every
    /// bias-free Linear takes `body` except the one writing the logits (the
    /// LM head), which takes `head` (None: it stays dense). A weight several Linears
    /// read is read quantised by each (a tied embedding stays dense for the
    /// gather). Returns the Linears changed.
    pub fn quantise(&mut self, body: QuantFormat, head: Option<QuantFormat>) -> usize {
        let logits: HashSet<u32> = self.outputs.iter().map(|o| o.value).collect();
        let mut changed = 0;
        let kernels = self
            .before
            .iter_mut()
            .chain(self.loop_.iter_mut().flat_map(|l| l.body.iter_mut()))
            .chain(self.after.iter_mut());
        for k in kernels {
            let head_kernel = k.outputs.iter().any(|o| logits.contains(o));
            // A Linear with a bias is Ouro's exit gate outside `step_end`
            // (a pipeline without the e-graph): it stays dense like the gate.
            if let Family::Linear(l) = &mut k.spec.family
                && !l.bias
            {
                l.quant = if head_kernel { head } else { Some(body) };
                changed += l.quant.is_some() as usize;
            }
        }
        changed
    }

    /// Number of distinct kernel codes ([`KernelSpec::code_key`]).
    pub fn distinct_kernels(&self) -> usize {
        self.kernels().map(|k| k.spec.code_key()).collect::<HashSet<_>>().len()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a Program serialises")
    }

    /// Read a program and [`check`](Program::check) it.
    pub fn from_json(s: &str) -> Result<Program, String> {
        let p: Program = serde_json::from_str(s).map_err(|e| format!("program JSON: {e}"))?;
        p.check()?;
        Ok(p)
    }

    /// Structural validation: names unique, operand counts and widths as
    /// the families say, every reference defined, arena offsets aligned,
    /// weight recipes in dependency order.
    pub fn check(&self) -> Result<(), String> {
        let values: HashMap<u32, &ActValue> = self.arena.values.iter().map(|v| (v.id, v)).collect();
        let mut seen = HashSet::new();
        for (i, w) in self.weights.iter().enumerate() {
            let earlier = |id: &u32| self.weights[..i].iter().any(|e| e.id == *id);
            let deps: Vec<u32> = match &w.recipe {
                Recipe::Checkpoint { .. } => vec![],
                Recipe::ScaleCols { w, s } => vec![*w, *s],
                Recipe::Concat { parts, .. } => parts.clone(),
                Recipe::Slice { of, .. } => vec![*of],
            };
            if let Some(d) = deps.iter().find(|d| !earlier(d)) {
                return Err(format!(
                    "weight %{}: its recipe reads %{d}, not an earlier weight",
                    w.id
                ));
            }
            if !seen.insert(w.id) {
                return Err(format!("weight %{} is listed twice", w.id));
            }
        }
        if self.arena.align == 0 {
            return Err("the arena's alignment is 0".into());
        }
        for v in &self.arena.values {
            // The whole row must lie in the arena: kernels write `width` elements from `offset`.
            let end = (v.width as u64)
                .checked_mul(v.dtype.size_bytes() as u64)
                .and_then(|b| b.checked_add(v.offset));
            if v.offset % self.arena.align != 0 || end.is_none_or(|e| e > self.arena.bytes_per_token) {
                return Err(format!(
                    "%{}: offset {} (width {} x {}) is unaligned or outside the arena of {} bytes per token",
                    v.id, v.offset, v.width, v.dtype, self.arena.bytes_per_token
                ));
            }
        }
        let act = |r: &ActRef, what: &str| -> Result<(), String> {
            let v = values
                .get(&r.value)
                .ok_or_else(|| format!("{what} reads %{}, which has no buffer", r.value))?;
            if r.col.checked_add(r.len).is_none_or(|end| end > v.width) {
                return Err(format!(
                    "{what} reads {} columns from column {} of %{} (width {})",
                    r.len, r.col, r.value, v.width
                ));
            }
            Ok(())
        };
        let mut names = HashSet::new();
        for k in self.kernels() {
            let name = &k.spec.name;
            if !names.insert(name.clone()) {
                return Err(format!("kernel name {name} is used twice"));
            }
            let fam = &k.spec.family;
            if k.inputs.len() != fam.operands() || k.outputs.len() != fam.results() {
                return Err(format!(
                    "kernel {name}: {} takes {} operands and {} results, it has {} and {}",
                    fam.name(),
                    fam.operands(),
                    fam.results(),
                    k.inputs.len(),
                    k.outputs.len()
                ));
            }
            for op in &k.inputs {
                match op {
                    Operand::Act(r) => act(r, &format!("kernel {name}"))?,
                    Operand::Weight(w) if self.weight(*w).is_none() => {
                        return Err(format!("kernel {name} reads weight %{w}, not in the table"));
                    }
                    Operand::Weight(_) => {}
                }
            }
            // A Linear's kernels read exactly [n, k] (and [n]) of their
            // weights and k columns of x; a quantised one runs on the
            // runtime's kernels, which take f32 and bf16 only.
            if let Family::Linear(l) = fam {
                if l.n == 0 || l.k == 0 {
                    return Err(format!("kernel {name}: a Linear of n = {}, k = {}", l.n, l.k));
                }
                if !matches!(&k.inputs[0], Operand::Act(r) if r.len == l.k) {
                    return Err(format!(
                        "kernel {name}: its input is not {} columns of an activation",
                        l.k
                    ));
                }
                let float = |d: DType| matches!(d, DType::F32 | DType::BF16);
                if l.quant.is_some() && !(float(k.spec.act) && float(l.weight)) {
                    return Err(format!(
                        "kernel {name}: a quantised Linear takes f32 or bf16 activations and bias, not {} and {}",
                        k.spec.act, l.weight
                    ));
                }
                let shape = |i: usize| match &k.inputs[i] {
                    Operand::Weight(w) => self.weight(*w).map(|e| e.shape.clone()),
                    Operand::Act(_) => None,
                };
                if shape(1) != Some(vec![l.n, l.k]) {
                    return Err(format!("kernel {name}: its weight is not a [{}, {}] weight", l.n, l.k));
                }
                if l.bias && shape(2) != Some(vec![l.n]) {
                    return Err(format!("kernel {name}: its bias is not a [{}] weight", l.n));
                }
            }
            for (o, width) in k.outputs.iter().zip(fam.result_widths()) {
                match values.get(o) {
                    Some(v) if v.width == width => {}
                    Some(v) => return Err(format!("kernel {name} writes %{o} of width {} as {width}", v.width)),
                    None => return Err(format!("kernel {name} writes %{o}, which has no buffer")),
                }
            }
        }
        let width = |v: u32, what: &str| {
            values
                .get(&v)
                .map(|v| v.width)
                .ok_or_else(|| format!("{what} %{v} has no buffer"))
        };
        if let Some(l) = &self.loop_ {
            for c in &l.carried {
                act(&c.init, "a carried init")?;
                act(&c.next, "a carried next")?;
                let w = width(c.arg, "the carried value")?;
                if c.init.len != w || c.next.len != w {
                    return Err(format!("carried %{}: init and next must have its width {w}", c.arg));
                }
            }
            act(&l.out, "the loop's out")?;
            if width(l.result, "the loop's result")? != l.out.len {
                return Err(format!("the loop's result %{} and out differ in width", l.result));
            }
            if let Some(e) = &l.exit {
                act(e, "the loop's exit")?;
                if e.len != 1 {
                    return Err("the loop's exit signal must be one value per token".into());
                }
            }
            ouroc_ir::ExitPolicy::parse(&l.policy)?.check(l.steps)?;
        }
        for o in &self.outputs {
            act(o, "an output")?;
        }
        Ok(())
    }
}

impl ActRef {
    pub fn whole(value: u32, width: usize) -> ActRef {
        ActRef {
            value,
            col: 0,
            len: width,
        }
    }
}

/// Prints `%v`, or `%v[a..b]` for a column window.
struct ActText<'a>(&'a ActRef, &'a Program);

impl fmt::Display for ActText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let width = self.1.value(r.value).map_or(r.len, |v| v.width);
        if r.col == 0 && r.len == width {
            write!(f, "%{}", r.value)
        } else {
            write!(f, "%{}[{}..{}]", r.value, r.col, r.col + r.len)
        }
    }
}

impl Program {
    fn fmt_kernels(&self, f: &mut fmt::Formatter<'_>, ks: &[Kernel], indent: &str) -> fmt::Result {
        let pad = self.kernels().map(|k| k.spec.name.len()).max().unwrap_or(0);
        for k in ks {
            let outs: Vec<String> = k.outputs.iter().map(|o| format!("%{o}")).collect();
            let ins: Vec<String> = k
                .inputs
                .iter()
                .map(|i| match i {
                    Operand::Act(r) => ActText(r, self).to_string(),
                    Operand::Weight(w) => format!("%{w}"),
                })
                .collect();
            writeln!(
                f,
                "{indent}{:<pad$}  {} = {}<{}>({}) {}",
                k.spec.name,
                outs.join(", "),
                k.spec.family.name(),
                k.spec.act,
                ins.join(", "),
                k.spec.attrs()
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ins: Vec<String> = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, v)| match i {
                0 => format!("ids %{v}"),
                1 => format!("positions %{v}"),
                _ => format!("%{v}"),
            })
            .collect();
        writeln!(f, "program @{}({})", self.name, ins.join(", "))?;
        let steps = self.loop_.as_ref().map_or(0, |l| l.steps);
        let body = self.loop_.as_ref().map_or(0, |l| l.body.len());
        writeln!(
            f,
            "kernels: {} before + {} x {} steps + {} after = {} per token ({} distinct)",
            self.before.len(),
            body,
            steps,
            self.after.len(),
            self.kernels_per_token(),
            self.distinct_kernels()
        )?;
        let computed = self
            .weights
            .iter()
            .filter(|w| !matches!(w.recipe, Recipe::Checkpoint { .. }))
            .count();
        writeln!(
            f,
            "weights: {} from the checkpoint, {} computed at load ({} resident)",
            self.weights.len() - computed,
            computed,
            self.weights.iter().filter(|w| w.resident).count()
        )?;
        for w in &self.weights {
            let ty = format!(
                "{}[{}]",
                w.dtype,
                w.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            );
            let recipe = match &w.recipe {
                Recipe::Checkpoint { tensor } => format!("{tensor:?}"),
                Recipe::ScaleCols { w, s } => format!("scale_cols(%{w}, %{s})"),
                Recipe::Concat { axis, parts } => {
                    let p: Vec<String> = parts.iter().map(|p| format!("%{p}")).collect();
                    format!("concat({}) {{axis = {axis}}}", p.join(", "))
                }
                Recipe::Slice { of, start, len } => format!("slice(%{of}) {{start = {start}, len = {len}}}"),
            };
            let note = if w.resident { "" } else { "  (load only)" };
            let quant: Vec<&str> = self
                .read_encodings(w.id)
                .into_iter()
                .filter_map(|e| matches!(e, Encoding::Quant(_)).then_some(e.name()))
                .collect();
            let quant = match quant.as_slice() {
                [] => String::new(),
                q => format!("  (read as {})", q.join(", ")),
            };
            writeln!(f, "  %{} = {recipe} : {ty}{note}{quant}", w.id)?;
        }
        writeln!(
            f,
            "arena: {} bytes per token ({} values, offsets per token, {}-byte aligned)",
            self.arena.bytes_per_token,
            self.arena.values.len(),
            self.arena.align
        )?;
        for v in &self.arena.values {
            writeln!(f, "  %{} : {}[{}] @ {}", v.id, v.dtype, v.width, v.offset)?;
        }
        if let Some(s) = self.kv.first() {
            let layers: HashSet<usize> = self.kv.iter().map(|s| s.layer).collect();
            writeln!(
                f,
                "kv cache: {} slots (step, layer) = {} steps x {} layers, kv_heads {}, head_dim {}, {}",
                self.kv.len(),
                self.kv.len() / layers.len().max(1),
                layers.len(),
                s.kv_heads,
                s.head_dim,
                s.dtype
            )?;
        }
        writeln!(f, "before:")?;
        self.fmt_kernels(f, &self.before, "  ")?;
        if let Some(l) = &self.loop_ {
            writeln!(
                f,
                "loop %{} {{steps = {}, policy = {}, step = %{}}}:",
                l.result, l.steps, l.policy, l.step_index
            )?;
            for c in &l.carried {
                let shared = |r: &ActRef| {
                    let off = |v| self.value(v).map(|v| v.offset);
                    off(r.value) == off(c.arg)
                };
                writeln!(
                    f,
                    "  carried %{} <- init {}{}, next {}{}",
                    c.arg,
                    ActText(&c.init, self),
                    if shared(&c.init) { " (same buffer)" } else { "" },
                    ActText(&c.next, self),
                    if shared(&c.next) { " (same buffer)" } else { "" },
                )?;
            }
            self.fmt_kernels(f, &l.body, "  ")?;
            write!(f, "  end of step: policy reads out {}", ActText(&l.out, self))?;
            if let Some(e) = &l.exit {
                write!(f, ", exit {}", ActText(e, self))?;
            }
            writeln!(f, "; carried <- next")?;
        }
        writeln!(f, "after:")?;
        self.fmt_kernels(f, &self.after, "  ")?;
        let outs: Vec<String> = self.outputs.iter().map(|o| ActText(o, self).to_string()).collect();
        writeln!(f, "return {}", outs.join(", "))
    }
}

impl Program {
    /// The values of the weights a runtime keeps (`resident`), each built by
    /// its recipe from the checkpoint once, at load, and rounded to its dtype
    /// (or left in f32 when `round` is false). Errors name the weight id.
    /// All of them at once: [`Program::stream_weights`] holds one at a time.
    pub fn materialise_weights(
        &self,
        src: &dyn WeightSource,
        round: bool,
    ) -> Result<HashMap<u32, Vec<f32>>, (u32, String)> {
        let mut out = HashMap::new();
        self.stream_weights(src, round, &mut |e, data| {
            out.insert(e.id, data.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    /// Builds the resident weights by their recipes and hands each to
    /// `sink` as soon as it is built (rounded to its dtype, or f32 when
    /// `round` is false), in table order. A weight that only feeds recipes
    /// is built when its first reader needs it and dropped after its last,
    /// so the f32 held at once is a few tensors (a layer's projections while
    /// they are merged), not the model: a sink that encodes each weight
    /// prepares a model in the memory of its encoding. Errors name the
    /// weight id.
    pub fn stream_weights(
        &self,
        src: &dyn WeightSource,
        round: bool,
        sink: &mut WeightSink,
    ) -> Result<(), (u32, String)> {
        let mut b = WeightBuilder {
            program: self,
            src,
            round,
            index: self.weights.iter().enumerate().map(|(i, e)| (e.id, i)).collect(),
            readers: HashMap::new(),
            live: HashMap::new(),
        };
        for e in &self.weights {
            for d in recipe_inputs(&e.recipe) {
                *b.readers.entry(d).or_default() += 1;
            }
        }
        for (i, e) in self.weights.iter().enumerate() {
            if !e.resident {
                continue; // built when a reader needs it (or never, when none does)
            }
            let data = b.build(i)?;
            sink(e, &data).map_err(|m| (e.id, m))?;
            if b.readers.get(&e.id).is_some_and(|&n| n > 0) {
                b.live.insert(e.id, data);
            }
        }
        Ok(())
    }
}

/// Where [`Program::stream_weights`] hands each resident weight.
pub type WeightSink<'a> = dyn FnMut(&WeightEntry, &[f32]) -> Result<(), String> + 'a;

/// The state of [`Program::stream_weights`]: the weights built and still to
/// be read, and how many reads each has left.
struct WeightBuilder<'a> {
    program: &'a Program,
    src: &'a dyn WeightSource,
    round: bool,
    /// Weight id -> its position in the table.
    index: HashMap<u32, usize>,
    /// Reads by recipes not yet built.
    readers: HashMap<u32, usize>,
    /// Built values some recipe still reads.
    live: HashMap<u32, Vec<f32>>,
}

impl WeightBuilder<'_> {
    /// The value of table entry `i`, its inputs built first when needed and
    /// dropped after their last read.
    fn build(&mut self, i: usize) -> Result<Vec<f32>, (u32, String)> {
        let e = &self.program.weights[i];
        let inputs = recipe_inputs(&e.recipe);
        for &d in &inputs {
            match self.index.get(&d) {
                // Recipes read earlier weights only, so this recursion ends.
                Some(&j) if j < i => {
                    if !self.live.contains_key(&d) {
                        let v = self.build(j)?;
                        self.live.insert(d, v);
                    }
                }
                _ => return Err((e.id, format!("its recipe reads %{d}, not an earlier weight"))),
            }
        }
        let dtype = if self.round { e.dtype } else { DType::F32 };
        let live = &self.live;
        let get = |id: &u32| {
            live.get(id)
                .ok_or((e.id, format!("%{id} was dropped before its last read")))
        };
        let data: Vec<f32> = match &e.recipe {
            Recipe::Checkpoint { tensor } => {
                let mut v = self
                    .src
                    .read_f32(tensor)
                    .map_err(|m| (e.id, format!("\"{tensor}\": {m}")))?;
                v.iter_mut().for_each(|x| *x = dtype.round(*x));
                v
            }
            Recipe::ScaleCols { w, s } => {
                let (w, s) = (get(w)?, get(s)?);
                if s.is_empty() {
                    return Err((e.id, "scales a weight by an empty vector".into()));
                }
                // Row by row: `w[i] * s[i % cols]` without a division per element (most of a
                // model's weights are folded here).
                let mut out = Vec::with_capacity(w.len());
                for row in w.chunks(s.len()) {
                    out.extend(row.iter().zip(s).map(|(x, c)| dtype.round(x * c)));
                }
                out
            }
            Recipe::Concat { axis, parts } => {
                let outer: usize = e.shape[..*axis].iter().product();
                let mut data = Vec::new();
                for o in 0..outer {
                    for part in parts {
                        let part = get(part)?;
                        let block = part.len() / outer.max(1);
                        data.extend_from_slice(&part[o * block..(o + 1) * block]);
                    }
                }
                data
            }
            Recipe::Slice { of, start, len } => {
                let row = *self.program.weight(*of).and_then(|w| w.shape.last()).unwrap_or(&1);
                if start.checked_add(*len).is_none_or(|end| end > row) {
                    return Err((e.id, format!("slices {len} columns from {start} of rows of {row}")));
                }
                get(of)?
                    .chunks(row.max(1))
                    .flat_map(|r| r[*start..start + len].iter().copied())
                    .collect()
            }
        };
        let n: usize = e.shape.iter().product();
        if data.len() != n {
            return Err((
                e.id,
                format!("has {} elements, its shape {:?} needs {n}", data.len(), e.shape),
            ));
        }
        for d in inputs {
            let left = self.readers.entry(d).or_default();
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.live.remove(&d);
            }
        }
        Ok(data)
    }
}

/// The weights a recipe reads.
fn recipe_inputs(r: &Recipe) -> Vec<u32> {
    match r {
        Recipe::Checkpoint { .. } => vec![],
        Recipe::ScaleCols { w, s } => vec![*w, *s],
        Recipe::Concat { parts, .. } => parts.clone(),
        Recipe::Slice { of, .. } => vec![*of],
    }
}
