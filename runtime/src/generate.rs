//! The generation loop: prefill the prompt, then sample and feed back one
//! token at a time, streaming each token and stopping on a stop id, the
//! token budget or the context length.

use crate::sampling::Sampler;
use crate::speculate::{self, Controller, DraftTokens, SpecOptions, SpecStats};
use ouroc_driver::Speculate;
use std::time::{Duration, Instant};

pub use ouroc_driver::Step;

/// A model that can be run forward through its KV cache.
pub trait Forward {
    /// Run `ids` (the prompt, then one token at a time) after everything
    /// already in the cache.
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String>;
    /// The loop's number of steps R.
    fn loop_steps(&self) -> usize;
    /// The driver as self-speculative decoding uses it; None where the
    /// backend has none (the reference interpreter).
    fn speculative(&mut self) -> Option<&mut dyn Speculate> {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop id was sampled (it is not printed).
    Stop(u32),
    MaxTokens,
    /// The context (max_position_embeddings) is full.
    Context,
}

#[derive(Clone, Debug)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Generated tokens, the stop id excluded.
    pub tokens: Vec<u32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Decode forward passes (each feeds one generated token back).
    pub decode_steps: usize,
    /// `depth_histogram[d-1]`: generated tokens whose logits came from exit depth d.
    pub depth_histogram: Vec<usize>,
    /// Loop steps run over all decode forward passes.
    pub decode_loop_steps: usize,
    pub stop: StopReason,
    /// Speculation's counts, when it was on.
    pub speculation: Option<SpecStats>,
}

impl GenStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// The summary `ouroc run` and built executables print after the text:
    /// tokens and why generation stopped, speeds, the exit-depth histogram
    /// and (after a decode) the share of loop steps run. `steps`: the
    /// loop's R; `max_positions`: the context, named when it filled.
    pub fn summary(&self, steps: usize, max_positions: usize) -> String {
        let stop = match self.stop {
            StopReason::Stop(id) => format!("stop token {id}"),
            StopReason::MaxTokens => "--max-new-tokens reached".into(),
            StopReason::Context => format!("context full ({max_positions} positions)"),
        };
        let hist: Vec<String> = self
            .depth_histogram
            .iter()
            .enumerate()
            .map(|(d, n)| format!("{} step{}: {n}", d + 1, if d == 0 { "" } else { "s" }))
            .collect();
        let mut out = format!(
            "--\nprompt {} tokens, generated {} tokens ({stop})\nprefill {:.1} tokens/s, decode {:.1} tokens/s\n\
             exit depth per generated token: {} (mean {:.2} of {steps})\n",
            self.prompt_tokens,
            self.tokens.len(),
            self.prefill_tokens_per_s(),
            self.decode_tokens_per_s(),
            hist.join(", "),
            self.mean_depth()
        );
        if let Some(sp) = &self.speculation {
            out += &sp.summary(steps);
        } else if self.decode_steps > 0 {
            out += &format!(
                "decode ran {} of {} loop steps ({:.0}%)\n",
                self.decode_loop_steps,
                self.decode_steps * steps,
                100.0 * self.decode_loop_steps as f64 / (self.decode_steps * steps) as f64
            );
        }
        out
    }

    /// Mean exit depth of the generated tokens.
    pub fn mean_depth(&self) -> f64 {
        let n: usize = self.depth_histogram.iter().sum();
        let total: usize = self.depth_histogram.iter().enumerate().map(|(d, c)| (d + 1) * c).sum();
        total as f64 / n.max(1) as f64
    }
}

pub struct GenLimits {
    pub max_new_tokens: usize,
    /// Positions the model accepts in all (prompt + generated).
    pub max_positions: usize,
}

/// Generate after `prompt`. `on_token` receives each generated token as
/// soon as it is chosen (for streaming); stop ids end generation unprinted.
pub fn generate(
    model: &mut dyn Forward,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop_ids: &[u32],
    limits: &GenLimits,
    on_token: &mut dyn FnMut(u32) -> Result<(), String>,
) -> Result<GenStats, String> {
    generate_with(model, prompt, sampler, stop_ids, limits, SpecOptions::OFF, on_token)
}

/// [`generate`] with self-speculative decoding as `spec` says: greedy, the
/// same tokens as without; sampling, the same distribution.
pub fn generate_with(
    model: &mut dyn Forward,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop_ids: &[u32],
    limits: &GenLimits,
    spec: SpecOptions,
    on_token: &mut dyn FnMut(u32) -> Result<(), String>,
) -> Result<GenStats, String> {
    if prompt.is_empty() {
        return Err("the prompt is empty: give some text with --prompt".into());
    }
    if prompt.len() >= limits.max_positions {
        return Err(format!(
            "the prompt has {} tokens but the model's context holds {} positions, leaving no room to generate",
            prompt.len(),
            limits.max_positions
        ));
    }
    let steps = model.loop_steps();
    // Auto speculation steps aside quietly where it cannot run (the
    // interpreter, a shared KV cache, no loop); a count asked for is refused.
    let refused = model.speculative().map(|m| m.speculation_refused());
    let depth = match (spec.tokens, refused) {
        (DraftTokens::Off, _) | (DraftTokens::Auto, None | Some(Some(_))) => None,
        (DraftTokens::Fixed(_), None) => {
            return Err("speculative decoding needs a compiled backend (--backend cpu), not the interpreter".into());
        }
        (DraftTokens::Fixed(_), Some(Some(why))) => return Err(why),
        (_, Some(None)) => Some(spec.depth_for(steps)?),
    };
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        tokens: vec![],
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
        decode_steps: 0,
        depth_histogram: vec![0; steps],
        decode_loop_steps: 0,
        stop: StopReason::MaxTokens,
        speculation: depth.map(|d| SpecStats {
            depth: d,
            ..SpecStats::default()
        }),
    };
    let mut ctl = Controller::new(spec.tokens);
    let mut context = prompt.to_vec();
    let t0 = Instant::now();
    let step = model.forward(prompt)?;
    stats.prefill_time = t0.elapsed();
    let t1 = Instant::now();
    // Tokens chosen and not yet emitted, with their exit depths.
    let mut chosen = vec![(sampler.sample(&step.logits, &context), step.depth)];
    'generation: loop {
        for &(next, depth) in &chosen {
            if stats.tokens.len() >= limits.max_new_tokens {
                break 'generation;
            }
            if stop_ids.contains(&next) {
                stats.stop = StopReason::Stop(next);
                break 'generation;
            }
            stats.depth_histogram[depth.clamp(1, steps) - 1] += 1;
            stats.tokens.push(next);
            context.push(next);
            on_token(next)?;
            if stats.tokens.len() == limits.max_new_tokens {
                break 'generation;
            }
            if context.len() >= limits.max_positions {
                stats.stop = StopReason::Context;
                break 'generation;
            }
        }
        // Drafting past the tokens still wanted buys nothing.
        let wanted = limits.max_new_tokens - stats.tokens.len();
        let k = depth
            .and_then(|_| ctl.next_round())
            .map(|k| k.min(wanted))
            .filter(|&k| k >= 2);
        chosen = match (depth, k) {
            (Some(d), Some(k)) => {
                let sp = stats.speculation.as_mut().expect("on with a depth");
                let m = model.speculative().expect("checked above");
                let (kept0, plain0) = (sp.round_tokens, sp.plain_tokens);
                let round = speculate::round(m, &context, d, k, sampler, &mut ctl, sp)?;
                let fed = sp.round_tokens - kept0 + sp.plain_tokens - plain0;
                stats.decode_steps += fed;
                stats.decode_loop_steps += round.loop_steps;
                round.tokens
            }
            _ => {
                let t = Instant::now();
                let step = model.forward(&[*context.last().expect("a token")])?;
                ctl.plain_pass(t.elapsed().as_secs_f64());
                stats.decode_steps += 1;
                stats.decode_loop_steps += step.steps_run;
                if let Some(sp) = stats.speculation.as_mut() {
                    sp.plain_tokens += 1;
                    sp.body_passes += step.steps_run;
                }
                vec![(sampler.sample(&step.logits, &context), step.depth)]
            }
        };
    }
    stats.decode_time = t1.elapsed();
    Ok(stats)
}
