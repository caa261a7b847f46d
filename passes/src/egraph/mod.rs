//! The e-graph rewriting pass (`egraph`): algebraic rewrites of the loop
//! body in an e-graph (egg), then extraction of the cheapest equivalent
//! graph under a per-token cost model.
//!
//! - [`lang`]: the e-graph language mirroring the IR ops, and the e-class
//!   analysis (types, constant-ness);
//! - [`convert`]: IR block <-> e-graph;
//! - [`rules`]: the rewrite rules, as a table;
//! - [`cost`]: the cost model (bytes moved + kernel launches per token);
//! - [`extract`]: DAG-aware extraction (shared nodes counted once).
//!
//! Scope: each loop body is one region whose leaves are the block
//! arguments and the values defined outside it, and whose roots are the
//! yield's next/out/exit values. Weight transforms the rules create
//! (scale_cols, concat of weights) are loop-invariant constants: they are
//! emitted in the top block just before the loop, where [`crate::Stats`]
//! counts them as computed once at load. A graph without a loop (an
//! unrolled one) has its top block rewritten as one region instead. The
//! rest of the top block of a looped graph is left as it is.
//!
//! Extraction starts from the input graph and only accepts changes that
//! lower the cost, so the pass never makes a graph costlier by its model;
//! it also drops ops nothing reachable from the roots uses.

pub mod convert;
pub mod cost;
pub mod extract;
pub mod lang;
pub mod rules;

use crate::manager::{Pass, PassError};
use egg::{Runner, SimpleScheduler};
use lang::Ctx;
use ouroc_ir::{Block, Graph, Loop, Op, OpKind, Terminator, Type, ValueId};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// Saturation limits. The rules only build fused forms of what is there,
/// so an Ouro body saturates in a handful of iterations; the limits only
/// guard against a rule someone adds that grows without bound.
const ITER_LIMIT: usize = 64;
const NODE_LIMIT: usize = 1_000_000;
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// The pass, with the rules of [`rules::rules`] except those named in
/// `off` (`--rules -NAME`), plus the rules in `extra` (added from outside
/// this crate with [`EGraphRewrite::with_rule`]: docs/extending.md).
#[derive(Clone, Debug, Default)]
pub struct EGraphRewrite {
    pub off: Vec<String>,
    pub extra: Vec<rules::Rule>,
}

impl EGraphRewrite {
    /// The pass with one more rule, tried beside the built-in ones.
    pub fn with_rule(mut self, rule: rules::Rule) -> EGraphRewrite {
        self.extra.push(rule);
        self
    }

    /// Run the pass and say what it did (which rules fired, how often).
    /// A rule named twice (an extra rule under a built-in rule's name) is
    /// an error naming it.
    pub fn optimize(&self, g: &Graph) -> Result<(Graph, Report), String> {
        let mut names = HashSet::new();
        for r in rules::rules().iter().chain(&self.extra) {
            if !names.insert(r.name) {
                return Err(format!("two rewrite rules are named `{}`", r.name));
            }
        }
        rewrite(g, &self.off, &self.extra)
    }
}

impl Pass for EGraphRewrite {
    fn name(&self) -> &'static str {
        "egraph"
    }

    fn description(&self) -> &'static str {
        "algebraic rewrites in an e-graph (norm folding, q/k/v and gate/up merging, swiglu, add+norm, \
         rope+attention, step end), extracted by bytes moved and kernels launched per token"
    }

    fn run(&self, g: &Graph) -> Result<Graph, PassError> {
        self.optimize(g)
            .map(|(g, _)| g)
            .map_err(|msg| PassError::Failed { pass: "egraph", msg })
    }
}

/// What the pass did to one region.
#[derive(Clone, Debug, Default)]
pub struct RegionReport {
    /// How many times each rule changed the e-graph, by rule name.
    pub applied: BTreeMap<String, usize>,
    /// Saturation iterations run, and why they stopped.
    pub iterations: usize,
    pub stop_reason: String,
    /// E-graph size at the end.
    pub nodes: usize,
    pub classes: usize,
    /// Cost per token of the input region and of the extracted one.
    pub cost_before: u64,
    pub cost_after: u64,
}

/// What the pass did: one report per region (loop body, or the top block).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub regions: Vec<RegionReport>,
}

impl Report {
    /// Times rule `name` changed the e-graph, over all regions.
    pub fn applied(&self, name: &str) -> usize {
        self.regions
            .iter()
            .map(|r| r.applied.get(name).copied().unwrap_or(0))
            .sum()
    }
}

/// Run the pass and say what it did.
pub fn optimize(g: &Graph) -> Result<(Graph, Report), String> {
    optimize_with(g, &[])
}

/// [`optimize`] without the rules named in `off`.
pub fn optimize_with(g: &Graph, off: &[String]) -> Result<(Graph, Report), String> {
    rewrite(g, off, &[])
}

fn rewrite(g: &Graph, off: &[String], extra: &[rules::Rule]) -> Result<(Graph, Report), String> {
    let mut types = g.types.clone();
    let mut report = Report::default();
    let top = &g.body;
    let has_loop = top.ops.iter().any(|op| matches!(op.kind, OpKind::Loop(_)));
    let body = if has_loop {
        let constants = top_constants(top);
        let mut ops = Vec::with_capacity(top.ops.len());
        for op in &top.ops {
            let OpKind::Loop(l) = &op.kind else {
                ops.push(op.clone());
                continue;
            };
            let Terminator::Yield { next, out, exit } = &l.body.term else {
                return Err("a loop body must end in yield".into());
            };
            let roots: Vec<ValueId> = next.iter().chain([out]).chain(exit).copied().collect();
            let how = How {
                trip: l.steps as u64,
                hoist: true,
                off,
                extra,
            };
            let (r, rep) = region(g, &l.body.ops, &roots, &constants, how, &mut types)?;
            report.regions.push(rep);
            ops.extend(r.prelude);
            let n = next.len();
            ops.push(Op {
                results: op.results.clone(),
                inputs: op.inputs.clone(),
                kind: OpKind::Loop(Box::new(Loop {
                    steps: l.steps,
                    policy: l.policy,
                    body: Block {
                        args: l.body.args.clone(),
                        ops: r.ops,
                        term: Terminator::Yield {
                            next: r.roots[..n].to_vec(),
                            out: r.roots[n],
                            exit: exit.map(|_| r.roots[n + 1]),
                        },
                    },
                })),
            });
        }
        Block {
            args: top.args.clone(),
            ops,
            term: top.term.clone(),
        }
    } else {
        // No loop: the top block is the region; weights stay as they are, first.
        let (weights, rest): (Vec<Op>, Vec<Op>) = top
            .ops
            .iter()
            .cloned()
            .partition(|op| matches!(op.kind, OpKind::Weight { .. }));
        let constants: HashSet<ValueId> = weights.iter().map(|op| op.result()).collect();
        let how = How {
            trip: 1,
            hoist: false,
            off,
            extra,
        };
        let (r, rep) = region(g, &rest, g.outputs(), &constants, how, &mut types)?;
        report.regions.push(rep);
        Block {
            args: top.args.clone(),
            ops: weights.into_iter().chain(r.ops).collect(),
            term: Terminator::Return(r.roots),
        }
    };
    let out = Graph {
        name: g.name.clone(),
        types,
        body,
    }
    .canonicalize();
    ouroc_ir::verify(&out).map_err(|e| format!("the rewritten graph does not verify: {e}"))?;
    Ok((out, report))
}

/// Values of the top block computed from weights only (as `Stats` counts them).
fn top_constants(top: &Block) -> HashSet<ValueId> {
    let mut constants = HashSet::new();
    for op in &top.ops {
        let pure = !lang::impure(&op.kind);
        if pure && op.inputs.iter().all(|i| constants.contains(i)) {
            constants.extend(op.results.iter().copied());
        }
    }
    constants
}

/// How a region is rewritten: its trip count (the cost model weighs the
/// loop body by it), whether invariant work is hoisted, the rules off and
/// the rules added.
struct How<'a> {
    trip: u64,
    hoist: bool,
    off: &'a [String],
    extra: &'a [rules::Rule],
}

/// Rewrite one region: build its e-graph, saturate, extract, emit.
fn region(
    g: &Graph,
    ops: &[Op],
    roots: &[ValueId],
    constants: &HashSet<ValueId>,
    how: How,
    types: &mut Vec<Type>,
) -> Result<(convert::Emitted, RegionReport), String> {
    let How {
        trip,
        hoist,
        off,
        extra,
    } = how;
    let built = convert::build(g, ops, roots, constants)?;
    let rules: Vec<rules::Rule> = rules::rules()
        .into_iter()
        .filter(|r| !off.iter().any(|n| n == r.name))
        .chain(extra.iter().cloned())
        .collect();
    let runner = Runner::<lang::Node, Ctx>::new(Ctx::default())
        .with_egraph(built.eg)
        .with_iter_limit(ITER_LIMIT)
        .with_node_limit(NODE_LIMIT)
        .with_time_limit(TIME_LIMIT)
        .with_scheduler(SimpleScheduler)
        .run(rules.iter().map(|r| &r.rewrite));
    let mut rep = RegionReport {
        iterations: runner.iterations.len(),
        stop_reason: format!("{:?}", runner.stop_reason),
        ..RegionReport::default()
    };
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *rep.applied.entry(name.to_string()).or_default() += n;
        }
    }
    let eg = runner.egraph;
    rep.nodes = eg.total_number_of_nodes();
    rep.classes = eg.number_of_classes();
    let p = convert::problem(&eg, &built.roots, |n| cost::node_cost(&eg, n, trip));
    let initial = convert::initial_choice(&eg, &p, &built.originals);
    rep.cost_before = p.total(&initial).ok_or("the input region does not extract")?;
    let (choice, cost) = p.solve(&initial).ok_or("no acyclic extraction")?;
    rep.cost_after = cost;
    let order = p.post_order(&choice).ok_or("no acyclic extraction")?;
    Ok((convert::emit(&eg, &p, &choice, &order, hoist, types), rep))
}
