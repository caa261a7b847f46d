//! Regression tests for what the fuzz targets found, each written as the smallest edit of a
//! corpus seed that reproduces it. Each target also replays its corpus, findings included.

use ouroc_fuzz::{corpus_dir, targets};

/// Runs the app_meta target on `meta` (it must not panic), then `Program::check` on its Program.
fn check_meta(meta: &str) -> Result<(), String> {
    targets::app_meta(meta.as_bytes());
    let v: serde_json::Value = serde_json::from_str(meta).unwrap();
    let p: ouroc_kernels::Program = serde_json::from_value(v["program"].clone()).unwrap();
    p.check()
}

fn seed(target: &str, file: &str) -> String {
    std::fs::read_to_string(corpus_dir(target).join(file)).expect("a text seed")
}

/// `.reg .pred %p<2147483648>` made the PTX emulator allocate 1 GiB of register state per
/// declaration (the fuzzing process was killed by the OOM killer).
#[test]
fn ptx_register_counts_are_bounded() {
    let text = seed("ptx_text", "r1-kernel1.ptx").replace(".reg .pred %p<3>", ".reg .pred %p<2147483648>");
    let Err(e) = ouroc_ptx_emu::Module::parse(&text) else {
        panic!("accepted")
    };
    let e = e.to_string();
    assert!(e.contains("at most 65536 registers"), "{e}");
    for (from, to) in [
        (".reg .pred %p<3>", ".reg .pred %p<-1>"),
        (".maxntid 32, 1, 1", ".maxntid 4294967295, 4294967295, 1"),
    ] {
        let text = seed("ptx_text", "r1-kernel1.ptx").replace(from, to);
        assert!(ouroc_ptx_emu::Module::parse(&text).is_err(), "{to} accepted");
    }
}

/// A Program whose operand reads columns `col..col + len` with `col` near `usize::MAX`
/// overflowed in `Program::check` (a panic in debug, a wrapped bound in release).
#[test]
fn program_check_refuses_column_ranges_that_overflow() {
    let meta =
        seed("app_meta", "r1.json").replacen(r#""col":0,"len":288"#, r#""col":18446744073709551615,"len":288"#, 1);
    let e = check_meta(&meta).unwrap_err();
    assert!(e.contains("18446744073709551615"), "{e}");
}

/// Arena rows that run past the arena, and an alignment of 0 (a division by zero).
#[test]
fn program_check_refuses_rows_outside_the_arena() {
    let wide = seed("app_meta", "r1.json").replacen(r#""width":288,"offset":0"#, r#""width":288,"offset":1664"#, 1);
    let zero = seed("app_meta", "r1.json").replacen(r#""align":64"#, r#""align":0"#, 1);
    for (meta, needle) in [(wide, "outside the arena"), (zero, "alignment is 0")] {
        let e = check_meta(&meta).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }
}

/// IR text with dimensions near 2^64 overflowed shape inference (`heads * head_dim`).
#[test]
fn ir_text_integers_are_bounded() {
    let text = seed("ir_text", "r1-imported.ir").replace("head_dim = 8", "head_dim = 9223372036854775808");
    let Err(e) = ouroc_ir::parse::parse(&text) else {
        panic!("accepted")
    };
    let e = e.to_string();
    assert!(e.contains("above the limit"), "{e}");
    let text = seed("ir_text", "r1-imported.ir").replace("f32[32, 32]", "f32[18446744073709551615, 32]");
    let Err(e) = ouroc_ir::parse::parse(&text) else {
        panic!("accepted")
    };
    let e = e.to_string();
    assert!(e.contains("above the limit"), "{e}");
}

/// An attention spec with `heads` near `usize::MAX` overflowed `heads * head_dim` when
/// `Program::check` computed the kernel's result width.
#[test]
fn program_check_refuses_kernel_specs_whose_widths_overflow() {
    let meta = seed("app_meta", "r1.json").replacen(r#""heads":4,"#, r#""heads":18446744073709551615,"#, 1);
    let e = check_meta(&meta).unwrap_err();
    assert!(e.contains("18446744073709551615"), "{e}");
}

/// `theta = 10000.1e308` parsed as infinity and printed as `inf`, which does not parse back.
#[test]
fn ir_text_floats_must_be_finite() {
    let text = seed("ir_text", "r1-imported.ir").replace("theta = 10000.0", "theta = 10000.1e308");
    let Err(e) = ouroc_ir::parse::parse(&text) else {
        panic!("accepted")
    };
    assert!(e.to_string().contains("out of the range"), "{e}");
    targets::ir_text(text.as_bytes());
}
