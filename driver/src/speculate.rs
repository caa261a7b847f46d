//! The mechanism of self-speculative decoding on a [`Driver`]: a draft runs
//! a token's first loop steps, a verification runs the last steps of
//! several drafted tokens in one call, rejected positions are rolled back.
//! The rounds (which tokens, acceptance, sampling) are the runtime's
//! (`ouroc_runtime::speculate`); the contract is in docs/speculative.md.
//!
//! Steps 1..d of a token depend only on the token and the steps 1..d K/V of
//! earlier positions, so a draft computes exactly what the whole loop would
//! for those steps: a verification continues from the draft's carried
//! values, and its multi-token call writes the later steps' K/V rows at the
//! drafted positions (a prefill continuing from a non-empty cache).

use crate::device::Device;
use crate::driver::{Driver, DriverError, LoopState, Plan, Want};
use crate::kv::KvMode;
use ouroc_kernels::spec::Family;

/// What a draft of one token computed.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    /// The logits after the draft's last step (its output through the
    /// kernels after the loop), or after the exit step when the policy
    /// decided within the draft.
    pub logits: Vec<f32>,
    /// The exit step, when the policy decided it within the draft's steps.
    pub exit: Option<usize>,
    /// The token's loop ended here (early exit: the later steps' KV slots
    /// were filled); its logits are the whole model's and it needs no
    /// verification.
    pub complete: bool,
    /// Loop steps run.
    pub steps_run: usize,
    /// The state a verification continues from.
    pub state: LoopState,
}

/// What a verification of drafted tokens computed.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// Per token, its logits (`[vocab]`): the whole model's.
    pub logits: Vec<Vec<f32>>,
    /// Per token, the exit step its policy chose.
    pub exit_steps: Vec<usize>,
}

/// Speculation on a model: what the runtime's rounds call. Object-safe, so
/// every backend's driver is one `&mut dyn Speculate`.
pub trait Speculate {
    /// Why speculation cannot run on this model and options, if it cannot.
    fn speculation_refused(&self) -> Option<String>;
    /// The loop's steps R.
    fn steps(&self) -> usize;
    /// Filled positions of the cache.
    fn positions(&self) -> usize;
    /// Whether decode stops a token's loop at its decided exit.
    fn early_exit(&self) -> bool;
    /// The context length.
    fn max_positions(&self) -> usize;
    /// Run `token`'s first `depth` loop steps at the next position. With
    /// `may_exit` and early exit on, a token whose exit is decided within
    /// them ends there as in plain decode ([`Draft::complete`]); without, it
    /// runs the `depth` steps (the caller rolls it back if plain decode
    /// would have stopped it).
    fn draft(&mut self, token: u32, depth: usize, may_exit: bool) -> Result<Draft, DriverError>;
    /// Run the last steps of drafted `tokens` (whose drafts, in order, are
    /// the last `tokens.len()` positions) in one call.
    fn verify(&mut self, tokens: &[u32], states: &[LoopState]) -> Result<Verified, DriverError>;
    /// Keep the first `positions` positions of every KV slot.
    fn rollback(&mut self, positions: usize) -> Result<(), DriverError>;
    /// Early exit of the token at `position` (the last kept) at step
    /// `exit`: its later steps' KV rows become step `exit`'s, as plain
    /// decode leaves them.
    fn fill_exit(&mut self, position: usize, exit: usize) -> Result<(), DriverError>;
}

impl<D: Device> Speculate for Driver<D> {
    fn speculation_refused(&self) -> Option<String> {
        if self.program().loop_.is_none() || self.loop_steps() < 2 {
            return Some("the model has no loop of two or more steps to draft from".into());
        }
        let outer_attention = self
            .program()
            .before
            .iter()
            .chain(&self.program().after)
            .any(|k| matches!(k.spec.family, Family::Attention(_)));
        if outer_attention {
            // A verification reruns the kernels before the loop and a draft
            // runs those after it: their KV rows would be appended twice or
            // computed from a draft's state.
            return Some("speculative decoding needs every attention layer inside the loop".into());
        }
        if self.kv_mode() != KvMode::Full {
            return Some(format!(
                "speculative decoding needs the full KV cache (--kv full), not --kv {}",
                self.kv_mode()
            ));
        }
        if self.kv_batch() > 1 {
            return Some("speculative decoding runs one sequence".into());
        }
        None
    }

    fn steps(&self) -> usize {
        self.loop_steps()
    }

    fn positions(&self) -> usize {
        self.past_len()
    }

    fn early_exit(&self) -> bool {
        self.options().early_exit
    }

    fn max_positions(&self) -> usize {
        self.options().max_positions
    }

    fn draft(&mut self, token: u32, depth: usize, may_exit: bool) -> Result<Draft, DriverError> {
        self.check_speculation(depth)?;
        let plan = Plan {
            pos0: self.past_len(),
            steps: 0..depth,
            seed: None,
            keep_states: true,
            early_exit: may_exit && self.options().early_exit,
        };
        let out = self.call_inner(&[&[token]], Want::default(), true, &plan)?;
        let state = out.states.into_iter().next().expect("one token's state");
        let exit = self.policy_decided(&state.lambdas);
        // Early exit stopped the loop (and filled the later slots).
        let complete = plan.early_exit && exit.is_some();
        Ok(Draft {
            logits: out.outputs.into_iter().next().expect("the logits"),
            exit,
            complete,
            steps_run: out.steps_run,
            state,
        })
    }

    fn verify(&mut self, tokens: &[u32], states: &[LoopState]) -> Result<Verified, DriverError> {
        let from = states.first().map_or(0, |s| s.steps());
        self.check_speculation(from)?;
        let pos0 = self.past_len().checked_sub(tokens.len()).ok_or_else(|| {
            DriverError::Input(format!(
                "{} tokens to verify but only {} positions in the cache",
                tokens.len(),
                self.past_len()
            ))
        })?;
        let plan = Plan {
            pos0,
            steps: from..self.loop_steps(),
            seed: Some(states),
            keep_states: false,
            early_exit: false,
        };
        let want = Want {
            all_positions: true,
            trace: false,
        };
        let out = self.call_inner(&[tokens], want, true, &plan)?;
        let vocab = self.program().outputs[0].len;
        let logits = out.outputs[0].chunks(vocab).map(|c| c.to_vec()).collect();
        Ok(Verified {
            logits,
            exit_steps: out.exit_steps,
        })
    }

    fn rollback(&mut self, positions: usize) -> Result<(), DriverError> {
        self.truncate(positions)
    }

    fn fill_exit(&mut self, position: usize, exit: usize) -> Result<(), DriverError> {
        self.fill_position(position, exit)
    }
}
