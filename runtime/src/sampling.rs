//! Choosing the next token from logits: greedy, or temperature sampling
//! with top-k, top-p and a repetition penalty, from a seeded generator.

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = all.
    pub top_p: f32,
    /// Above 1 discourages tokens already in the context (the CTRL / Hugging
    /// Face rule: positive logits divided by it, negative multiplied); 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Reject values that have no meaning, naming the flag.
    pub fn check(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "--temperature must be >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "--repetition-penalty must be > 0 (1 = off), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let state = params.seed ^ 0x5851_F42D_4C95_7F2D;
        Sampler { params, state }
    }

    /// splitmix64: small, fast, and the same sequence on every machine.
    fn uniform(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// The next token given the last position's logits and the context so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        match self.candidates(logits, context) {
            Candidates::Greedy(t) => t,
            Candidates::Drawn(idx, probs) => {
                let u = self.uniform();
                let mut acc = 0.0;
                for (i, &pr) in idx.iter().zip(&probs) {
                    acc += pr;
                    if u < acc {
                        return *i as u32;
                    }
                }
                idx[idx.len() - 1] as u32
            }
        }
    }

    /// Whether tokens are chosen by argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// The distribution [`Sampler::sample`] draws from, over the whole
    /// vocabulary (zero outside top-k / top-p; one-hot when greedy).
    pub fn probs(&self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut p = vec![0.0f32; logits.len()];
        match self.candidates(logits, context) {
            Candidates::Greedy(t) => p[t as usize] = 1.0,
            Candidates::Drawn(idx, probs) => idx.iter().zip(&probs).for_each(|(&i, &x)| p[i] = x),
        }
        p
    }

    /// A uniform draw in [0, 1) from the seeded generator.
    pub fn draw_uniform(&mut self) -> f32 {
        self.uniform()
    }

    /// A token drawn from weights `w` (non-negative, any positive sum).
    pub fn draw(&mut self, w: &[f32]) -> u32 {
        let sum: f32 = w.iter().sum();
        let u = self.uniform() * sum;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                acc += x;
                last = i;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last as u32
    }

    /// The logits after the repetition penalty, then either the argmax
    /// (greedy) or the candidates by descending logit with their
    /// probabilities after temperature, top-k and top-p.
    fn candidates(&self, logits: &[f32], context: &[u32]) -> Candidates {
        let p = &self.params;
        let mut l = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return Candidates::Greedy(argmax(&l) as u32);
        }
        // Candidates by descending logit (stable: ties keep the lower id first).
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0]];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((l[i] - max) / p.temperature).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&x| {
                acc += x;
                acc >= p.top_p
            });
            let n = keep.map_or(probs.len(), |k| k + 1);
            idx.truncate(n);
            probs.truncate(n);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        Candidates::Drawn(idx, probs)
    }
}

enum Candidates {
    Greedy(u32),
    /// Token ids and their probabilities, most likely first.
    Drawn(Vec<usize>, Vec<f32>),
}

/// Index of the largest value; the first on ties (as torch.argmax).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0));
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 3.0, 1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities about 0.84, 0.11, 0.04, 0.01: top-p 0.8 keeps only the first.
        let mut s = Sampler::new(params(1.0, 0, 0.8));
        for _ in 0..50 {
            assert_eq!(s.sample(&[4.0, 2.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(SamplingParams {
            seed: 42,
            ..params(1.0, 0, 1.0)
        });
        let n = 4000;
        let ones = (0..n).filter(|_| s.sample(&logits, &[]) == 1).count();
        let frac = ones as f32 / n as f32;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0, 0, 1.0)
            });
            (0..32).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        // 3.0 / 2 = 1.5 < 2.0: the unseen token wins.
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
        // Negative logits are multiplied, pushing them further down.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
    }

    #[test]
    fn meaningless_parameters_are_refused_by_flag() {
        assert!(params(-1.0, 0, 1.0).check().unwrap_err().contains("--temperature"));
        assert!(params(1.0, 0, 0.0).check().unwrap_err().contains("--top-p"));
        let p = SamplingParams {
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        };
        assert!(p.check().unwrap_err().contains("--repetition-penalty"));
    }
}
