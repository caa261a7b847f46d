//! The rule `silu-from-sigmoid`: `mul(x, sigmoid(x)) -> silu(x)`, and the
//! same with the operands of `mul` swapped.
//!
//! Sound because silu(x) = x * sigmoid(x) is its definition; in f32 the
//! fused form rounds once where the split form rounds twice, so results
//! agree within rounding (as the built-in norm folding does). Written as
//! patterns in the e-graph language (`ouroc compile --list` prints the
//! built-in rules; the op names are those of `emit ir`).

use ouroc_passes::egraph::rules::Rule;

pub const NAME: &str = "silu-from-sigmoid";

pub fn silu_from_sigmoid() -> Rule {
    Rule::pattern(
        NAME,
        "mul(x, sigmoid(x)) -> silu(x)",
        "(mul ?x (sigmoid ?x))",
        "(silu ?x)",
    )
    .expect("the rule's patterns parse")
}

/// The commuted form: `mul(sigmoid(x), x) -> silu(x)`.
pub fn silu_from_sigmoid_commuted() -> Rule {
    Rule::pattern(
        "silu-from-sigmoid-commuted",
        "mul(sigmoid(x), x) -> silu(x)",
        "(mul (sigmoid ?x) ?x)",
        "(silu ?x)",
    )
    .expect("the rule's patterns parse")
}
