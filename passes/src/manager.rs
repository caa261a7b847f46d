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
    #[error("the pipeline already has a pass named `{0}`")]
    Duplicate(&'static str),
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

    /// Add `pass` at the end (docs/extending.md).
    pub fn push(&mut self, pass: Box<dyn Pass>) -> Result<(), PassError> {
        let at = self.passes.len();
        self.insert_at(at, pass)
    }

    /// Add `pass` just before the pass named `anchor`.
    pub fn insert_before(&mut self, anchor: &str, pass: Box<dyn Pass>) -> Result<(), PassError> {
        let at = self.position(anchor)?;
        self.insert_at(at, pass)
    }

    /// Add `pass` just after the pass named `anchor`.
    pub fn insert_after(&mut self, anchor: &str, pass: Box<dyn Pass>) -> Result<(), PassError> {
        let at = self.position(anchor)? + 1;
        self.insert_at(at, pass)
    }

    /// Put `pass` in the place of the pass named `name` (it may keep the
    /// name: a variant of a built-in pass, such as `egraph` with more rules).
    pub fn replace(&mut self, name: &str, pass: Box<dyn Pass>) -> Result<(), PassError> {
        let at = self.position(name)?;
        if pass.name() != name && self.passes.iter().any(|p| p.name() == pass.name()) {
            return Err(PassError::Duplicate(pass.name()));
        }
        self.passes[at] = pass;
        Ok(())
    }

    fn position(&self, name: &str) -> Result<usize, PassError> {
        self.passes
            .iter()
            .position(|p| p.name() == name)
            .ok_or_else(|| PassError::Unknown {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }

    /// Names stay unique: `--after NAME` and the reports name passes.
    fn insert_at(&mut self, at: usize, pass: Box<dyn Pass>) -> Result<(), PassError> {
        if self.passes.iter().any(|p| p.name() == pass.name()) {
            return Err(PassError::Duplicate(pass.name()));
        }
        self.passes.insert(at, pass);
        Ok(())
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
