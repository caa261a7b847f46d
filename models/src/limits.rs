//! Upper bounds on every size read from a checkpoint or a flag.
//!
//! Sizes are checked against these before anything is allocated, so a corrupt or hostile
//! `config.json` (`total_ut_steps: 1e12`) or flag (`--loops 18446744073709551615`) gets a message
//! naming the number instead of an allocation abort or an overflow panic. Each bound is far above
//! any released model (Ouro-2.6B: hidden 2048, 48 layers, R = 4, vocab 49152) and far below
//! where the products of sizes could overflow a u64.

/// hidden_size (the largest released LLMs use 16384-25600).
pub const MAX_HIDDEN: usize = 1 << 16;
/// intermediate_size.
pub const MAX_INTERMEDIATE: usize = 1 << 18;
/// num_hidden_layers (layers of the shared stack).
pub const MAX_LAYERS: usize = 1024;
/// num_attention_heads and num_key_value_heads.
pub const MAX_HEADS: usize = 1024;
/// head_dim.
pub const MAX_HEAD_DIM: usize = 1024;
/// vocab_size.
pub const MAX_VOCAB: usize = 1 << 24;
/// max_position_embeddings (the context).
pub const MAX_POSITIONS: usize = 1 << 24;
/// total_ut_steps and `--loops`: loop steps R. Ouro is trained with R = 4; studies of looped
/// models go to a few dozen.
pub const MAX_LOOPS: usize = 256;

/// `Err` naming `what`, its value and the limit when `value > limit`.
pub fn check(what: &str, value: usize, limit: usize) -> Result<usize, String> {
    if value > limit {
        Err(format!("{what} = {value} is more than ouroc accepts (at most {limit})"))
    } else {
        Ok(value)
    }
}

/// The loop count `R`, from `--loops` or total_ut_steps: at least 1 and at most [`MAX_LOOPS`].
pub fn check_loops(loops: usize) -> Result<usize, String> {
    if loops == 0 {
        return Err("--loops must be at least 1".into());
    }
    check("the loop count R (--loops or total_ut_steps)", loops, MAX_LOOPS)
}

/// Parser of a `--loops R` flag (clap `value_parser`).
pub fn parse_loops_flag(text: &str) -> Result<usize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a loop count (an integer from 1 to {MAX_LOOPS})"))?;
    check_loops(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_counts_outside_one_to_the_limit_are_refused_with_the_number() {
        assert_eq!(parse_loops_flag("4"), Ok(4));
        assert_eq!(parse_loops_flag("256"), Ok(256));
        let e = parse_loops_flag("1000000000000").unwrap_err();
        assert!(e.contains("1000000000000") && e.contains("at most 256"), "{e}");
        let e = parse_loops_flag("18446744073709551615").unwrap_err();
        assert!(e.contains("at most 256"), "{e}");
        assert!(
            parse_loops_flag("99999999999999999999999")
                .unwrap_err()
                .contains("not a loop count")
        );
        assert!(parse_loops_flag("0").unwrap_err().contains("at least 1"));
        assert!(parse_loops_flag("-1").is_err());
    }
}
