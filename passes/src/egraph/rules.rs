//! The rewrite rules, as data: one table built in [`rules`], each entry a
//! name, a one-line summary and the rewrite (a pattern pair, a pattern with
//! a condition, or a pattern with an applier written in Rust when the
//! right-hand side needs several results or computed attributes).
//!
//! Every rule must preserve the f32 results (within rounding: folding a norm
//! weight into a linear reassociates one product) and the verifier's typing;
//! appliers that build ops type-check them first and do nothing otherwise.
//!
//! To add a rule: add an entry to the table with a comment saying what it
//! does and why it is sound, and a test in `passes/tests/egraph.rs` that it
//! fires on a fixture.

use super::lang::{Ctx, EG, Leaf, NextCode, Node, infer_node, ir_kind};
use egg::{Applier, ConditionalApplier, Id, Pattern, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use std::collections::BTreeMap;

pub type Rw = Rewrite<Node, Ctx>;

/// A named rewrite.
#[derive(Clone)]
pub struct Rule {
    pub name: &'static str,
    /// One line: what it rewrites into what.
    pub summary: &'static str,
    pub rewrite: Rw,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rule({}: {})", self.name, self.summary)
    }
}

/// Building rules from outside this crate (docs/extending.md).
impl Rule {
    /// `lhs -> rhs`, two patterns in the e-graph language ([`Node`]'s
    /// op names, `?x` variables). The right-hand side is added for every
    /// match but joins the matched class only where it has the same result
    /// types, so a rule that does not type-check where it matches changes
    /// nothing there (instead of making the extracted graph fail to verify).
    /// Malformed patterns, and a right side with variables the left lacks,
    /// are errors naming the rule.
    pub fn pattern(name: &'static str, summary: &'static str, lhs: &str, rhs: &str) -> Result<Rule, String> {
        let parse = |s: &str| {
            s.parse::<Pattern<Node>>()
                .map_err(|e| format!("rule `{name}`: pattern `{s}`: {e}"))
        };
        let (lhs, rhs) = (parse(lhs)?, parse(rhs)?);
        let rewrite = Rw::new(name, lhs, Typed(rhs)).map_err(|e| format!("rule `{name}`: {e}"))?;
        Ok(Rule { name, summary, rewrite })
    }

    /// A rule with its own searcher and applier (any egg rewrite over
    /// [`Node`] and [`Ctx`]); appliers must keep the typing, see the module docs.
    pub fn custom(name: &'static str, summary: &'static str, rewrite: Rw) -> Rule {
        Rule { name, summary, rewrite }
    }
}

/// A pattern right-hand side that joins only a class of the same types.
struct Typed(Pattern<Node>);

impl Applier<Node, Ctx> for Typed {
    fn apply_one(&self, eg: &mut EG, class: Id, s: &Subst, _: Option<&PatternAst<Node>>, _: Symbol) -> Vec<Id> {
        let new = eg.add_instantiation(&self.0.ast, s);
        let (have, got) = (&eg[class].data.types, &eg[new].data.types);
        if got.is_empty() || have != got || !eg.union(class, new) {
            return vec![];
        }
        vec![class]
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

/// The rule table.
pub fn rules() -> Vec<Rule> {
    vec![
        // 1. RMSNorm weight folding. rms_norm(x, w) = rms_scale(x) * w (per
        // column), and (s * w) W^T = s (W diag(w))^T, so the weight moves into
        // the linear's matrix: scale_cols(W, w), a weight transform done once
        // at load. Only for constant W and w (otherwise the transform would
        // run per token). The rms_norm stays in its class for any other
        // consumer; extraction keeps it only where something still needs it.
        pattern_if(
            "fold-norm-into-linear",
            "linear(rms_norm(x, w), W) -> linear(rms_scale(x), scale_cols(W, w))",
            "(linear (rms_norm ?eps ?x ?w) ?W)",
            "(linear (rms_scale ?eps ?x) (scale_cols ?W ?w))",
            |eg, s| constant(eg, s, &["?W", "?w"]),
        ),
        // 1b. The same with a bias (the exit gate's linear); the bias is added
        // after the product, so it is unaffected.
        pattern_if(
            "fold-norm-into-linear-bias",
            "linear(rms_norm(x, w), W, b) -> linear(rms_scale(x), scale_cols(W, w), b)",
            "(linear (rms_norm ?eps ?x ?w) ?W ?b)",
            "(linear (rms_scale ?eps ?x) (scale_cols ?W ?w) ?b)",
            |eg, s| constant(eg, s, &["?W", "?w"]),
        ),
        // 2. Horizontal fusion: every bias-free linear reading the same input
        // class with a constant weight (q/k/v; gate/up) becomes one linear
        // with the weights concatenated along the output axis, each old
        // result a slice (a view) of the merged one. Each output column is
        // the same dot product as before, so results are bit-identical.
        Rule {
            name: "merge-linears",
            summary: "linear(x, W1), linear(x, W2).. -> slices of linear(x, concat(W1, W2..){axis=0})",
            rewrite: Rw::new("merge-linears", MergeLinears, MergeLinears).expect("merge-linears"),
        },
        // 2b. Scaling columns commutes with stacking rows: concatenating
        // projections whose folded weights share one norm weight equals
        // folding it once into the concatenation. Merging before or after
        // folding then yields one merged weight class instead of two
        // (elementwise the same products, so bit-identical).
        Rule {
            name: "scale-cols-of-concat",
            summary: "concat(scale_cols(W1, s), scale_cols(W2, s)..){axis=0} -> scale_cols(concat(W1, W2..){axis=0}, s)",
            rewrite: Rw::new("scale-cols-of-concat", ScaleColsOfConcat, ScaleColsOfConcat)
                .expect("scale-cols-of-concat"),
        },
        // 3. SwiGLU: silu then multiply as one elementwise kernel (the op
        // rounds silu and the product exactly as the two ops do).
        pattern(
            "swiglu",
            "mul(silu(g), u) -> swiglu(g, u)",
            "(mul (silu ?g) ?u)",
            "(swiglu ?g ?u)",
        ),
        // 3b. After gate/up are merged, swiglu of the two halves of the merged
        // result is the one-operand swiglu of the whole (gate first).
        pattern_if(
            "swiglu-merged",
            "swiglu(slice(m, 0, I), slice(m, I, I)) -> swiglu(m) when m is 2I wide",
            "(swiglu (slice 0 ?n ?m) (slice ?n ?n ?m))",
            "(swiglu ?m)",
            |eg, s| {
                let n = eg[s[var("?n")]].data.int();
                let width = eg[s[var("?m")]].data.ty().and_then(|t| t.last()?.fixed());
                matches!((n, width), (Some(n), Some(w)) if w == 2 * n)
            },
        ),
        // 4. Residual add + the norm that follows: one kernel computes the sum
        // and its norm; the add's other users read projection 0.
        custom(
            "add-rms-norm",
            "rms_norm(add(h, a), w) -> get 1 of add_rms_norm(h, a, w); add(h, a) = get 0",
            "(rms_norm ?eps (add ?h ?a) ?w)",
            |eg, class, s| fuse_add_norm(eg, class, s, Some(s[var("?w")])),
        ),
        // 4b. The same after the norm weight was folded away (rule 1).
        custom(
            "add-rms-scale",
            "rms_scale(add(h, a)) -> get 1 of add_rms_norm(h, a); add(h, a) = get 0",
            "(rms_scale ?eps (add ?h ?a))",
            |eg, class, s| fuse_add_norm(eg, class, s, None),
        ),
        // 5. RoPE + KV-cache write: attention with cos/sin operands applies
        // RoPE to q and k itself (rounding as `rope` does) before appending
        // k to the cache. The rope attributes must be the ones attention uses
        // (heads for q, kv_heads for k, the same head_dim).
        pattern_if(
            "rope-into-attention",
            "attention(rope(q, c, s), rope(k, c, s), v) -> attention(q, k, v, c, s)",
            "(attention ?at (rope ?rq ?q ?c ?s) (rope ?rk ?k ?c ?s) ?v)",
            "(attention ?at ?q ?k ?v ?c ?s)",
            |eg, s| {
                let leaf = |v: &str| eg[s[var(v)]].data.leaf.clone();
                match (leaf("?at"), leaf("?rq"), leaf("?rk")) {
                    (
                        Some(Leaf::Attn {
                            heads,
                            kv_heads,
                            head_dim,
                            ..
                        }),
                        Some(Leaf::Rope {
                            heads: hq,
                            head_dim: dq,
                        }),
                        Some(Leaf::Rope {
                            heads: hk,
                            head_dim: dk,
                        }),
                    ) => hq == heads && hk == kv_heads && dq == head_dim && dk == head_dim,
                    _ => false,
                }
            },
        ),
        // 6. The end of a loop step: final norm, exit-gate linear and sigmoid
        // as one op; the norm's other users (the next step, the output) read
        // projection 0. `next = "none"`: the loop-rotation pass later moves
        // the next step's input norm in (fusion across the loop boundary).
        custom(
            "step-end",
            "sigmoid(linear(rms_norm(h, n), gw, gb)) -> get 1 of step_end(h, n, gw, gb); rms_norm(h, n) = get 0",
            "(sigmoid (linear (rms_norm ?eps ?h ?n) ?gw ?gb))",
            step_end,
        ),
        // 7. Commutativity (exact in IEEE arithmetic). mul: swiglu's pattern
        // needs silu as the first factor, whichever order a tracer emitted.
        // add: residual adds are matched in either operand order (rule 4
        // puts the tuple's operands in a canonical order, so both
        // orientations give one fused op).
        pattern("mul-commute", "mul(a, b) -> mul(b, a)", "(mul ?a ?b)", "(mul ?b ?a)"),
        pattern("add-commute", "add(a, b) -> add(b, a)", "(add ?a ?b)", "(add ?b ?a)"),
    ]
}

fn var(s: &str) -> Var {
    s.parse().expect("a pattern variable")
}

fn constant(eg: &EG, s: &Subst, vars: &[&str]) -> bool {
    vars.iter().all(|v| eg[s[var(v)]].data.constant)
}

fn pat(s: &str) -> Pattern<Node> {
    s.parse().unwrap_or_else(|e| panic!("rule pattern `{s}`: {e}"))
}

fn pattern(name: &'static str, summary: &'static str, lhs: &str, rhs: &str) -> Rule {
    Rule {
        name,
        summary,
        rewrite: Rw::new(name, pat(lhs), pat(rhs)).unwrap_or_else(|e| panic!("{e}")),
    }
}

fn pattern_if(name: &'static str, summary: &'static str, lhs: &str, rhs: &str, cond: fn(&EG, &Subst) -> bool) -> Rule {
    let applier = ConditionalApplier {
        condition: move |eg: &mut EG, _: Id, s: &Subst| cond(eg, s),
        applier: pat(rhs),
    };
    Rule {
        name,
        summary,
        rewrite: Rw::new(name, pat(lhs), applier).unwrap_or_else(|e| panic!("{e}")),
    }
}

/// An applier in Rust: adds what it needs, does its own unions and returns
/// the classes it changed.
type ApplyFn = fn(&mut EG, Id, &Subst) -> Vec<Id>;

struct Custom(ApplyFn);

impl Applier<Node, Ctx> for Custom {
    fn apply_one(&self, eg: &mut EG, class: Id, s: &Subst, _: Option<&PatternAst<Node>>, _: Symbol) -> Vec<Id> {
        (self.0)(eg, class, s)
    }
}

fn custom(name: &'static str, summary: &'static str, lhs: &str, apply: ApplyFn) -> Rule {
    Rule {
        name,
        summary,
        rewrite: Rw::new(name, pat(lhs), Custom(apply)).unwrap_or_else(|e| panic!("{e}")),
    }
}

/// Add an op node if it types; None otherwise.
fn add_typed(eg: &mut EG, n: Node) -> Option<Id> {
    let (kind, ins) = ir_kind(eg, &n)?;
    infer_node(eg, &kind, &ins)?;
    Some(eg.add(n))
}

fn int(eg: &mut EG, i: usize) -> Id {
    eg.add(Node::Leaf(Leaf::Int(i)))
}

/// Union `a` and `b`, recording `a` as changed if they were apart.
fn union(eg: &mut EG, a: Id, b: Id, changed: &mut Vec<Id>) {
    if eg.union(a, b) {
        changed.push(a);
    }
}

/// The projections 0 and 1 of a tuple class.
fn projections(eg: &mut EG, tuple: Id) -> (Id, Id) {
    let (i0, i1) = (int(eg, 0), int(eg, 1));
    (eg.add(Node::Get([i0, tuple])), eg.add(Node::Get([i1, tuple])))
}

fn fuse_add_norm(eg: &mut EG, norm: Id, s: &Subst, w: Option<Id>) -> Vec<Id> {
    let (eps, h, a) = (s[var("?eps")], s[var("?h")], s[var("?a")]);
    let sum = eg.add(Node::Add([h, a]));
    // The add is exactly commutative: order the operands by first
    // appearance so add(h, a) and add(a, h) give the same fused op.
    let key = |eg: &EG, id: Id| (eg[id].data.order, eg.find(id));
    let (h, a) = if key(eg, a) < key(eg, h) { (a, h) } else { (h, a) };
    let children: Vec<Id> = [eps, h, a].into_iter().chain(w).collect();
    let Some(tuple) = add_typed(eg, Node::AddRmsNorm(children.into())) else {
        return vec![];
    };
    let (p0, p1) = projections(eg, tuple);
    let mut changed = vec![];
    union(eg, sum, p0, &mut changed);
    union(eg, norm, p1, &mut changed);
    changed
}

fn step_end(eg: &mut EG, lambda: Id, s: &Subst) -> Vec<Id> {
    let (eps, h, n, gw, gb) = (s[var("?eps")], s[var("?h")], s[var("?n")], s[var("?gw")], s[var("?gb")]);
    let norm = eg.add(Node::RmsNorm([eps, h, n]));
    let next = eg.add(Node::Leaf(Leaf::Next(NextCode::None)));
    let Some(tuple) = add_typed(eg, Node::StepEnd(vec![eps, next, h, n, gw, gb].into())) else {
        return vec![];
    };
    let (p0, p1) = projections(eg, tuple);
    let mut changed = vec![];
    union(eg, norm, p0, &mut changed);
    union(eg, lambda, p1, &mut changed);
    changed
}

/// Rule 2's searcher and applier: finds, for each input class, the
/// bias-free linears reading it with constant, not yet merged weights (one
/// per result class, in order of first appearance); a match binds `?x` (the
/// input), `?c0`.. (the linears' classes) and `?w0`.. (their weights).
struct MergeLinears;

impl Searcher<Node, Ctx> for MergeLinears {
    fn search_eclass_with_limit(&self, eg: &EG, class: Id, limit: usize) -> Option<SearchMatches<'_, Node>> {
        self.search_with_limit(eg, limit)
            .into_iter()
            .find(|m| m.eclass == class)
    }

    fn search_with_limit(&self, eg: &EG, limit: usize) -> Vec<SearchMatches<'_, Node>> {
        // input class -> (order key, linear class, weight class)
        let mut groups: BTreeMap<Id, Vec<(u32, Id, Id)>> = BTreeMap::new();
        for class in eg.classes() {
            for n in class.iter() {
                if let Node::Linear(c) = n
                    && let [x, w] = c[..]
                {
                    let wd = &eg[w].data;
                    if wd.constant && !wd.merged && wd.ty().is_some_and(|t| t.rank() == 2) {
                        groups
                            .entry(eg.find(x))
                            .or_default()
                            .push((class.data.order, class.id, w));
                    }
                }
            }
        }
        let mut out = vec![];
        for (x, mut members) in groups {
            members.sort();
            members.dedup_by_key(|m| m.1);
            if members.len() < 2 || out.len() >= limit {
                continue;
            }
            let mut subst = Subst::with_capacity(1 + 2 * members.len());
            subst.insert(var("?x"), x);
            for (i, (_, c, w)) in members.iter().enumerate() {
                subst.insert(var(&format!("?c{i}")), *c);
                subst.insert(var(&format!("?w{i}")), *w);
            }
            out.push(SearchMatches {
                eclass: x,
                substs: vec![subst],
                ast: None,
            });
        }
        out
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<Node, Ctx> for MergeLinears {
    fn apply_one(&self, eg: &mut EG, _: Id, s: &Subst, _: Option<&PatternAst<Node>>, _: Symbol) -> Vec<Id> {
        let x = s[var("?x")];
        let members: Vec<(Id, Id)> = numbered(s, "c").into_iter().zip(numbered(s, "w")).collect();
        let widths: Option<Vec<usize>> = members
            .iter()
            .map(|(_, w)| eg[*w].data.ty()?.shape[0].fixed())
            .collect();
        let Some(widths) = widths else { return vec![] };
        let axis = int(eg, 0);
        let parts: Vec<Id> = std::iter::once(axis).chain(members.iter().map(|m| m.1)).collect();
        let Some(weight) = add_typed(eg, Node::Concat(parts.into())) else {
            return vec![];
        };
        let Some(merged) = add_typed(eg, Node::Linear(vec![x, weight].into())) else {
            return vec![];
        };
        let mut changed = vec![];
        let mut start = 0;
        for ((c, _), len) in members.into_iter().zip(widths) {
            let (s0, l) = (int(eg, start), int(eg, len));
            let part = eg.add(Node::Slice([s0, l, merged]));
            union(eg, c, part, &mut changed);
            start += len;
        }
        changed
    }
}

/// `?p0`, `?p1`..: the numbered variables of a variable-size match.
fn numbered(s: &Subst, prefix: &str) -> Vec<Id> {
    (0..)
        .map_while(|i| s.get(var(&format!("?{prefix}{i}"))).copied())
        .collect()
}

/// Rule 2b's searcher and applier: a match is a concat (axis 0) class whose
/// every part holds a `scale_cols(W_i, s)` with one common `s`; it binds
/// `?s` and `?w0`.. .
struct ScaleColsOfConcat;

impl Searcher<Node, Ctx> for ScaleColsOfConcat {
    fn search_eclass_with_limit(&self, eg: &EG, class: Id, limit: usize) -> Option<SearchMatches<'_, Node>> {
        let mut substs = vec![];
        for n in eg[class].iter() {
            let Node::Concat(c) = n else { continue };
            let [axis, parts @ ..] = &c[..] else { continue };
            if eg[*axis].data.int() != Some(0) || parts.len() < 2 || substs.len() >= limit {
                continue;
            }
            let scaled = |part: Id, s: Option<Id>| {
                eg[part].iter().find_map(|m| match m {
                    Node::ScaleCols([w, s2]) if s.is_none_or(|s| eg.find(s) == eg.find(*s2)) => Some((*w, *s2)),
                    _ => None,
                })
            };
            let Some((w0, s)) = scaled(parts[0], None) else {
                continue;
            };
            let Some(rest): Option<Vec<Id>> = parts[1..].iter().map(|p| scaled(*p, Some(s)).map(|x| x.0)).collect()
            else {
                continue;
            };
            let mut subst = Subst::with_capacity(1 + parts.len());
            subst.insert(var("?s"), s);
            for (i, w) in std::iter::once(w0).chain(rest).enumerate() {
                subst.insert(var(&format!("?w{i}")), w);
            }
            substs.push(subst);
        }
        (!substs.is_empty()).then_some(SearchMatches {
            eclass: class,
            substs,
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<Node, Ctx> for ScaleColsOfConcat {
    fn apply_one(&self, eg: &mut EG, class: Id, s: &Subst, _: Option<&PatternAst<Node>>, _: Symbol) -> Vec<Id> {
        let axis = int(eg, 0);
        let parts: Vec<Id> = std::iter::once(axis).chain(numbered(s, "w")).collect();
        let Some(cat) = add_typed(eg, Node::Concat(parts.into())) else {
            return vec![];
        };
        let Some(scaled) = add_typed(eg, Node::ScaleCols([cat, s[var("?s")]])) else {
            return vec![];
        };
        let mut changed = vec![];
        union(eg, class, scaled, &mut changed);
        changed
    }
}
