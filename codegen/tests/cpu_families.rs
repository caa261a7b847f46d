//! The Cranelift CPU kernels of the gather, RoPE-table, RoPE and attention
//! families against the reference (`ouroc_kernels::exec`, or its loop
//! copied where it is private), on random inputs at the fixture shapes
//! (mha-r4: hidden 32, heads 4, head_dim 8; gqa-hd: heads 4, kv_heads 2,
//! head_dim 16), f32 and bf16, and the CLIF of each family as a snapshot.
//!
//! Every kernel here performs the reference's f32 operations in the
//! reference's order (the attention's V sum is vectorised across the
//! output lanes, which keeps each lane's order), and calls the same `f32`
//! exp / cos / sin, so results are compared bit for bit.

use ouroc_codegen::cpu::{Jit, KvSeq, clif_text, extra_args, operand_dtypes};
use ouroc_ir::DType;
use ouroc_kernels::KernelSpec;
use ouroc_kernels::spec::{AttentionSpec, Family, GatherSpec, RopeSpec, RopeTableSpec, Trig};

/// Deterministic uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// Bytes of `v` stored as `d` (bf16: rounded to nearest even; i32: the
/// values are integers).
fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn decode(b: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => b
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

fn rounded(v: &[f32], d: DType) -> Vec<f32> {
    v.iter().map(|&x| d.round(x)).collect()
}

fn spec(name: &str, act: DType, family: Family) -> KernelSpec {
    KernelSpec {
        name: name.into(),
        act,
        family,
    }
}

/// Run a kernel without extra arguments on `tokens` contiguous rows.
fn run(jit: &mut Jit, spec: &KernelSpec, operands: &[Vec<f32>], tokens: usize) -> Vec<f32> {
    assert_eq!(extra_args(spec), 0);
    let dtypes = operand_dtypes(spec);
    let width = spec.family.result_widths()[0];
    let mut bufs: Vec<Vec<u8>> = operands.iter().zip(&dtypes).map(|(v, &d)| encode(v, d)).collect();
    let mut strides: Vec<usize> = operands.iter().map(|v| v.len() / tokens).collect();
    bufs.push(vec![0xff; width * tokens * spec.act.size_bytes()]);
    strides.push(width);
    let id = jit.compile(spec).expect("compiles");
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
    // SAFETY: every buffer holds `tokens` rows of its stride (weights whole).
    unsafe { jit.kernel(id).call(&ptrs, &strides, tokens) };
    decode(&bufs[operands.len()], spec.act)
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g}, want {w}");
    }
}

fn gather(rows: usize, width: usize, table: DType, act: DType) -> KernelSpec {
    spec("embed", act, Family::Gather(GatherSpec { rows, width, table }))
}

#[test]
fn gather_copies_table_rows() {
    let mut jit = Jit::new().expect("host ISA");
    let mut rng = Rng(0x1234_5678);
    for (rows, width) in [(64, 32), (50, 7), (3, 1), (17, 40)] {
        for (table, act) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::BF16),
        ] {
            for tokens in [1, 3, 6] {
                let s = gather(rows, width, table, act);
                let t = rounded(&rng.vec(rows * width, 4.0), table);
                let ids: Vec<f32> = (0..tokens)
                    .map(|i| {
                        if i == 0 {
                            (rows - 1) as f32
                        } else {
                            (rng.next() % rows as u64) as f32
                        }
                    })
                    .collect();
                let got = run(&mut jit, &s, &[t.clone(), ids.clone()], tokens);
                // exec's loop; the copy is exact, except an f32 table read
                // into bf16 activations, which a bf16 buffer stores rounded.
                let want: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| t[id as usize * width..(id as usize + 1) * width].iter())
                    .map(|&x| act.round(x))
                    .collect();
                assert_bits(&format!("gather {rows}x{width} {table}->{act} t={tokens}"), &got, &want);
            }
        }
    }
}

fn rope_table(func: Trig, head_dim: usize, theta: f64, act: DType) -> KernelSpec {
    spec(
        "rope_table",
        act,
        Family::RopeTable(RopeTableSpec { func, head_dim, theta }),
    )
}

/// exec's `RopeTable` loop.
fn rope_table_ref(s: &RopeTableSpec, pos: &[f32], act: DType) -> Vec<f32> {
    let half = s.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| 1.0 / (s.theta as f32).powf((2 * j) as f32 / s.head_dim as f32))
        .collect();
    let func = match s.func {
        Trig::Cos => f32::cos,
        Trig::Sin => f32::sin,
    };
    pos.iter()
        .flat_map(|&p| (0..s.head_dim).map(move |j| (p, j)))
        .map(|(p, j)| act.round(func(p * inv[j % half])))
        .collect()
}

#[test]
fn rope_table_equals_the_reference_bit_for_bit() {
    let mut jit = Jit::new().expect("host ISA");
    let positions: Vec<f32> = [0, 1, 2, 3, 7, 31, 100, 1023, 4097, 32767, 1 << 20, (1 << 24) + 1]
        .iter()
        .map(|&p| p as f32)
        .collect();
    for act in [DType::F32, DType::BF16] {
        for func in [Trig::Cos, Trig::Sin] {
            for (hd, theta) in [(8, 10000.0), (16, 1_000_000.0), (2, 10000.0), (6, 500.0)] {
                let s = rope_table(func, hd, theta, act);
                let Family::RopeTable(rt) = &s.family else {
                    unreachable!()
                };
                for tokens in [1, 3, positions.len()] {
                    let pos = &positions[positions.len() - tokens..];
                    let got = run(&mut jit, &s, &[pos.to_vec()], tokens);
                    let want = rope_table_ref(rt, pos, act);
                    assert_bits(&format!("{s} t={tokens}"), &got, &want);
                }
            }
        }
    }
}

fn rope(heads: usize, head_dim: usize, act: DType) -> KernelSpec {
    spec("rope", act, Family::Rope(RopeSpec { heads, head_dim }))
}

/// cos / sin rows of `positions` (as the table kernels compute them).
fn tables(positions: &[usize], hd: usize, act: DType) -> (Vec<f32>, Vec<f32>) {
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let t = |func| {
        rope_table_ref(
            &RopeTableSpec {
                func,
                head_dim: hd,
                theta: 10000.0,
            },
            &pos,
            act,
        )
    };
    (t(Trig::Cos), t(Trig::Sin))
}

#[test]
fn rope_equals_the_reference_bit_for_bit() {
    let mut jit = Jit::new().expect("host ISA");
    let mut rng = Rng(99);
    for act in [DType::F32, DType::BF16] {
        for (heads, hd) in [(4, 8), (4, 16), (2, 16), (3, 6), (1, 2)] {
            for tokens in [1, 4] {
                let s = rope(heads, hd, act);
                let x = rounded(&rng.vec(tokens * heads * hd, 3.0), act);
                let positions: Vec<usize> = (0..tokens).map(|t| 5 + 3 * t).collect();
                let (c, sn) = tables(&positions, hd, act);
                let got = run(&mut jit, &s, &[x.clone(), c.clone(), sn.clone()], tokens);
                let want = ouroc_kernels::exec::rope(&x, &c, &sn, heads, hd, &|v| act.round(v));
                assert_bits(&format!("{s} t={tokens}"), &got, &want);
            }
        }
    }
}

#[test]
fn rope_is_correct_in_place() {
    let mut jit = Jit::new().expect("host ISA");
    let (heads, hd, tokens, act) = (4, 8, 3, DType::BF16);
    let s = rope(heads, hd, act);
    let x = rounded(&Rng(5).vec(tokens * heads * hd, 2.0), act);
    let (c, sn) = tables(&[0, 9, 10], hd, act);
    let (mut xb, mut cb, mut sb) = (encode(&x, act), encode(&c, act), encode(&sn, act));
    let id = jit.compile(&s).unwrap();
    let ptrs = [xb.as_mut_ptr(), cb.as_mut_ptr(), sb.as_mut_ptr(), xb.as_mut_ptr()];
    // SAFETY: the result is the same rows as x, as the contract allows.
    unsafe { jit.kernel(id).call(&ptrs, &[heads * hd, hd, hd, heads * hd], tokens) };
    let want = ouroc_kernels::exec::rope(&x, &c, &sn, heads, hd, &|v| act.round(v));
    assert_bits("rope in place", &decode(&xb, act), &want);
}

fn attention(heads: usize, kv_heads: usize, head_dim: usize, rope: bool, act: DType) -> KernelSpec {
    spec(
        "attn",
        act,
        Family::Attention(AttentionSpec {
            layer: 0,
            heads,
            kv_heads,
            head_dim,
            rope,
        }),
    )
}

/// A batch of sequences through a series of calls of `seq` new tokens
/// each (prefill, then decode steps, then a further prefill), checking
/// the results and the cache contents against the reference after each.
fn check_attention(jit: &mut Jit, a: AttentionSpec, act: DType, batch: usize, calls: &[usize]) {
    let s = attention(a.heads, a.kv_heads, a.head_dim, a.rope, act);
    let (hd, kvw, qw) = (a.head_dim, a.kv_heads * a.head_dim, a.heads * a.head_dim);
    let size = act.size_bytes();
    let capacity: usize = calls.iter().sum::<usize>() + 1;
    let id = jit.compile(&s).expect("compiles");
    let mut rng = Rng(0xa77e ^ (a.heads * 100 + a.kv_heads * 10 + hd) as u64);
    // The kernel's slots (act bytes, NaN-filled beyond what is written) and the reference's.
    let nan = encode(&vec![f32::NAN; capacity * kvw], act);
    let mut kc: Vec<Vec<u8>> = vec![nan.clone(); batch];
    let mut vc: Vec<Vec<u8>> = vec![nan; batch];
    let mut rk: Vec<Vec<f32>> = vec![Vec::new(); batch];
    let mut rv: Vec<Vec<f32>> = vec![Vec::new(); batch];
    let mut past = 0;
    for &seq in calls {
        let tokens = batch * seq;
        let q = rounded(&rng.vec(tokens * qw, 2.0), act);
        let k = rounded(&rng.vec(tokens * kvw, 2.0), act);
        let v = rounded(&rng.vec(tokens * kvw, 2.0), act);
        let positions: Vec<usize> = (0..batch).flat_map(|_| past..past + seq).collect();
        let (c, sn) = tables(&positions, hd, act);
        let mut ops = vec![q, k, v];
        if a.rope {
            ops.extend([c, sn]);
        }
        let mut bufs: Vec<Vec<u8>> = ops.iter().map(|o| encode(o, act)).collect();
        let mut strides: Vec<usize> = ops.iter().map(|o| o.len() / tokens).collect();
        bufs.push(vec![0xff; tokens * qw * size]);
        strides.push(qw);
        let mut seqs: Vec<KvSeq> = (0..batch)
            .map(|b| KvSeq {
                k: kc[b].as_mut_ptr(),
                v: vc[b].as_mut_ptr(),
                past,
            })
            .collect();
        let mut scratch = vec![0f32; past + seq];
        let mut ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        ptrs.push(seqs.as_mut_ptr().cast());
        ptrs.push(scratch.as_mut_ptr().cast());
        strides.extend([seq, 0]);
        // SAFETY: activations hold `tokens` rows of their strides; each slot
        // holds `capacity >= past + seq` rows; the scratch `past + seq` f32.
        unsafe { jit.kernel(id).call(&ptrs, &strides, tokens) };
        let got = decode(&bufs[ops.len()], act);
        let what = format!("{s} batch={batch} past={past} seq={seq}");
        for b in 0..batch {
            let rows = |x: &[f32], w: usize| x[b * seq * w..(b + 1) * seq * w].to_vec();
            let ins: Vec<Vec<f32>> = ops
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    rows(
                        o,
                        if i == 0 {
                            qw
                        } else if i < 3 {
                            kvw
                        } else {
                            hd
                        },
                    )
                })
                .collect();
            let refs: Vec<&[f32]> = ins.iter().map(|x| &x[..]).collect();
            let want = ouroc_kernels::exec::attention_seq(&a, &refs, &mut rk[b], &mut rv[b], seq, &|x| act.round(x));
            assert_bits(&format!("{what} seq {b} output"), &rows(&got, qw), &want);
            let filled = (past + seq) * kvw * size;
            assert_bits(
                &format!("{what} seq {b} K cache"),
                &decode(&kc[b][..filled], act),
                &rk[b],
            );
            assert_bits(
                &format!("{what} seq {b} V cache"),
                &decode(&vc[b][..filled], act),
                &rv[b],
            );
        }
        past += seq;
    }
}

fn attn_spec(heads: usize, kv_heads: usize, head_dim: usize, rope: bool) -> AttentionSpec {
    AttentionSpec {
        layer: 3,
        heads,
        kv_heads,
        head_dim,
        rope,
    }
}

#[test]
fn attention_equals_the_reference_in_prefill_and_decode() {
    let mut jit = Jit::new().expect("host ISA");
    for act in [DType::F32, DType::BF16] {
        for rope in [false, true] {
            // mha-r4, gqa-hd, and awkward shapes (head_dim % 4 != 0, 1 kv head).
            for (h, kvh, hd) in [(4, 4, 8), (4, 2, 16), (3, 1, 6), (2, 2, 2)] {
                let a = attn_spec(h, kvh, hd, rope);
                check_attention(&mut jit, a.clone(), act, 1, &[5, 1, 1, 3, 1]);
                check_attention(&mut jit, a.clone(), act, 1, &[1, 1, 1]);
                check_attention(&mut jit, a, act, 2, &[4, 1, 2]);
            }
        }
    }
}

#[test]
fn attention_prefill_equals_prefill_then_decode() {
    // One call of 6 tokens and 6 calls of one token give the same outputs.
    let mut jit = Jit::new().expect("host ISA");
    let a = attn_spec(4, 2, 16, true);
    let s = attention(4, 2, 16, true, DType::F32);
    let id = jit.compile(&s).unwrap();
    let (qw, kvw, n) = (64, 32, 6);
    let mut rng = Rng(11);
    let (q, k, v) = (rng.vec(n * qw, 1.0), rng.vec(n * kvw, 1.0), rng.vec(n * kvw, 1.0));
    let positions: Vec<usize> = (0..n).collect();
    let (c, sn) = tables(&positions, a.head_dim, DType::F32);
    let call = |from: usize, seq: usize, kc: &mut Vec<f32>, vc: &mut Vec<f32>| -> Vec<f32> {
        let mut out = vec![0f32; seq * qw];
        let mut scratch = vec![0f32; from + seq];
        let mut seqs = [KvSeq {
            k: kc.as_mut_ptr().cast(),
            v: vc.as_mut_ptr().cast(),
            past: from,
        }];
        let row = |x: &[f32], w: usize| x[from * w..].as_ptr() as *mut u8;
        let ptrs = [
            row(&q, qw),
            row(&k, kvw),
            row(&v, kvw),
            row(&c, 16),
            row(&sn, 16),
            out.as_mut_ptr().cast(),
            seqs.as_mut_ptr().cast(),
            scratch.as_mut_ptr().cast(),
        ];
        // SAFETY: operands are read only; every buffer is large enough.
        unsafe { jit.kernel(id).call(&ptrs, &[qw, kvw, kvw, 16, 16, qw, seq, 0], seq) };
        out
    };
    let (mut k1, mut v1) = (vec![0f32; n * kvw], vec![0f32; n * kvw]);
    let once = call(0, n, &mut k1, &mut v1);
    let (mut k2, mut v2) = (vec![0f32; n * kvw], vec![0f32; n * kvw]);
    let steps: Vec<f32> = (0..n).flat_map(|t| call(t, 1, &mut k2, &mut v2)).collect();
    assert_bits("prefill vs decode", &steps, &once);
    assert_bits("K caches", &k2, &k1);
}

/// A prompt appended in one launch (`AttentionPhase::Append`) and then
/// attended in blocks of query tokens (`AttentionPhase::Attend`, row
/// pointers at the block's first token, `past` advanced to it), as the CPU
/// runtime splits attention over threads, gives the outputs and caches of
/// one whole launch bit for bit; an attend-only launch writes no cache row
/// and an append-only launch no output.
#[test]
fn attention_phases_in_blocks_equal_one_launch() {
    let mut jit = Jit::new().expect("host ISA");
    for act in [DType::F32, DType::BF16] {
        let a = attn_spec(4, 2, 16, true);
        let s = attention(4, 2, 16, true, act);
        let id = jit.compile(&s).unwrap();
        let (qw, kvw, past, n) = (64, 32, 3, 9);
        let mut rng = Rng(12);
        let round = |v: Vec<f32>| rounded(&v, act);
        let (q, k, v) = (
            round(rng.vec(n * qw, 1.0)),
            round(rng.vec(n * kvw, 1.0)),
            round(rng.vec(n * kvw, 1.0)),
        );
        let positions: Vec<usize> = (past..past + n).collect();
        let (c, sn) = tables(&positions, a.head_dim, act);
        let (q, k, v, c, sn) = (
            encode(&q, act),
            encode(&k, act),
            encode(&v, act),
            encode(&c, act),
            encode(&sn, act),
        );
        let size = act.size_bytes();
        // The first `past` cache rows: earlier positions.
        let cache0 = encode(&round(rng.vec((past + n) * kvw, 1.0)), act);
        // Tokens t0 .. t0 + len of the prompt in `phase` (0, 1 or 2).
        let call = |t0: usize, len: usize, phase: usize, kc: &mut Vec<u8>, vc: &mut Vec<u8>, out: &mut Vec<u8>| {
            let mut scratch = vec![0f32; past + n];
            let mut seqs = [KvSeq {
                k: kc.as_mut_ptr(),
                v: vc.as_mut_ptr(),
                past: past + t0,
            }];
            let row = |x: &[u8], w: usize| x[t0 * w * size..].as_ptr() as *mut u8;
            let ptrs = [
                row(&q, qw),
                row(&k, kvw),
                row(&v, kvw),
                row(&c, 16),
                row(&sn, 16),
                out[t0 * qw * size..].as_mut_ptr(),
                seqs.as_mut_ptr().cast(),
                scratch.as_mut_ptr().cast(),
            ];
            // SAFETY: operands are read only; every buffer is large enough.
            unsafe { jit.kernel(id).call(&ptrs, &[qw, kvw, kvw, 16, 16, qw, len, phase], len) };
        };
        let (mut k1, mut v1, mut o1) = (cache0.clone(), cache0.clone(), vec![0u8; n * qw * size]);
        call(0, n, 0, &mut k1, &mut v1, &mut o1);
        let (mut k2, mut v2, mut o2) = (cache0.clone(), cache0.clone(), vec![0u8; n * qw * size]);
        call(0, n, 1, &mut k2, &mut v2, &mut o2);
        assert!(o2.iter().all(|&b| b == 0), "{act}: an append-only launch wrote output");
        assert_eq!((&k2, &v2), (&k1, &v1), "{act}: appended caches");
        for (t0, len) in [(0, 2), (2, 4), (6, 3)] {
            call(t0, len, 2, &mut k2, &mut v2, &mut o2);
        }
        assert_eq!((&k2, &v2), (&k1, &v1), "{act}: attend-only launches changed a cache");
        assert_eq!(o2, o1, "{act}: outputs of attention in blocks");
        assert!(o1.iter().any(|&b| b != 0));
    }
}

#[test]
fn clif_snapshots_of_the_new_families() {
    let snap = |name: &str, s: &KernelSpec| {
        let text = format!("; {s}\n{}", clif_text(s).expect("emits"));
        insta::assert_snapshot!(name, text);
    };
    snap("gather_bf16_64x32", &gather(64, 32, DType::BF16, DType::BF16));
    snap("rope_table_cos_hd8", &rope_table(Trig::Cos, 8, 10000.0, DType::F32));
    snap("rope_h4_hd8", &rope(4, 8, DType::F32));
    snap("attention_mha_r4_rope", &attention(4, 4, 8, true, DType::F32));
}
