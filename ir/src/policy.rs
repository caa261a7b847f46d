//! Exit policies of the loop and the arithmetic that chooses a token's exit step.
//!
//! Textual form (the same in the IR and on the command line):
//! `last`, `step:K` (0-based), `threshold:Q` (cumulative exit probability in
//! f32), `threshold:Q:bf16` (the same sum rounded like the reference code's
//! bfloat16 arithmetic), `weighted` (expected output over the exit distribution).

use crate::types::DType;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExitPolicy {
    /// Output of the last step.
    Last,
    /// Output of step K (0-based).
    Step(usize),
    /// First step whose cumulative exit probability reaches `q`; `arith` is
    /// the arithmetic of that sum (F32 or BF16).
    Threshold { q: f32, arith: DType },
    /// Sum over steps of p_r * output_r (the training objective's expectation).
    Weighted,
}

impl ExitPolicy {
    /// Parse `last | step:K | threshold:Q[:f32|:bf16] | weighted`.
    pub fn parse(s: &str) -> Result<ExitPolicy, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("invalid exit policy `{s}`: expected last, step:K, threshold:Q, threshold:Q:bf16 or weighted");
        match parts.as_slice() {
            ["last"] => Ok(ExitPolicy::Last),
            ["weighted"] => Ok(ExitPolicy::Weighted),
            ["step", k] => k.parse::<usize>().map(ExitPolicy::Step).map_err(|_| bad()),
            ["threshold", q] | ["threshold", q, _] => {
                let q: f32 = q.parse().map_err(|_| bad())?;
                if !(q > 0.0 && q <= 1.0) {
                    return Err(format!(
                        "invalid exit policy `{s}`: threshold must be in (0, 1], got {q}"
                    ));
                }
                let arith = match parts.get(2) {
                    None | Some(&"f32") => DType::F32,
                    Some(&"bf16") => DType::BF16,
                    Some(other) => {
                        return Err(format!(
                            "invalid exit policy `{s}`: threshold arithmetic must be f32 or bf16, got `{other}`"
                        ));
                    }
                };
                Ok(ExitPolicy::Threshold { q, arith })
            }
            _ => Err(bad()),
        }
    }

    /// Check the policy against a loop of `steps` iterations.
    pub fn check(&self, steps: usize) -> Result<(), String> {
        match self {
            ExitPolicy::Step(k) if *k >= steps => Err(format!(
                "exit policy step:{k} is out of range for a loop of {steps} steps (0..{})",
                steps - 1
            )),
            _ => Ok(()),
        }
    }

    /// The step a token exits at, from its per-step exit probabilities
    /// `lambdas[r]` (sigmoid of the gate), for a loop of `lambdas.len()` steps.
    /// `Weighted` and `Last` use every step and report the last.
    pub fn exit_step(&self, lambdas: &[f32]) -> usize {
        let steps = lambdas.len();
        self.decided_exit(lambdas, steps).unwrap_or(steps - 1)
    }

    /// The exit step when it is already decided by the first steps' gate
    /// values `prefix` of a loop of `steps` steps, else None. This is what
    /// lets a runtime stop a token's loop early: the later gates cannot
    /// change a decision made here.
    pub fn decided_exit(&self, prefix: &[f32], steps: usize) -> Option<usize> {
        let n = prefix.len();
        match *self {
            ExitPolicy::Last | ExitPolicy::Weighted => (n >= steps).then(|| steps - 1),
            ExitPolicy::Step(k) => (n > k.min(steps - 1)).then(|| k.min(steps - 1)),
            ExitPolicy::Threshold { q, arith } => {
                // The cumulative sum accumulates in f32 and each partial sum is
                // rounded to the arithmetic's dtype before the comparison
                // (torch.cumsum on bf16 accumulates in f32, rounds each output);
                // the threshold itself is a tensor of that dtype too, so 0.9
                // compares as bf16(0.9) = 0.8984375.
                let q = arith.round(q);
                let mut acc = 0.0f32;
                for (r, pr) in exit_probabilities(prefix, steps, arith).into_iter().enumerate() {
                    acc += pr;
                    if arith.round(acc) >= q {
                        return Some(r);
                    }
                }
                (n >= steps).then(|| steps - 1)
            }
        }
    }
}

/// p_r for the known steps `lambdas` of a loop of `steps` steps (the last
/// step, if known, takes the rest). See `exit_distribution`.
fn exit_probabilities(lambdas: &[f32], steps: usize, arith: DType) -> Vec<f32> {
    let rd = |x: f32| arith.round(x);
    let mut p = Vec::with_capacity(lambdas.len());
    let mut survive = 1.0f32;
    for (r, &lam) in lambdas.iter().enumerate() {
        let lam = rd(lam);
        if r + 1 < steps {
            p.push(rd(lam * survive));
            survive = rd(survive * rd(1.0 - lam));
        } else {
            p.push(survive);
        }
    }
    p
}

/// Exit distribution over steps: p_r = lambda_r * S_{r-1} for r < R-1, with
/// S_{-1} = 1 and S_r = S_{r-1} * (1 - lambda_r); the last step takes the
/// rest, p_{R-1} = S_{R-2}. With `arith = BF16` every product and the
/// survival S are rounded to bf16, reproducing the reference's bf16 tensors.
pub fn exit_distribution(lambdas: &[f32], arith: DType) -> Vec<f32> {
    exit_probabilities(lambdas, lambdas.len(), arith)
}

impl fmt::Display for ExitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitPolicy::Last => f.write_str("last"),
            ExitPolicy::Weighted => f.write_str("weighted"),
            ExitPolicy::Step(k) => write!(f, "step:{k}"),
            ExitPolicy::Threshold { q, arith: DType::BF16 } => write!(f, "threshold:{q:?}:bf16"),
            ExitPolicy::Threshold { q, .. } => write!(f, "threshold:{q:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for s in ["last", "weighted", "step:2", "threshold:0.5", "threshold:1.0:bf16"] {
            assert_eq!(ExitPolicy::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            ExitPolicy::parse("threshold:0.5:f32").unwrap().to_string(),
            "threshold:0.5"
        );
    }

    #[test]
    fn parse_rejects_bad_policies_with_reason() {
        assert!(ExitPolicy::parse("threshold:1.5").unwrap_err().contains("(0, 1]"));
        assert!(ExitPolicy::parse("threshold:0.5:f64").unwrap_err().contains("f64"));
        assert!(ExitPolicy::parse("step:x").unwrap_err().contains("step:K"));
        assert!(ExitPolicy::parse("early").unwrap_err().contains("`early`"));
        assert!(ExitPolicy::Step(4).check(4).unwrap_err().contains("out of range"));
    }

    #[test]
    fn distribution_sums_to_one_and_last_takes_the_rest() {
        let p = exit_distribution(&[0.5, 0.5, 0.5, 0.9], DType::F32);
        assert_eq!(p, vec![0.5, 0.25, 0.125, 0.125]);
    }

    #[test]
    fn threshold_picks_first_step_reaching_q() {
        let lam = [0.3, 0.6, 0.2, 0.1];
        // cumulative: 0.3, 0.72, 0.776, 1.0
        let pol = |q| ExitPolicy::Threshold { q, arith: DType::F32 };
        assert_eq!(pol(0.3).exit_step(&lam), 0);
        assert_eq!(pol(0.5).exit_step(&lam), 1);
        assert_eq!(pol(0.75).exit_step(&lam), 2);
        assert_eq!(pol(0.99).exit_step(&lam), 3);
    }

    #[test]
    fn bf16_arithmetic_exits_early_at_threshold_one() {
        // sigmoid(7) = 0.99909 rounds to 1.0 in bf16: the reference exits at step 0
        // even with q = 1.0, while exact arithmetic runs to the last step.
        let lam = [1.0 / (1.0 + (-7.0f32).exp()), 0.5, 0.5, 0.5];
        let bf = ExitPolicy::Threshold {
            q: 1.0,
            arith: DType::BF16,
        };
        let f = ExitPolicy::Threshold {
            q: 1.0,
            arith: DType::F32,
        };
        assert_eq!(bf.exit_step(&lam), 0);
        assert_eq!(f.exit_step(&lam), 3);
    }

    #[test]
    fn bf16_threshold_is_itself_rounded() {
        // 0.899 reaches bf16(0.9) = 0.8984375 but not 0.9.
        let lam = [0.899, 0.0, 0.0, 0.0];
        let bf = ExitPolicy::Threshold {
            q: 0.9,
            arith: DType::BF16,
        };
        let f = ExitPolicy::Threshold {
            q: 0.9,
            arith: DType::F32,
        };
        assert_eq!(bf.exit_step(&lam), 0);
        assert_eq!(f.exit_step(&lam), 3);
    }

    #[test]
    fn decisions_from_a_prefix_agree_with_the_full_sequence() {
        let lam = [0.3, 0.6, 0.2, 0.1];
        for pol in [
            "last",
            "weighted",
            "step:0",
            "step:2",
            "threshold:0.5",
            "threshold:0.75",
            "threshold:1.0:bf16",
        ] {
            let p = ExitPolicy::parse(pol).unwrap();
            let full = p.exit_step(&lam);
            for n in 1..=4 {
                match p.decided_exit(&lam[..n], 4) {
                    Some(r) => assert_eq!(r, full, "{pol} decided after {n} steps"),
                    None => assert!(full >= n, "{pol}: undecided after {n} steps but exits at {full}"),
                }
            }
        }
        // threshold:0.5 is decided after two steps (0.3 + 0.42 >= 0.5).
        assert_eq!(
            ExitPolicy::parse("threshold:0.5").unwrap().decided_exit(&lam[..2], 4),
            Some(1)
        );
        assert_eq!(ExitPolicy::parse("last").unwrap().decided_exit(&lam[..3], 4), None);
    }

    #[test]
    fn single_step_loop_always_exits_at_zero() {
        for s in ["last", "weighted", "step:0", "threshold:0.5", "threshold:1.0:bf16"] {
            assert_eq!(ExitPolicy::parse(s).unwrap().exit_step(&[0.1]), 0, "{s}");
        }
    }
}
