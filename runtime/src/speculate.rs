//! Self-speculative decoding from the loop: the first `d` loop steps (then
//! the kernels after the loop) draft tokens one at a time, one call runs
//! the last `R - d` steps of every drafted token, and the longest agreeing
//! prefix is kept, plus the whole model's token where they part. The
//! driver holds the mechanism ([`ouroc_driver::Speculate`]); this module
//! holds the rounds, acceptance (greedy and speculative sampling), the
//! automatic draft length and the statistics. Contract: docs/speculative.md.

use crate::sampling::Sampler;
use ouroc_driver::Speculate;
use std::time::Instant;

/// Most tokens one round drafts (and one verification call holds).
pub const MAX_DRAFT_TOKENS: usize = 8;

/// How many tokens a round drafts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraftTokens {
    /// No speculation: one token per forward pass.
    Off,
    /// Always this many positions per round (2..=[`MAX_DRAFT_TOKENS`]).
    Fixed(usize),
    /// Chosen from the measured acceptance rate and times (see
    /// [`Controller`]); off while it does not pay.
    Auto,
}

impl DraftTokens {
    /// Parse `--draft-tokens`: `auto`, `off` (or 0), or 2..=8.
    pub fn parse(s: &str) -> Result<DraftTokens, String> {
        match s {
            "auto" => Ok(DraftTokens::Auto),
            "off" | "0" => Ok(DraftTokens::Off),
            _ => match s.parse::<usize>() {
                Ok(k) if (2..=MAX_DRAFT_TOKENS).contains(&k) => Ok(DraftTokens::Fixed(k)),
                Ok(1) => Err("--draft-tokens 1 drafts nothing: give 2 to 8, auto, or off".into()),
                _ => Err(format!(
                    "--draft-tokens takes auto, off, or a count from 2 to {MAX_DRAFT_TOKENS}, not `{s}`"
                )),
            },
        }
    }
}

impl std::fmt::Display for DraftTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DraftTokens::Off => f.write_str("off"),
            DraftTokens::Fixed(k) => write!(f, "{k}"),
            DraftTokens::Auto => f.write_str("auto"),
        }
    }
}

/// Speculation settings of a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecOptions {
    pub tokens: DraftTokens,
    /// Loop steps of a draft (1..R-1); None: half the loop, rounded down
    /// (at least 1).
    pub depth: Option<usize>,
}

impl SpecOptions {
    pub const OFF: SpecOptions = SpecOptions {
        tokens: DraftTokens::Off,
        depth: None,
    };

    /// From the flags: `--draft-tokens` (`default` when absent) and
    /// `--draft-steps`. `auto` speculates only when `greedy`: greedy output
    /// is plain decoding's token for token, while sampled output keeps its
    /// distribution but not its text for a seed, which auto's timing-driven
    /// choices would make vary from run to run.
    pub fn from_flags(
        tokens: Option<&str>,
        depth: Option<usize>,
        default: DraftTokens,
        greedy: bool,
    ) -> Result<SpecOptions, String> {
        let tokens = tokens.map_or(Ok(default), DraftTokens::parse)?;
        if depth == Some(0) {
            return Err("--draft-steps must be at least 1".into());
        }
        let tokens = match tokens {
            DraftTokens::Auto if !greedy => DraftTokens::Off,
            t => t,
        };
        Ok(SpecOptions { tokens, depth })
    }

    /// The draft depth for a loop of `steps`, checked.
    pub fn depth_for(&self, steps: usize) -> Result<usize, String> {
        let d = self.depth.unwrap_or((steps / 2).max(1));
        if d == 0 || d >= steps {
            return Err(format!(
                "--draft-steps must be from 1 to {} for this model's {steps} loop steps, not {d}",
                steps.saturating_sub(1)
            ));
        }
        Ok(d)
    }
}

/// What speculation did over a generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Draft depth d.
    pub depth: usize,
    /// Rounds run (a plain decode pass is not a round).
    pub rounds: usize,
    /// Drafted tokens offered for acceptance.
    pub proposed: usize,
    /// Of those, accepted.
    pub accepted: usize,
    /// Tokens fed back by rounds (positions kept).
    pub round_tokens: usize,
    /// Plain decode passes (speculation off or not paying, or a draft's
    /// first token that exited early).
    pub plain_tokens: usize,
    /// Passes of the loop body's weights: a draft step of one token or a
    /// verification step of all its tokens counts 1; a plain pass its steps.
    pub body_passes: usize,
}

impl SpecStats {
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.proposed.max(1) as f64
    }

    pub fn tokens_per_round(&self) -> f64 {
        self.round_tokens as f64 / self.rounds.max(1) as f64
    }

    /// The share of loop-body weight reads saved against one read per loop
    /// step per decoded token.
    pub fn reads_saved(&self, steps: usize) -> f64 {
        let plain = ((self.round_tokens + self.plain_tokens) * steps) as f64;
        if plain == 0.0 {
            0.0
        } else {
            1.0 - self.body_passes as f64 / plain
        }
    }

    /// One summary line.
    pub fn summary(&self, steps: usize) -> String {
        format!(
            "speculation: draft {} of {steps} steps, {} rounds, acceptance {:.0}% ({} of {}), {:.2} tokens per round, \
             {} plain passes, loop weight reads saved {:.0}%\n",
            self.depth,
            self.rounds,
            100.0 * self.acceptance(),
            self.accepted,
            self.proposed,
            self.tokens_per_round(),
            self.plain_tokens,
            100.0 * self.reads_saved(steps)
        )
    }
}

/// A round's outcome: the tokens chosen, in order, with the exit depth of
/// the logits each came from. Every one but the last is in the KV cache;
/// the last is the next round's first token.
pub struct Round {
    pub tokens: Vec<(u32, usize)>,
    /// Loop steps run by the tokens the round put in the cache.
    pub loop_steps: usize,
}

/// The automatic draft length: from the measured acceptance rate `a` and
/// times, the round length k maximising expected tokens per second,
/// `(1 + a + ... + a^(k-1)) / (k * t_draft + t_verify(k))`, against plain
/// decode's `1 / t_plain` (measured on the first two decode tokens and on
/// one plain pass every [`Controller::REMEASURE_EVERY`] rounds); off while
/// no k beats plain decode, probed again after [`Controller::PROBE_EVERY`]
/// plain tokens.
#[derive(Clone, Debug)]
pub struct Controller {
    mode: DraftTokens,
    /// Acceptance per proposed token (moving average).
    accept: f64,
    /// Seconds of a plain decode pass, of one token's draft, and of a
    /// verification per round length.
    t_plain: Option<f64>,
    t_draft: Option<f64>,
    t_verify: [Option<f64>; MAX_DRAFT_TOKENS + 1],
    /// Plain passes left before speculation is tried again.
    plain_left: usize,
    /// The current round length.
    k: usize,
    /// Rounds since the last plain pass (plain decode's time is measured
    /// again every [`Controller::REMEASURE_EVERY`] rounds).
    since_plain: usize,
}

impl Controller {
    /// Plain tokens between probes once speculation was found not to pay.
    pub const PROBE_EVERY: usize = 16;
    /// Rounds between plain passes that keep plain decode's time current.
    pub const REMEASURE_EVERY: usize = 32;
    /// Moving-average weight of a new measurement.
    const RATE: f64 = 0.25;

    pub fn new(mode: DraftTokens) -> Controller {
        Controller {
            mode,
            accept: 0.8,
            t_plain: None,
            t_draft: None,
            t_verify: [None; MAX_DRAFT_TOKENS + 1],
            // Two plain passes first: their time is the yardstick.
            plain_left: if mode == DraftTokens::Auto { 2 } else { 0 },
            k: 4,
            since_plain: 0,
        }
    }

    fn ema(old: Option<f64>, x: f64) -> Option<f64> {
        Some(old.map_or(x, |o| o + Controller::RATE * (x - o)))
    }

    /// Positions the next round drafts; None: a plain pass.
    pub fn next_round(&mut self) -> Option<usize> {
        match self.mode {
            DraftTokens::Off => None,
            DraftTokens::Fixed(k) => Some(k),
            DraftTokens::Auto if self.plain_left > 0 => {
                self.plain_left -= 1;
                None
            }
            DraftTokens::Auto if self.since_plain >= Controller::REMEASURE_EVERY => {
                self.since_plain = 0;
                None
            }
            DraftTokens::Auto => {
                self.since_plain += 1;
                Some(self.k)
            }
        }
    }

    pub fn plain_pass(&mut self, secs: f64) {
        self.t_plain = Controller::ema(self.t_plain, secs);
    }

    /// A round of `k` positions proposed `proposed` tokens and `accepted`
    /// of them; its drafts took `draft` seconds per token, its verification
    /// `verify`.
    pub fn round(&mut self, k: usize, proposed: usize, accepted: usize, draft: f64, verify: Option<f64>) {
        if proposed > 0 {
            let a = accepted as f64 / proposed as f64;
            self.accept += Controller::RATE * (a - self.accept);
        }
        self.t_draft = Controller::ema(self.t_draft, draft);
        if let Some(v) = verify {
            self.t_verify[k] = Controller::ema(self.t_verify[k], v);
        }
        if self.mode == DraftTokens::Auto {
            self.choose();
        }
    }

    /// Expected tokens per second of rounds of `k` positions (None before
    /// the times are known).
    pub fn rate(&self, k: usize) -> Option<f64> {
        let tokens: f64 = (0..k).map(|i| self.accept.powi(i as i32)).sum();
        let verify = self.verify_time(k)?;
        Some(tokens / (k as f64 * self.t_draft? + verify))
    }

    /// A verification's time for `k` positions: measured, else the nearest
    /// measured length's (memory-bound: nearly independent of k).
    fn verify_time(&self, k: usize) -> Option<f64> {
        (0..=MAX_DRAFT_TOKENS)
            .filter_map(|j| self.t_verify[j].map(|t| (j.abs_diff(k), t)))
            .min_by_key(|&(d, _)| d)
            .map(|(_, t)| t)
    }

    fn choose(&mut self) {
        let Some(best) = (2..=MAX_DRAFT_TOKENS)
            .filter_map(|k| self.rate(k).map(|r| (k, r)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
        else {
            return;
        };
        self.k = best.0;
        if let Some(tp) = self.t_plain
            && best.1 < 1.0 / tp
        {
            self.plain_left = Controller::PROBE_EVERY;
        }
    }

    /// The acceptance rate the controller works with.
    pub fn acceptance(&self) -> f64 {
        self.accept
    }
}

/// One round after `t0` (chosen, in `context` as its last token, not yet
/// in the cache): draft up to `k` positions, verify, keep the agreeing
/// prefix. Times go to `ctl`, counts to `stats`.
pub fn round(
    m: &mut dyn Speculate,
    context: &[u32],
    depth: usize,
    k: usize,
    sampler: &mut Sampler,
    ctl: &mut Controller,
    stats: &mut SpecStats,
) -> Result<Round, String> {
    let err = |e: ouroc_driver::DriverError| e.to_string();
    let steps = m.steps();
    let p0 = m.positions();
    let k = k.min(m.max_positions().saturating_sub(p0)).max(1);
    let t0 = *context.last().ok_or("speculation needs a first token")?;
    let mut ctx = context.to_vec();
    let mut toks = vec![t0];
    // Per drafted position i: its state, and the draft distribution its
    // successor toks[i + 1] was drawn from (None when greedy).
    let mut states = Vec::new();
    let mut qs: Vec<Option<Vec<f32>>> = Vec::new();
    let start = Instant::now();
    for i in 0..k {
        let d = m.draft(toks[i], depth, i == 0).map_err(err)?;
        stats.body_passes += d.steps_run;
        if d.complete {
            // The first token exited within the draft: that was a plain
            // decode pass, and its logits are the model's.
            let tok = sampler.sample(&d.logits, &ctx);
            stats.plain_tokens += 1;
            return Ok(Round {
                tokens: vec![(tok, d.exit.map_or(steps, |e| e + 1))],
                loop_steps: d.steps_run,
            });
        }
        if i > 0 && m.early_exit() && d.exit.is_some() {
            // Plain decode would stop this token's loop at its exit: leave
            // it to the next round, where it is the first. It stays the
            // candidate at position i - 1 (the acceptance test keeps that
            // position's token distributed as the model's, which dropping
            // it for a fresh draw from p would not: whether the draft
            // stops here depends on its value).
            m.rollback(p0 + i).map_err(err)?;
            break;
        }
        states.push(d.state);
        if i + 1 < k {
            let (tok, q) = if sampler.is_greedy() {
                (sampler.sample(&d.logits, &ctx), None)
            } else {
                let q = sampler.probs(&d.logits, &ctx);
                (sampler.draw(&q), Some(q))
            };
            toks.push(tok);
            ctx.push(tok);
            qs.push(q);
        }
    }
    // toks: the n verified positions' inputs, then possibly one more
    // candidate (a rolled-back draft), which is never in the cache.
    let n = states.len();
    let drafted = start.elapsed().as_secs_f64() / n as f64;
    let t1 = Instant::now();
    let v = m.verify(&toks[..n], &states).map_err(err)?;
    let verify = t1.elapsed().as_secs_f64();
    stats.body_passes += steps - depth;
    // Acceptance, position by position: the candidate drafted after
    // position j against the model's distribution there.
    let mut out = Vec::new();
    let mut ctx = context.to_vec();
    let (mut proposed, mut accepted) = (0, 0);
    let mut kept = n;
    for (j, (logits, &exit)) in v.logits.iter().zip(&v.exit_steps).enumerate() {
        // Early exit at a verified position: the later positions attended
        // to its real later-step rows, which plain decode would not have
        // computed: the round ends here.
        let early = m.early_exit() && exit + 1 < steps;
        let tok = match toks.get(j + 1) {
            None => sampler.sample(logits, &ctx),
            Some(&cand) => {
                proposed += 1;
                match accept(sampler, logits, &ctx, cand, qs[j].as_deref()) {
                    Ok(()) => {
                        accepted += 1;
                        cand
                    }
                    Err(tok) => {
                        // The model's own token where the draft parted.
                        out.push((tok, exit + 1));
                        kept = j + 1;
                        break;
                    }
                }
            }
        };
        out.push((tok, exit + 1));
        ctx.push(tok);
        if j + 1 == n || early {
            kept = j + 1;
            break;
        }
    }
    m.rollback(p0 + kept).map_err(err)?;
    let last = kept - 1;
    if m.early_exit() && v.exit_steps[last] + 1 < steps {
        // Its later steps' rows become its exit step's, as plain decode
        // leaves them.
        m.fill_exit(p0 + last, v.exit_steps[last]).map_err(err)?;
    }
    stats.rounds += 1;
    stats.proposed += proposed;
    stats.accepted += accepted;
    stats.round_tokens += kept;
    ctl.round(n, proposed, accepted, drafted, Some(verify));
    Ok(Round {
        tokens: out,
        loop_steps: kept * steps,
    })
}

/// Whether `cand`, drafted from `q` (None: greedy), stands at a position
/// whose model logits are `logits`: Ok, or Err with the position's token.
/// Greedy: the model's argmax equals it. Sampling: accepted with
/// probability min(1, p(cand) / q(cand)), else a draw from the normalised
/// residual max(0, p - q), so the token is distributed as p.
fn accept(sampler: &mut Sampler, logits: &[f32], ctx: &[u32], cand: u32, q: Option<&[f32]>) -> Result<(), u32> {
    let Some(q) = q else {
        let tok = sampler.sample(logits, ctx);
        return if tok == cand { Ok(()) } else { Err(tok) };
    };
    let p = sampler.probs(logits, ctx);
    let (pc, qc) = (p[cand as usize], q[cand as usize]);
    let u = sampler.draw_uniform();
    if qc > 0.0 && u < pc / qc {
        return Ok(());
    }
    let resid: Vec<f32> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    Err(if resid.iter().any(|&x| x > 0.0) {
        sampler.draw(&resid)
    } else {
        sampler.draw(&p)
    })
}
