//! [`Trace`]: what one call computed at every position, for the research
//! interface (`ouroc logits`).

/// Every position's logits, each step's outputs and lambdas, the exit steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The first output (the logits) of every position, row after row.
    pub logits: Vec<f32>,
    /// Per loop step run: the step's output (`LoopSpec::out`, Ouro's
    /// normalised state h_r) of every position, row after row.
    pub step_outputs: Vec<Vec<f32>>,
    /// Per loop step run: the exit gate's lambda of every position; empty
    /// when the Program does not compute the gate (the policies `last` and
    /// `step:K` never read it, and the pipeline drops it unless asked to
    /// keep it).
    pub lambdas: Vec<Vec<f32>>,
    /// The exit step the policy chose per position (0-based; 0 without a loop).
    pub exit_steps: Vec<usize>,
    /// Elements per row of `logits` (the vocabulary).
    pub vocab: usize,
    /// Elements per row of `step_outputs` (the hidden size).
    pub hidden_size: usize,
    /// Loop steps run (fewer than the loop's only with early exit in decode).
    pub steps_run: usize,
}
