//! The structural fuzzer: valid-but-extreme models, compiled and run.
//!
//! [`Extreme::from_bytes`] turns fuzzer bytes into a model config at the edges of what is valid
//! (hidden sizes from 2, odd intermediate sizes, every GQA ratio, explicit head_dim unrelated to
//! hidden_size, loop counts 1 to 16, vocabularies of one token, tied heads, every exit policy);
//! [`Extreme::check`] writes it as a checkpoint with random weights and runs a prompt and two
//! decode steps on the reference interpreter (imported graph) and on the compiled CPU engine
//! (optimised Program, JIT kernels). They must agree within f32 rounding, or both refuse the
//! model: a model one accepts and the other refuses, or different outputs, is a compiler bug.

use ouroc_ir::{DType, ExitPolicy};
use ouroc_models::{BuildOptions, Checkpoint, StorageDtype};
use ouroc_runtime::cpu::{CpuForward, CpuOptions};
use ouroc_runtime::generate::Forward;
use ouroc_runtime::interp::InterpForward;

/// One generated model and how to run it.
#[derive(Debug, Clone)]
pub struct Extreme {
    pub config: serde_json::Value,
    pub policy: String,
    pub prompt: Vec<u32>,
    pub seed: u64,
}

/// Relative error (max |a - b| over max |b|) the two engines may differ by: f32 with different
/// summation orders.
const TOLERANCE: f32 = 2e-4;

/// The smallest logit scale the tolerance is relative to. A model with one or two tokens can
/// have every logit near zero by cancellation (1.8e-6 in a one-token model with hidden size 2,
/// where the two engines differed by 7e-9, f32 noise, yet 0.4% relative): such a difference is
/// not a disagreement. Logits of these random models are otherwise about 1e-2 and above.
const LOGIT_FLOOR: f32 = 1e-3;

impl Extreme {
    /// A model chosen by `data` (any bytes; short inputs repeat).
    pub fn from_bytes(data: &[u8]) -> Extreme {
        let mut at = 0usize;
        let mut pick = |n: usize| -> usize {
            let b = if data.is_empty() {
                0
            } else {
                data[at % data.len()] as usize
            };
            at += 1;
            // Mix the position in, so short inputs still vary every choice.
            (b ^ (at * 37)) % n
        };
        let heads = [1, 2, 3, 4, 6, 8][pick(6)];
        let divisors: Vec<usize> = (1..=heads).filter(|d| heads % d == 0).collect();
        let kv_heads = divisors[pick(divisors.len())];
        let explicit = pick(2) == 0;
        let (hidden, head_dim) = if explicit {
            ([2, 3, 5, 8, 16, 24, 40][pick(7)], [2, 4, 6, 8, 16, 32][pick(6)])
        } else {
            let hd = [2, 4, 8, 16][pick(4)];
            (heads * hd, hd)
        };
        let steps = [1, 2, 3, 4, 5, 8, 16][pick(7)];
        let vocab = [1, 2, 7, 31, 64, 300][pick(6)];
        let max_pos = [4, 8, 16, 64][pick(4)];
        let intermediate = [1, 3, 7, 16, 33, 96][pick(6)];
        let layers = [1, 2, 3][pick(3)];
        let eps = [1e-6, 1e-5, 0.5][pick(3)];
        let theta = [10000.0, 1.0, 1e6][pick(3)];
        let tied = pick(2) == 0;
        let threshold = [1.0, 0.5, 0.01][pick(3)];
        let mut config = serde_json::json!({
            "model_type": "ouro",
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab,
            "rms_norm_eps": eps,
            "rope_theta": theta,
            "max_position_embeddings": max_pos,
            "tie_word_embeddings": tied,
            "total_ut_steps": steps,
            "early_exit_threshold": threshold,
        });
        if explicit {
            config["head_dim"] = head_dim.into();
        }
        let policy = match pick(5) {
            0 => "last".to_string(),
            1 => format!("step:{}", 1 + pick(steps)),
            2 => "weighted".to_string(),
            3 => format!("threshold:{}", [0.5, 0.9, 1.0][pick(3)]),
            _ => format!("threshold:{}:bf16", [0.3, 1.0][pick(2)]),
        };
        let prompt_len = 1 + pick(max_pos.min(6));
        let prompt = (0..prompt_len).map(|_| pick(vocab) as u32).collect();
        Extreme {
            config,
            policy,
            prompt,
            seed: pick(256) as u64,
        }
    }

    /// Runs the model on both engines: `Ok(true)` when they agree, `Ok(false)` when both
    /// refuse it, otherwise what differs.
    pub fn check(&self) -> Result<bool, String> {
        self.check_with(true)
    }

    /// As [`Extreme::check`]; `early_exit`: decode tokens stop at their exit step on both engines
    /// (the reference's decode), or run every step.
    pub fn check_with(&self, early_exit: bool) -> Result<bool, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let json = self.config.to_string();
        ouroc_models::random::write_random_weights(&json, dir.path(), StorageDtype::F32, self.seed, &mut |_, _| {})
            .map_err(|e| format!("a valid config could not be written: {e}"))?;
        let ckpt = Checkpoint::open(dir.path()).map_err(|e| format!("a written checkpoint does not open: {e}"))?;
        let opts = BuildOptions {
            dtype: DType::F32,
            policy: ExitPolicy::parse(&self.policy).map_err(|e| format!("policy: {e}"))?,
            loops: None,
            unrolled: false,
        };
        let graph = match ouroc_models::build_graph(&ckpt, &opts) {
            Ok(g) => g,
            // Refused before either engine exists: both refuse.
            Err(_) => return Ok(false),
        };
        let max = ckpt.config.max_position_embeddings;
        let interp = InterpForward::new(&graph, &ckpt, max, early_exit).map(Box::new);
        let cpu = ouroc_compile::compile_graph(graph.clone(), false)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                CpuForward::with_options(
                    c.program,
                    &ckpt,
                    &CpuOptions {
                        early_exit,
                        ..CpuOptions::new(max)
                    },
                )
                .map_err(|e| e.to_string())
            });
        let (mut interp, mut cpu) = match (interp, cpu) {
            (Ok(i), Ok(c)) => (i, c),
            (Err(_), Err(_)) => return Ok(false),
            (Err(e), Ok(_)) => return Err(format!("the interpreter refuses ({e}), the CPU engine accepts")),
            (Ok(_), Err(e)) => return Err(format!("the CPU engine refuses ({e}), the interpreter accepts")),
        };
        let vocab = ckpt.config.vocab_size as u32;
        let mut ids = self.prompt.clone();
        for call in 0..3 {
            if ids.is_empty() {
                break;
            }
            let a = interp
                .forward(&ids)
                .map_err(|e| format!("interpreter call {call}: {e}"))?;
            let b = cpu.forward(&ids).map_err(|e| format!("cpu call {call}: {e}"))?;
            let err = rel_err(&b.logits, &a.logits);
            // NaN fails too.
            if err.is_nan() || err > TOLERANCE || a.depth != b.depth {
                return Err(format!(
                    "call {call} ({ids:?}): logits differ by {err:e} (relative), exit depth {} vs {}\ninterpreter {:?}\ncpu         {:?}",
                    a.depth,
                    b.depth,
                    &a.logits[..a.logits.len().min(8)],
                    &b.logits[..b.logits.len().min(8)]
                ));
            }
            // Decode the interpreter's greedy token next, while the context has room.
            let used: usize = self.prompt.len() + call;
            ids = if used < ckpt.config.max_position_embeddings {
                vec![argmax(&a.logits).min(vocab - 1)]
            } else {
                vec![]
            };
        }
        Ok(true)
    }
}

/// Largest |a - b| over the largest |b|, the latter at least [`LOGIT_FLOOR`].
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(LOGIT_FLOOR);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) },
        )
        .0 as u32
}
