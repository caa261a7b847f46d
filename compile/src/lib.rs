//! ouroc-compile: the one library entry point from a checkpoint to what
//! the runtime runs: checkpoint + [`CompileOptions`] -> imported graph ->
//! optimised graph (the pass pipeline) -> [`Program`] (+ its encoded
//! weights). The CLI, `ouroc build`, the examples, benches and tests call
//! this instead of wiring the stages by hand.
//!
//! ```no_run
//! use ouroc_compile::{CompileOptions, compile};
//! let ckpt = ouroc_models::Checkpoint::open("tests/fixtures/mha-r4".as_ref()).unwrap();
//! let c = compile(&ckpt, &CompileOptions::reference(&ckpt, ouroc_ir::DType::F32)).unwrap();
//! println!("{}", c.program);
//! let weights = c.encode_weights(&ckpt).unwrap();
//! ```

use ouroc_driver::ResidentWeights;
use ouroc_ir::{DType, ExitPolicy, Graph};
use ouroc_kernels::Program;
use ouroc_models::{BuildOptions, Checkpoint};
use ouroc_passes::{PassManager, PassReport};

/// What to compile.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// The model dtype, exit policy, loop steps and import form.
    pub build: BuildOptions,
    /// Keep every loop step and the exit gate whatever the policy (the
    /// pipeline without `policy-dce`): what a trace of each step's state and
    /// gate needs (`ouroc logits --out`). Off: the fastest Program.
    pub keep_exit_trace: bool,
}

impl CompileOptions {
    /// `dtype`, the checkpoint's default policy (the reference's threshold),
    /// its loop steps, rolled import, optimised for speed.
    pub fn reference(ckpt: &Checkpoint, dtype: DType) -> CompileOptions {
        CompileOptions {
            build: BuildOptions {
                dtype,
                policy: BuildOptions::reference_policy(&ckpt.config, dtype),
                loops: None,
                unrolled: false,
            },
            keep_exit_trace: false,
        }
    }

    /// The same with exit policy `policy`.
    pub fn with_policy(mut self, policy: ExitPolicy) -> CompileOptions {
        self.build.policy = policy;
        self
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileError {
    #[error("cannot build the graph: {0}")]
    Build(String),
    #[error("{0}")]
    Pass(String),
    #[error("cannot lower the graph to a Program: {0}")]
    Lower(String),
    #[error("cannot load the weights: {0}")]
    Weights(String),
}

/// Every stage's result.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The graph as imported from the checkpoint.
    pub imported: Graph,
    /// After the pass pipeline.
    pub optimised: Graph,
    /// Per pass: its statistics.
    pub reports: Vec<PassReport>,
    pub program: Program,
}

impl Compiled {
    /// The Program's resident weights from `ckpt`, built by their recipes
    /// and encoded as the kernels read them.
    pub fn encode_weights(&self, ckpt: &Checkpoint) -> Result<ResidentWeights, CompileError> {
        ResidentWeights::encode(&self.program, ckpt, true).map_err(CompileError::Weights)
    }
}

/// Import `ckpt`, optimise and lower it.
pub fn compile(ckpt: &Checkpoint, opts: &CompileOptions) -> Result<Compiled, CompileError> {
    let imported = ouroc_models::build_graph(ckpt, &opts.build).map_err(CompileError::Build)?;
    compile_graph(imported, opts.keep_exit_trace)
}

/// Optimise and lower a graph (`keep_exit_trace`: see [`CompileOptions`]).
pub fn compile_graph(imported: Graph, keep_exit_trace: bool) -> Result<Compiled, CompileError> {
    compile_with(imported, &ouroc_passes::pipeline(keep_exit_trace))
}

/// Optimise a graph with the pass pipeline `passes` instead of the default
/// one (a test's partial pipeline; none: the imported graph lowered as it
/// is), then lower it.
pub fn compile_with(imported: Graph, passes: &PassManager) -> Result<Compiled, CompileError> {
    let (optimised, reports) = run_passes(passes, &imported, None)?;
    let program = ouroc_kernels::lower(&optimised).map_err(|e| CompileError::Lower(e.to_string()))?;
    Ok(Compiled {
        imported,
        optimised,
        reports,
        program,
    })
}

/// The optimisation stage alone: `imported` through the pass pipeline
/// (`keep_exit_trace`: see [`CompileOptions`]) and each pass's report,
/// stopping after the pass named `stop_after` if given (`ouroc emit ir
/// --after PASS`; an unknown name is an error listing the pipeline's).
pub fn optimise(
    imported: &Graph,
    keep_exit_trace: bool,
    stop_after: Option<&str>,
) -> Result<(Graph, Vec<PassReport>), CompileError> {
    run_passes(&ouroc_passes::pipeline(keep_exit_trace), imported, stop_after)
}

/// [`optimise`] with a chosen pipeline (`--passes` / `--skip`:
/// [`ouroc_passes::pipeline_with`]).
pub fn optimise_with(
    imported: &Graph,
    passes: &PassManager,
    stop_after: Option<&str>,
) -> Result<(Graph, Vec<PassReport>), CompileError> {
    run_passes(passes, imported, stop_after)
}

fn run_passes(
    passes: &PassManager,
    g: &Graph,
    stop_after: Option<&str>,
) -> Result<(Graph, Vec<PassReport>), CompileError> {
    passes.run(g, stop_after).map_err(|e| CompileError::Pass(e.to_string()))
}
