//! Ouro checkpoint -> IR, exactly as the spec's forward pass (embedding;
//! RoPE tables once per position; R steps of the same L layers, each step
//! ending in the final norm and the exit gate; the head applied to the
//! policy's choice).
//!
//! Two forms of the same computation, emitted by the same code:
//! - rolled (the default): one `loop` whose body is one step;
//! - unrolled (`BuildOptions::unrolled`): what a tracer produces, R explicit
//!   copies of the step in the top block (attention of step r, layer i uses
//!   KV layer `r*L + i`) and an `exit_select` over the R step outputs and
//!   exit signals. The `reroll` pass recovers the rolled form from it.

use crate::checkpoint::Checkpoint;
use crate::config::OuroConfig;
use ouroc_ir::{Attention, DType, ExitPolicy, Graph, GraphBuilder, OpKind, RopeTable, Type, ValueId, WeightSource};

#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The model dtype: activations and weights (bf16 reproduces the
    /// reference's bf16 run, f32 its f32 run).
    pub dtype: DType,
    pub policy: ExitPolicy,
    /// Loop steps; defaults to the config's total_ut_steps.
    pub loops: Option<usize>,
    /// Emit R explicit copies of the layer stack and an `exit_select`
    /// instead of a `loop` (the form a tracer produces).
    pub unrolled: bool,
}

impl BuildOptions {
    /// The reference's default policy: threshold at the config's
    /// early_exit_threshold, summed in the model dtype's arithmetic.
    pub fn reference_policy(cfg: &OuroConfig, dtype: DType) -> ExitPolicy {
        let arith = if dtype == DType::F32 { DType::F32 } else { DType::BF16 };
        ExitPolicy::Threshold {
            q: cfg.early_exit_threshold as f32,
            arith,
        }
    }
}

/// Build the graph of a loaded checkpoint.
pub fn build_graph(ckpt: &Checkpoint, opts: &BuildOptions) -> Result<Graph, String> {
    build_from_config(&ckpt.config, ckpt.head_tensor_name(), opts)
}

/// One layer's weights.
struct Layer {
    ln1: ValueId,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    o: ValueId,
    ln2: ValueId,
    ln3: ValueId,
    gate: ValueId,
    up: ValueId,
    down: ValueId,
    ln4: ValueId,
}

/// What one loop step reads from outside it: the weights, the RoPE tables
/// and the attributes.
struct Step {
    d: DType,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cos: ValueId,
    sin: ValueId,
    layers: Vec<Layer>,
    norm: ValueId,
    gate_w: ValueId,
    gate_b: ValueId,
}

impl Step {
    /// Emit one loop step on `x`: the L layers (attention of layer i uses KV
    /// layer `first_layer + i`), the final norm and the exit gate. Returns
    /// the step's output h (also the next step's input) and its lambda.
    fn emit(&self, b: &mut GraphBuilder, mut x: ValueId, first_layer: usize) -> Result<(ValueId, ValueId), String> {
        let (d, eps, hd) = (self.d, self.eps, self.head_dim);
        for (i, l) in self.layers.iter().enumerate() {
            let n1 = b.op(OpKind::RmsNorm { eps }, &[x, l.ln1], d)?;
            let q = b.op(OpKind::Linear, &[n1, l.q], d)?;
            let k = b.op(OpKind::Linear, &[n1, l.k], d)?;
            let vv = b.op(OpKind::Linear, &[n1, l.v], d)?;
            let rope = |heads| OpKind::Rope { heads, head_dim: hd };
            let q = b.op(rope(self.heads), &[q, self.cos, self.sin], d)?;
            let k = b.op(rope(self.kv_heads), &[k, self.cos, self.sin], d)?;
            let attn = Attention {
                layer: first_layer + i,
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: hd,
            };
            let a = b.op(OpKind::Attention(attn), &[q, k, vv], d)?;
            let a = b.op(OpKind::Linear, &[a, l.o], d)?;
            let a = b.op(OpKind::RmsNorm { eps }, &[a, l.ln2], d)?;
            x = b.op(OpKind::Add, &[x, a], d)?;
            let n3 = b.op(OpKind::RmsNorm { eps }, &[x, l.ln3], d)?;
            let g = b.op(OpKind::Linear, &[n3, l.gate], d)?;
            let u = b.op(OpKind::Linear, &[n3, l.up], d)?;
            let g = b.op(OpKind::Silu, &[g], d)?;
            let m = b.op(OpKind::Mul, &[g, u], d)?;
            let m = b.op(OpKind::Linear, &[m, l.down], d)?;
            let m = b.op(OpKind::RmsNorm { eps }, &[m, l.ln4], d)?;
            x = b.op(OpKind::Add, &[x, m], d)?;
        }
        let hn = b.op(OpKind::RmsNorm { eps }, &[x, self.norm], d)?;
        let g = b.op(OpKind::Linear, &[hn, self.gate_w, self.gate_b], d)?;
        let lam = b.op(OpKind::Sigmoid, &[g], d)?;
        Ok((hn, lam))
    }
}

/// Build from a config alone (weights are referenced by name). `head` is the
/// tensor used as lm_head (`model.embed_tokens.weight` when tied).
pub fn build_from_config(cfg: &OuroConfig, head: &str, opts: &BuildOptions) -> Result<Graph, String> {
    let steps = crate::limits::check_loops(opts.loops.unwrap_or(cfg.total_ut_steps))?;
    opts.policy.check(steps)?;
    let d = opts.dtype;
    let (h, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (heads, kvh, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let mut b = GraphBuilder::new("ouro");
    let tok = Type::new(DType::I32, vec![ouroc_ir::Dim::sym("batch"), ouroc_ir::Dim::sym("seq")]);
    let ids = b.input(tok.clone());
    let pos = b.input(tok);
    let w = |b: &mut GraphBuilder, name: &str, dims: &[usize]| b.weight(name, Type::fixed(d, dims));

    let embed = w(&mut b, "model.embed_tokens.weight", &[v, h]);
    let x0 = b.op(OpKind::Embedding, &[embed, ids], d)?;
    let table = RopeTable {
        head_dim: hd,
        theta: cfg.rope_theta,
    };
    let cos = b.op(OpKind::RopeCos(table), &[pos], d)?;
    let sin = b.op(OpKind::RopeSin(table), &[pos], d)?;

    let layers: Vec<Layer> = (0..cfg.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            Layer {
                ln1: w(&mut b, &format!("{p}.input_layernorm.weight"), &[h]),
                q: w(&mut b, &format!("{p}.self_attn.q_proj.weight"), &[heads * hd, h]),
                k: w(&mut b, &format!("{p}.self_attn.k_proj.weight"), &[kvh * hd, h]),
                v: w(&mut b, &format!("{p}.self_attn.v_proj.weight"), &[kvh * hd, h]),
                o: w(&mut b, &format!("{p}.self_attn.o_proj.weight"), &[h, heads * hd]),
                ln2: w(&mut b, &format!("{p}.input_layernorm_2.weight"), &[h]),
                ln3: w(&mut b, &format!("{p}.post_attention_layernorm.weight"), &[h]),
                gate: w(&mut b, &format!("{p}.mlp.gate_proj.weight"), &[inter, h]),
                up: w(&mut b, &format!("{p}.mlp.up_proj.weight"), &[inter, h]),
                down: w(&mut b, &format!("{p}.mlp.down_proj.weight"), &[h, inter]),
                ln4: w(&mut b, &format!("{p}.post_attention_layernorm_2.weight"), &[h]),
            }
        })
        .collect();
    let step = Step {
        d,
        eps: cfg.rms_norm_eps,
        heads,
        kv_heads: kvh,
        head_dim: hd,
        cos,
        sin,
        layers,
        norm: w(&mut b, "model.norm.weight", &[h]),
        gate_w: w(&mut b, "model.early_exit_gate.weight", &[1, h]),
        gate_b: w(&mut b, "model.early_exit_gate.bias", &[1]),
    };
    let head_w = w(&mut b, head, &[v, h]);

    let out = if opts.unrolled {
        // R copies of the step; step r's attention layers are r*L + i.
        let l = cfg.num_hidden_layers;
        let (mut outs, mut lams) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
        let mut x = x0;
        for r in 0..steps {
            let (hn, lam) = step.emit(&mut b, x, r * l)?;
            outs.push(hn);
            lams.push(lam);
            x = hn;
        }
        outs.extend(lams);
        b.op(OpKind::ExitSelect { policy: opts.policy }, &outs, d)?
    } else {
        let (_step, carried) = b.begin_loop(&[x0]);
        let (hn, lam) = step.emit(&mut b, carried[0], 0)?;
        b.end_loop(steps, opts.policy, &[hn], hn, Some(lam))
    };
    let logits = b.op(OpKind::Linear, &[out, head_w], d)?;
    let graph = b.finish(&[logits]);
    ouroc_ir::verify(&graph).map_err(|e| format!("internal error: the built graph does not verify: {e}"))?;
    Ok(graph)
}

impl WeightSource for Checkpoint {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, String> {
        Checkpoint::read_f32(self, name).map_err(|e| e.to_string())
    }
}
