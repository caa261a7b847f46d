//! The reference device: a Program's kernels computed by the reference
//! kernels of `ouroc_kernels::exec`, in plain loops and f32, on the host.
//! With the driver it is the executable meaning of a Program (the CPU and
//! GPU devices are checked against it). Its arena is a cell per two bytes
//! of the plan, filled with NaN at every call (reading a byte no kernel
//! wrote shows), values kept in f32 whatever their dtype; kernels round at
//! their rounding points unless built with `round: false`. Every launch
//! checks the Program's aliasing rule.
//!
//! [`Executor`] is the driver on this device with the reference's options.

use crate::device::{CallShape, Device, DeviceError, KvArg, KvLayout, KvStore, Span};
use crate::driver::{Driver, DriverError, DriverOptions, Want};
use crate::kv::KvMode;
use crate::weights::ResidentWeights;
use ouroc_ir::{DType, Tensor, WeightSource};
use ouroc_kernels::exec::{attention_seq, compute};
use ouroc_kernels::quant::{self, QuantFormat};
use ouroc_kernels::spec::{Encoding, Family, LinearSpec, operand_dtypes, operand_encodings};
use ouroc_kernels::{ActValue, Kernel, Operand, Program};
use std::collections::HashMap;
use std::ops::Range;

/// The reference device.
pub struct HostDevice {
    round: bool,
    values: HashMap<u32, ActValue>,
    weights: HashMap<(u32, DType), Vec<f32>>,
    /// Quantised Linear weights, as stored.
    quant: HashMap<(u32, QuantFormat), Vec<u8>>,
    cells: Vec<f32>,
    tokens: usize,
    /// K and V rows per store (`None`: freed).
    stores: Vec<Option<HostStore>>,
}

struct HostStore {
    layout: KvLayout,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl HostDevice {
    /// `round`: round at each kernel's rounding points (and weights to
    /// their dtypes); false: everything f32 whatever the dtypes say.
    pub fn new(round: bool) -> HostDevice {
        HostDevice {
            round,
            values: HashMap::new(),
            weights: HashMap::new(),
            quant: HashMap::new(),
            cells: Vec::new(),
            tokens: 0,
            stores: Vec::new(),
        }
    }

    fn cell(s: &Span, row: usize, e: usize) -> usize {
        (s.byte + row * s.stride + e * s.dtype.size_bytes()) / 2
    }

    fn store(&mut self, s: KvStore) -> Result<&mut HostStore, DeviceError> {
        self.stores
            .get_mut(s.0)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| DeviceError::Failed(format!("KV store {} is not allocated", s.0)))
    }

    /// Bytes of value `v` in a call of `tokens` tokens.
    fn extent(v: &ActValue, tokens: usize) -> Range<usize> {
        let start = v.offset as usize * tokens;
        start..start + tokens * v.width * v.dtype.size_bytes()
    }

    /// The aliasing rule of the contract: a result may share memory with an
    /// operand (or another result) only as the same rows (same offset and
    /// row size), never across rows; a kernel that processes rows in any
    /// order (threads) stays correct.
    fn check_aliasing(&self, k: &Kernel, tokens: usize) -> Result<(), DeviceError> {
        let operands = k.inputs.iter().filter_map(|o| match o {
            Operand::Act(r) => Some(r.value),
            Operand::Weight(_) => None,
        });
        for (i, &o) in k.outputs.iter().enumerate() {
            let out = &self.values[&o];
            for other in operands.clone().chain(k.outputs[..i].iter().copied()) {
                let x = &self.values[&other];
                let (a, b) = (Self::extent(out, tokens), Self::extent(x, tokens));
                let overlap = a.start < b.end && b.start < a.end;
                let same_rows = out.offset == x.offset && a.len() == b.len();
                let is_output = k.outputs[..i].contains(&other);
                if overlap && (!same_rows || is_output) {
                    return Err(DeviceError::Program(format!(
                        "kernel {}: result %{o} overlaps %{other} other than row for row",
                        k.spec.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn act_span(&self, value: u32, col: usize, len: usize) -> Span {
        let v = &self.values[&value];
        let size = v.dtype.size_bytes();
        Span {
            byte: v.offset as usize * self.tokens + col * size,
            stride: v.width * size,
            rows: self.tokens,
            len,
            dtype: v.dtype,
        }
    }
}

impl Device for HostDevice {
    type Bound = Kernel;

    fn name(&self) -> String {
        "reference".into()
    }

    fn rounds(&self) -> bool {
        self.round
    }

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn load(&mut self, program: &Program, weights: &ResidentWeights) -> Result<(), DeviceError> {
        self.values = program.arena.values.iter().map(|v| (v.id, v.clone())).collect();
        for ((id, e), bytes) in weights.entries() {
            match e {
                Encoding::Dense(d) => {
                    self.weights.insert((id, d), crate::codec::decode(bytes, d));
                }
                Encoding::Quant(q) => {
                    self.quant.insert((id, q), bytes.to_vec());
                }
            }
        }
        Ok(())
    }

    fn bind(&mut self, k: &Kernel) -> Result<Kernel, DeviceError> {
        for (op, e) in k.inputs.iter().zip(operand_encodings(&k.spec)) {
            if let Operand::Weight(w) = op {
                let loaded = match e {
                    Encoding::Dense(d) => self
                        .weights
                        .contains_key(&(*w, if self.round { d } else { DType::F32 })),
                    Encoding::Quant(q) => self.quant.contains_key(&(*w, q)),
                };
                if !loaded {
                    let d = e;
                    return Err(DeviceError::Program(format!(
                        "kernel {} reads weight %{w} as {d}, which is not loaded",
                        k.spec.name
                    )));
                }
            }
        }
        Ok(k.clone())
    }

    fn begin_call(&mut self, shape: CallShape, _: &[KvArg]) -> Result<(), DeviceError> {
        let bytes_per_token: usize = self
            .values
            .values()
            .map(|v| v.offset as usize + v.width * v.dtype.size_bytes())
            .max()
            .unwrap_or(0);
        self.tokens = shape.tokens;
        self.cells.clear();
        self.cells
            .resize((bytes_per_token * shape.tokens).div_ceil(2), f32::NAN);
        Ok(())
    }

    fn launch(&mut self, k: &Kernel, shape: CallShape, kv: &[KvArg]) -> Result<(), DeviceError> {
        self.check_aliasing(k, shape.tokens)?;
        let d = if self.round { k.spec.act } else { DType::F32 };
        let rd = move |x: f32| d.round(x);
        let dtypes = operand_dtypes(&k.spec);
        let acts: Vec<Vec<f32>> = k
            .inputs
            .iter()
            .map(|o| match o {
                Operand::Act(r) => self.read(self.act_span(r.value, r.col, r.len)),
                Operand::Weight(_) => Ok(Vec::new()),
            })
            .collect::<Result<_, _>>()?;
        let results = if let Family::Attention(a) = &k.spec.family {
            let (batch, seq) = (kv.len(), shape.seq);
            let mut out = Vec::with_capacity(shape.tokens * a.heads * a.head_dim);
            for (b, arg) in kv.iter().enumerate() {
                let rows: Vec<&[f32]> = acts
                    .iter()
                    .map(|x| {
                        let w = x.len() / (batch * seq);
                        &x[b * seq * w..(b + 1) * seq * w]
                    })
                    .collect();
                let st = self.store(arg.store)?;
                let n = arg.past * st.layout.row_elems();
                st.k.truncate(n);
                st.v.truncate(n);
                out.extend(attention_seq(a, &rows, &mut st.k, &mut st.v, seq, &rd));
            }
            vec![out]
        } else {
            let weights = &self.weights;
            let round = self.round;
            let input = |i: usize| -> &[f32] {
                match &k.inputs[i] {
                    Operand::Act(_) => &acts[i],
                    Operand::Weight(w) => &weights[&(*w, if round { dtypes[i] } else { DType::F32 })],
                }
            };
            match &k.spec.family {
                Family::Linear(l @ LinearSpec { quant: Some(q), .. }) => {
                    let Operand::Weight(w) = &k.inputs[1] else {
                        return Err(DeviceError::Program(format!(
                            "kernel {}: its weight is not a weight",
                            k.spec.name
                        )));
                    };
                    let bias = l.bias.then(|| input(2));
                    let y = quant::linear(*q, input(0), &self.quant[&(*w, *q)], bias, l.n, l.k);
                    vec![y.into_iter().map(rd).collect()]
                }
                _ => compute(k, &input, shape.tokens, &rd),
            }
        };
        for (&o, data) in k.outputs.iter().zip(&results) {
            let width = self.values[&o].width;
            if data.len() != shape.tokens * width {
                return Err(DeviceError::Program(format!(
                    "kernel {} computed {} elements for %{o}",
                    k.spec.name,
                    data.len()
                )));
            }
            self.write(self.act_span(o, 0, width), data)?;
        }
        Ok(())
    }

    fn read(&mut self, at: Span) -> Result<Vec<f32>, DeviceError> {
        let mut out = Vec::with_capacity(at.rows * at.len);
        for t in 0..at.rows {
            out.extend((0..at.len).map(|e| self.cells[Self::cell(&at, t, e)]));
        }
        Ok(out)
    }

    fn write(&mut self, at: Span, data: &[f32]) -> Result<(), DeviceError> {
        for t in 0..at.rows {
            for e in 0..at.len {
                self.cells[Self::cell(&at, t, e)] = data[t * at.len + e];
            }
        }
        Ok(())
    }

    fn copy(&mut self, dst: Span, src: Span) -> Result<(), DeviceError> {
        let data = self.read(src)?;
        self.write(dst, &data)
    }

    fn kv_alloc(&mut self, layout: KvLayout) -> Result<KvStore, DeviceError> {
        self.stores.push(Some(HostStore {
            layout,
            k: Vec::new(),
            v: Vec::new(),
        }));
        Ok(KvStore(self.stores.len() - 1))
    }

    fn kv_free(&mut self, store: KvStore) -> Result<(), DeviceError> {
        self.store(store)?;
        self.stores[store.0] = None;
        Ok(())
    }

    fn kv_reserve(&mut self, store: KvStore, _: usize) -> Result<(), DeviceError> {
        self.store(store).map(|_| ())
    }

    fn kv_copy(&mut self, dst: KvStore, src: KvStore, rows: Range<usize>) -> Result<(), DeviceError> {
        let (k, v) = self.kv_read(src, rows.clone())?;
        self.kv_write(dst, rows.start, &k, &v)
    }

    fn kv_read(&mut self, store: KvStore, rows: Range<usize>) -> Result<(Vec<f32>, Vec<f32>), DeviceError> {
        let s = self.store(store)?;
        let e = s.layout.row_elems();
        let r = rows.start * e..rows.end * e;
        if r.end > s.k.len() {
            return Err(DeviceError::Failed(format!(
                "KV store {}: positions {rows:?} are not filled",
                store.0
            )));
        }
        Ok((s.k[r.clone()].to_vec(), s.v[r].to_vec()))
    }

    fn kv_write(&mut self, store: KvStore, row0: usize, k: &[f32], v: &[f32]) -> Result<(), DeviceError> {
        let round = self.round;
        let s = self.store(store)?;
        let d = if round { s.layout.dtype } else { DType::F32 };
        let at = row0 * s.layout.row_elems();
        let end = at + k.len();
        if s.k.len() < end {
            s.k.resize(end, f32::NAN);
            s.v.resize(end, f32::NAN);
        }
        for (dst, src) in [(&mut s.k, k), (&mut s.v, v)] {
            dst[at..end].iter_mut().zip(src).for_each(|(a, &x)| *a = d.round(x));
        }
        Ok(())
    }

    fn kv_reserved(&self, store: KvStore) -> usize {
        self.stores
            .get(store.0)
            .and_then(|s| s.as_ref())
            .map_or(0, |s| (s.k.capacity() + s.v.capacity()) * 4)
    }
}

/// The options of the reference executor.
#[derive(Clone, Copy, Debug)]
pub struct ExecOptions {
    /// Round at the rounding points of each kernel (and weights to their
    /// dtype at load). Off: everything stays f32 whatever the dtypes say.
    pub round_low_precision: bool,
    /// In decode (one new token per sequence), stop the loop as soon as
    /// every token's exit step is decided, filling the KV slots of the steps
    /// not run with the last run step's K/V. Off, and always in prefill:
    /// every step runs.
    pub exit_skips: bool,
    /// KV-cache sharing in decode.
    pub kv: KvMode,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            round_low_precision: true,
            exit_skips: false,
            kv: KvMode::Full,
        }
    }
}

/// What one [`Executor::run_tokens`] computed.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    /// One tensor per program output, `[batch, seq, len]`.
    pub outputs: Vec<Tensor>,
    /// Per token (batch-major), the loop step its exit policy chose; empty
    /// without a loop.
    pub exit_steps: Vec<usize>,
    /// Loop steps run (fewer than the loop's steps only with `exit_skips`).
    pub steps_run: usize,
    /// Kernels launched.
    pub launches: usize,
}

/// The reference execution of a Program: the driver on the [`HostDevice`],
/// on batches of equally long sequences, every position returned.
pub struct Executor {
    driver: Driver<HostDevice>,
}

impl Executor {
    /// Check the program, then load its weights: checkpoint tensors from
    /// `src`, then each recipe in table order.
    pub fn new(p: &Program, src: &dyn WeightSource, opts: ExecOptions) -> Result<Executor, DriverError> {
        let dopts = DriverOptions {
            max_positions: usize::MAX,
            early_exit: opts.exit_skips,
            kv: opts.kv,
        };
        let dev = HostDevice::new(opts.round_low_precision);
        Ok(Executor {
            driver: Driver::from_source(p.clone(), src, dev, dopts)?,
        })
    }

    /// Positions already in the KV cache.
    pub fn past_len(&self) -> usize {
        self.driver.past_len()
    }

    /// Forget the KV cache.
    pub fn reset(&mut self) {
        self.driver
            .reset()
            .expect("the reference device does not fail to reset");
    }

    /// The driver (KV rows, launch counts).
    pub fn driver(&mut self) -> &mut Driver<HostDevice> {
        &mut self.driver
    }

    /// Run on a batch of equally long token sequences; positions continue
    /// after the cache.
    pub fn run_tokens(&mut self, ids: &[Vec<u32>]) -> Result<ExecOutput, DriverError> {
        let batch: Vec<&[u32]> = ids.iter().map(|s| s.as_slice()).collect();
        let out = self.driver.call(
            &batch,
            Want {
                all_positions: true,
                trace: false,
            },
        )?;
        let (b, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        let p = self.driver.program();
        let outputs = p
            .outputs
            .iter()
            .zip(out.outputs)
            .map(|(o, data)| Tensor::new(vec![b, seq, o.len], data))
            .collect();
        Ok(ExecOutput {
            outputs,
            exit_steps: if p.loop_.is_some() { out.exit_steps } else { Vec::new() },
            steps_run: if p.loop_.is_some() { out.steps_run } else { 0 },
            launches: out.launches,
        })
    }
}
