//! Parser for the text form printed by `print`. Values get numbers in the
//! order they appear, so the result is canonical. Names are resolved here
//! (an undefined or redefined value is an error with its line); types and
//! shapes are checked by the verifier.

use crate::graph::{Attention, Block, Graph, Loop, NextNorm, Op, OpKind, RopeTable, Terminator, ValueId};
use crate::policy::ExitPolicy;
use crate::types::{DType, Dim, Type};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Value(String),
    Global(String),
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
    Caret(String),
}

struct Lexer {
    toks: Vec<(Tok, usize)>,
}

fn lex(src: &str) -> Result<Lexer, ParseError> {
    let mut toks = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line) = (0, 1);
    let word = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_' || chars[*i] == '.') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            c if c.is_whitespace() => i += 1,
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '%' | '@' | '^' => {
                i += 1;
                let w = word(&mut i);
                if w.is_empty() {
                    return Err(ParseError {
                        line,
                        msg: format!("expected a name after `{c}`"),
                    });
                }
                toks.push((
                    match c {
                        '%' => Tok::Value(w),
                        '@' => Tok::Global(w),
                        _ => Tok::Caret(w),
                    },
                    line,
                ));
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None | Some('\n') => {
                            return Err(ParseError {
                                line,
                                msg: "unterminated string".into(),
                            });
                        }
                        Some('"') => break,
                        Some('\\') => {
                            s.push(*chars.get(i + 1).unwrap_or(&'\\'));
                            i += 2;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
                toks.push((Tok::Str(s), line));
            }
            c if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) => {
                let start = i;
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || chars[i] == '.'
                        || ((chars[i] == '-' || chars[i] == '+') && matches!(chars[i - 1], 'e' | 'E')))
                {
                    i += 1;
                }
                toks.push((Tok::Num(chars[start..i].iter().collect()), line));
            }
            c if c.is_alphabetic() || c == '_' => {
                let w = word(&mut i);
                toks.push((Tok::Ident(w), line));
            }
            '(' | ')' | '{' | '}' | '[' | ']' | ',' | ':' | '=' => {
                toks.push((Tok::Punct(c), line));
                i += 1;
            }
            other => {
                return Err(ParseError {
                    line,
                    msg: format!("unexpected character `{other}`"),
                });
            }
        }
    }
    Ok(Lexer { toks })
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    types: Vec<Type>,
    scopes: Vec<HashMap<String, ValueId>>,
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Value(s) => format!("%{s}"),
        Tok::Global(s) => format!("@{s}"),
        Tok::Caret(s) => format!("^{s}"),
        Tok::Ident(s) | Tok::Num(s) => s.clone(),
        Tok::Str(s) => format!("{s:?}"),
        Tok::Punct(c) => c.to_string(),
    }
}

/// The largest integer (dimension, head count, index) the text may hold: far above any model,
/// and small enough that shape inference's products of two and sums of many cannot overflow.
const MAX_INT: usize = 1 << 32;

type Attrs = HashMap<String, (Tok, usize)>;

impl Parser {
    fn line(&self) -> usize {
        self.toks.get(self.pos).or(self.toks.last()).map(|t| t.1).unwrap_or(1)
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line(),
            msg: msg.into(),
        })
    }

    /// An error about what was just read: reported at the line of the last
    /// consumed token, not of the next one (which may be on a later line).
    fn err_prev<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        let line = self
            .pos
            .checked_sub(1)
            .and_then(|i| self.toks.get(i))
            .map_or_else(|| self.line(), |t| t.1);
        Err(ParseError { line, msg: msg.into() })
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn next(&mut self) -> Result<Tok, ParseError> {
        match self.toks.get(self.pos) {
            Some((t, _)) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => self.err("unexpected end of input"),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), ParseError> {
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            t => {
                self.pos -= 1;
                self.err(format!("expected `{c}`, found `{}`", show(&t)))
            }
        }
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        match self.next()? {
            Tok::Ident(w) if w == kw => Ok(()),
            t => {
                self.pos -= 1;
                self.err(format!("expected `{kw}`, found `{}`", show(&t)))
            }
        }
    }

    fn ty(&mut self) -> Result<Type, ParseError> {
        let dtype = match self.next()? {
            Tok::Ident(d) => match DType::parse(&d) {
                Some(d) => d,
                None => return self.err_prev(format!("unknown dtype `{d}`")),
            },
            t => return self.err_prev(format!("expected a type, found `{}`", show(&t))),
        };
        self.punct('[')?;
        let mut shape = Vec::new();
        while !self.is_punct(']') {
            if !shape.is_empty() {
                self.punct(',')?;
            }
            shape.push(match self.next()? {
                Tok::Num(n) => match n.parse::<usize>() {
                    Ok(v) if v <= MAX_INT => Dim::Fixed(v),
                    Ok(_) => return self.err_prev(format!("dimension {n} is above the limit of {MAX_INT}")),
                    Err(_) => return self.err_prev(format!("invalid dimension `{n}`")),
                },
                Tok::Ident(s) => Dim::Sym(s),
                t => return self.err_prev(format!("expected a dimension, found `{}`", show(&t))),
            });
        }
        self.punct(']')?;
        Ok(Type::new(dtype, shape))
    }

    fn define(&mut self, name: &str, ty: Type) -> Result<ValueId, ParseError> {
        if self.scopes.iter().any(|s| s.contains_key(name)) {
            return self.err_prev(format!("value %{name} is defined twice"));
        }
        self.types.push(ty);
        let v = ValueId((self.types.len() - 1) as u32);
        self.scopes.last_mut().expect("scope").insert(name.to_string(), v);
        Ok(v)
    }

    fn use_value(&mut self) -> Result<ValueId, ParseError> {
        match self.next()? {
            Tok::Value(n) => match self.scopes.iter().rev().find_map(|s| s.get(&n)) {
                Some(v) => Ok(*v),
                None => self.err_prev(format!("use of undefined value %{n}")),
            },
            t => self.err_prev(format!("expected a value, found `{}`", show(&t))),
        }
    }

    fn value_list(&mut self) -> Result<Vec<ValueId>, ParseError> {
        self.punct('(')?;
        let mut vs = Vec::new();
        while !self.is_punct(')') {
            if !vs.is_empty() {
                self.punct(',')?;
            }
            vs.push(self.use_value()?);
        }
        self.punct(')')?;
        Ok(vs)
    }

    fn arg_list(&mut self) -> Result<Vec<ValueId>, ParseError> {
        self.punct('(')?;
        let mut vs = Vec::new();
        while !self.is_punct(')') {
            if !vs.is_empty() {
                self.punct(',')?;
            }
            let name = match self.next()? {
                Tok::Value(n) => n,
                t => return self.err_prev(format!("expected an argument, found `{}`", show(&t))),
            };
            self.punct(':')?;
            let ty = self.ty()?;
            vs.push(self.define(&name, ty)?);
        }
        self.punct(')')?;
        Ok(vs)
    }

    fn attrs(&mut self) -> Result<Attrs, ParseError> {
        let mut a = HashMap::new();
        if !self.is_punct('{') {
            return Ok(a);
        }
        self.punct('{')?;
        while !self.is_punct('}') {
            if !a.is_empty() {
                self.punct(',')?;
            }
            let key = match self.next()? {
                Tok::Ident(k) => k,
                t => return self.err_prev(format!("expected an attribute name, found `{}`", show(&t))),
            };
            self.punct('=')?;
            let line = self.line();
            let val = self.next()?;
            if a.insert(key.clone(), (val, line)).is_some() {
                return self.err_prev(format!("attribute `{key}` given twice"));
            }
        }
        self.punct('}')?;
        Ok(a)
    }

    fn block_body(&mut self, in_loop: bool) -> Result<(Vec<Op>, Terminator), ParseError> {
        let mut ops = Vec::new();
        loop {
            match self.peek() {
                Some(Tok::Ident(k)) if k == "return" && !in_loop => {
                    self.pos += 1;
                    let mut vs = vec![self.use_value()?];
                    while self.is_punct(',') {
                        self.pos += 1;
                        vs.push(self.use_value()?);
                    }
                    return Ok((ops, Terminator::Return(vs)));
                }
                Some(Tok::Ident(k)) if k == "yield" && in_loop => {
                    self.pos += 1;
                    self.keyword("next")?;
                    let next = self.value_list()?;
                    self.keyword("out")?;
                    self.punct('(')?;
                    let out = self.use_value()?;
                    self.punct(')')?;
                    let exit = if matches!(self.peek(), Some(Tok::Ident(k)) if k == "exit") {
                        self.pos += 1;
                        self.punct('(')?;
                        let e = self.use_value()?;
                        self.punct(')')?;
                        Some(e)
                    } else {
                        None
                    };
                    return Ok((ops, Terminator::Yield { next, out, exit }));
                }
                Some(Tok::Value(_)) => ops.push(self.op()?),
                Some(t) => {
                    let t = show(t);
                    let end = if in_loop { "yield" } else { "return" };
                    return self.err(format!("expected an op or `{end}`, found `{t}`"));
                }
                None => return self.err("unexpected end of input inside a block"),
            }
        }
    }

    fn op(&mut self) -> Result<Op, ParseError> {
        let mut names = Vec::new();
        loop {
            match self.next()? {
                Tok::Value(n) => names.push(n),
                t => return self.err_prev(format!("expected a value, found `{}`", show(&t))),
            }
            if !self.is_punct(',') {
                break;
            }
            self.pos += 1;
        }
        let name = names[0].clone();
        self.punct('=')?;
        if names.len() > 1
            && self
                .peek()
                .is_some_and(|t| matches!(t, Tok::Ident(o) if o == "weight" || o == "loop"))
        {
            return self.err("weight and loop have exactly one result");
        }
        let opname = match self.next()? {
            Tok::Ident(o) => o,
            t => return self.err_prev(format!("expected an op name, found `{}`", show(&t))),
        };
        if opname == "weight" {
            let wname = match self.next()? {
                Tok::Str(s) => s,
                t => return self.err_prev(format!("weight needs a quoted tensor name, found `{}`", show(&t))),
            };
            self.punct(':')?;
            let ty = self.ty()?;
            let result = self.define(&name, ty)?;
            return Ok(Op {
                results: vec![result],
                kind: OpKind::Weight { name: wname },
                inputs: vec![],
            });
        }
        let inputs = self.value_list()?;
        let mut attrs = self.attrs()?;
        self.punct(':')?;
        let mut types = vec![self.ty()?];
        while self.is_punct(',') {
            self.pos += 1;
            types.push(self.ty()?);
        }
        if types.len() != names.len() {
            return self.err_prev(format!("{} results but {} types", names.len(), types.len()));
        }
        let ty = types[0].clone();
        if opname == "loop" {
            let result = self.define(&name, ty)?;
            let steps: usize = self.attr_num(&mut attrs, "steps")?;
            let policy = self.attr_policy(&mut attrs, "loop")?;
            self.no_more(attrs, "loop")?;
            self.punct('{')?;
            match self.next()? {
                Tok::Caret(b) if b == "body" => {}
                t => return self.err_prev(format!("expected `^body`, found `{}`", show(&t))),
            }
            self.scopes.push(HashMap::new());
            let args = self.arg_list()?;
            self.punct(':')?;
            let (ops, term) = self.block_body(true)?;
            self.scopes.pop();
            self.punct('}')?;
            let body = Block { args, ops, term };
            return Ok(Op {
                results: vec![result],
                kind: OpKind::Loop(Box::new(Loop { steps, policy, body })),
                inputs,
            });
        }
        let kind = match opname.as_str() {
            "embedding" => OpKind::Embedding,
            "linear" => OpKind::Linear,
            "silu" => OpKind::Silu,
            "sigmoid" => OpKind::Sigmoid,
            "add" => OpKind::Add,
            "mul" => OpKind::Mul,
            "rms_norm" => OpKind::RmsNorm {
                eps: self.attr_num(&mut attrs, "eps")?,
            },
            "rope_cos" | "rope_sin" => {
                let t = RopeTable {
                    head_dim: self.attr_num(&mut attrs, "head_dim")?,
                    theta: self.attr_num(&mut attrs, "theta")?,
                };
                if opname == "rope_cos" {
                    OpKind::RopeCos(t)
                } else {
                    OpKind::RopeSin(t)
                }
            }
            "rope" => OpKind::Rope {
                heads: self.attr_num(&mut attrs, "heads")?,
                head_dim: self.attr_num(&mut attrs, "head_dim")?,
            },
            "rms_scale" => OpKind::RmsScale {
                eps: self.attr_num(&mut attrs, "eps")?,
            },
            "add_rms_norm" => OpKind::AddRmsNorm {
                eps: self.attr_num(&mut attrs, "eps")?,
            },
            "step_end" => {
                let eps = self.attr_num(&mut attrs, "eps")?;
                let next = match attrs.remove("next") {
                    Some((Tok::Str(s), line)) => NextNorm::parse(&s).ok_or_else(|| ParseError {
                        line,
                        msg: format!("step_end next must be \"none\", \"scale\" or \"norm\", got \"{s}\""),
                    })?,
                    Some((t, line)) => {
                        return Err(ParseError {
                            line,
                            msg: format!("next must be a quoted string, found `{}`", show(&t)),
                        });
                    }
                    None => return self.err_prev("step_end needs attribute `next`"),
                };
                let gate = match attrs.remove("gate") {
                    None => true,
                    Some((Tok::Str(s), _)) if s == "none" => false,
                    Some((t, line)) => {
                        return Err(ParseError {
                            line,
                            msg: format!("step_end gate may only be \"none\", found `{}`", show(&t)),
                        });
                    }
                };
                OpKind::StepEnd { eps, next, gate }
            }
            "scale_cols" => OpKind::ScaleCols,
            "swiglu" => OpKind::Swiglu,
            "concat" => OpKind::Concat {
                axis: self.attr_num(&mut attrs, "axis")?,
            },
            "slice" => OpKind::Slice {
                start: self.attr_num(&mut attrs, "start")?,
                len: self.attr_num(&mut attrs, "len")?,
            },
            "exit_select" => OpKind::ExitSelect {
                policy: self.attr_policy(&mut attrs, "exit_select")?,
            },
            "attention" => OpKind::Attention(Attention {
                layer: self.attr_num(&mut attrs, "layer")?,
                heads: self.attr_num(&mut attrs, "heads")?,
                kv_heads: self.attr_num(&mut attrs, "kv_heads")?,
                head_dim: self.attr_num(&mut attrs, "head_dim")?,
            }),
            other => return self.err_prev(format!("unknown op `{other}`")),
        };
        self.no_more(attrs, &opname)?;
        let mut results = Vec::new();
        for (n, t) in names.iter().zip(types) {
            results.push(self.define(n, t)?);
        }
        Ok(Op { results, kind, inputs })
    }

    fn attr_policy(&self, attrs: &mut Attrs, op: &str) -> Result<ExitPolicy, ParseError> {
        match attrs.remove("policy") {
            Some((Tok::Str(s), line)) => ExitPolicy::parse(&s).map_err(|msg| ParseError { line, msg }),
            Some((t, line)) => Err(ParseError {
                line,
                msg: format!("policy must be a quoted string, found `{}`", show(&t)),
            }),
            None => self.err_prev(format!("{op} needs attribute `policy`")),
        }
    }

    fn attr_num<T: std::str::FromStr>(&self, attrs: &mut Attrs, key: &str) -> Result<T, ParseError> {
        match attrs.remove(key) {
            Some((Tok::Num(n), line)) => {
                // Integers are sizes and counts: bounded, so that the products and sums of shape
                // inference cannot overflow.
                if n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u64>().is_ok_and(|v| v > MAX_INT as u64) {
                    return Err(ParseError {
                        line,
                        msg: format!("attribute `{key}` = {n} is above the limit of {MAX_INT}"),
                    });
                }
                // A float that overflows to infinity would print as `inf`, which is not a number
                // of this syntax: refused here rather than printed unreadable.
                if n.parse::<f64>().is_ok_and(|x| !x.is_finite()) {
                    return Err(ParseError {
                        line,
                        msg: format!("attribute `{key}` = {n} is out of the range of f64"),
                    });
                }
                n.parse().map_err(|_| ParseError {
                    line,
                    msg: format!("invalid value `{n}` for attribute `{key}`"),
                })
            }
            Some((t, line)) => Err(ParseError {
                line,
                msg: format!("attribute `{key}` needs a number, found `{}`", show(&t)),
            }),
            None => self.err_prev(format!("missing attribute `{key}`")),
        }
    }

    fn no_more(&self, attrs: Attrs, op: &str) -> Result<(), ParseError> {
        match attrs.into_iter().min_by_key(|(_, (_, line))| *line) {
            Some((k, (_, line))) => Err(ParseError {
                line,
                msg: format!("unknown attribute `{k}` for {op}"),
            }),
            None => Ok(()),
        }
    }
}

/// Parse a graph from its text form.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let lx = lex(src)?;
    let mut p = Parser {
        toks: lx.toks,
        pos: 0,
        types: Vec::new(),
        scopes: vec![HashMap::new()],
    };
    p.keyword("graph")?;
    let name = match p.next()? {
        Tok::Global(n) => n,
        t => return p.err_prev(format!("expected `@name`, found `{}`", show(&t))),
    };
    let args = p.arg_list()?;
    p.punct('{')?;
    let (ops, term) = p.block_body(false)?;
    p.punct('}')?;
    if let Some(t) = p.peek() {
        let t = show(t);
        return p.err(format!("unexpected `{t}` after the end of the graph"));
    }
    Ok(Graph {
        name,
        types: p.types,
        body: Block { args, ops, term },
    })
}
