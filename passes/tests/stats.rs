//! Statistics count what they say.

mod common;

use common::*;
use ouroc_passes::Stats;

#[test]
fn stats_count_loop_body_once_per_step() {
    let ckpt = open("mha-r4");
    let g = fixture_graph(&ckpt, "threshold:0.5");
    let s = Stats::of(&g);
    let body_ops = g.find_loop().unwrap().body.ops.len();
    assert_eq!(s.ops_in_loop, body_ops);
    // Outside the loop: embedding, rope_cos, rope_sin, lm_head launch; weights do not.
    let outside_kernels = 4;
    assert_eq!(s.kernels_per_token, outside_kernels + 4 * body_ops);
    // Weights read per token: one embedding row + the head, plus every layer's weights once per step.
    let c = &ckpt.config;
    let (h, i, v) = (c.hidden_size as u64, c.intermediate_size as u64, c.vocab_size as u64);
    let layer = 4 * h * h + 3 * h * i + 4 * h;
    let per_step = c.num_hidden_layers as u64 * layer + h + (h + 1);
    assert_eq!(s.weight_bytes_per_token, 4 * (h + v * h + 4 * per_step));
}
