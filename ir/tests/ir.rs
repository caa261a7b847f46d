//! Tests of ouroc-ir through its public API: the text form (round trip and
//! parse errors), the verifier, the interpreter's numerics on hand-checkable
//! graphs, and the loop's semantics (exit policies, trace, KV cache, errors)
//! on a tiny but complete looped language model.

use ouroc_ir::{
    Attention, DType, Dim, ExitPolicy, Graph, GraphBuilder, InterpError, Interpreter, OpKind, Options, ParseError,
    RopeTable, RunOutput, Tensor, Terminator, Type, ValueId, VerifyError, exit_distribution, parse, print, verify,
};
use std::collections::HashMap;

// ---------------------------------------------------------------------------
// The tiny looped LM and its weights
// ---------------------------------------------------------------------------

const VOCAB: usize = 11;
const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const INTER: usize = 12;
const STEPS: usize = 3;
const EPS: f64 = 1e-6;
const THETA: f64 = 10000.0;

/// Every exit policy the loop supports, as used across the tests.
fn all_policies() -> Vec<ExitPolicy> {
    ["last", "step:1", "threshold:0.5", "threshold:1.0:bf16", "weighted"]
        .iter()
        .map(|s| ExitPolicy::parse(s).unwrap())
        .collect()
}

/// A complete looped LM: `ids, pos: i32[batch, seq]`; embedding; RoPE tables;
/// a loop of `STEPS` steps over one decoder layer, each step ending in the
/// final norm and the exit gate; the head on the loop's result. Returns
/// `(logits, loop result)`.
fn lm_graph(d: DType, policy: ExitPolicy) -> Graph {
    let mut b = GraphBuilder::new("tiny_lm");
    let tok = Type::new(DType::I32, vec![Dim::sym("batch"), Dim::sym("seq")]);
    let ids = b.input(tok.clone());
    let pos = b.input(tok);
    let w = |b: &mut GraphBuilder, name: &str, dims: &[usize]| b.weight(name, Type::fixed(d, dims));
    let op = |b: &mut GraphBuilder, kind: OpKind, ins: &[ValueId]| b.op(kind, ins, d).unwrap();

    let embed = w(&mut b, "embed", &[VOCAB, HIDDEN]);
    let attn_norm = w(&mut b, "l0.attn_norm", &[HIDDEN]);
    let wq = w(&mut b, "l0.q", &[HEADS * HEAD_DIM, HIDDEN]);
    let wk = w(&mut b, "l0.k", &[KV_HEADS * HEAD_DIM, HIDDEN]);
    let wv = w(&mut b, "l0.v", &[KV_HEADS * HEAD_DIM, HIDDEN]);
    let wo = w(&mut b, "l0.o", &[HIDDEN, HEADS * HEAD_DIM]);
    let mlp_norm = w(&mut b, "l0.mlp_norm", &[HIDDEN]);
    let wg = w(&mut b, "l0.gate", &[INTER, HIDDEN]);
    let wu = w(&mut b, "l0.up", &[INTER, HIDDEN]);
    let wd = w(&mut b, "l0.down", &[HIDDEN, INTER]);
    let final_norm = w(&mut b, "final_norm", &[HIDDEN]);
    let exit_w = w(&mut b, "exit.weight", &[1, HIDDEN]);
    let exit_b = w(&mut b, "exit.bias", &[1]);
    let head = w(&mut b, "head", &[VOCAB, HIDDEN]);

    let x0 = op(&mut b, OpKind::Embedding, &[embed, ids]);
    let table = RopeTable {
        head_dim: HEAD_DIM,
        theta: THETA,
    };
    let cos = op(&mut b, OpKind::RopeCos(table), &[pos]);
    let sin = op(&mut b, OpKind::RopeSin(table), &[pos]);

    let (_step, carried) = b.begin_loop(&[x0]);
    let x = carried[0];
    let n1 = op(&mut b, OpKind::RmsNorm { eps: EPS }, &[x, attn_norm]);
    let q = op(&mut b, OpKind::Linear, &[n1, wq]);
    let k = op(&mut b, OpKind::Linear, &[n1, wk]);
    let v = op(&mut b, OpKind::Linear, &[n1, wv]);
    let q = op(
        &mut b,
        OpKind::Rope {
            heads: HEADS,
            head_dim: HEAD_DIM,
        },
        &[q, cos, sin],
    );
    let k = op(
        &mut b,
        OpKind::Rope {
            heads: KV_HEADS,
            head_dim: HEAD_DIM,
        },
        &[k, cos, sin],
    );
    let attn = Attention {
        layer: 0,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let a = op(&mut b, OpKind::Attention(attn), &[q, k, v]);
    let a = op(&mut b, OpKind::Linear, &[a, wo]);
    let x = op(&mut b, OpKind::Add, &[x, a]);
    let n2 = op(&mut b, OpKind::RmsNorm { eps: EPS }, &[x, mlp_norm]);
    let g = op(&mut b, OpKind::Linear, &[n2, wg]);
    let u = op(&mut b, OpKind::Linear, &[n2, wu]);
    let g = op(&mut b, OpKind::Silu, &[g]);
    let m = op(&mut b, OpKind::Mul, &[g, u]);
    let m = op(&mut b, OpKind::Linear, &[m, wd]);
    let x = op(&mut b, OpKind::Add, &[x, m]);
    let hn = op(&mut b, OpKind::RmsNorm { eps: EPS }, &[x, final_norm]);
    let e = op(&mut b, OpKind::Linear, &[hn, exit_w, exit_b]);
    let lam = op(&mut b, OpKind::Sigmoid, &[e]);
    let out = b.end_loop(STEPS, policy, &[hn], hn, Some(lam));
    let logits = op(&mut b, OpKind::Linear, &[out, head]);
    b.finish(&[logits, out])
}

/// Deterministic pseudo-random numbers in [-0.5, 0.5): xorshift64* seeded by
/// an FNV-1a hash of the weight's name, so every graph naming the same
/// weight gets the same values.
struct Rng(u64);

impl Rng {
    fn new(name: &str) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for byte in name.bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Weights for every `weight` op of `g`: norm scales near 1, the rest in [-0.5, 0.5).
fn weights_for(g: &Graph) -> HashMap<String, Vec<f32>> {
    let mut map = HashMap::new();
    for op in g.walk() {
        if let OpKind::Weight { name } = &op.kind {
            let n = g.ty(op.result()).fixed_numel().expect("weights have fixed dims");
            let mut rng = Rng::new(name);
            let norm = name.contains("norm");
            let data = (0..n)
                .map(|_| if norm { 1.0 + 0.2 * rng.next() } else { rng.next() })
                .collect();
            map.insert(name.clone(), data);
        }
    }
    map
}

fn interp<'g>(g: &'g Graph, w: &HashMap<String, Vec<f32>>) -> Interpreter<'g> {
    Interpreter::new(g, w, Options::default()).unwrap_or_else(|e| panic!("interpreter: {e}"))
}

fn run_tokens(it: &mut Interpreter<'_>, ids: &[Vec<u32>]) -> RunOutput {
    it.run_tokens(ids).unwrap_or_else(|e| panic!("run_tokens: {e}"))
}

fn run_err(it: &mut Interpreter<'_>, ids: &[Vec<u32>]) -> InterpError {
    match it.run_tokens(ids) {
        Ok(_) => panic!("run_tokens({ids:?}) should fail"),
        Err(e) => e,
    }
}

fn new_err(g: &Graph, w: &HashMap<String, Vec<f32>>) -> InterpError {
    match Interpreter::new(g, w, Options::default()) {
        Ok(_) => panic!("Interpreter::new should fail"),
        Err(e) => e,
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

/// Row `t` (over all leading dims) of a tensor.
fn row(t: &Tensor, i: usize) -> &[f32] {
    let n = t.row_len();
    &t.data[i * n..(i + 1) * n]
}

const PROMPT: [u32; 6] = [3, 1, 4, 1, 5, 9];

// ---------------------------------------------------------------------------
// 1. Text form
// ---------------------------------------------------------------------------

#[test]
fn built_graph_is_already_canonical_and_verifies() {
    for d in [DType::F32, DType::BF16] {
        let g = lm_graph(d, ExitPolicy::Last);
        assert_eq!(g, g.canonicalize());
        verify(&g).unwrap_or_else(|e| panic!("{d}: {e}"));
        // 2 inputs, 14 weights, embedding, 2 tables, loop, step + carried, 19 body ops, head.
        assert_eq!(g.types.len(), 2 + 14 + 1 + 2 + 1 + 2 + 19 + 1);
        assert_eq!(g.outputs().len(), 2);
        assert_eq!(g.ty(g.outputs()[0]), &Type::act(d, VOCAB));
        assert_eq!(g.ty(g.outputs()[1]), &Type::act(d, HIDDEN));
    }
}

#[test]
fn print_parse_round_trips_for_every_dtype_and_policy() {
    for d in [DType::F32, DType::BF16] {
        for policy in all_policies() {
            let g = lm_graph(d, policy);
            let text = print(&g);
            let parsed = parse(&text).unwrap_or_else(|e| panic!("{d} {policy}: {e}\n{text}"));
            assert_eq!(parsed, g.canonicalize(), "{d} {policy}");
            assert_eq!(
                print(&parsed),
                text,
                "{d} {policy}: printing the parsed graph changes the text"
            );
            verify(&parsed).unwrap_or_else(|e| panic!("{d} {policy}: {e}"));
            assert_eq!(parsed.find_loop().unwrap().policy, policy);
            assert!(text.contains(&format!("policy = \"{policy}\"")), "{text}");
            assert!(text.contains("%0: i32[batch, seq], %1: i32[batch, seq]"), "{text}");
            assert!(
                text.contains(&format!("= weight \"head\" : {d}[{VOCAB}, {HIDDEN}]")),
                "{text}"
            );
        }
    }
}

#[test]
fn round_trip_renumbers_a_graph_with_gaps_in_its_value_ids() {
    // Renumber a built graph to non-textual ids (reverse order); printing
    // then parsing gives back the textual numbering.
    let g = lm_graph(DType::F32, ExitPolicy::Weighted);
    let n = g.types.len() as u32;
    let rev = |v: ValueId| ValueId(n - 1 - v.0);
    let mut shuffled = g.clone();
    shuffled.types.reverse();
    fn remap(b: &mut ouroc_ir::Block, f: &dyn Fn(ValueId) -> ValueId) {
        b.args.iter_mut().for_each(|a| *a = f(*a));
        for op in &mut b.ops {
            op.results = op.results.iter().map(|r| f(*r)).collect();
            op.inputs.iter_mut().for_each(|i| *i = f(*i));
            if let OpKind::Loop(l) = &mut op.kind {
                remap(&mut l.body, f);
            }
        }
        b.term = match &b.term {
            Terminator::Return(vs) => Terminator::Return(vs.iter().map(|v| f(*v)).collect()),
            Terminator::Yield { next, out, exit } => Terminator::Yield {
                next: next.iter().map(|v| f(*v)).collect(),
                out: f(*out),
                exit: exit.map(f),
            },
        };
    }
    remap(&mut shuffled.body, &rev);
    assert_ne!(shuffled, g);
    verify(&shuffled).unwrap();
    assert_eq!(shuffled.canonicalize(), g);
    assert_eq!(parse(&print(&shuffled)).unwrap(), g);
}

const NAMED: &str = r#"// a tiny looped graph, written by hand
graph @named(%tokens: f32[batch, 4]) {   // the input
  %w = weight "proj" : f32[4, 4]
  %g = weight "gate" : f32[1, 4]
  // the loop: two steps, weighted exit
  %result = loop(%tokens) {steps = 2, policy = "weighted"} : f32[batch, 4] {
  ^body(%i: i32[], %h: f32[batch, 4]):
    %x.1 = linear(%h, %w) : f32[batch, 4]   // the step
    %x.2 = linear(%x.1, %g) : f32[batch, 1]
    %lam = sigmoid(%x.2) : f32[batch, 1]
    yield next(%x.1) out(%x.1) exit(%lam)
  }
  return %result // done
}
"#;

const NAMED_CANONICAL: &str = r#"graph @named(%0: f32[batch, 4]) {
  %1 = weight "proj" : f32[4, 4]
  %2 = weight "gate" : f32[1, 4]
  %3 = loop(%0) {steps = 2, policy = "weighted"} : f32[batch, 4] {
  ^body(%4: i32[], %5: f32[batch, 4]):
    %6 = linear(%5, %1) : f32[batch, 4]
    %7 = linear(%6, %2) : f32[batch, 1]
    %8 = sigmoid(%7) : f32[batch, 1]
    yield next(%6) out(%6) exit(%8)
  }
  return %3
}
"#;

#[test]
fn parser_accepts_comments_and_arbitrary_names_and_renumbers_canonically() {
    let g = parse(NAMED).unwrap();
    assert_eq!(print(&g), NAMED_CANONICAL);

    let mut b = GraphBuilder::new("named");
    let x = b.input(Type::new(DType::F32, vec![Dim::sym("batch"), Dim::Fixed(4)]));
    let w = b.weight("proj", Type::fixed(DType::F32, &[4, 4]));
    let gw = b.weight("gate", Type::fixed(DType::F32, &[1, 4]));
    let (_, c) = b.begin_loop(&[x]);
    let y = b.op(OpKind::Linear, &[c[0], w], DType::F32).unwrap();
    let e = b.op(OpKind::Linear, &[y, gw], DType::F32).unwrap();
    let lam = b.op(OpKind::Sigmoid, &[e], DType::F32).unwrap();
    let r = b.end_loop(2, ExitPolicy::Weighted, &[y], y, Some(lam));
    let built = b.finish(&[r]);
    assert_eq!(g, built);
    verify(&g).unwrap();
}

#[test]
fn float_attributes_survive_the_text_form_exactly() {
    let eps_values = [1e-6, 1e-5, 0.1 + 0.2];
    for &eps in &eps_values {
        let mut b = GraphBuilder::new("floats");
        let x = b.input(Type::act(DType::F32, 8));
        let p = b.input(Type::new(DType::I32, vec![Dim::sym("batch"), Dim::sym("seq")]));
        let nw = b.weight("n", Type::fixed(DType::F32, &[8]));
        let gw = b.weight("g", Type::fixed(DType::F32, &[1, 8]));
        let n = b.op(OpKind::RmsNorm { eps }, &[x, nw], DType::F32).unwrap();
        let cos = b
            .op(
                OpKind::RopeCos(RopeTable {
                    head_dim: 4,
                    theta: 10000.0,
                }),
                &[p],
                DType::F32,
            )
            .unwrap();
        let sin = b
            .op(
                OpKind::RopeSin(RopeTable {
                    head_dim: 4,
                    theta: 1000000.0,
                }),
                &[p],
                DType::F32,
            )
            .unwrap();
        let r = b
            .op(OpKind::Rope { heads: 2, head_dim: 4 }, &[n, cos, sin], DType::F32)
            .unwrap();
        let (_, c) = b.begin_loop(&[r]);
        let e = b.op(OpKind::Linear, &[c[0], gw], DType::F32).unwrap();
        let lam = b.op(OpKind::Sigmoid, &[e], DType::F32).unwrap();
        let policy = ExitPolicy::Threshold {
            q: 0.3,
            arith: DType::F32,
        };
        let out = b.end_loop(2, policy, &[c[0]], c[0], Some(lam));
        let g = b.finish(&[out]);

        let text = print(&g);
        assert!(text.contains("theta = 10000.0}"), "{text}");
        assert!(text.contains("theta = 1000000.0}"), "{text}");
        assert!(text.contains("policy = \"threshold:0.3\""), "{text}");
        if eps == 1e-6 {
            assert!(text.contains("{eps = 1e-6}"), "{text}");
        }
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed, g);
        let ops = parsed.walk();
        let kinds: Vec<&OpKind> = ops.iter().map(|o| &o.kind).collect();
        assert!(kinds.contains(&&OpKind::RmsNorm { eps }), "eps {eps:?} lost");
        assert!(kinds.contains(&&OpKind::RopeCos(RopeTable {
            head_dim: 4,
            theta: 10000.0
        })));
        assert!(kinds.contains(&&OpKind::RopeSin(RopeTable {
            head_dim: 4,
            theta: 1000000.0
        })));
        let q = match parsed.find_loop().unwrap().policy {
            ExitPolicy::Threshold { q, arith: DType::F32 } => q,
            p => panic!("policy became {p}"),
        };
        assert_eq!(q.to_bits(), 0.3f32.to_bits());
    }
}

// ---------------------------------------------------------------------------
// 2. Parse errors
// ---------------------------------------------------------------------------

const SMALL: &str = "graph @t(%x: f32[batch, 8]) {
  %w = weight \"w\" : f32[4, 8]
  %y = linear(%x, %w) : f32[batch, 4]
  %z = sigmoid(%y) : f32[batch, 4]
  return %z
}
";

/// SMALL with line `line` (1-based) replaced.
fn small_with(line: usize, text: &str) -> String {
    let mut lines: Vec<&str> = SMALL.lines().collect();
    lines[line - 1] = text;
    lines.join("\n") + "\n"
}

fn parse_err(src: &str) -> ParseError {
    match parse(src) {
        Ok(g) => panic!("parse should fail, got\n{g}"),
        Err(e) => e,
    }
}

fn assert_parse_err(src: &str, line: usize, needle: &str) {
    let e = parse_err(src);
    assert!(
        e.msg.contains(needle),
        "expected `{needle}` in `{}` (line {})\n{src}",
        e.msg,
        e.line
    );
    assert_eq!(e.line, line, "wrong line for `{}`\n{src}", e.msg);
    assert_eq!(e.to_string(), format!("line {line}: {}", e.msg));
}

#[test]
fn small_parse_base_is_valid() {
    let g = parse(SMALL).unwrap();
    verify(&g).unwrap();
    assert_eq!(g.types.len(), 4);
}

#[test]
fn parser_rejects_undefined_value_with_its_line() {
    assert_parse_err(
        &small_with(4, "  %z = sigmoid(%q) : f32[batch, 4]"),
        4,
        "use of undefined value %q",
    );
    assert_parse_err(&small_with(5, "  return %q"), 5, "use of undefined value %q");
}

#[test]
fn parser_rejects_value_defined_twice() {
    assert_parse_err(
        &small_with(4, "  %y = sigmoid(%y) : f32[batch, 4]"),
        4,
        "value %y is defined twice",
    );
    assert_parse_err(
        &small_with(2, "  %x = weight \"w\" : f32[4, 8]"),
        2,
        "value %x is defined twice",
    );
}

#[test]
fn parser_rejects_unknown_op() {
    assert_parse_err(
        &small_with(4, "  %z = softmax(%y) : f32[batch, 4]"),
        4,
        "unknown op `softmax`",
    );
}

#[test]
fn parser_rejects_unknown_attribute() {
    assert_parse_err(
        &small_with(4, "  %z = sigmoid(%y) {axis = 1} : f32[batch, 4]"),
        4,
        "unknown attribute `axis` for sigmoid",
    );
}

#[test]
fn parser_rejects_missing_attribute() {
    let src = small_with(4, "  %z = rms_norm(%x, %x) : f32[batch, 8]");
    assert_parse_err(&src, 4, "missing attribute `eps`");
    let src = small_with(4, "  %z = rope_cos(%x) {head_dim = 4} : f32[batch, 8, 4]");
    assert_parse_err(&src, 4, "missing attribute `theta`");
}

#[test]
fn parser_rejects_bad_dtype() {
    assert_parse_err(
        &small_with(3, "  %y = linear(%x, %w) : f31[batch, 4]"),
        3,
        "unknown dtype `f31`",
    );
}

#[test]
fn parser_rejects_unterminated_string() {
    assert_parse_err(
        &small_with(2, "  %w = weight \"w : f32[4, 8]"),
        2,
        "unterminated string",
    );
}

#[test]
fn parser_rejects_bad_policy_string() {
    let src = LOOP.replace("policy = \"last\"", "policy = \"early\"");
    assert_parse_err(&src, 4, "invalid exit policy `early`");
    let src = LOOP.replace("policy = \"last\"", "policy = \"threshold:1.5\"");
    assert_parse_err(&src, 4, "threshold must be in (0, 1]");
}

#[test]
fn parser_rejects_trailing_garbage() {
    let src = format!("{SMALL}extra\n");
    assert_parse_err(&src, 7, "unexpected `extra` after the end of the graph");
}

#[test]
fn parser_rejects_missing_return() {
    let src = SMALL.replace("  return %z\n", "");
    assert_parse_err(&src, 5, "expected an op or `return`, found `}`");
}

// ---------------------------------------------------------------------------
// 3. Verifier
// ---------------------------------------------------------------------------

/// A loop base: %x=0 %w=1 %g=2 %l=3 %s=4 %h=5 %y=6 %e=7 %lam=8.
const LOOP: &str = r#"graph @v(%x: f32[batch, seq, 8]) {
  %w = weight "w" : f32[8, 8]
  %g = weight "g" : f32[1, 8]
  %l = loop(%x) {steps = 3, policy = "last"} : f32[batch, seq, 8] {
  ^body(%s: i32[], %h: f32[batch, seq, 8]):
    %y = linear(%h, %w) : f32[batch, seq, 8]
    %e = linear(%y, %g) : f32[batch, seq, 1]
    %lam = sigmoid(%e) : f32[batch, seq, 1]
    yield next(%y) out(%y) exit(%lam)
  }
  return %l
}
"#;

/// An op base: %x=0 %p=1 %w=2 %y=3 %z=4.
const OPS: &str = r#"graph @ops(%x: f32[batch, seq, 8], %p: i32[batch, seq]) {
  %w = weight "w" : f32[4, 8]
  %y = linear(%x, %w) : f32[batch, seq, 4]
  %z = add(%y, %y) : f32[batch, seq, 4]
  return %z
}
"#;

fn edit(base: &str, from: &str, to: &str) -> String {
    assert_eq!(base.matches(from).count(), 1, "`{from}` must occur once");
    base.replace(from, to)
}

fn verify_text(src: &str) -> Result<(), VerifyError> {
    verify(&parse(src).unwrap_or_else(|e| panic!("{e}\n{src}")))
}

fn assert_rejected(g: &Graph, value: u32, needle: &str) {
    let e = verify(g).expect_err("the verifier should reject this graph");
    assert_eq!(e.value, Some(ValueId(value)), "wrong value for `{}`", e.msg);
    assert!(
        e.msg.contains(&format!("%{value}")),
        "`{}` does not name %{value}",
        e.msg
    );
    assert!(e.msg.contains(needle), "expected `{needle}` in `{}`", e.msg);
}

fn assert_text_rejected(src: &str, value: u32, needle: &str) {
    assert_rejected(&parse(src).unwrap_or_else(|e| panic!("{e}\n{src}")), value, needle);
}

#[test]
fn verifier_accepts_the_base_graphs() {
    verify_text(LOOP).unwrap();
    verify_text(OPS).unwrap();
}

#[test]
fn verifier_rejects_linear_with_mismatched_in_features() {
    let src = edit(OPS, "weight \"w\" : f32[4, 8]", "weight \"w\" : f32[4, 6]");
    assert_text_rejected(&src, 3, "has 8 features but weight f32[4, 6] expects 6");
}

#[test]
fn verifier_rejects_add_of_different_shapes() {
    let src = edit(OPS, "add(%y, %y)", "add(%y, %x)");
    assert_text_rejected(&src, 4, "add operands differ: f32[batch, seq, 4] vs f32[batch, seq, 8]");
}

#[test]
fn verifier_rejects_declared_type_disagreeing_with_inference() {
    let src = edit(
        OPS,
        "%y = linear(%x, %w) : f32[batch, seq, 4]",
        "%y = linear(%x, %w) : f32[batch, seq, 5]",
    );
    assert_text_rejected(
        &src,
        3,
        "is declared f32[batch, seq, 5] but its operands give f32[batch, seq, 4]",
    );
    let src = edit(
        OPS,
        "%y = linear(%x, %w) : f32[batch, seq, 4]",
        "%y = linear(%x, %w) : bf16[batch, seq, 4]",
    );
    assert_text_rejected(
        &src,
        3,
        "is declared bf16[batch, seq, 4] but its operands give f32[batch, seq, 4]",
    );
}

#[test]
fn verifier_rejects_carried_type_differing_from_initial_value() {
    let src = edit(LOOP, "%h: f32[batch, seq, 8]", "%h: bf16[batch, seq, 8]");
    assert_text_rejected(
        &src,
        5,
        "carried %5 has type bf16[batch, seq, 8] but its initial value %0 has f32[batch, seq, 8]",
    );
}

#[test]
fn verifier_rejects_yielded_next_value_of_the_wrong_type() {
    let src = edit(LOOP, "next(%y)", "next(%e)");
    assert_text_rejected(
        &src,
        7,
        "next value %7 has type f32[batch, seq, 1] but carried %5 has f32[batch, seq, 8]",
    );
}

#[test]
fn verifier_rejects_exit_signal_of_the_wrong_shape() {
    let src = edit(LOOP, "exit(%lam)", "exit(%y)");
    assert_text_rejected(
        &src,
        6,
        "exit signal %6 has type f32[batch, seq, 8], expected shape like f32[batch, seq, 1]",
    );
}

#[test]
fn verifier_rejects_step_policy_out_of_range() {
    let src = edit(LOOP, "policy = \"last\"", "policy = \"step:5\"");
    assert_text_rejected(&src, 3, "exit policy step:5 is out of range for a loop of 3 steps");
    // The last step is in range.
    verify_text(&edit(LOOP, "policy = \"last\"", "policy = \"step:2\"")).unwrap();
}

#[test]
fn verifier_rejects_two_attention_ops_on_the_same_layer() {
    let src = r#"graph @a(%q: f32[batch, seq, 8], %k: f32[batch, seq, 4]) {
  %a0 = attention(%q, %k, %k) {layer = 0, heads = 2, kv_heads = 1, head_dim = 4} : f32[batch, seq, 8]
  %a1 = attention(%a0, %k, %k) {layer = 0, heads = 2, kv_heads = 1, head_dim = 4} : f32[batch, seq, 8]
  return %a1
}
"#;
    assert_text_rejected(src, 3, "uses KV layer 0 already used by %2");
    let distinct = src.replacen("layer = 0", "layer = 1", 1);
    verify_text(&distinct).unwrap();
}

#[test]
fn verifier_rejects_nested_loop() {
    let src = r#"graph @nested(%x: f32[batch, 8]) {
  %g = weight "g" : f32[1, 8]
  %outer = loop(%x) {steps = 2, policy = "last"} : f32[batch, 8] {
  ^body(%s: i32[], %h: f32[batch, 8]):
    %inner = loop(%h) {steps = 2, policy = "last"} : f32[batch, 8] {
    ^body(%t: i32[], %k: f32[batch, 8]):
      %e = linear(%k, %g) : f32[batch, 1]
      %lam = sigmoid(%e) : f32[batch, 1]
      yield next(%k) out(%k) exit(%lam)
    }
    %e2 = linear(%inner, %g) : f32[batch, 1]
    %lam2 = sigmoid(%e2) : f32[batch, 1]
    yield next(%inner) out(%inner) exit(%lam2)
  }
  return %outer
}
"#;
    assert_text_rejected(src, 5, "nested loops are not supported");
}

#[test]
fn verifier_rejects_loop_result_type_differing_from_out() {
    let src = edit(
        LOOP,
        "\"last\"} : f32[batch, seq, 8]",
        "\"last\"} : bf16[batch, seq, 8]",
    );
    assert_text_rejected(
        &src,
        3,
        "is declared bf16[batch, seq, 8] but its output %6 has type f32[batch, seq, 8]",
    );
}

#[test]
fn verifier_rejects_use_of_a_body_value_after_the_loop() {
    // The parser's scoping forbids this in text, so mutate a parsed graph.
    let mut g = parse(LOOP).unwrap();
    g.body.term = Terminator::Return(vec![ValueId(6)]);
    assert_rejected(&g, 6, "return uses %6, which is not defined before it in scope");

    // Same for an op after the loop that reads the body's value.
    let mut g = parse(&edit(
        LOOP,
        "  return %l",
        "  %after = sigmoid(%l) : f32[batch, seq, 8]\n  return %after",
    ))
    .unwrap();
    verify(&g).unwrap();
    g.body.ops.last_mut().unwrap().inputs = vec![ValueId(8)];
    assert_rejected(&g, 8, "uses %8, which is not defined before it in scope");
}

#[test]
fn verifier_rejects_a_loop_body_reading_its_own_loop_result() {
    // The parser defines the loop's name before its body, so this parses;
    // the loop's result (%3) only exists after the loop.
    let src = edit(LOOP, "%y = linear(%h, %w)", "%y = linear(%l, %w)");
    assert_text_rejected(&src, 3, "%6 (linear) uses %3, which is not defined before it in scope");
}

#[test]
fn parser_reports_errors_inside_a_loop_body_at_their_line() {
    let src = edit(LOOP, "%lam = sigmoid(%e)", "%lam = sigmoid(%nope)");
    assert_parse_err(&src, 8, "use of undefined value %nope");
    let src = edit(LOOP, "    yield next(%y) out(%y) exit(%lam)\n", "");
    assert_parse_err(&src, 9, "expected an op or `yield`, found `}`");
    // A body value is out of scope after the loop.
    let src = edit(LOOP, "  return %l", "  return %y");
    assert_parse_err(&src, 11, "use of undefined value %y");
}

#[test]
fn verifier_rejects_weight_with_a_symbolic_dim() {
    let src = edit(OPS, "weight \"w\" : f32[4, 8]", "weight \"w\" : f32[batch, 8]");
    assert_text_rejected(
        &src,
        2,
        "\"w\" must be a float tensor with fixed dims, got f32[batch, 8]",
    );
}

#[test]
fn verifier_rejects_rope_on_a_tensor_whose_width_is_not_heads_times_head_dim() {
    let src = r#"graph @r(%x: f32[batch, seq, 6], %p: i32[batch, seq]) {
  %c = rope_cos(%p) {head_dim = 4, theta = 10000.0} : f32[batch, seq, 4]
  %s = rope_sin(%p) {head_dim = 4, theta = 10000.0} : f32[batch, seq, 4]
  %r = rope(%x, %c, %s) {heads = 2, head_dim = 4} : f32[batch, seq, 6]
  return %r
}
"#;
    assert_text_rejected(src, 4, "must have last dim heads*head_dim = 8");
    verify_text(&src.replace("6]", "8]")).unwrap();
}

#[test]
fn verifier_rejects_attention_heads_not_a_multiple_of_kv_heads() {
    let src = r#"graph @a(%q: f32[batch, seq, 12], %k: f32[batch, seq, 8]) {
  %a = attention(%q, %k, %k) {layer = 0, heads = 3, kv_heads = 2, head_dim = 4} : f32[batch, seq, 12]
  return %a
}
"#;
    assert_text_rejected(src, 2, "attention heads 3 is not a multiple of kv_heads 2");
}

#[test]
fn verifier_rejects_mutated_lm_graph_with_duplicate_value_definition() {
    // A pass that reuses a result id: the second definition is the fault.
    let mut g = lm_graph(DType::F32, ExitPolicy::Last);
    let first_weight = g.body.ops[0].result();
    g.body.ops[1].results = vec![first_weight];
    assert_rejected(&g, first_weight.0, "is defined more than once");
}

// ---------------------------------------------------------------------------
// 4. Interpreter numerics on hand-checkable graphs
// ---------------------------------------------------------------------------

fn tensor(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), data.to_vec())
}

fn weights(pairs: &[(&str, &[f32])]) -> HashMap<String, Vec<f32>> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()
}

fn run_graph(g: &Graph, w: &HashMap<String, Vec<f32>>, opts: Options, inputs: &[Tensor]) -> Vec<Tensor> {
    verify(g).unwrap_or_else(|e| panic!("{e}\n{g}"));
    let mut it = Interpreter::new(g, w, opts).unwrap();
    it.run(inputs).unwrap_or_else(|e| panic!("{e}")).outputs
}

#[test]
fn rms_norm_matches_hand_computation() {
    let mut b = GraphBuilder::new("rms");
    let x = b.input(Type::fixed(DType::F32, &[2, 4]));
    let w = b.weight("w", Type::fixed(DType::F32, &[4]));
    let y = b.op(OpKind::RmsNorm { eps: 1e-6 }, &[x, w], DType::F32).unwrap();
    let g = b.finish(&[y]);
    let ws = weights(&[("w", &[0.5, 1.0, 1.5, 2.0])]);
    let out = run_graph(
        &g,
        &ws,
        Options::default(),
        &[tensor(&[2, 4], &[1.0, 2.0, 3.0, 4.0, -2.0, 0.0, 0.0, 2.0])],
    );
    // Row 0: mean square 7.5; row 1: mean square 2.
    let inv0 = 1.0 / (7.5f64 + 1e-6).sqrt();
    let inv1 = 1.0 / (2.0f64 + 1e-6).sqrt();
    let want: Vec<f32> = [
        0.5 * inv0,
        2.0 * inv0,
        4.5 * inv0,
        8.0 * inv0,
        -inv1,
        0.0,
        0.0,
        4.0 * inv1,
    ]
    .iter()
    .map(|&v| v as f32)
    .collect();
    assert_eq!(out[0].shape, vec![2, 4]);
    assert_close(&out[0].data, &want, 1e-6, "rms_norm");
}

#[test]
fn linear_with_bias_computes_x_w_transposed_plus_b() {
    let mut b = GraphBuilder::new("lin");
    let x = b.input(Type::new(DType::F32, vec![Dim::sym("batch"), Dim::Fixed(2)]));
    let w = b.weight("w", Type::fixed(DType::F32, &[3, 2]));
    let bias = b.weight("b", Type::fixed(DType::F32, &[3]));
    let y = b.op(OpKind::Linear, &[x, w, bias], DType::F32).unwrap();
    let g = b.finish(&[y]);
    let ws = weights(&[("w", &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), ("b", &[0.5, -1.0, 2.0])]);
    let out = run_graph(&g, &ws, Options::default(), &[tensor(&[2, 2], &[1.0, 2.0, 3.0, -1.0])]);
    assert_eq!(out[0].shape, vec![2, 3]);
    assert_eq!(out[0].data, vec![1.5, 1.0, 5.0, 3.5, -2.0, 4.0]);
}

/// `rope(x, cos(pos), sin(pos))` with 2 heads of dim 4, theta 10000.
fn rope_graph() -> Graph {
    let mut b = GraphBuilder::new("rope");
    let x = b.input(Type::act(DType::F32, 8));
    let p = b.input(Type::new(DType::I32, vec![Dim::sym("batch"), Dim::sym("seq")]));
    let t = RopeTable {
        head_dim: 4,
        theta: 10000.0,
    };
    let c = b.op(OpKind::RopeCos(t), &[p], DType::F32).unwrap();
    let s = b.op(OpKind::RopeSin(t), &[p], DType::F32).unwrap();
    let r = b
        .op(OpKind::Rope { heads: 2, head_dim: 4 }, &[x, c, s], DType::F32)
        .unwrap();
    b.finish(&[r, c, s])
}

#[test]
fn rope_at_position_zero_is_identity() {
    let g = rope_graph();
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.7 - 2.0).collect();
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[tensor(&[1, 1, 8], &x), tensor(&[1, 1], &[0.0])],
    );
    assert_eq!(out[0].data, x);
    assert_eq!(out[1].data, vec![1.0; 4]);
    assert_eq!(out[2].data, vec![0.0; 4]);
}

#[test]
fn rope_rotates_first_and_second_half_pairs_by_position_times_inv_freq() {
    let g = rope_graph();
    let p = 3.0f64;
    let x: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, -3.0];
    // Two positions in one sequence: position 0 (identity) and position p.
    let mut xs = x.clone();
    xs.extend(&x);
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[tensor(&[1, 2, 8], &xs), tensor(&[1, 2], &[0.0, p as f32])],
    );
    assert_eq!(row(&out[0], 0), &x[..]);
    // inv_freq = [1, 10000^(-1/2)] for head_dim 4; pair (j, j + 2) rotates by p * inv_freq[j].
    let inv = [1.0f64, 0.01];
    let mut want = vec![0.0f32; 8];
    for h in 0..2 {
        for j in 0..2 {
            let (a, bb) = (x[h * 4 + j] as f64, x[h * 4 + j + 2] as f64);
            let ang = p * inv[j];
            want[h * 4 + j] = (a * ang.cos() - bb * ang.sin()) as f32;
            want[h * 4 + j + 2] = (bb * ang.cos() + a * ang.sin()) as f32;
        }
    }
    assert_close(row(&out[0], 1), &want, 1e-5, "rope at position 3");
    assert_close(
        row(&out[1], 1),
        &[
            3f64.cos() as f32,
            0.03f64.cos() as f32,
            3f64.cos() as f32,
            0.03f64.cos() as f32,
        ],
        1e-6,
        "cos",
    );
    assert_close(
        row(&out[2], 1),
        &[
            3f64.sin() as f32,
            0.03f64.sin() as f32,
            3f64.sin() as f32,
            0.03f64.sin() as f32,
        ],
        1e-6,
        "sin",
    );
}

#[test]
fn sigmoid_and_silu_match_their_formulas() {
    let mut b = GraphBuilder::new("act");
    let x = b.input(Type::fixed(DType::F32, &[5]));
    let s = b.op(OpKind::Sigmoid, &[x], DType::F32).unwrap();
    let si = b.op(OpKind::Silu, &[x], DType::F32).unwrap();
    let g = b.finish(&[s, si]);
    let xs = [-2.0f32, 0.0, 1.0, 3.0, -20.0];
    let out = run_graph(&g, &HashMap::new(), Options::default(), &[tensor(&[5], &xs)]);
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let want_s: Vec<f32> = xs.iter().map(|&v| sig(v as f64) as f32).collect();
    let want_si: Vec<f32> = xs.iter().map(|&v| (v as f64 * sig(v as f64)) as f32).collect();
    assert_eq!(out[0].data[1], 0.5);
    assert_eq!(out[1].data[1], 0.0);
    assert_close(&out[0].data, &want_s, 1e-6, "sigmoid");
    assert_close(&out[1].data, &want_si, 1e-6, "silu");
    assert!((out[1].data[0] - (-0.238_405_84)).abs() < 1e-6);
}

/// `attention(q, k, v)` on graph inputs.
fn attention_graph(heads: usize, kv_heads: usize, head_dim: usize) -> Graph {
    let mut b = GraphBuilder::new("attn");
    let q = b.input(Type::act(DType::F32, heads * head_dim));
    let k = b.input(Type::act(DType::F32, kv_heads * head_dim));
    let v = b.input(Type::act(DType::F32, kv_heads * head_dim));
    let a = Attention {
        layer: 0,
        heads,
        kv_heads,
        head_dim,
    };
    let o = b.op(OpKind::Attention(a), &[q, k, v], DType::F32).unwrap();
    b.finish(&[o])
}

#[test]
fn attention_over_a_single_position_returns_v() {
    let g = attention_graph(2, 1, 4);
    let q = [0.3, -1.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0];
    let k = [0.1, 0.2, 0.3, 0.4];
    let v = [1.5, -2.0, 0.25, 7.0];
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[tensor(&[1, 1, 8], &q), tensor(&[1, 1, 4], &k), tensor(&[1, 1, 4], &v)],
    );
    assert_eq!(out[0].data, [v, v].concat());
}

#[test]
fn attention_over_two_positions_is_the_softmax_weighted_sum_of_v() {
    let g = attention_graph(2, 1, 4);
    let q = [
        [0.3f32, -1.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0],
        [0.5, 0.5, -0.5, 1.0, -2.0, 0.0, 1.0, 0.3],
    ];
    let k = [[0.1f32, 0.2, 0.3, 0.4], [1.0, -0.5, 0.2, 0.8]];
    let v = [[1.5f32, -2.0, 0.25, 7.0], [-1.0, 3.0, 0.5, 2.0]];
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[
            tensor(&[1, 2, 8], &q.concat()),
            tensor(&[1, 2, 4], &k.concat()),
            tensor(&[1, 2, 4], &v.concat()),
        ],
    );
    // Token 0 sees only position 0.
    assert_eq!(row(&out[0], 0), &[v[0], v[0]].concat()[..]);
    // Token 1: per head, softmax over scores q.k_j / sqrt(4).
    let mut want = Vec::new();
    for h in 0..2 {
        let qh = &q[1][h * 4..h * 4 + 4];
        let s: Vec<f64> = k
            .iter()
            .map(|kj| qh.iter().zip(kj).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * 0.5)
            .collect();
        let e: Vec<f64> = s.iter().map(|x| x.exp()).collect();
        let (p0, p1) = (e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1]));
        assert!(p0 > 0.05 && p1 > 0.05, "both positions must matter");
        want.extend((0..4).map(|i| (p0 * v[0][i] as f64 + p1 * v[1][i] as f64) as f32));
    }
    assert_close(row(&out[0], 1), &want, 1e-6, "attention token 1");
}

#[test]
fn attention_is_causal_earlier_tokens_ignore_later_ones() {
    let g = attention_graph(2, 1, 4);
    let mut rng = Rng::new("causal");
    let mut r = |n: usize| (0..n).map(|_| rng.next() * 4.0).collect::<Vec<f32>>();
    let (q, k, v) = (r(3 * 8), r(3 * 4), r(3 * 4));
    let run = |n: usize| {
        run_graph(
            &g,
            &HashMap::new(),
            Options::default(),
            &[
                tensor(&[1, n, 8], &q[..n * 8]),
                tensor(&[1, n, 4], &k[..n * 4]),
                tensor(&[1, n, 4], &v[..n * 4]),
            ],
        )
        .remove(0)
    };
    let one = run(1);
    let two = run(2);
    let three = run(3);
    assert_eq!(row(&one, 0), row(&three, 0));
    assert_eq!(row(&two, 1), row(&three, 1));
    // The later tokens do attend to more than themselves.
    assert_ne!(row(&three, 2), &[&v[8..12], &v[8..12]].concat()[..]);
}

#[test]
fn attention_query_heads_of_a_group_read_the_same_kv_head() {
    // 4 query heads, 2 kv heads: heads 0,1 read kv head 0; heads 2,3 read kv head 1.
    let g = attention_graph(4, 2, 2);
    let q = [1.0, 0.0, 0.0, 1.0, -1.0, 0.5, 0.2, 0.2];
    let k = [0.3, 0.3, -0.7, 0.1];
    let v = [1.0, 2.0, 3.0, 4.0];
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[tensor(&[1, 1, 8], &q), tensor(&[1, 1, 4], &k), tensor(&[1, 1, 4], &v)],
    );
    assert_eq!(out[0].data, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);

    // With a second position, head 1 mixes kv head 0's values with its own scores.
    let q2 = [[0.0f32; 8], [0.5, -1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 1.0]];
    let k2 = [[0.3f32, 0.3, -0.7, 0.1], [1.0, 0.0, 0.5, -0.5]];
    let v2 = [[1.0f32, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]];
    let out = run_graph(
        &g,
        &HashMap::new(),
        Options::default(),
        &[
            tensor(&[1, 2, 8], &q2.concat()),
            tensor(&[1, 2, 4], &k2.concat()),
            tensor(&[1, 2, 4], &v2.concat()),
        ],
    );
    let scale = 0.5f64.sqrt();
    let mut want = Vec::new();
    for h in 0..4 {
        let kvh = h / 2;
        let qh = &q2[1][h * 2..h * 2 + 2];
        let s: Vec<f64> = (0..2)
            .map(|j| {
                let kj = &k2[j][kvh * 2..kvh * 2 + 2];
                qh.iter().zip(kj).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * scale
            })
            .collect();
        let e: Vec<f64> = s.iter().map(|x| x.exp()).collect();
        let z = e[0] + e[1];
        want.extend((0..2).map(|i| ((e[0] * v2[0][kvh * 2 + i] as f64 + e[1] * v2[1][kvh * 2 + i] as f64) / z) as f32));
    }
    assert_close(row(&out[0], 1), &want, 1e-6, "gqa token 1");
}

/// `y = linear(x, w)`, `s = sigmoid(y)`, `z = add(s, s)`, all in `d`.
fn rounding_graph(d: DType) -> Graph {
    let mut b = GraphBuilder::new("round");
    let x = b.input(Type::fixed(d, &[1, 3]));
    let w = b.weight("w", Type::fixed(d, &[2, 3]));
    let y = b.op(OpKind::Linear, &[x, w], d).unwrap();
    let s = b.op(OpKind::Sigmoid, &[y], d).unwrap();
    let z = b.op(OpKind::Add, &[y, s], d).unwrap();
    b.finish(&[y, s, z])
}

#[test]
fn bf16_values_are_rounded_at_each_op_result_unless_rounding_is_off() {
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
    // Row 0 of w sums x to 1 + 2^-8 (a bf16 tie: rounds to 1); row 1 holds
    // 1 + 2^-9, which bf16 itself cannot hold (the weight rounds to 1 on load).
    let ws = weights(&[("w", &[1.0, 1.0, 0.0, 1.0 + 1.0 / 512.0, 0.0, 0.0])]);
    let x = tensor(&[1, 3], &[1.0, 1.0 / 256.0, 5.0]);

    let g = rounding_graph(DType::BF16);
    let out = run_graph(&g, &ws, Options::default(), std::slice::from_ref(&x));
    assert_eq!(out[0].data, vec![1.0, 1.0]);
    let s = bf(sig(1.0));
    assert_ne!(s, sig(1.0));
    assert_eq!(out[1].data, vec![s, s]);
    assert_eq!(out[2].data, vec![bf(1.0 + s), bf(1.0 + s)]);

    let off = Options {
        round_low_precision: false,
        ..Options::default()
    };
    let out = run_graph(&g, &ws, off, std::slice::from_ref(&x));
    let y = [1.0 + 1.0 / 256.0, 1.0 + 1.0 / 512.0];
    assert_eq!(out[0].data, y.to_vec());
    assert_eq!(out[1].data, vec![sig(y[0]), sig(y[1])]);
    assert_eq!(out[2].data, vec![y[0] + sig(y[0]), y[1] + sig(y[1])]);

    // The same graph typed f32 does not round even with rounding on.
    let g32 = rounding_graph(DType::F32);
    let out32 = run_graph(&g32, &ws, Options::default(), &[x]);
    assert_eq!(out32[0].data, y.to_vec());
    assert_eq!(out32[2].data, out[2].data);
}

// ---------------------------------------------------------------------------
// 5. Loop semantics on the tiny LM
// ---------------------------------------------------------------------------

fn lambdas(trace: &ouroc_ir::LoopTrace, token: usize) -> Vec<f32> {
    trace.exit_signals.iter().map(|e| e.data[token]).collect()
}

#[test]
fn trace_records_every_step_and_the_steps_differ() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    let out = run_tokens(&mut it, &[PROMPT.to_vec(), vec![2, 7, 1, 8, 2, 8]]);
    let trace = out.trace.expect("the LM has a loop");
    assert_eq!(trace.step_outputs.len(), STEPS);
    assert_eq!(trace.exit_signals.len(), STEPS);
    assert_eq!(trace.exit_step.len(), 2 * PROMPT.len());
    for (o, e) in trace.step_outputs.iter().zip(&trace.exit_signals) {
        assert_eq!(o.shape, vec![2, PROMPT.len(), HIDDEN]);
        assert_eq!(e.shape, vec![2, PROMPT.len(), 1]);
        assert!(e.data.iter().all(|&l| l > 0.0 && l < 1.0));
    }
    assert_ne!(trace.step_outputs[0], trace.step_outputs[1]);
    assert_ne!(trace.step_outputs[1], trace.step_outputs[2]);
    assert_eq!(out.outputs[0].shape, vec![2, PROMPT.len(), VOCAB]);
    assert_eq!(it.past_len(), PROMPT.len());
}

#[test]
fn step_policy_selects_that_steps_output_and_last_the_final_one() {
    for k in 0..STEPS {
        let g = lm_graph(DType::F32, ExitPolicy::Step(k));
        let w = weights_for(&g);
        let out = run_tokens(&mut interp(&g, &w), &[PROMPT.to_vec()]);
        let trace = out.trace.unwrap();
        assert_eq!(out.outputs[1], trace.step_outputs[k], "step:{k}");
        assert!(trace.exit_step.iter().all(|&s| s == k));
    }
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let out = run_tokens(&mut interp(&g, &w), &[PROMPT.to_vec()]);
    let trace = out.trace.unwrap();
    assert_eq!(out.outputs[1], trace.step_outputs[STEPS - 1]);
    assert!(trace.exit_step.iter().all(|&s| s == STEPS - 1));
}

#[test]
fn weighted_policy_is_the_exit_distribution_weighted_sum_of_step_outputs() {
    let g = lm_graph(DType::F32, ExitPolicy::Weighted);
    let w = weights_for(&g);
    let out = run_tokens(&mut interp(&g, &w), &[PROMPT.to_vec()]);
    let trace = out.trace.unwrap();
    let result = &out.outputs[1];
    for t in 0..PROMPT.len() {
        let p = exit_distribution(&lambdas(&trace, t), DType::F32);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let mut want = vec![0.0f32; HIDDEN];
        for (pr, o) in p.iter().zip(&trace.step_outputs) {
            for (wv, x) in want.iter_mut().zip(row(o, t)) {
                *wv += pr * x;
            }
        }
        assert_close(row(result, t), &want, 1e-6, &format!("token {t}"));
        assert_ne!(row(result, t), row(&trace.step_outputs[STEPS - 1], t));
    }
    assert!(trace.exit_step.iter().all(|&s| s == STEPS - 1));
}

#[test]
fn threshold_policies_exit_where_exit_step_says_per_token() {
    let mut seen = std::collections::BTreeSet::new();
    for policy in all_policies() {
        let g = lm_graph(DType::F32, policy);
        let w = weights_for(&g);
        let out = run_tokens(&mut interp(&g, &w), &[PROMPT.to_vec(), vec![0, 10, 2, 6, 6, 3]]);
        let trace = out.trace.unwrap();
        for t in 0..2 * PROMPT.len() {
            let s = policy.exit_step(&lambdas(&trace, t));
            assert_eq!(trace.exit_step[t], s, "{policy} token {t}");
            if policy != ExitPolicy::Weighted {
                assert_eq!(
                    row(&out.outputs[1], t),
                    row(&trace.step_outputs[s], t),
                    "{policy} token {t}"
                );
            }
            if policy == ExitPolicy::parse("threshold:0.5").unwrap() {
                seen.insert(s);
            }
        }
    }
    // The weights make threshold:0.5 exit at different steps for different tokens.
    assert!(seen.len() > 1, "threshold:0.5 exits only at {seen:?}");
}

#[test]
fn prefill_equals_token_by_token_decode_for_every_policy() {
    let seqs = [PROMPT.to_vec(), vec![2, 7, 1, 8, 2, 8]];
    for d in [DType::F32, DType::BF16] {
        for policy in all_policies() {
            let g = lm_graph(d, policy);
            let w = weights_for(&g);
            let full = run_tokens(&mut interp(&g, &w), &seqs);
            let full_trace = full.trace.unwrap();
            let mut it = interp(&g, &w);
            for i in 0..PROMPT.len() {
                let step: Vec<Vec<u32>> = seqs.iter().map(|s| vec![s[i]]).collect();
                let one = run_tokens(&mut it, &step);
                let trace = one.trace.unwrap();
                assert_eq!(it.past_len(), i + 1);
                for b in 0..2 {
                    let t = b * PROMPT.len() + i;
                    let what = format!("{d} {policy} seq {b} token {i}");
                    assert_close(row(&one.outputs[0], b), row(&full.outputs[0], t), 1e-5, &what);
                    assert_eq!(trace.exit_step[b], full_trace.exit_step[t], "{what}");
                }
            }
        }
    }
}

#[test]
fn reset_forgets_the_kv_cache() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    let first = run_tokens(&mut it, &[PROMPT.to_vec()]);
    assert_eq!(it.past_len(), PROMPT.len());
    // Without a reset, the same prompt continues the sequence: different logits.
    let continued = run_tokens(&mut it, &[PROMPT.to_vec()]);
    assert_eq!(it.past_len(), 2 * PROMPT.len());
    assert_ne!(continued.outputs[0], first.outputs[0]);
    it.reset();
    assert_eq!(it.past_len(), 0);
    let again = run_tokens(&mut it, &[PROMPT.to_vec()]);
    assert_eq!(again.outputs[0], first.outputs[0]);
    // After a reset the batch size may change too.
    it.reset();
    let two = run_tokens(&mut it, &[PROMPT.to_vec(), PROMPT.to_vec()]);
    assert_eq!(row(&two.outputs[0], PROMPT.len()), row(&first.outputs[0], 0));
}

#[test]
fn run_tokens_rejects_empty_input() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    for ids in [vec![], vec![vec![]], vec![vec![], vec![]]] {
        match run_err(&mut it, &ids) {
            InterpError::Input(m) => assert!(m.contains("no tokens"), "{m}"),
            e => panic!("unexpected {e}"),
        }
    }
    assert_eq!(it.past_len(), 0);
}

#[test]
fn run_tokens_rejects_token_ids_outside_the_vocabulary() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    match run_err(&mut it, &[vec![1, VOCAB as u32, 2]]) {
        InterpError::Input(m) => assert!(m.contains("token id 11 is out of the vocabulary (0..11)"), "{m}"),
        e => panic!("unexpected {e}"),
    }
    assert_eq!(it.past_len(), 0);
    // The last id of the vocabulary is fine, and the failed call left no trace.
    let ok = run_tokens(&mut it, &[vec![1, VOCAB as u32 - 1, 2]]);
    let fresh = run_tokens(&mut interp(&g, &w), &[vec![1, VOCAB as u32 - 1, 2]]);
    assert_eq!(ok.outputs[0], fresh.outputs[0]);
}

#[test]
fn run_tokens_rejects_a_ragged_batch() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    match run_err(&mut it, &[vec![1, 2], vec![3]]) {
        InterpError::Input(m) => assert!(m.contains("same length"), "{m}"),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn run_tokens_rejects_a_batch_size_change_against_the_cache() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let mut it = interp(&g, &w);
    run_tokens(&mut it, &[vec![1, 2]]);
    match run_err(&mut it, &[vec![3], vec![4]]) {
        InterpError::Input(m) => assert!(m.contains("batch size 2 differs from the cached batch size 1"), "{m}"),
        e => panic!("unexpected {e}"),
    }
    assert_eq!(it.past_len(), 2);
}

#[test]
fn run_tokens_rejects_exceeding_max_positions() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let w = weights_for(&g);
    let opts = Options {
        max_positions: Some(4),
        ..Options::default()
    };
    let mut it = Interpreter::new(&g, &w, opts).unwrap();
    it.run_tokens(&[vec![1, 2, 3]]).map_err(|e| e.to_string()).unwrap();
    match run_err(&mut it, &[vec![4, 5]]) {
        e @ InterpError::Context { .. } => {
            assert_eq!(
                e,
                InterpError::Context {
                    past: 3,
                    new: 2,
                    limit: 4
                }
            );
            assert!(
                e.to_string().contains("3 cached + 2 new positions > the limit of 4"),
                "{e}"
            );
        }
        e => panic!("unexpected {e}"),
    }
    assert_eq!(it.past_len(), 3);
    // Exactly reaching the limit is allowed.
    it.run_tokens(&[vec![4]]).map_err(|e| e.to_string()).unwrap();
    assert_eq!(it.past_len(), 4);
}

#[test]
fn interpreter_rejects_a_missing_weight() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let mut w = weights_for(&g);
    w.remove("head");
    match new_err(&g, &w) {
        InterpError::Weight { name, msg } => {
            assert_eq!(name, "head");
            assert!(msg.contains("no weight named head"), "{msg}");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn interpreter_rejects_a_weight_with_the_wrong_element_count() {
    let g = lm_graph(DType::F32, ExitPolicy::Last);
    let mut w = weights_for(&g);
    w.get_mut("l0.q").unwrap().pop();
    match new_err(&g, &w) {
        InterpError::Weight { name, msg } => {
            assert_eq!(name, "l0.q");
            assert!(msg.contains("has 63 elements, its type f32[8, 8] needs 64"), "{msg}");
        }
        e => panic!("unexpected {e}"),
    }
}
