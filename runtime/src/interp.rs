//! A [`Forward`] backed by the reference interpreter. In decode it stops a
//! token's loop as soon as the exit policy has decided (real early exit:
//! the later steps do not run; their KV slots get the exit step's K/V).

use crate::generate::{Forward, Step};
use ouroc_ir::{Graph, Interpreter, Options, WeightSource};

pub struct InterpForward<'g> {
    interp: Interpreter<'g>,
    steps: usize,
}

impl<'g> InterpForward<'g> {
    /// `early_exit`: skip the steps after a decode token's exit.
    pub fn new(
        graph: &'g Graph,
        weights: &dyn WeightSource,
        max_positions: usize,
        early_exit: bool,
    ) -> Result<Self, String> {
        let steps = graph.exit_control().map_or(1, |(steps, _)| steps);
        let opts = Options {
            round_low_precision: true,
            max_positions: Some(max_positions),
            exit_skips: early_exit,
        };
        let interp = Interpreter::new(graph, weights, opts).map_err(|e| e.to_string())?;
        Ok(InterpForward { interp, steps })
    }

    /// Forget the KV cache: the next call starts a new sequence.
    pub fn reset(&mut self) {
        self.interp.reset();
    }
}

impl Forward for InterpForward<'_> {
    fn forward(&mut self, ids: &[u32]) -> Result<Step, String> {
        let out = self.interp.run_tokens(&[ids.to_vec()]).map_err(|e| e.to_string())?;
        let logits = &out.outputs[0];
        let vocab = logits.row_len();
        let last = logits.data[logits.data.len() - vocab..].to_vec();
        let (depth, steps_run) = match &out.trace {
            Some(t) => (t.exit_step.last().map_or(self.steps, |s| s + 1), t.step_outputs.len()),
            None => (1, 1),
        };
        Ok(Step {
            logits: last,
            depth,
            steps_run,
        })
    }

    fn loop_steps(&self) -> usize {
        self.steps
    }
}
