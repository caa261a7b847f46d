//! The pass manager: an ordered, named pipeline.

use crate::stats::Stats;
use ouroc_ir::{Graph, verify};

/// One transformation of the IR.
pub trait Pass {
    /// Short name, used by `--after NAME` (kebab-case).
    fn name(&self) -> &'static str;
    /// One line for help text and reports.
    fn description(&self) -> &'static str;
    /// Transform a verified graph; the result must verify and compute the
    /// same outputs.
    fn run(&self, g: &Graph) -> Result<Graph, PassError>;
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PassError {
    #[error("pass {pass}: {msg}")]
    Failed { pass: &'static str, msg: String },
    #[error("pass {pass} produced a graph that does not verify: {err}")]
    Broken {
        pass: &'static str,
        err: ouroc_ir::VerifyError,
    },
    #[error("unknown pass `{name}`; the pipeline has: {known}")]
    Unknown { name: String, known: String },
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub name: &'static str,
    pub before: Stats,
    pub after: Stats,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn passes(&self) -> &[Box<dyn Pass>] {
        &self.passes
    }

    /// Run the pipeline, stopping after the pass named `stop_after` if given.
    /// Every pass's output is verified; stats are taken before and after.
    pub fn run(&self, g: &Graph, stop_after: Option<&str>) -> Result<(Graph, Vec<PassReport>), PassError> {
        if let Some(name) = stop_after
            && !self.passes.iter().any(|p| p.name() == name)
        {
            return Err(PassError::Unknown {
                name: name.to_string(),
                known: self.names().join(", "),
            });
        }
        let mut g = g.clone();
        let mut reports = Vec::new();
        for p in &self.passes {
            let before = Stats::of(&g);
            let out = p.run(&g)?;
            verify(&out).map_err(|err| PassError::Broken { pass: p.name(), err })?;
            reports.push(PassReport {
                name: p.name(),
                before,
                after: Stats::of(&out),
            });
            g = out;
            if stop_after == Some(p.name()) {
                break;
            }
        }
        Ok((g, reports))
    }
}
