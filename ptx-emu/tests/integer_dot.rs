//! The 8-bit integer dot products the quantised Linear kernels use, run
//! from PTX text: `dp4a` in its four signedness combinations and
//! `mma.sync.aligned.m16n8k32.row.col.s32.{u8,s8}.s8.s32`, against sums
//! computed here; and malformed forms rejected at parse time.

// Lane and register indices follow the ISA's fragment formulas.
#![allow(clippy::needless_range_loop)]

use ouroc_ptx_emu::{LaunchDims, Memory, Module, Param};

const HEADER: &str = ".version 8.0\n.target sm_80\n.address_size 64\n";

fn module(body: &str) -> Module {
    Module::parse(&format!("{HEADER}{body}")).unwrap_or_else(|e| panic!("{e}"))
}

fn one_warp() -> LaunchDims {
    LaunchDims {
        grid: (1, 1, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
    }
}

/// Deterministic words (xorshift).
fn words(n: usize, mut s: u64) -> Vec<u32> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        })
        .collect()
}

fn u32s(mem: &Memory, addr: u64, n: usize) -> Vec<u32> {
    mem.read_bytes(addr, 4 * n)
        .unwrap()
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn byte(w: u32, i: usize, signed: bool) -> i64 {
    let b = (w >> (8 * i)) as u8;
    if signed { b as i8 as i64 } else { b as i64 }
}

#[test]
fn dp4a_every_signedness() {
    let m = module(
        ".visible .entry k(.param .u64 a, .param .u64 b, .param .u64 out)
{
    .reg .b32 %r<12>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [a];
    ld.param.u64 %rd2, [b];
    ld.param.u64 %rd3, [out];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    ld.global.u32 %r2, [%rd5];
    ld.global.u32 %r3, [%rd6];
    dp4a.u32.u32 %r4, %r2, %r3, 7;
    dp4a.u32.s32 %r5, %r2, %r3, %r1;
    dp4a.s32.u32 %r6, %r2, %r3, -5;
    dp4a.s32.s32 %r7, %r2, %r3, 0;
    mul.wide.u32 %rd4, %r1, 16;
    add.s64 %rd7, %rd3, %rd4;
    st.global.v4.u32 [%rd7], {%r4, %r5, %r6, %r7};
    ret;
}
",
    );
    let (a, b) = (words(32, 3), words(32, 9));
    let mut mem = Memory::new();
    let (pa, pb) = (mem.alloc_bytes(&bytes(&a)), mem.alloc_bytes(&bytes(&b)));
    let out = mem.alloc_bytes(&[0; 32 * 16]);
    m.launch(
        "k",
        one_warp(),
        &[Param::Ptr(pa), Param::Ptr(pb), Param::Ptr(out)],
        &mut mem,
    )
    .unwrap();
    let got = u32s(&mem, out, 128);
    for l in 0..32 {
        let dot = |sa: bool, sb: bool| -> i64 { (0..4).map(|i| byte(a[l], i, sa) * byte(b[l], i, sb)).sum() };
        let want = [
            dot(false, false) + 7,
            dot(false, true) + l as i64,
            dot(true, false) - 5,
            dot(true, true),
        ];
        for (j, w) in want.iter().enumerate() {
            assert_eq!(got[4 * l + j], *w as u32, "lane {l}, form {j}");
        }
    }
}

#[test]
fn mma_m16n8k32_u8_and_s8_against_a_cpu_product() {
    for (atype, a_signed) in [("u8", false), ("s8", true)] {
        let m = module(&format!(
            ".visible .entry k(.param .u64 a, .param .u64 b, .param .u64 out)
{{
    .reg .b32 %r<20>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [a];
    ld.param.u64 %rd2, [b];
    ld.param.u64 %rd3, [out];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 16;
    add.s64 %rd5, %rd1, %rd4;
    ld.global.v4.u32 {{%r2, %r3, %r4, %r5}}, [%rd5];
    mul.wide.u32 %rd4, %r1, 8;
    add.s64 %rd6, %rd2, %rd4;
    ld.global.v2.u32 {{%r6, %r7}}, [%rd6];
    mov.u32 %r8, 100;
    mma.sync.aligned.m16n8k32.row.col.s32.{atype}.s8.s32 {{%r10, %r11, %r12, %r13}}, {{%r2, %r3, %r4, %r5}}, {{%r6, %r7}}, {{%r8, %r1, %r8, %r1}};
    mul.wide.u32 %rd4, %r1, 16;
    add.s64 %rd7, %rd3, %rd4;
    st.global.v4.u32 [%rd7], {{%r10, %r11, %r12, %r13}};
    ret;
}}
"
        ));
        // A [16][32] and B [32][8] as bytes; each lane's fragment words.
        let av: Vec<u32> = words(16 * 32, 5).iter().map(|w| w & 0xff).collect();
        let bv: Vec<u32> = words(32 * 8, 6).iter().map(|w| w & 0xff).collect();
        let (mut af, mut bf) = (vec![0u32; 32 * 4], vec![0u32; 32 * 2]);
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for r in 0..4 {
                for j in 0..4 {
                    af[4 * l + r] |= av[(g + 8 * (r & 1)) * 32 + 4 * t + 16 * (r >> 1) + j] << (8 * j);
                }
            }
            for r in 0..2 {
                for j in 0..4 {
                    bf[2 * l + r] |= bv[(4 * t + 16 * r + j) * 8 + g] << (8 * j);
                }
            }
        }
        let mut mem = Memory::new();
        let (pa, pb) = (mem.alloc_bytes(&bytes(&af)), mem.alloc_bytes(&bytes(&bf)));
        let out = mem.alloc_bytes(&[0; 32 * 16]);
        m.launch(
            "k",
            one_warp(),
            &[Param::Ptr(pa), Param::Ptr(pb), Param::Ptr(out)],
            &mut mem,
        )
        .unwrap();
        let got = u32s(&mem, out, 128);
        let sx = |v: u32, s: bool| if s { v as u8 as i8 as i64 } else { v as i64 };
        for l in 0..32 {
            let (g, t) = (l / 4, l % 4);
            for r in 0..4 {
                let (row, col) = (g + 8 * (r >> 1), 2 * t + (r & 1));
                let dot: i64 = (0..32)
                    .map(|k| sx(av[row * 32 + k], a_signed) * sx(bv[k * 8 + col], true))
                    .sum();
                let c = if r % 2 == 0 { 100 } else { l as i64 };
                assert_eq!(got[4 * l + r], (dot + c) as u32, "{atype}: lane {l} register {r}");
            }
        }
    }
}

#[test]
fn malformed_integer_forms_are_parse_errors() {
    for bad in [
        "dp4a.u16.s32 %r1, %r2, %r3, %r4;",
        "dp4a.s32 %r1, %r2, %r3, %r4;",
        "mma.sync.aligned.m16n8k32.row.col.f32.s8.s8.f32 {%r1, %r2, %r3, %r4}, {%r1, %r2, %r3, %r4}, {%r1, %r2}, {%r1, %r2, %r3, %r4};",
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%r1, %r2, %r3, %r4}, {%r1, %r2}, {%r1, %r2}, {%r1, %r2, %r3, %r4};",
        "mma.sync.aligned.m16n8k32.row.col.s32.s4.s8.s32 {%r1, %r2, %r3, %r4}, {%r1, %r2, %r3, %r4}, {%r1, %r2}, {%r1, %r2, %r3, %r4};",
    ] {
        let text = format!("{HEADER}.visible .entry k()\n{{\n    .reg .b32 %r<8>;\n    {bad}\n    ret;\n}}\n");
        assert!(Module::parse(&text).is_err(), "accepted: {bad}");
    }
}
