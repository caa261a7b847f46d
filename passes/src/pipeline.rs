//! The default optimisation pipeline, in order. Each pass's place is
//! chosen by what it needs:
//! 1. `reroll` first: an unrolled import becomes a loop, so everything
//!    after sees one loop body (no-op on a rolled graph);
//! 2. `egraph`: algebraic rewrites and fusion in the loop body (norm
//!    weights folded, q/k/v and gate/up merged, swiglu, add+norm,
//!    rope+attention, step_end);
//! 3. `hoist`: the weight transforms the rewrites created move out of the loop;
//! 4. `rotate`: carries the next step's input norm so `step_end` fuses it
//!    (must precede `policy-dce`, which simplifies `step_end` under `last`);
//! 5. `policy-dce`, `peel`: remove what the fixed exit policy never uses;
//! 6. `cse`, `dce`: clean up (`dce` is the last pass: `--after dce` is the
//!    optimised graph).
//!
//! Memory planning is an analysis of the result, not a pass:
//! [`crate::memplan::plan`], which lowering calls.

use crate::cse::Cse;
use crate::dce::Dce;
use crate::egraph::EGraphRewrite;
use crate::hoist::Hoist;
use crate::manager::PassManager;
use crate::peel::Peel;
use crate::policy_dce::PolicyDce;
use crate::reroll::Reroll;
use crate::rotate::Rotate;

pub fn default_pipeline() -> PassManager {
    pipeline(false)
}

/// The default pipeline; with `keep_exit_trace`, without `policy-dce`, so
/// the loop keeps every step and its exit gate whatever the policy (what
/// the research interface traces: `ouroc logits --out` writes each step's
/// state and gate under every policy).
pub fn pipeline(keep_exit_trace: bool) -> PassManager {
    PassManager::new(pipeline_parts(keep_exit_trace))
}

fn pipeline_parts(keep_exit_trace: bool) -> Vec<Box<dyn crate::Pass>> {
    let mut passes: Vec<Box<dyn crate::Pass>> = vec![
        Box::new(Reroll),
        Box::new(EGraphRewrite::default()),
        Box::new(Hoist),
        Box::new(Rotate::new()),
    ];
    if !keep_exit_trace {
        passes.push(Box::new(PolicyDce));
    }
    passes.extend([
        Box::new(Peel::new()) as Box<dyn crate::Pass>,
        Box::new(Cse),
        Box::new(Dce),
    ]);
    passes
}

/// The default pipeline's passes, in order, with what each does: what
/// `ouroc compile --list` prints.
pub fn pass_list() -> Vec<(&'static str, &'static str)> {
    pipeline(false)
        .passes()
        .iter()
        .map(|p| (p.name(), p.description()))
        .collect()
}

/// Which passes of the default pipeline run (`--passes` / `--skip`): all
/// but `skip`, or only those in `only`; either way in the pipeline's order
/// (each pass's place is fixed by what it needs, see the module docs).
/// Unknown and repeated names are refused with the list of passes.
pub fn pipeline_with(
    keep_exit_trace: bool,
    only: Option<&[String]>,
    skip: &[String],
    rules: &[String],
) -> Result<PassManager, String> {
    let off = rules_off(rules)?;
    let known: Vec<&str> = pass_list().iter().map(|p| p.0).collect();
    let named = only.unwrap_or(&[]).iter().chain(skip);
    let mut seen = std::collections::HashSet::new();
    for n in named {
        if !known.contains(&n.as_str()) {
            return Err(format!("unknown pass `{n}`; the passes are: {}", known.join(", ")));
        }
        if !seen.insert(n.as_str()) {
            return Err(format!("pass `{n}` is named twice"));
        }
    }
    if only.is_some() && !skip.is_empty() {
        return Err("give --passes or --skip, not both".into());
    }
    let keep = |name: &str| match only {
        Some(list) => list.iter().any(|n| n == name),
        None => !skip.iter().any(|n| n == name),
    };
    if !off.is_empty() && !keep("egraph") {
        return Err("--rules chooses the rules of the `egraph` pass, which this pipeline does not run".into());
    }
    let passes = pipeline_parts(keep_exit_trace)
        .into_iter()
        .filter(|p| keep(p.name()))
        .map(|p| -> Box<dyn crate::Pass> {
            if p.name() == "egraph" {
                Box::new(EGraphRewrite {
                    off: off.clone(),
                    ..EGraphRewrite::default()
                })
            } else {
                p
            }
        })
        .collect();
    Ok(PassManager::new(passes))
}

/// The rewrite rules of the `egraph` pass with their summaries: what
/// `ouroc compile --list` prints and `--rules` names.
pub fn rule_list() -> Vec<(&'static str, &'static str)> {
    crate::egraph::rules::rules()
        .iter()
        .map(|r| (r.name, r.summary))
        .collect()
}

/// `--rules -a,+b`: the rules turned off (every rule is on by default;
/// `+NAME` turns one back on after a `-NAME`). Unknown names and entries
/// without a sign are refused with the list of rules.
fn rules_off(rules: &[String]) -> Result<Vec<String>, String> {
    let known: Vec<&str> = rule_list().iter().map(|r| r.0).collect();
    let mut off: Vec<String> = Vec::new();
    for r in rules {
        let (on, name) = match (r.strip_prefix('-'), r.strip_prefix('+')) {
            (Some(n), _) => (false, n),
            (_, Some(n)) => (true, n),
            _ => {
                return Err(format!(
                    "--rules takes -NAME (off) or +NAME (on), not `{r}`; the rules are: {}",
                    known.join(", ")
                ));
            }
        };
        if !known.contains(&name) {
            return Err(format!("unknown rule `{name}`; the rules are: {}", known.join(", ")));
        }
        off.retain(|n| n != name);
        if !on {
            off.push(name.to_string());
        }
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    /// Every pass of the pipeline transforms the graph; memory planning, an
    /// analysis, is not one of them.
    #[test]
    fn the_pipeline_ends_at_dce() {
        assert_eq!(
            super::default_pipeline().names(),
            [
                "reroll",
                "egraph",
                "hoist",
                "rotate",
                "policy-dce",
                "peel",
                "cse",
                "dce"
            ]
        );
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_chosen_pipeline_keeps_the_default_order() {
        let only = names(&["dce", "egraph"]);
        let p = super::pipeline_with(false, Some(&only), &[], &[]).unwrap();
        assert_eq!(p.names(), ["egraph", "dce"]);
        let p = super::pipeline_with(false, None, &names(&["rotate", "peel"]), &[]).unwrap();
        assert_eq!(p.names(), ["reroll", "egraph", "hoist", "policy-dce", "cse", "dce"]);
        assert!(
            super::pipeline_with(false, Some(&[]), &[], &[])
                .unwrap()
                .names()
                .is_empty()
        );
    }

    #[test]
    fn unknown_repeated_and_conflicting_names_are_refused() {
        let e = super::pipeline_with(false, None, &names(&["fuse"]), &[]).err().unwrap();
        assert!(e.contains("unknown pass `fuse`") && e.contains("egraph"), "{e}");
        let e = super::pipeline_with(false, Some(&names(&["cse", "cse"])), &[], &[])
            .err()
            .unwrap();
        assert!(e.contains("named twice"), "{e}");
        let e = super::pipeline_with(false, Some(&names(&["cse"])), &names(&["dce"]), &[])
            .err()
            .unwrap();
        assert!(e.contains("not both"), "{e}");
        let e = super::pipeline_with(false, None, &[], &names(&["-fuse-all"]))
            .err()
            .unwrap();
        assert!(
            e.contains("unknown rule `fuse-all`") && e.contains("merge-linears"),
            "{e}"
        );
        let e = super::pipeline_with(false, None, &[], &names(&["swiglu"]))
            .err()
            .unwrap();
        assert!(e.contains("-NAME"), "{e}");
        let e = super::pipeline_with(false, Some(&names(&["dce"])), &[], &names(&["-swiglu"]))
            .err()
            .unwrap();
        assert!(e.contains("does not run"), "{e}");
    }

    #[test]
    fn rules_turn_off_and_back_on_in_order() {
        let off = super::rules_off(&names(&["-swiglu", "-merge-linears", "+swiglu"])).unwrap();
        assert_eq!(off, ["merge-linears"]);
        assert!(super::rules_off(&[]).unwrap().is_empty());
    }
}
