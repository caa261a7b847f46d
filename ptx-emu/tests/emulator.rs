//! The PTX emulator on hand-written kernels: each test proves one piece of
//! the semantics (predication, shuffles, shared memory and barriers,
//! divergence, cp.async groups, ldmatrix and mma fragment layouts, a tiled
//! tensor-core GEMM, cvt rounding) or one error path.

use std::time::Instant;

use ouroc_ptx_emu::{EmuError, LaunchDims, Memory, Module, Param, bf16_from_f32, bf16_to_f32};

const HEADER: &str = ".version 8.0\n.target sm_80\n.address_size 64\n";

fn module(body: &str) -> Module {
    let text = format!("{HEADER}{body}");
    match Module::parse(&text) {
        Ok(m) => m,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn dims(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> LaunchDims {
    LaunchDims {
        grid,
        block,
        shared_bytes,
    }
}

/// A deterministic pseudo-random stream (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
}

const VADD: &str = r#"
.visible .entry vadd(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [pc];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra $L__done;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    mul.wide.u32 %rd4, %r5, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    add.s64 %rd7, %rd3, %rd4;
    ld.global.nc.f32 %f1, [%rd5];
    ld.global.nc.f32 %f2, [%rd6];
    add.rn.f32 %f3, %f1, %f2;
    st.global.f32 [%rd7], %f3;
$L__done:
    ret;
}
"#;

#[test]
fn vector_add_with_bounds_predication() {
    let m = module(VADD);
    let n = 300usize;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| 1000.0 - i as f32).collect();
    let mut mem = Memory::new();
    let (pa, pb) = (mem.alloc_f32(&a), mem.alloc_f32(&b));
    // exactly n elements: a store past the end would fault
    let pc = mem.alloc(n * 4);
    let stats = m
        .launch(
            "vadd",
            dims((3, 1, 1), (128, 1, 1), 0),
            &[Param::Ptr(pa), Param::Ptr(pb), Param::Ptr(pc), Param::U32(n as u32)],
            &mut mem,
        )
        .unwrap();
    let c = mem.read_f32(pc, n).unwrap();
    for i in 0..n {
        assert_eq!(c[i], a[i] + b[i], "element {i}");
    }
    assert_eq!(stats.ctas, 3);
    assert_eq!(stats.warps, 12);
}

const SHFL: &str = r#"
.visible .entry shfl(.param .u64 out)
{
    .reg .pred %p<4>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<4>;

    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %laneid;
    mad.lo.u32 %r2, %r1, 3, 1;          // x = 3 * lane + 1

    // butterfly all-reduce
    mov.b32 %r3, %r2;
    shfl.sync.bfly.b32 %r4, %r3, 16, 0x1f, -1;
    add.u32 %r3, %r3, %r4;
    shfl.sync.bfly.b32 %r4, %r3, 8, 0x1f, -1;
    add.u32 %r3, %r3, %r4;
    shfl.sync.bfly.b32 %r4, %r3, 4, 0x1f, -1;
    add.u32 %r3, %r3, %r4;
    shfl.sync.bfly.b32 %r4, %r3, 2, 0x1f, -1;
    add.u32 %r3, %r3, %r4;
    shfl.sync.bfly.b32 %r4, %r3, 1, 0x1f, -1;
    add.u32 %r3, %r3, %r4;

    // down tree (lane 0 gets the total)
    mov.b32 %r5, %r2;
    shfl.sync.down.b32 %r6, %r5, 16, 31, 0xffffffff;
    add.u32 %r5, %r5, %r6;
    shfl.sync.down.b32 %r6, %r5, 8, 31, 0xffffffff;
    add.u32 %r5, %r5, %r6;
    shfl.sync.down.b32 %r6, %r5, 4, 31, 0xffffffff;
    add.u32 %r5, %r5, %r6;
    shfl.sync.down.b32 %r6, %r5, 2, 31, 0xffffffff;
    add.u32 %r5, %r5, %r6;
    shfl.sync.down.b32 %r6, %r5, 1, 31, 0xffffffff;
    add.u32 %r5, %r5, %r6;

    // inclusive scan with up and the in-range predicate
    mov.b32 %r7, %r2;
    shfl.sync.up.b32 %r8|%p1, %r7, 1, 0, -1;
    @%p1 add.u32 %r7, %r7, %r8;
    shfl.sync.up.b32 %r8|%p1, %r7, 2, 0, -1;
    @%p1 add.u32 %r7, %r7, %r8;
    shfl.sync.up.b32 %r8|%p1, %r7, 4, 0, -1;
    @%p1 add.u32 %r7, %r7, %r8;
    shfl.sync.up.b32 %r8|%p1, %r7, 8, 0, -1;
    @%p1 add.u32 %r7, %r7, %r8;
    shfl.sync.up.b32 %r8|%p1, %r7, 16, 0, -1;
    @%p1 add.u32 %r7, %r7, %r8;

    // idx broadcast of lane 5 within segments of 8 lanes
    shfl.sync.idx.b32 %r9, %r2, 5, 0x181f, -1;
    // down by 3 within segments of 8 lanes, with the in-range predicate
    shfl.sync.down.b32 %r10|%p2, %r2, 3, 0x181f, -1;
    selp.u32 %r11, 1, 0, %p2;
    // up by 3 with the full warp: predicate false below lane 3
    shfl.sync.up.b32 %r12|%p3, %r2, 3, 0, -1;
    selp.u32 %r13, 1, 0, %p3;

    mul.wide.u32 %rd2, %r1, 32;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r3, %r5, %r7, %r9};
    st.global.v4.u32 [%rd3+16], {%r10, %r11, %r12, %r13};
    ret;
}
"#;

#[test]
fn warp_shuffles_all_four_modes() {
    let m = module(SHFL);
    let mut mem = Memory::new();
    let out = mem.alloc(32 * 32);
    m.launch("shfl", dims((1, 1, 1), (32, 1, 1), 0), &[Param::Ptr(out)], &mut mem)
        .unwrap();
    let r = mem.read_u32(out, 32 * 8).unwrap();
    let x: Vec<u32> = (0..32).map(|l| 3 * l + 1).collect();
    let total: u32 = x.iter().sum();
    // CUDA's definition of __shfl_down_sync: an out-of-range source lane
    // gives the lane its own value (which the kernel then adds)
    let mut down = x.clone();
    for d in [16, 8, 4, 2, 1] {
        let prev = down.clone();
        for l in 0..32 {
            down[l] += if l + d < 32 { prev[l + d] } else { prev[l] };
        }
    }
    for l in 0..32usize {
        let row = &r[l * 8..l * 8 + 8];
        assert_eq!(row[0], total, "bfly lane {l}");
        assert_eq!(row[1], down[l], "down lane {l}");
        assert_eq!(row[2], x[..=l].iter().sum::<u32>(), "up scan lane {l}");
        assert_eq!(row[3], x[(l & !7) + 5], "idx lane {l}");
        let in_seg = l % 8 + 3 < 8;
        assert_eq!(row[4], if in_seg { x[l + 3] } else { x[l] }, "segmented down lane {l}");
        assert_eq!(row[5], u32::from(in_seg), "down predicate lane {l}");
        assert_eq!(row[6], if l >= 3 { x[l - 3] } else { x[l] }, "up lane {l}");
        assert_eq!(row[7], u32::from(l >= 3), "up predicate lane {l}");
    }
    assert_eq!(down[0], total);
}

const BLOCK_SUM: &str = r#"
.extern .shared .align 16 .b8 sdata[];

.visible .entry block_sum(.param .u64 in, .param .u64 out)
{
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mad.lo.u32 %r4, %r2, %r3, %r1;
    mul.wide.u32 %rd3, %r4, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.u32 %r5, [%rd4];
    mov.u32 %r6, sdata;
    shl.b32 %r7, %r1, 2;
    add.u32 %r8, %r6, %r7;              // &sdata[tid]
    st.shared.u32 [%r8], %r5;
    bar.sync 0;
    shr.u32 %r9, %r3, 1;                // s = ntid / 2
$L__loop:
    setp.ge.u32 %p1, %r1, %r9;
    @%p1 bra $L__skip;
    shl.b32 %r10, %r9, 2;
    add.u32 %r11, %r8, %r10;
    ld.shared.u32 %r12, [%r11];
    ld.shared.u32 %r13, [%r8];
    add.u32 %r13, %r13, %r12;
    st.shared.u32 [%r8], %r13;
$L__skip:
    bar.sync 0;
    shr.u32 %r9, %r9, 1;
    setp.ne.u32 %p2, %r9, 0;
    @%p2 bra $L__loop;
    setp.ne.u32 %p3, %r1, 0;
    @%p3 bra $L__end;
    ld.shared.u32 %r14, [sdata];
    mul.wide.u32 %rd5, %r2, 4;
    add.s64 %rd6, %rd2, %rd5;
    st.global.u32 [%rd6], %r14;
$L__end:
    ret;
}
"#;

#[test]
fn block_reduction_with_shared_memory_and_barriers() {
    let m = module(BLOCK_SUM);
    let (blocks, threads) = (4usize, 256usize);
    let data: Vec<u32> = (0..blocks * threads).map(|i| (i as u32 * 7919) % 1000).collect();
    let mut mem = Memory::new();
    let pin = mem.alloc_u32(&data);
    let pout = mem.alloc(blocks * 4);
    let stats = m
        .launch(
            "block_sum",
            dims((blocks as u32, 1, 1), (threads as u32, 1, 1), 1024),
            &[Param::Ptr(pin), Param::Ptr(pout)],
            &mut mem,
        )
        .unwrap();
    let got = mem.read_u32(pout, blocks).unwrap();
    for b in 0..blocks {
        assert_eq!(
            got[b],
            data[b * threads..(b + 1) * threads].iter().sum::<u32>(),
            "block {b}"
        );
    }
    // one barrier after the stores and one per halving step (8), per CTA
    assert_eq!(stats.barriers, blocks as u64 * 9);
    // without the dynamic shared memory the stores fault
    let err = m
        .launch(
            "block_sum",
            dims((1, 1, 1), (256, 1, 1), 0),
            &[Param::Ptr(pin), Param::Ptr(pout)],
            &mut mem,
        )
        .unwrap_err();
    assert!(matches!(err, EmuError::Fault { .. }), "{err}");
    assert!(err.to_string().contains("shared access"), "{err}");
}

const DIVERGE: &str = r#"
.visible .entry diverge(.param .u64 out)
{
    .reg .pred %p<4>;
    .reg .b32 %r<20>;
    .reg .b64 %rd<4>;

    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %laneid;
    and.b32 %r2, %r1, 1;
    setp.eq.u32 %p1, %r2, 0;
    @%p1 bra $EVEN;
    add.u32 %r3, %r1, 100;              // odd lanes
    bra.uni $JOIN;
$EVEN:
    shl.b32 %r3, %r1, 1;                // even lanes
$JOIN:
    // needs the whole warp converged again
    shfl.sync.bfly.b32 %r4, %r3, 1, 31, -1;

    // a loop whose trip count is lane % 5 + lane / 8, with a nested branch
    rem.u32 %r5, %r1, 5;
    shr.u32 %r6, %r1, 3;
    add.u32 %r5, %r5, %r6;
    mov.u32 %r7, 0;                     // i
    mov.u32 %r8, 0;                     // acc
$LOOP:
    setp.ge.u32 %p2, %r7, %r5;
    @%p2 bra $END;
    mad.lo.u32 %r8, %r7, %r1, %r8;
    add.u32 %r8, %r8, 1;
    and.b32 %r9, %r7, 1;
    setp.eq.u32 %p3, %r9, 0;
    @%p3 bra $NEXT;
    add.u32 %r8, %r8, 1000;
$NEXT:
    add.u32 %r7, %r7, 1;
    bra $LOOP;
$END:
    // converged again: broadcast lane 31's accumulator
    shfl.sync.idx.b32 %r10, %r8, 31, 31, -1;
    activemask.b32 %r11;
    mul.wide.u32 %rd2, %r1, 16;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r3, %r4, %r8, %r10};
    ret;
}
"#;

#[test]
fn divergence_and_reconvergence() {
    let m = module(DIVERGE);
    let mut mem = Memory::new();
    let out = mem.alloc(32 * 16);
    m.launch("diverge", dims((1, 1, 1), (32, 1, 1), 0), &[Param::Ptr(out)], &mut mem)
        .unwrap();
    let r = mem.read_u32(out, 32 * 4).unwrap();
    let v = |l: u32| if l.is_multiple_of(2) { 2 * l } else { l + 100 };
    let acc = |l: u32| {
        let mut a = 0;
        for i in 0..(l % 5 + l / 8) {
            a += i * l + 1;
            if i % 2 == 1 {
                a += 1000;
            }
        }
        a
    };
    for l in 0..32u32 {
        let row = &r[l as usize * 4..l as usize * 4 + 4];
        assert_eq!(row[0], v(l), "if/else lane {l}");
        assert_eq!(row[1], v(l ^ 1), "shuffle after the join, lane {l}");
        assert_eq!(row[2], acc(l), "loop lane {l}");
        assert_eq!(row[3], acc(31), "broadcast after the loop, lane {l}");
    }
}

const CP_ASYNC: &str = r#"
.shared .align 16 .b8 buf[64];
.shared .align 16 .b8 buf2[64];

.visible .entry cpa(.param .u64 src, .param .u64 out)
{
    .reg .b32 %r<40>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [src];
    ld.param.u64 %rd2, [out];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 4;                // t * 16
    mov.u32 %r3, buf;
    add.u32 %r4, %r3, %r2;              // &buf[t*16]
    mov.u32 %r5, buf2;
    add.u32 %r6, %r5, %r2;              // &buf2[t*16]
    st.shared.v4.b32 [%r4], {0x77777777, 0x77777777, 0x77777777, 0x77777777};
    st.shared.v4.b32 [%r6], {0x55555555, 0x55555555, 0x55555555, 0x55555555};
    bar.sync 0;
    cvt.u64.u32 %rd3, %r2;
    add.s64 %rd4, %rd1, %rd3;           // src + t*16
    mul.wide.u32 %rd5, %r1, 64;
    add.s64 %rd6, %rd2, %rd5;           // out + t*64

    cp.async.ca.shared.global [%r4], [%rd4], 16;
    cp.async.commit_group;
    ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r4];   // before the wait: old data
    cp.async.wait_group 0;
    ld.shared.v4.u32 {%r14, %r15, %r16, %r17}, [%r4];   // after: the copy
    st.global.v4.u32 [%rd6], {%r10, %r11, %r12, %r13};
    st.global.v4.u32 [%rd6+16], {%r14, %r15, %r16, %r17};

    // zero fill: 8 of 16 bytes from the source
    cp.async.cg.shared.global [%r4], [%rd4+64], 16, 8;
    cp.async.wait_all;
    ld.shared.v4.u32 {%r18, %r19, %r20, %r21}, [%r4];
    st.global.v4.u32 [%rd6+32], {%r18, %r19, %r20, %r21};

    // two groups; wait_group 1 retires only the older one
    cp.async.ca.shared.global [%r4], [%rd4+128], 8;
    cp.async.commit_group;
    cp.async.ca.shared.global [%r6], [%rd4+192], 4;
    cp.async.commit_group;
    cp.async.wait_group 1;
    ld.shared.u32 %r22, [%r4];          // first group: new
    ld.shared.u32 %r23, [%r6];          // second group: still old
    cp.async.wait_group 0;
    ld.shared.u32 %r24, [%r6];          // now new
    ld.shared.u32 %r25, [%r4+8];        // beyond the 8-byte copy: the zero fill from before
    st.global.v4.u32 [%rd6+48], {%r22, %r23, %r24, %r25};
    ret;
}
"#;

#[test]
fn cp_async_is_deferred_until_the_wait() {
    let m = module(CP_ASYNC);
    let src: Vec<u32> = (0..64).map(|i| 0x1000 + i).collect();
    let mut mem = Memory::new();
    let psrc = mem.alloc_u32(&src);
    let threads = 4usize;
    let out = mem.alloc(threads * 64);
    m.launch(
        "cpa",
        dims((1, 1, 1), (threads as u32, 1, 1), 0),
        &[Param::Ptr(psrc), Param::Ptr(out)],
        &mut mem,
    )
    .unwrap();
    let r = mem.read_u32(out, threads * 16).unwrap();
    for t in 0..threads {
        let row = &r[t * 16..t * 16 + 16];
        assert_eq!(
            &row[0..4],
            &[0x7777_7777; 4],
            "thread {t} reads stale data before the wait"
        );
        assert_eq!(&row[4..8], &src[t * 4..t * 4 + 4], "thread {t} after the wait");
        let w = 16 + t * 4;
        assert_eq!(&row[8..12], &[src[w], src[w + 1], 0, 0], "thread {t} zero fill");
        assert_eq!(row[12], src[32 + t * 4], "thread {t}: older group retired");
        assert_eq!(row[13], 0x5555_5555, "thread {t}: newer group still pending");
        assert_eq!(row[14], src[48 + t * 4], "thread {t}: newer group after wait_group 0");
        assert_eq!(row[15], 0, "thread {t}: bytes 8..12 keep the earlier zero fill");
    }
}

const LDMATRIX: &str = r#"
.shared .align 16 .b16 tile[256];

.visible .entry ldm(.param .u64 in, .param .u64 out)
{
    .reg .pred %p<3>;
    .reg .b32 %r<40>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out];
    mov.u32 %r1, %laneid;
    // logical row R is stored at slot (5R + 3) % 32
    mad.lo.u32 %r2, %r1, 5, 3;
    and.b32 %r2, %r2, 31;
    shl.b32 %r3, %r2, 4;
    mov.u32 %r4, tile;
    add.u32 %r5, %r4, %r3;              // &slot(lane)
    mul.wide.u32 %rd3, %r1, 16;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.v4.u32 {%r6, %r7, %r8, %r9}, [%rd4];
    st.shared.v4.u32 [%r5], {%r6, %r7, %r8, %r9};
    bar.warp.sync -1;

    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r10, %r11, %r12, %r13}, [%r5];
    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r14, %r15, %r16, %r17}, [%r5];
    // lanes 16..31 (x2) and 8..31 (x1) give addresses that are not used
    setp.ge.u32 %p1, %r1, 16;
    selp.u32 %r18, 0xfffff0, %r5, %p1;
    ldmatrix.sync.aligned.m8n8.x2.shared::cta.b16 {%r19, %r20}, [%r18];
    setp.ge.u32 %p2, %r1, 8;
    selp.u32 %r21, 0xfffff0, %r5, %p2;
    ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%r22}, [%r21];

    mul.wide.u32 %rd5, %r1, 48;
    add.s64 %rd6, %rd2, %rd5;
    st.global.v4.u32 [%rd6], {%r10, %r11, %r12, %r13};
    st.global.v4.u32 [%rd6+16], {%r14, %r15, %r16, %r17};
    st.global.v4.u32 [%rd6+32], {%r19, %r20, %r22, 0};
    ret;
}
"#;

/// Where element `(row, col)` of an 8x8 matrix lands per the ISA's ldmatrix
/// figure: thread `4*row + col/2` holds it, in the low half when `col` is
/// even; with `.trans` the matrix is read column-major.
fn ldmatrix_expect(m: &[[u16; 8]; 8], trans: bool) -> [u32; 32] {
    let mut regs = [0u32; 32];
    for (row, cols) in m.iter().enumerate() {
        for (col, &v) in cols.iter().enumerate() {
            let (r, c) = if trans { (col, row) } else { (row, col) };
            let lane = 4 * r + c / 2;
            regs[lane] |= u32::from(v) << (16 * (c % 2));
        }
    }
    regs
}

#[test]
fn ldmatrix_x4_trans_x2_x1_follow_the_isa_mapping() {
    let m = module(LDMATRIX);
    let val = |r: usize, c: usize| (r * 8 + c + 1) as u16;
    let data: Vec<u16> = (0..32).flat_map(|r| (0..8).map(move |c| val(r, c))).collect();
    let mut mem = Memory::new();
    let pin = mem.alloc_bf16_bits(&data);
    let out = mem.alloc(32 * 48);
    m.launch(
        "ldm",
        dims((1, 1, 1), (32, 1, 1), 0),
        &[Param::Ptr(pin), Param::Ptr(out)],
        &mut mem,
    )
    .unwrap();
    let r = mem.read_u32(out, 32 * 12).unwrap();
    let mat = |k: usize| {
        let mut a = [[0u16; 8]; 8];
        for (i, row) in a.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = val(8 * k + i, j);
            }
        }
        a
    };
    for k in 0..4 {
        let plain = ldmatrix_expect(&mat(k), false);
        let trans = ldmatrix_expect(&mat(k), true);
        for l in 0..32 {
            assert_eq!(r[l * 12 + k], plain[l], "x4 matrix {k} lane {l}");
            assert_eq!(r[l * 12 + 4 + k], trans[l], "x4.trans matrix {k} lane {l}");
            if k < 2 {
                assert_eq!(r[l * 12 + 8 + k], plain[l], "x2 matrix {k} lane {l}");
            }
            if k == 0 {
                assert_eq!(r[l * 12 + 10], trans[l], "x1.trans lane {l}");
            }
        }
    }
    // spot-check the figure: thread 5 holds row 1, columns 2 and 3
    assert_eq!(r[5 * 12], u32::from(val(1, 2)) | (u32::from(val(1, 3)) << 16));
}

const MMA: &str = r#"
.shared .align 16 .b8 sA[512];
.shared .align 16 .b8 sW[256];
.shared .align 16 .b8 sB[256];

// D = A (16x16, row-major) x B + C; B given both as W = B^T (8x16, row-major,
// ldmatrix without .trans) and as B (16x8, row-major, ldmatrix .trans).
.visible .entry mma16816(.param .u64 pa, .param .u64 pw, .param .u64 pb, .param .u64 pc, .param .u64 out1, .param .u64 out2)
{
    .reg .pred %p<2>;
    .reg .b32 %r<64>;
    .reg .f32 %f<32>;
    .reg .b64 %rd<32>;

    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pw];
    ld.param.u64 %rd3, [pb];
    ld.param.u64 %rd4, [pc];
    mov.u32 %r1, %laneid;
    mul.wide.u32 %rd5, %r1, 16;
    // A: 32 chunks of 16 bytes
    add.s64 %rd6, %rd1, %rd5;
    ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd6];
    mov.u32 %r6, sA;
    shl.b32 %r7, %r1, 4;
    add.u32 %r8, %r6, %r7;
    st.shared.v4.u32 [%r8], {%r2, %r3, %r4, %r5};
    // W and B: 16 chunks each
    setp.lt.u32 %p1, %r1, 16;
    @!%p1 bra $SKIP;
    add.s64 %rd7, %rd2, %rd5;
    ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd7];
    mov.u32 %r9, sW;
    add.u32 %r10, %r9, %r7;
    st.shared.v4.u32 [%r10], {%r2, %r3, %r4, %r5};
    add.s64 %rd8, %rd3, %rd5;
    ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd8];
    mov.u32 %r11, sB;
    add.u32 %r12, %r11, %r7;
    st.shared.v4.u32 [%r12], {%r2, %r3, %r4, %r5};
$SKIP:
    bar.sync 0;

    // C fragment: c0,c1 at (g, 2t..2t+1), c2,c3 at (g+8, 2t..2t+1)
    shr.u32 %r13, %r1, 2;               // g
    and.b32 %r14, %r1, 3;               // t
    shl.b32 %r15, %r14, 1;              // 2t
    mad.lo.u32 %r16, %r13, 8, %r15;     // g*8 + 2t
    mul.wide.u32 %rd9, %r16, 4;
    add.s64 %rd10, %rd4, %rd9;
    ld.global.v2.f32 {%f1, %f2}, [%rd10];
    ld.global.v2.f32 {%f3, %f4}, [%rd10+256];

    // A fragment: lane l addresses row l % 16, column block l / 16
    and.b32 %r17, %r1, 15;
    shr.u32 %r18, %r1, 4;
    shl.b32 %r19, %r17, 5;
    shl.b32 %r20, %r18, 4;
    add.u32 %r21, %r6, %r19;
    add.u32 %r21, %r21, %r20;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r22, %r23, %r24, %r25}, [%r21];

    // B from W: lanes 0-7 address n = l, k 0..7; lanes 8-15 n = l - 8, k 8..15
    and.b32 %r26, %r1, 7;
    shr.u32 %r27, %r1, 3;
    and.b32 %r27, %r27, 1;
    shl.b32 %r28, %r26, 5;
    shl.b32 %r29, %r27, 4;
    mov.u32 %r9, sW;
    add.u32 %r30, %r9, %r28;
    add.u32 %r30, %r30, %r29;
    ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%r31, %r32}, [%r30];
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r22, %r23, %r24, %r25}, {%r31, %r32}, {%f1, %f2, %f3, %f4};

    // B with .trans: lanes 0-15 address row k = l
    shl.b32 %r33, %r17, 4;
    mov.u32 %r11, sB;
    add.u32 %r34, %r11, %r33;
    ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r35, %r36}, [%r34];
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f9, %f10, %f11, %f12}, {%r22, %r23, %r24, %r25}, {%r35, %r36}, {%f1, %f2, %f3, %f4};

    ld.param.u64 %rd11, [out1];
    ld.param.u64 %rd12, [out2];
    add.s64 %rd13, %rd11, %rd9;
    st.global.v2.f32 [%rd13], {%f5, %f6};
    st.global.v2.f32 [%rd13+256], {%f7, %f8};
    add.s64 %rd14, %rd12, %rd9;
    st.global.v2.f32 [%rd14], {%f9, %f10};
    st.global.v2.f32 [%rd14+256], {%f11, %f12};
    ret;
}
"#;

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16_to_f32(bf16_from_f32(x))).collect()
}

#[test]
fn mma_m16n8k16_with_ldmatrix_fragments_matches_a_cpu_matmul() {
    let m = module(MMA);
    let mut rng = Rng(0x1234_5678);
    let a = round_bf16(&(0..256).map(|_| rng.f32()).collect::<Vec<_>>());
    let b = round_bf16(&(0..128).map(|_| rng.f32()).collect::<Vec<_>>()); // [k][n]
    let c: Vec<f32> = (0..128).map(|_| rng.f32()).collect();
    let w: Vec<f32> = (0..128).map(|i| b[(i % 16) * 8 + i / 16]).collect(); // [n][k]
    let mut mem = Memory::new();
    let pa = mem.alloc_bf16(&a);
    let pw = mem.alloc_bf16(&w);
    let pb = mem.alloc_bf16(&b);
    let pc = mem.alloc_f32(&c);
    let o1 = mem.alloc(128 * 4);
    let o2 = mem.alloc(128 * 4);
    let params = [pa, pw, pb, pc, o1, o2].map(Param::Ptr);
    m.launch("mma16816", dims((1, 1, 1), (32, 1, 1), 0), &params, &mut mem)
        .unwrap();
    let d1 = mem.read_f32(o1, 128).unwrap();
    let d2 = mem.read_f32(o2, 128).unwrap();
    for i in 0..16 {
        for j in 0..8 {
            let mut acc = f64::from(c[i * 8 + j]);
            for k in 0..16 {
                acc += f64::from(a[i * 16 + k]) * f64::from(b[k * 8 + j]);
            }
            let want = acc as f32;
            assert!(
                (d1[i * 8 + j] - want).abs() <= 1e-6 * want.abs().max(1.0),
                "W path ({i},{j}): {} vs {want}",
                d1[i * 8 + j]
            );
            assert_eq!(d1[i * 8 + j], d2[i * 8 + j], "trans path ({i},{j})");
        }
    }
}

/// A tiled GEMM `C[M][N] = A[M][K] · W[N][K]^T` (bf16 in, f32 out) in the
/// shape an sm_80 generator emits: 128 threads, a 64x64 CTA tile, 2x2 warps
/// of 32x32, BK = 32 in two cp.async stages (rows padded to 80 bytes),
/// ldmatrix.x4 fragments and 8 mma.m16n8k16 per warp per k16 step.
fn gemm_ptx() -> String {
    let mut s = String::new();
    s.push_str(
        r#"
.shared .align 16 .b8 sA[10240];
.shared .align 16 .b8 sB[10240];

.visible .entry gemm(.param .u64 pa, .param .u64 pw, .param .u64 pc, .param .u32 pN, .param .u32 pK)
.maxntid 128, 1, 1
{
    .reg .pred %p<4>;
    .reg .b32 %r<80>;
    .reg .f32 %acc<32>;
    .reg .b32 %a<8>;
    .reg .b32 %b<8>;
    .reg .b64 %rd<24>;

    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pw];
    ld.param.u64 %rd3, [pc];
    ld.param.u32 %r1, [pN];
    ld.param.u32 %r2, [pK];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    mov.u32 %r3, %tid.x;
    shr.u32 %r4, %r3, 5;                // warp
    and.b32 %r5, %r3, 31;               // lane
    shr.u32 %r6, %r4, 1;                // warp_m
    and.b32 %r7, %r4, 1;                // warp_n
    mov.u32 %r8, %ctaid.y;
    shl.b32 %r8, %r8, 6;                // row0
    mov.u32 %r9, %ctaid.x;
    shl.b32 %r9, %r9, 6;                // col0
    shr.u32 %r10, %r2, 5;               // KT = K / 32
    mov.u32 %r11, sA;
    mov.u32 %r12, sB;

    // this thread's two 16-byte chunks per operand: chunk c -> row c / 4, k (c % 4) * 8
    // chunk 0: c = tid, chunk 1: c = tid + 128 (row + 32)
    shr.u32 %r13, %r3, 2;               // row of chunk 0
    and.b32 %r14, %r3, 3;
    shl.b32 %r14, %r14, 3;              // k offset (elements)
    mad.lo.u32 %r15, %r13, 80, 0;
    shl.b32 %r16, %r14, 1;
    add.u32 %r15, %r15, %r16;           // shared byte offset of chunk 0 within a stage
    // global element offsets of chunk 0 (k-tile 0): (row0 + row) * K + k
    add.u32 %r17, %r8, %r13;
    mad.lo.u32 %r18, %r17, %r2, %r14;   // A
    add.u32 %r19, %r9, %r13;
    mad.lo.u32 %r20, %r19, %r2, %r14;   // W
    mul.wide.u32 %rd4, %r18, 2;
    add.s64 %rd4, %rd1, %rd4;           // &A chunk 0
    mul.wide.u32 %rd5, %r20, 2;
    add.s64 %rd5, %rd2, %rd5;           // &W chunk 0
    shl.b32 %r21, %r2, 6;               // 32 rows * K * 2 bytes: chunk 1 is 32 rows further
    cvt.u64.u32 %rd6, %r21;

    // zero the accumulators
"#,
    );
    for i in 0..32 {
        s.push_str(&format!("    mov.f32 %acc{i}, 0f00000000;\n"));
    }
    let load_stage = |s: &mut String, kt: &str, guard: &str| {
        s.push_str(&format!(
            r#"
    and.b32 %r30, {kt}, 1;
    mul.lo.u32 %r31, %r30, 5120;        // stage offset
    add.u32 %r32, %r31, %r15;
    add.u32 %r33, %r11, %r32;           // sA dst chunk 0
    add.u32 %r34, %r12, %r32;           // sB dst chunk 0
    shl.b32 %r35, {kt}, 6;              // kt * 32 elements * 2 bytes
    cvt.u64.u32 %rd7, %r35;
    add.s64 %rd8, %rd4, %rd7;
    add.s64 %rd9, %rd5, %rd7;
    add.s64 %rd10, %rd8, %rd6;
    add.s64 %rd11, %rd9, %rd6;
    {guard}cp.async.cg.shared.global [%r33], [%rd8], 16;
    {guard}cp.async.cg.shared.global [%r33+2560], [%rd10], 16;
    {guard}cp.async.cg.shared.global [%r34], [%rd9], 16;
    {guard}cp.async.cg.shared.global [%r34+2560], [%rd11], 16;
    cp.async.commit_group;
"#
        ));
    };
    s.push_str("    mov.u32 %r40, 0;                    // kt\n");
    load_stage(&mut s, "%r40", "");
    // ldmatrix lane addressing (within a stage, for kk = 0)
    s.push_str(
        r#"
    // A: row warp_m*32 + mi*16 + (lane & 15), k (lane >> 4) * 8
    and.b32 %r41, %r5, 15;
    shl.b32 %r42, %r6, 5;
    add.u32 %r41, %r41, %r42;
    mul.lo.u32 %r43, %r41, 80;
    shr.u32 %r44, %r5, 4;
    shl.b32 %r44, %r44, 4;
    add.u32 %r43, %r43, %r44;           // A lane offset (mi = 0)
    // B: n warp_n*32 + p*16 + (lane & 7) + (lane >> 4) * 8, k ((lane >> 3) & 1) * 8
    and.b32 %r45, %r5, 7;
    shr.u32 %r46, %r5, 4;
    shl.b32 %r46, %r46, 3;
    add.u32 %r45, %r45, %r46;
    shl.b32 %r47, %r7, 5;
    add.u32 %r45, %r45, %r47;
    mul.lo.u32 %r48, %r45, 80;
    shr.u32 %r49, %r5, 3;
    and.b32 %r49, %r49, 1;
    shl.b32 %r49, %r49, 4;
    add.u32 %r48, %r48, %r49;           // B lane offset (p = 0)

$L__ktile:
    add.u32 %r50, %r40, 1;
    setp.lt.u32 %p1, %r50, %r10;
"#,
    );
    load_stage(&mut s, "%r50", "@%p1 ");
    s.push_str(
        r#"
    cp.async.wait_group 1;
    bar.sync 0;
    and.b32 %r51, %r40, 1;
    mul.lo.u32 %r52, %r51, 5120;
    add.u32 %r53, %r11, %r52;
    add.u32 %r53, %r53, %r43;           // A ldmatrix address, mi = 0, kk = 0
    add.u32 %r54, %r12, %r52;
    add.u32 %r54, %r54, %r48;           // B ldmatrix address, p = 0, kk = 0
"#,
    );
    for kk in [0u32, 32] {
        for mi in 0..2u32 {
            let off = kk + mi * 16 * 80;
            s.push_str(&format!(
                "    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%a{}, %a{}, %a{}, %a{}}}, [%r53+{off}];\n",
                mi * 4,
                mi * 4 + 1,
                mi * 4 + 2,
                mi * 4 + 3
            ));
        }
        for p in 0..2u32 {
            let off = kk + p * 16 * 80;
            s.push_str(&format!(
                "    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%b{}, %b{}, %b{}, %b{}}}, [%r54+{off}];\n",
                p * 4,
                p * 4 + 1,
                p * 4 + 2,
                p * 4 + 3
            ));
        }
        for mi in 0..2u32 {
            for ni in 0..4u32 {
                let acc = (mi * 4 + ni) * 4;
                // n-tile ni: b regs (p = ni / 2): b0 = %b[p*4 + (ni%2)*2], b1 = +1
                let b0 = (ni / 2) * 4 + (ni % 2) * 2;
                s.push_str(&format!(
                    "    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{%acc{a0}, %acc{a1}, %acc{a2}, %acc{a3}}}, \
                     {{%a{x0}, %a{x1}, %a{x2}, %a{x3}}}, {{%b{b0}, %b{b1}}}, {{%acc{a0}, %acc{a1}, %acc{a2}, %acc{a3}}};\n",
                    a0 = acc,
                    a1 = acc + 1,
                    a2 = acc + 2,
                    a3 = acc + 3,
                    x0 = mi * 4,
                    x1 = mi * 4 + 1,
                    x2 = mi * 4 + 2,
                    x3 = mi * 4 + 3,
                    b1 = b0 + 1,
                ));
            }
        }
    }
    s.push_str(
        r#"
    bar.sync 0;
    mov.u32 %r40, %r50;
    setp.lt.u32 %p2, %r40, %r10;
    @%p2 bra $L__ktile;
    cp.async.wait_all;

    // epilogue: row = row0 + warp_m*32 + mi*16 + g (+8), col = col0 + warp_n*32 + ni*8 + 2t
    shr.u32 %r60, %r5, 2;
    and.b32 %r61, %r5, 3;
    shl.b32 %r61, %r61, 1;
    shl.b32 %r62, %r6, 5;
    add.u32 %r63, %r8, %r62;
    add.u32 %r63, %r63, %r60;           // row for mi = 0
    shl.b32 %r64, %r7, 5;
    add.u32 %r65, %r9, %r64;
    add.u32 %r65, %r65, %r61;           // col for ni = 0
    mad.lo.u32 %r66, %r63, %r1, %r65;
    mul.wide.u32 %rd12, %r66, 4;
    add.s64 %rd13, %rd3, %rd12;         // &C[row][col]
    shl.b32 %r67, %r1, 5;               // 8 rows in bytes
    cvt.u64.u32 %rd14, %r67;
    shl.b32 %r68, %r1, 6;               // 16 rows in bytes
    cvt.u64.u32 %rd15, %r68;
"#,
    );
    for mi in 0..2u32 {
        if mi == 1 {
            s.push_str("    add.s64 %rd13, %rd13, %rd15;\n");
        }
        s.push_str("    add.s64 %rd16, %rd13, %rd14;\n");
        for ni in 0..4u32 {
            let acc = (mi * 4 + ni) * 4;
            let off = ni * 32;
            s.push_str(&format!(
                "    st.global.v2.f32 [%rd13+{off}], {{%acc{}, %acc{}}};\n    st.global.v2.f32 [%rd16+{off}], {{%acc{}, %acc{}}};\n",
                acc,
                acc + 1,
                acc + 2,
                acc + 3
            ));
        }
    }
    s.push_str("    ret;\n}\n");
    s
}

fn run_gemm(m: &Module, mm: usize, n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f64>, std::time::Duration) {
    let mut rng = Rng(seed);
    let a = round_bf16(&(0..mm * k).map(|_| rng.f32()).collect::<Vec<_>>());
    let w = round_bf16(&(0..n * k).map(|_| rng.f32()).collect::<Vec<_>>());
    let mut mem = Memory::new();
    let pa = mem.alloc_bf16(&a);
    let pw = mem.alloc_bf16(&w);
    let pc = mem.alloc(mm * n * 4);
    let params = [
        Param::Ptr(pa),
        Param::Ptr(pw),
        Param::Ptr(pc),
        Param::U32(n as u32),
        Param::U32(k as u32),
    ];
    let t = Instant::now();
    m.launch(
        "gemm",
        dims(((n / 64) as u32, (mm / 64) as u32, 1), (128, 1, 1), 0),
        &params,
        &mut mem,
    )
    .unwrap();
    let dt = t.elapsed();
    let c = mem.read_f32(pc, mm * n).unwrap();
    let mut want = vec![0f64; mm * n];
    for i in 0..mm {
        for j in 0..n {
            want[i * n + j] = (0..k).map(|x| f64::from(a[i * k + x]) * f64::from(w[j * k + x])).sum();
        }
    }
    (c, want, dt)
}

#[test]
fn tiled_mma_gemm_64x64x64_and_larger() {
    let text = gemm_ptx();
    let m = module(&text);
    for (mm, n, k) in [(64, 64, 64), (128, 128, 64), (64, 128, 160)] {
        let (c, want, dt) = run_gemm(&m, mm, n, k, 42 + k as u64);
        for (i, (&g, &w)) in c.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{mm}x{n}x{k} C[{}][{}]: {g} vs {w}",
                i / n,
                i % n
            );
        }
        eprintln!("emulated {mm}x{n}x{k} mma GEMM in {dt:?}");
        if (mm, n, k) == (64, 64, 64) {
            assert!(dt.as_secs_f64() < 2.0, "the 64x64x64 GEMM took {dt:?}");
        }
    }
}

const CVT_BF16: &str = r#"
.visible .entry cvt_bf16(.param .u64 in, .param .u64 out16, .param .u64 back, .param .u64 pairs, .param .u32 n)
{
    .reg .pred %p<3>;
    .reg .b16 %rs<4>;
    .reg .b32 %r<10>;
    .reg .f32 %f<6>;
    .reg .b64 %rd<16>;

    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [out16];
    ld.param.u64 %rd3, [back];
    ld.param.u64 %rd4, [pairs];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %tid.x;
    mad.lo.u32 %r4, %r2, 256, %r3;
    setp.ge.u32 %p1, %r4, %r1;
    @%p1 bra $END;
    mul.wide.u32 %rd5, %r4, 4;
    add.s64 %rd6, %rd1, %rd5;
    ld.global.f32 %f1, [%rd6];
    cvt.rn.bf16.f32 %rs1, %f1;
    mul.wide.u32 %rd7, %r4, 2;
    add.s64 %rd8, %rd2, %rd7;
    st.global.b16 [%rd8], %rs1;
    cvt.f32.bf16 %f2, %rs1;
    add.s64 %rd9, %rd3, %rd5;
    st.global.f32 [%rd9], %f2;
    // even threads pack (x[i+1], x[i]) with a in the upper half
    and.b32 %r5, %r4, 1;
    setp.ne.u32 %p2, %r5, 0;
    @%p2 bra $END;
    ld.global.f32 %f3, [%rd6+4];
    cvt.rn.bf16x2.f32 %r6, %f3, %f1;
    shr.u32 %r7, %r4, 1;
    mul.wide.u32 %rd10, %r7, 4;
    add.s64 %rd11, %rd4, %rd10;
    st.global.b32 [%rd11], %r6;
$END:
    ret;
}
"#;

#[test]
fn cvt_rn_bf16_is_bit_exact_round_to_nearest_even() {
    let m = module(CVT_BF16);
    let mut rng = Rng(0xdead_beef);
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::from_bits(0x3f80_8000), // tie, even: stays
        f32::from_bits(0x3f81_8000), // tie, odd: rounds up
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x3f80_7fff),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x0000_8000),
        f32::from_bits(0x0001_8000),
        f32::from_bits(0x7f7f_8000),
        65504.0,
        1e-40,
    ];
    while xs.len() < 4096 {
        let b = rng.next() as u32;
        let x = f32::from_bits(b);
        if !x.is_nan() {
            xs.push(x);
        }
    }
    let n = xs.len();
    let mut mem = Memory::new();
    let pin = mem.alloc_f32(&xs);
    let p16 = mem.alloc(n * 2);
    let pback = mem.alloc(n * 4);
    let ppairs = mem.alloc(n * 2);
    let params = [
        Param::Ptr(pin),
        Param::Ptr(p16),
        Param::Ptr(pback),
        Param::Ptr(ppairs),
        Param::U32(n as u32),
    ];
    m.launch(
        "cvt_bf16",
        dims((n.div_ceil(256) as u32, 1, 1), (256, 1, 1), 0),
        &params,
        &mut mem,
    )
    .unwrap();
    let bits = mem.read_bf16_bits(p16, n).unwrap();
    let back = mem.read_f32(pback, n).unwrap();
    let pairs = mem.read_u32(ppairs, n / 2).unwrap();
    for (i, &x) in xs.iter().enumerate() {
        let want = half::bf16::from_f32(x).to_bits();
        assert_eq!(bits[i], want, "cvt.rn.bf16.f32 of {x:e} ({:#010x})", x.to_bits());
        assert_eq!(bf16_from_f32(x), want, "host helper on {x:e}");
        assert_eq!(
            back[i].to_bits(),
            half::bf16::from_bits(want).to_f32().to_bits(),
            "cvt.f32.bf16 of {want:#06x}"
        );
    }
    for (j, &p) in pairs.iter().enumerate() {
        let lo = half::bf16::from_f32(xs[2 * j]).to_bits();
        let hi = half::bf16::from_f32(xs[2 * j + 1]).to_bits();
        assert_eq!(p, (u32::from(hi) << 16) | u32::from(lo), "cvt.rn.bf16x2.f32 pair {j}");
    }
    // NaN becomes the canonical bf16 NaN
    let nan_in = mem.alloc_f32(&[f32::NAN, -f32::NAN]);
    let nan16 = mem.alloc(4);
    let nanback = mem.alloc(8);
    let nanpairs = mem.alloc(4);
    let params = [
        Param::Ptr(nan_in),
        Param::Ptr(nan16),
        Param::Ptr(nanback),
        Param::Ptr(nanpairs),
        Param::U32(2),
    ];
    m.launch("cvt_bf16", dims((1, 1, 1), (32, 1, 1), 0), &params, &mut mem)
        .unwrap();
    assert_eq!(mem.read_bf16_bits(nan16, 2).unwrap(), vec![0x7fff, 0x7fff]);
}

const CVT_INT: &str = r#"
.visible .entry cvt_int(.param .u64 in, .param .u64 ints, .param .u64 out)
{
    .reg .b32 %r<24>;
    .reg .f32 %f<12>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [in];
    ld.param.u64 %rd2, [ints];
    ld.param.u64 %rd3, [out];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    ld.global.f32 %f1, [%rd5];
    cvt.rni.s32.f32 %r2, %f1;
    cvt.rzi.s32.f32 %r3, %f1;
    cvt.rmi.s32.f32 %r4, %f1;
    cvt.rpi.s32.f32 %r5, %f1;
    cvt.rzi.u32.f32 %r6, %f1;
    cvt.rni.f32.f32 %f2, %f1;
    mov.b32 %r7, %f2;
    cvt.rzi.s16.f32 %r8, %f1;
    add.s64 %rd6, %rd2, %rd4;
    ld.global.s32 %r9, [%rd6];
    cvt.rn.f32.s32 %f3, %r9;
    cvt.rz.f32.s32 %f4, %r9;
    cvt.rm.f32.s32 %f5, %r9;
    cvt.rp.f32.s32 %f6, %r9;
    cvt.s8.s32 %r10, %r9;
    cvt.sat.s8.s32 %r11, %r9;
    cvt.u16.u32 %r12, %r9;
    cvt.s64.s32 %rd7, %r9;
    mul.wide.u32 %rd8, %r1, 64;
    add.s64 %rd9, %rd3, %rd8;
    st.global.v4.u32 [%rd9], {%r2, %r3, %r4, %r5};
    st.global.v4.u32 [%rd9+16], {%r6, %r7, %r8, %r10};
    st.global.v4.f32 [%rd9+32], {%f3, %f4, %f5, %f6};
    st.global.v2.u32 [%rd9+48], {%r11, %r12};
    st.global.u64 [%rd9+56], %rd7;
    ret;
}
"#;

#[test]
fn cvt_integer_float_rounding_and_saturation() {
    let m = module(CVT_INT);
    let fs: Vec<f32> = vec![
        2.5,
        3.5,
        -2.5,
        -0.7,
        1e10,
        -1e10,
        f32::NAN,
        0.49999997,
        100000.6,
        -40000.2,
        7.0,
        -0.0,
    ];
    let is: Vec<i32> = vec![
        16_777_217,
        -16_777_217,
        1,
        -1,
        200,
        -200,
        i32::MAX,
        i32::MIN,
        70000,
        -70000,
        127,
        0,
    ];
    let t = fs.len();
    let mut mem = Memory::new();
    let pin = mem.alloc_f32(&fs);
    let pints = mem.alloc_u32(&is.iter().map(|&v| v as u32).collect::<Vec<_>>());
    let out = mem.alloc(t * 64);
    m.launch(
        "cvt_int",
        dims((1, 1, 1), (t as u32, 1, 1), 0),
        &[Param::Ptr(pin), Param::Ptr(pints), Param::Ptr(out)],
        &mut mem,
    )
    .unwrap();
    let r = mem.read_u32(out, t * 16).unwrap();
    let sat = |x: f64, lo: f64, hi: f64| if x.is_nan() { 0.0 } else { x.clamp(lo, hi) };
    for (i, (&x, &v)) in fs.iter().zip(&is).enumerate() {
        let row = &r[i * 16..i * 16 + 16];
        let xd = f64::from(x);
        let s32 = |y: f64| sat(y, f64::from(i32::MIN), f64::from(i32::MAX)) as i32 as u32;
        assert_eq!(row[0], s32(xd.round_ties_even()), "rni {x}");
        assert_eq!(row[1], s32(xd.trunc()), "rzi {x}");
        assert_eq!(row[2], s32(xd.floor()), "rmi {x}");
        assert_eq!(row[3], s32(xd.ceil()), "rpi {x}");
        assert_eq!(row[4], sat(xd.trunc(), 0.0, f64::from(u32::MAX)) as u32, "rzi.u32 {x}");
        if x.is_nan() {
            assert!(f32::from_bits(row[5]).is_nan());
        } else {
            assert_eq!(row[5], x.round_ties_even().to_bits(), "cvt.rni.f32.f32 {x}");
        }
        let s16 = sat(xd.trunc(), -32768.0, 32767.0) as i32;
        assert_eq!(row[6], s16 as u32, "rzi.s16 sign-extends into the .b32 register: {x}");
        assert_eq!(
            row[7],
            i32::from(v as i8) as u32,
            "cvt.s8.s32 truncates then sign-extends: {v}"
        );
        // int -> f32 in four directions
        let exact = f64::from(v);
        let rn = v as f32;
        let (down, up) = if f64::from(rn) == exact {
            (rn, rn)
        } else if f64::from(rn) > exact {
            (rn.next_down(), rn)
        } else {
            (rn, rn.next_up())
        };
        let rz = if v >= 0 { down } else { up };
        assert_eq!(f32::from_bits(row[8]), rn, "rn {v}");
        assert_eq!(f32::from_bits(row[9]), rz, "rz {v}");
        assert_eq!(f32::from_bits(row[10]), down, "rm {v}");
        assert_eq!(f32::from_bits(row[11]), up, "rp {v}");
        assert_eq!(row[12], v.clamp(-128, 127) as u32, "cvt.sat.s8.s32 {v}");
        assert_eq!(row[13], (v as u32) & 0xffff, "cvt.u16.u32 {v}");
        assert_eq!(
            u64::from(row[14]) | (u64::from(row[15]) << 32),
            i64::from(v) as u64,
            "cvt.s64.s32 {v}"
        );
    }
}

#[test]
fn special_registers_in_2d_grids_and_blocks() {
    let m = module(
        r#"
.visible .entry ids(.param .u64 out)
{
    .reg .b32 %r<16>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %tid.y;
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ctaid.y;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %nctaid.x;
    mov.u32 %r7, %warpid;
    mov.u32 %r8, %laneid;
    // linear thread id in the block and CTA id in the grid
    mad.lo.u32 %r9, %r2, %r5, %r1;
    mad.lo.u32 %r10, %r4, %r6, %r3;
    mov.u32 %r11, %ntid.y;
    mul.lo.u32 %r12, %r5, %r11;
    mad.lo.u32 %r13, %r10, %r12, %r9;
    mul.wide.u32 %rd2, %r13, 16;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r9, %r10, %r7, %r8};
    ret;
}
"#,
    );
    let (gx, gy, bx, by) = (3u32, 2u32, 8u32, 6u32);
    let total = (gx * gy * bx * by) as usize;
    let mut mem = Memory::new();
    let out = mem.alloc(total * 16);
    m.launch("ids", dims((gx, gy, 1), (bx, by, 1), 0), &[Param::Ptr(out)], &mut mem)
        .unwrap();
    let r = mem.read_u32(out, total * 4).unwrap();
    for cta in 0..gx * gy {
        for t in 0..bx * by {
            let i = (cta * bx * by + t) as usize;
            assert_eq!(&r[i * 4..i * 4 + 4], &[t, cta, t / 32, t % 32], "cta {cta} thread {t}");
        }
    }
}

fn unsupported(body: &str) -> EmuError {
    Module::parse(&format!("{HEADER}{body}")).unwrap_err()
}

#[test]
fn unknown_instructions_and_modifiers_are_parse_errors() {
    let e = unsupported(
        ".visible .entry k()\n{\n    .reg .b32 %r<2>;\n    mov.u32 %r1, 0;\n    frobnicate.b32 %r1, %r1;\n    ret;\n}\n",
    );
    match &e {
        EmuError::Unsupported { line, inst, msg } => {
            assert_eq!(*line, 8);
            assert_eq!(inst, "frobnicate.b32 %r1, %r1;");
            assert!(msg.contains("frobnicate"), "{msg}");
        }
        other => panic!("{other}"),
    }
    let e = unsupported(
        ".visible .entry k()\n{\n    .reg .f32 %f<2>;\n    add.rn.wobble.f32 %f1, %f1, %f1;\n    ret;\n}\n",
    );
    assert!(e.to_string().contains(".wobble"), "{e}");
    let e = unsupported(".visible .entry k()\n{\n    .reg .f32 %f<2>;\n    add.rz.f32 %f1, %f1, %f1;\n    ret;\n}\n");
    assert!(e.to_string().contains("rounding mode"), "{e}");
    // operand type checking: an f32 register in an integer add
    let e = unsupported(".visible .entry k()\n{\n    .reg .f32 %f<2>;\n    add.u32 %f1, %f1, 1;\n    ret;\n}\n");
    assert!(e.to_string().contains("%f1"), "{e}");
    let e = unsupported(".visible .entry k()\n{\n    .reg .b32 %r<2>;\n    bra $NOWHERE;\n    ret;\n}\n");
    assert!(e.to_string().contains("NOWHERE"), "{e}");
    let e = unsupported(".visible .func f()\n{\n    ret;\n}\n");
    assert!(e.to_string().contains(".func"), "{e}");
}

#[test]
fn out_of_bounds_store_reports_kernel_instruction_and_address() {
    let m = module(VADD);
    let mut mem = Memory::new();
    let n = 100usize;
    let pa = mem.alloc_f32(&vec![1.0; n]);
    let pb = mem.alloc_f32(&vec![2.0; n]);
    let pc = mem.alloc((n - 1) * 4); // one element short
    let err = m
        .launch(
            "vadd",
            dims((1, 1, 1), (128, 1, 1), 0),
            &[Param::Ptr(pa), Param::Ptr(pb), Param::Ptr(pc), Param::U32(n as u32)],
            &mut mem,
        )
        .unwrap_err();
    match &err {
        EmuError::Fault {
            kernel,
            inst,
            thread,
            msg,
            ..
        } => {
            assert_eq!(kernel, "vadd");
            assert_eq!(inst, "st.global.f32 [%rd7], %f3;");
            assert_eq!(*thread, [99, 0, 0]);
            assert!(msg.contains(&format!("{:#x}", pc + 396)), "{msg}");
            assert!(msg.contains("out of bounds"), "{msg}");
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("line"), "{err}");
}

#[test]
fn barrier_skipped_by_a_warp_is_a_deadlock_not_a_hang() {
    let m = module(
        r#"
.visible .entry skip()
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    setp.ge.u32 %p1, %r1, 32;
    @%p1 bra $OUT;
    bar.sync 0;
$OUT:
    ret;
}
"#,
    );
    let mut mem = Memory::new();
    let err = m
        .launch("skip", dims((1, 1, 1), (64, 1, 1), 0), &[], &mut mem)
        .unwrap_err();
    match &err {
        EmuError::Deadlock { kernel, msg, .. } => {
            assert_eq!(kernel, "skip");
            assert!(msg.contains("reached by 1 of 2 warps"), "{msg}");
            assert!(msg.contains("bar.sync 0;"), "{msg}");
        }
        other => panic!("{other}"),
    }
    // the same kernel with one warp is fine
    m.launch("skip", dims((1, 1, 1), (32, 1, 1), 0), &[], &mut mem).unwrap();
}

#[test]
fn collectives_and_alignment_are_checked() {
    // a shuffle inside divergent code names lanes that do not execute it
    let m = module(
        r#"
.visible .entry bad_shfl()
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %laneid;
    setp.lt.u32 %p1, %r1, 16;
    @!%p1 bra $OUT;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
$OUT:
    ret;
}

.visible .entry misaligned(.param .u64 p)
{
    .reg .b32 %r<6>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [p];
    ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1+4];
    ret;
}

.visible .entry forever()
{
$L:
    bra.uni $L;
}
"#,
    );
    let mut mem = Memory::new();
    let e = m
        .launch("bad_shfl", dims((1, 1, 1), (32, 1, 1), 0), &[], &mut mem)
        .unwrap_err();
    assert!(e.to_string().contains("membermask"), "{e}");
    let p = mem.alloc(64);
    let e = m
        .launch("misaligned", dims((1, 1, 1), (32, 1, 1), 0), &[Param::Ptr(p)], &mut mem)
        .unwrap_err();
    assert!(e.to_string().contains("misaligned 16-byte load"), "{e}");
    let mut m = m;
    m.set_step_limit(10_000);
    let e = m
        .launch("forever", dims((1, 1, 1), (32, 1, 1), 0), &[], &mut mem)
        .unwrap_err();
    assert!(matches!(e, EmuError::StepLimit { .. }), "{e}");
    // launch-time checks: parameter count and sm_80 limits
    let e = m
        .launch("misaligned", dims((1, 1, 1), (32, 1, 1), 0), &[], &mut mem)
        .unwrap_err();
    assert!(matches!(e, EmuError::Launch { .. }), "{e}");
    let e = m
        .launch("forever", dims((1, 1, 1), (2048, 1, 1), 0), &[], &mut mem)
        .unwrap_err();
    assert!(e.to_string().contains("1024"), "{e}");
}

/// An mma whose fragments come straight from global memory, one word per
/// register per lane, so the host lays them out with the ISA's formulas and
/// the test does not depend on ldmatrix.
fn mma_direct_ptx(shape: &str, types: &str, na: usize, nb: usize, nc: usize, nd: usize, dreg: &str) -> String {
    let mut s =
        String::from(".visible .entry mma_direct(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd)\n{\n");
    s.push_str("    .reg .b32 %a<4>;\n    .reg .b32 %b<2>;\n    .reg .f32 %c<4>;\n    .reg .b32 %h<4>;\n    .reg .f32 %d<4>;\n    .reg .b32 %e<4>;\n");
    s.push_str(
        "    .reg .b32 %r<4>;\n    .reg .b64 %rd<16>;\n    mov.u32 %r1, %laneid;\n    mul.wide.u32 %rd1, %r1, 16;\n",
    );
    for (i, name) in ["pa", "pb", "pc", "pd"].iter().enumerate() {
        s.push_str(&format!(
            "    ld.param.u64 %rd{}, [{name}];\n    add.s64 %rd{}, %rd{}, %rd1;\n",
            i + 2,
            i + 2,
            i + 2
        ));
    }
    let list = |p: &str, n: usize| (0..n).map(|i| format!("%{p}{i}")).collect::<Vec<_>>().join(", ");
    for i in 0..na {
        s.push_str(&format!("    ld.global.b32 %a{i}, [%rd2+{}];\n", 4 * i));
    }
    for i in 0..nb {
        s.push_str(&format!("    ld.global.b32 %b{i}, [%rd3+{}];\n", 4 * i));
    }
    let creg = if nc == 4 { "c" } else { "h" };
    for i in 0..nc {
        let t = if nc == 4 { "f32" } else { "b32" };
        s.push_str(&format!("    ld.global.{t} %{creg}{i}, [%rd4+{}];\n", 4 * i));
    }
    s.push_str(&format!(
        "    mma.sync.aligned.{shape}.row.col.{types} {{{}}}, {{{}}}, {{{}}}, {{{}}};\n",
        list(dreg, nd),
        list("a", na),
        list("b", nb),
        list(creg, nc)
    ));
    for i in 0..nd {
        let t = if dreg == "d" { "f32" } else { "b32" };
        s.push_str(&format!("    st.global.{t} [%rd5+{}], %{dreg}{i};\n", 4 * i));
    }
    s.push_str("    ret;\n}\n");
    s
}

/// A 16-bit float format's rounding conversion from f32 and its widening.
type Conv16 = (fn(f32) -> u16, fn(u16) -> f32);

#[test]
fn mma_fragment_layouts_follow_the_isa_formulas() {
    // (shape, k, inputs f16?, accumulators f16?)
    for (shape, k, f16_in, f16_acc) in [
        ("m16n8k16", 16, false, false),
        ("m16n8k16", 16, true, false),
        ("m16n8k16", 16, true, true),
        ("m16n8k8", 8, false, false),
    ] {
        let types = match (f16_in, f16_acc) {
            (false, _) => "f32.bf16.bf16.f32",
            (true, false) => "f32.f16.f16.f32",
            (true, true) => "f16.f16.f16.f16",
        };
        let (na, nb) = if k == 16 { (4, 2) } else { (2, 1) };
        let nacc = if f16_acc { 2 } else { 4 };
        let text = mma_direct_ptx(shape, types, na, nb, nacc, nacc, if f16_acc { "e" } else { "d" });
        let m = module(&text);
        let mut rng = Rng(0x5eed + k as u64 + u64::from(f16_in) * 7 + u64::from(f16_acc) * 13);
        let (to16, from16): Conv16 = if f16_in {
            (ouroc_ptx_emu::f16_from_f32, ouroc_ptx_emu::f16_to_f32)
        } else {
            (bf16_from_f32, bf16_to_f32)
        };
        let a: Vec<u16> = (0..16 * k).map(|_| to16(rng.f32())).collect(); // [16][k]
        let b: Vec<u16> = (0..k * 8).map(|_| to16(rng.f32())).collect(); // [k][8]
        let c: Vec<f32> = (0..128)
            .map(|_| if f16_acc { from16(to16(rng.f32())) } else { rng.f32() })
            .collect();
        // registers per the ISA: groupID = lane >> 2, threadID_in_group = lane % 4
        let mut ra = vec![0u32; 32 * 4];
        let mut rb = vec![0u32; 32 * 4];
        let mut rc = vec![0u32; 32 * 4];
        for lane in 0..32 {
            let (g, t) = (lane >> 2, lane % 4);
            for i in 0..2 * na {
                // A: row g for a0,a1,a4,a5 (g + 8 otherwise); col 2t + (i & 1) (+8 for i >= 4)
                let row = if i < 2 || (4..6).contains(&i) { g } else { g + 8 };
                let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
                ra[lane * 4 + i / 2] |= u32::from(a[row * k + col]) << (16 * (i % 2));
            }
            for i in 0..2 * nb {
                // B: row (k) 2t + (i & 1) (+8 for i >= 2), col g
                let row = t * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
                rb[lane * 4 + i / 2] |= u32::from(b[row * 8 + g]) << (16 * (i % 2));
            }
            for i in 0..4 {
                // C: row g for c0,c1 (g + 8 for c2,c3), col 2t + (i & 1)
                let (row, col) = (if i < 2 { g } else { g + 8 }, t * 2 + (i & 1));
                let v = c[row * 8 + col];
                if f16_acc {
                    rc[lane * 4 + i / 2] |= u32::from(to16(v)) << (16 * (i % 2));
                } else {
                    rc[lane * 4 + i] = v.to_bits();
                }
            }
        }
        let mut mem = Memory::new();
        let (pa, pb, pc) = (mem.alloc_u32(&ra), mem.alloc_u32(&rb), mem.alloc_u32(&rc));
        let pd = mem.alloc(32 * 16);
        let params = [pa, pb, pc, pd].map(Param::Ptr);
        m.launch("mma_direct", dims((1, 1, 1), (32, 1, 1), 0), &params, &mut mem)
            .unwrap();
        let rd = mem.read_u32(pd, 32 * 4).unwrap();
        for lane in 0..32 {
            let (g, t) = (lane >> 2, lane % 4);
            for i in 0..4 {
                let (row, col) = (if i < 2 { g } else { g + 8 }, t * 2 + (i & 1));
                let mut acc = f64::from(c[row * 8 + col]);
                for x in 0..k {
                    acc += f64::from(from16(a[row * k + x])) * f64::from(from16(b[x * 8 + col]));
                }
                let got = if f16_acc {
                    from16((rd[lane * 4 + i / 2] >> (16 * (i % 2))) as u16)
                } else {
                    f32::from_bits(rd[lane * 4 + i])
                };
                let want = if f16_acc { from16(to16(acc as f32)) } else { acc as f32 };
                let tol = if f16_acc { 2e-3 } else { 1e-6 };
                assert!(
                    (got - want).abs() <= tol * want.abs().max(1.0),
                    "{shape} {types} lane {lane} d{i}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn const_tables_with_initialisers() {
    let m = module(
        r#"
.const .align 4 .b32 tab[4] = {0f3F800000, 0f40000000, 0f40400000, 0f40800000};
.const .align 8 .u64 big[2] = {5, -1};

.visible .entry ctab(.param .u64 out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<10>;
    ld.param.u64 %rd1, [out];
    mov.u32 %r1, %tid.x;
    mov.u64 %rd2, tab;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.const.f32 %f1, [%rd4];
    ld.const.f32 %f2, [tab+8];
    add.s64 %rd5, %rd1, %rd3;
    st.global.f32 [%rd5], %f1;
    st.global.f32 [%rd5+16], %f2;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra $END;
    ld.const.u64 %rd6, [big+8];
    ld.const.u64 %rd7, [big];
    st.global.v2.u64 [%rd1+32], {%rd6, %rd7};
$END:
    ret;
}
"#,
    );
    let mut mem = Memory::new();
    let out = mem.alloc(48);
    m.launch("ctab", dims((1, 1, 1), (4, 1, 1), 0), &[Param::Ptr(out)], &mut mem)
        .unwrap();
    assert_eq!(
        mem.read_f32(out, 8).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 3.0, 3.0, 3.0, 3.0]
    );
    assert_eq!(mem.read_u32(out + 32, 4).unwrap(), vec![u32::MAX, u32::MAX, 5, 0]);
    let e = unsupported(
        ".const .b32 c[2];\n.visible .entry k()\n{\n    .reg .b32 %r<2>;\n    st.const.u32 [c], %r1;\n    ret;\n}\n",
    );
    assert!(e.to_string().contains("st.const"), "{e}");
    let e = unsupported(".const .b32 c[2] = {1, 2, 3};\n");
    assert!(e.to_string().contains("3 initialisers for 2"), "{e}");
}
