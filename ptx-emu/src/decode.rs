//! PTX text -> [`Module`]: directives, entry signatures, register and shared
//! declarations, labels, and instructions decoded into [`Op`]s with every
//! modifier checked (anything unknown is an error naming the line).

use std::collections::HashMap;

use super::ir::*;
use super::lex::{Tok, Token, lex};
use super::num::{self, Round};
use super::{CONST_WINDOW, EmuError, Kernel, MAX_CONST, Module, ParamDecl, SHARED_WINDOW};

/// A literal as written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lit {
    Int(i128),
    F32(u32),
    F64(u64),
    Dec(f64),
}

/// An operand before decoding.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    /// A name with an optional `+imm` (`smem+16`).
    Name(String, i64),
    /// `!%p`
    Not(String),
    Lit(Lit),
    Vec(Vec<Raw>),
    /// `[base+off]`; base is a name or absent (absolute address).
    Addr(Option<String>, i64),
    /// `%r|%p`
    Pipe(String, String),
    Sink,
}

#[derive(Debug, Clone, Copy)]
enum RegRef {
    R(u32, Ty),
    P(u32),
}

fn perr(line: u32, msg: impl Into<String>) -> EmuError {
    EmuError::Parse { line, msg: msg.into() }
}

fn parse_lit(s: &str, line: u32) -> Result<Lit, EmuError> {
    let bad = || perr(line, format!("bad number `{s}`"));
    let t = s.strip_suffix('U').unwrap_or(s);
    let lower = t.to_ascii_lowercase();
    if let Some(h) = lower.strip_prefix("0f") {
        if h.len() != 8 {
            return Err(bad());
        }
        return u32::from_str_radix(h, 16).map(Lit::F32).map_err(|_| bad());
    }
    if let Some(h) = lower.strip_prefix("0d") {
        if h.len() != 16 {
            return Err(bad());
        }
        return u64::from_str_radix(h, 16).map(Lit::F64).map_err(|_| bad());
    }
    if let Some(h) = lower.strip_prefix("0x") {
        return u64::from_str_radix(h, 16)
            .map(|v| Lit::Int(i128::from(v)))
            .map_err(|_| bad());
    }
    if let Some(h) = lower.strip_prefix("0b") {
        return u64::from_str_radix(h, 2)
            .map(|v| Lit::Int(i128::from(v)))
            .map_err(|_| bad());
    }
    if lower.contains('.') || lower.contains('e') {
        return lower.parse::<f64>().map(Lit::Dec).map_err(|_| bad());
    }
    if lower.len() > 1 && lower.starts_with('0') {
        return u64::from_str_radix(&lower[1..], 8)
            .map(|v| Lit::Int(i128::from(v)))
            .map_err(|_| bad());
    }
    lower.parse::<u64>().map(|v| Lit::Int(i128::from(v))).map_err(|_| bad())
}

fn neg_lit(l: Lit) -> Lit {
    match l {
        Lit::Int(v) => Lit::Int(-v),
        Lit::F32(b) => Lit::F32(b ^ 0x8000_0000),
        Lit::F64(b) => Lit::F64(b ^ (1 << 63)),
        Lit::Dec(f) => Lit::Dec(-f),
    }
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 }
}

/// The bits of literal `l` as an operand of type `ty`.
fn lit_bits(l: Lit, ty: Ty) -> Result<u64, String> {
    Ok(match ty {
        Ty::F32 => match l {
            Lit::Int(v) => u64::from((v as f64 as f32).to_bits()),
            Lit::F32(b) => u64::from(b),
            Lit::F64(b) => num::f64_to_format(f64::from_bits(b), num::F32, Round::Nearest),
            Lit::Dec(f) => num::f64_to_format(f, num::F32, Round::Nearest),
        },
        Ty::F64 => match l {
            Lit::Int(v) => (v as f64).to_bits(),
            Lit::F32(b) => f64::from(f32::from_bits(b)).to_bits(),
            Lit::F64(b) => b,
            Lit::Dec(f) => f.to_bits(),
        },
        Ty::F16 | Ty::Bf16 => {
            let fmt = if ty == Ty::F16 { num::F16 } else { num::BF16 };
            match l {
                Lit::Int(v) => (v as u64) & 0xffff,
                Lit::F32(b) => num::f64_to_format(f64::from(f32::from_bits(b)), fmt, Round::Nearest),
                Lit::F64(b) => num::f64_to_format(f64::from_bits(b), fmt, Round::Nearest),
                Lit::Dec(f) => num::f64_to_format(f, fmt, Round::Nearest),
            }
        }
        Ty::Pred => match l {
            Lit::Int(v) => u64::from(v != 0),
            _ => return Err("a predicate constant must be 0 or 1".into()),
        },
        _ => match l {
            Lit::Int(v) => (v as u64) & mask(ty.bits()),
            Lit::F32(b) if ty.bits() == 32 && ty.is_bit() => u64::from(b),
            Lit::F64(b) if ty.bits() == 64 && ty.is_bit() => b,
            _ => return Err(format!("a float literal is not a .{} operand", ty.name())),
        },
    })
}

/// PTX operand type compatibility (section "Operand Type Information"): same
/// size, and bit types match anything, integers match integers.
fn compatible(reg: Ty, inst: Ty) -> bool {
    reg.bits() == inst.bits() && (reg == inst || reg.is_bit() || inst.is_bit() || (reg.is_int() && inst.is_int()))
}

/// The relaxed rule of ld/st/cvt data operands: a register wider than the
/// instruction type (integer and bit types).
fn relaxed(reg: Ty, inst: Ty) -> bool {
    compatible(reg, inst) || (reg.bits() > inst.bits() && !inst.is_float() && !reg.is_float())
}

/// Modifiers of one opcode, consumed by the decoder; leftovers are errors.
struct Mods {
    list: Vec<String>,
}

impl Mods {
    fn take(&mut self, m: &str) -> bool {
        if let Some(i) = self.list.iter().position(|x| x == m) {
            self.list.remove(i);
            true
        } else {
            false
        }
    }
    fn take_any(&mut self, set: &[&str]) -> Option<String> {
        let i = self.list.iter().position(|x| set.contains(&x.as_str()))?;
        Some(self.list.remove(i))
    }
    fn take_ty(&mut self) -> Option<Ty> {
        let i = self.list.iter().position(|x| Ty::parse(x).is_some())?;
        Ty::parse(&self.list.remove(i))
    }
    fn take_round(&mut self) -> Option<Round> {
        Some(match self.take_any(&["rn", "rz", "rm", "rp"])?.as_str() {
            "rn" => Round::Nearest,
            "rz" => Round::Zero,
            "rm" => Round::Down,
            _ => Round::Up,
        })
    }
    fn take_iround(&mut self) -> Option<Round> {
        Some(match self.take_any(&["rni", "rzi", "rmi", "rpi"])?.as_str() {
            "rni" => Round::Nearest,
            "rzi" => Round::Zero,
            "rmi" => Round::Down,
            _ => Round::Up,
        })
    }
    fn done(&self) -> Result<(), String> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(format!("unsupported modifier(s) .{}", self.list.join(" .")))
        }
    }
}

/// A variable in `.shared`: its offset in the CTA's shared window.
#[derive(Debug, Clone, Copy)]
struct SharedVar {
    offset: u64,
}

struct Parser<'a> {
    toks: Vec<Token>,
    pos: usize,
    lines: Vec<&'a str>,
    /// module-level `.shared` variables
    shared: HashMap<String, SharedVar>,
    shared_size: u64,
    /// module-level `.extern .shared` names and the largest alignment
    dyn_shared: Vec<String>,
    dyn_align: u64,
    /// module-level `.const` variables: offsets into `const_data`
    consts: HashMap<String, u64>,
    const_data: Vec<u8>,
}

/// Per-function decoding state.
struct Func {
    scopes: Vec<HashMap<String, RegRef>>,
    reg_bits: Vec<u32>,
    npreds: u32,
    labels: HashMap<String, u32>,
    fixups: Vec<(usize, String, u32)>,
    shared: HashMap<String, SharedVar>,
    shared_size: u64,
    dyn_shared: Vec<String>,
    dyn_align: u64,
    params: HashMap<String, (u64, ParamDecl)>,
    insts: Vec<Inst>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a.max(1)) * a.max(1)
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k).map(|t| &t.tok)
    }
    fn line(&self) -> u32 {
        self.toks.get(self.pos).or(self.toks.last()).map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<Tok, EmuError> {
        let t = self
            .toks
            .get(self.pos)
            .ok_or_else(|| perr(self.line(), "unexpected end of input"))?;
        self.pos += 1;
        Ok(t.tok.clone())
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, c: char) -> Result<(), EmuError> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            Err(perr(self.line(), format!("expected `{c}`, found {:?}", self.peek())))
        }
    }
    fn ident(&mut self) -> Result<String, EmuError> {
        let line = self.line();
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            t => Err(perr(line, format!("expected an identifier, found {t:?}"))),
        }
    }
    fn number(&mut self) -> Result<i128, EmuError> {
        let line = self.line();
        let neg = self.eat_punct('-');
        match self.next()? {
            Tok::Num(s) => match parse_lit(&s, line)? {
                Lit::Int(v) => Ok(if neg { -v } else { v }),
                _ => Err(perr(line, format!("expected an integer, found `{s}`"))),
            },
            t => Err(perr(line, format!("expected a number, found {t:?}"))),
        }
    }
    /// Skips every remaining token on the current line (`.loc`, `.file`).
    fn skip_line(&mut self, line: u32) {
        while self.toks.get(self.pos).is_some_and(|t| t.line == line) {
            self.pos += 1;
        }
    }

    fn module(mut self) -> Result<Module, EmuError> {
        let mut m = Module {
            const_data: Vec::new(),
            version: None,
            target: Vec::new(),
            address_size: None,
            kernels: Vec::new(),
            step_limit: 1 << 32,
        };
        while let Some(tok) = self.peek().cloned() {
            let line = self.line();
            let Tok::Ident(d) = tok else {
                return Err(perr(line, format!("unexpected {tok:?} at module scope")));
            };
            self.pos += 1;
            match d.as_str() {
                ".version" => match self.next()? {
                    Tok::Num(v) => m.version = Some(v),
                    t => return Err(perr(line, format!("bad .version {t:?}"))),
                },
                ".target" => loop {
                    m.target.push(self.ident()?);
                    if !self.eat_punct(',') {
                        break;
                    }
                },
                ".address_size" => {
                    let n = self.number()?;
                    if n != 64 {
                        return Err(perr(line, ".address_size must be 64"));
                    }
                    m.address_size = Some(64);
                }
                ".visible" | ".weak" => {}
                ".entry" => m.kernels.push(self.entry()?),
                ".extern" => {
                    let next = self.ident()?;
                    if next != ".shared" {
                        return Err(perr(line, format!("unsupported `.extern {next}`")));
                    }
                    let (name, align, _) = self.var_decl(true)?;
                    self.dyn_shared.push(name);
                    self.dyn_align = self.dyn_align.max(align);
                }
                ".shared" => {
                    let (name, align, size) = self.var_decl(false)?;
                    let offset = align_up(self.shared_size, align);
                    self.shared_size = offset + size;
                    self.shared.insert(name, SharedVar { offset });
                }
                ".const" => self.const_decl()?,
                ".file" | ".loc" => self.skip_line(line),
                ".pragma" => {
                    self.next()?;
                    self.expect_punct(';')?;
                }
                ".func" => {
                    return Err(perr(
                        line,
                        "unsupported directive .func (device functions are not emulated)",
                    ));
                }
                other => return Err(perr(line, format!("unsupported directive `{other}` at module scope"))),
            }
        }
        m.const_data = std::mem::take(&mut self.const_data);
        Ok(m)
    }

    /// `[.align N] .type name[dims] [= init];` after `.const`; initialisers
    /// are a literal or a (nested) brace list of literals.
    fn const_decl(&mut self) -> Result<(), EmuError> {
        let line = self.line();
        let mut align = None;
        let mut ty = None;
        let name = loop {
            let t = self.ident()?;
            match t.as_str() {
                ".align" => align = Some(self.number()? as u64),
                _ if t.starts_with('.') => {
                    ty = Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("unsupported .const type `{t}`")))?);
                }
                _ => break t,
            }
        };
        let ty = ty.ok_or_else(|| perr(line, format!("`{name}` has no type")))?;
        if ty == Ty::Pred {
            return Err(perr(line, "a .const variable cannot be .pred"));
        }
        let mut count = 1u64;
        while self.eat_punct('[') {
            count *= self.number()? as u64;
            self.expect_punct(']')?;
        }
        let mut values = Vec::new();
        if self.eat_punct('=') {
            let mut depth = 0;
            loop {
                let l = self.line();
                match self.next()? {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => depth -= 1,
                    Tok::Punct(',') => {}
                    Tok::Punct('-') => match self.next()? {
                        Tok::Num(n) => values.push(neg_lit(parse_lit(&n, l)?)),
                        t => return Err(perr(l, format!("expected a number after `-`, found {t:?}"))),
                    },
                    Tok::Num(n) => values.push(parse_lit(&n, l)?),
                    t => return Err(perr(l, format!("unexpected {t:?} in the initialiser of `{name}`"))),
                }
                if depth == 0 {
                    break;
                }
            }
        }
        self.expect_punct(';')?;
        if values.len() as u64 > count {
            return Err(perr(
                line,
                format!("`{name}` has {} initialisers for {count} elements", values.len()),
            ));
        }
        let align = align.unwrap_or(u64::from(ty.bytes()));
        let offset = align_up(self.const_data.len() as u64, align);
        let size = count * u64::from(ty.bytes());
        if offset + size > MAX_CONST as u64 {
            return Err(perr(line, format!("`{name}`: .const data exceeds {MAX_CONST} bytes")));
        }
        self.const_data.resize((offset + size) as usize, 0);
        let n = ty.bytes() as usize;
        for (i, v) in values.into_iter().enumerate() {
            let bits = lit_bits(v, ty).map_err(|e| perr(line, format!("`{name}`: {e}")))?;
            let at = offset as usize + i * n;
            self.const_data[at..at + n].copy_from_slice(&bits.to_le_bytes()[..n]);
        }
        if self.consts.insert(name.clone(), offset).is_some() || self.shared.contains_key(&name) {
            return Err(perr(line, format!("`{name}` is declared twice")));
        }
        Ok(())
    }

    /// `[.align N] .type name[dims]...;` after `.shared`; returns name,
    /// alignment and size (0 for `[]`, which only `.extern` may use).
    fn var_decl(&mut self, is_extern: bool) -> Result<(String, u64, u64), EmuError> {
        let line = self.line();
        let mut align = None;
        let mut ty = None;
        let name = loop {
            let t = self.ident()?;
            match t.as_str() {
                ".align" => align = Some(self.number()? as u64),
                _ if t.starts_with('.') => {
                    ty =
                        Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("unsupported variable type `{t}`")))?);
                }
                _ => break t,
            }
        };
        let ty = ty.ok_or_else(|| perr(line, format!("variable `{name}` has no type")))?;
        let mut count = 1u64;
        let mut unsized_array = false;
        while self.eat_punct('[') {
            if self.eat_punct(']') {
                unsized_array = true;
                continue;
            }
            count *= self.number()? as u64;
            self.expect_punct(']')?;
        }
        if self.is_punct('=') {
            return Err(perr(line, "initialisers are not allowed on .shared variables"));
        }
        self.expect_punct(';')?;
        if unsized_array != is_extern {
            return Err(perr(
                line,
                format!("`{name}`: only .extern .shared arrays may be unsized (and they must be)"),
            ));
        }
        let align = align.unwrap_or(u64::from(ty.bytes()));
        if !align.is_power_of_two() {
            return Err(perr(line, format!("`{name}`: alignment {align} is not a power of two")));
        }
        Ok((name, align, count * u64::from(ty.bytes())))
    }

    fn entry(&mut self) -> Result<Kernel, EmuError> {
        let name = self.ident()?;
        let mut f = Func {
            scopes: vec![HashMap::new()],
            reg_bits: Vec::new(),
            npreds: 0,
            labels: HashMap::new(),
            fixups: Vec::new(),
            shared: HashMap::new(),
            shared_size: self.shared_size,
            dyn_shared: Vec::new(),
            dyn_align: self.dyn_align,
            params: HashMap::new(),
            insts: Vec::new(),
        };
        let mut params = Vec::new();
        let mut param_bytes = 0u64;
        self.expect_punct('(')?;
        if !self.eat_punct(')') {
            loop {
                let line = self.line();
                let kw = self.ident()?;
                if kw != ".param" {
                    return Err(perr(line, format!("expected .param, found `{kw}`")));
                }
                let mut align = None;
                let mut ty = None;
                let pname = loop {
                    let t = self.ident()?;
                    match t.as_str() {
                        ".align" => align = Some(self.number()? as u64),
                        ".ptr" | ".global" | ".shared" | ".const" | ".local" => {}
                        _ if t.starts_with('.') => {
                            ty = Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("bad param type `{t}`")))?);
                        }
                        _ => break t,
                    }
                };
                let ty = ty.ok_or_else(|| perr(line, format!("param `{pname}` has no type")))?;
                let mut count = 1u64;
                while self.eat_punct('[') {
                    count *= self.number()? as u64;
                    self.expect_punct(']')?;
                }
                let size = count * u64::from(ty.bytes());
                let align = align.unwrap_or(u64::from(ty.bytes()));
                let offset = align_up(param_bytes, align);
                param_bytes = offset + size;
                let decl = ParamDecl {
                    name: pname.clone(),
                    ty_name: ty.name(),
                    size: size as usize,
                    offset: offset as usize,
                    array: count > 1 || ty == Ty::B8,
                };
                f.params.insert(pname, (offset, decl.clone()));
                params.push(decl);
                if self.eat_punct(')') {
                    break;
                }
                self.expect_punct(',')?;
            }
        }
        let mut reqntid = None;
        let mut maxntid = None;
        loop {
            let line = self.line();
            match self.peek() {
                Some(Tok::Punct('{')) => break,
                Some(Tok::Ident(d)) => {
                    let d = d.clone();
                    self.pos += 1;
                    match d.as_str() {
                        ".maxntid" | ".reqntid" => {
                            let mut dims = [1u32; 3];
                            for (i, slot) in dims.iter_mut().enumerate() {
                                if i > 0 && !self.eat_punct(',') {
                                    break;
                                }
                                *slot = self.number()? as u32;
                            }
                            if d == ".reqntid" {
                                reqntid = Some(dims);
                            } else {
                                maxntid = Some(dims);
                            }
                        }
                        ".minnctapersm" | ".maxnreg" | ".maxnctapersm" => {
                            self.number()?;
                        }
                        ".noreturn" => {}
                        _ => return Err(perr(line, format!("unsupported entry directive `{d}`"))),
                    }
                }
                other => return Err(perr(line, format!("expected the body of `{name}`, found {other:?}"))),
            }
        }
        self.expect_punct('{')?;
        self.body(&mut f)?;
        for (idx, label, line) in std::mem::take(&mut f.fixups) {
            let target = *f
                .labels
                .get(&label)
                .ok_or_else(|| perr(line, format!("undefined label `{label}`")))?;
            if let Op::Bra { target: t, .. } = &mut f.insts[idx].op {
                *t = target;
            }
        }
        let dyn_align = f.dyn_align.max(16);
        Ok(Kernel {
            name,
            params,
            param_bytes: param_bytes as usize,
            insts: f.insts,
            reg_bits: f.reg_bits,
            npreds: f.npreds as usize,
            static_shared: f.shared_size as usize,
            dyn_shared_offset: align_up(f.shared_size, dyn_align) as usize,
            reqntid,
            maxntid,
        })
    }

    fn body(&mut self, f: &mut Func) -> Result<(), EmuError> {
        loop {
            let line = self.line();
            let Some(tok) = self.peek().cloned() else {
                return Err(perr(line, "unterminated function body"));
            };
            match tok {
                Tok::Punct('}') => {
                    self.pos += 1;
                    if f.scopes.len() == 1 {
                        return Ok(());
                    }
                    f.scopes.pop();
                }
                Tok::Punct('{') => {
                    self.pos += 1;
                    f.scopes.push(HashMap::new());
                }
                Tok::Punct('@') => {
                    self.pos += 1;
                    let neg = self.eat_punct('!');
                    let pname = self.ident()?;
                    let idx = match lookup(f, &pname) {
                        Some(RegRef::P(i)) => i,
                        _ => return Err(perr(line, format!("guard `{pname}` is not a declared predicate"))),
                    };
                    let op = self.ident()?;
                    self.instruction(f, Some(PredSrc { idx, neg }), op, line)?;
                }
                Tok::Ident(s) if self.peek_at(1) == Some(&Tok::Punct(':')) && !s.starts_with('.') => {
                    self.pos += 2;
                    if f.labels.insert(s.clone(), f.insts.len() as u32).is_some() {
                        return Err(perr(line, format!("duplicate label `{s}`")));
                    }
                }
                Tok::Ident(s) if s.starts_with('.') => {
                    self.pos += 1;
                    self.body_directive(f, &s, line)?;
                }
                Tok::Ident(s) => {
                    self.pos += 1;
                    self.instruction(f, None, s, line)?;
                }
                other => return Err(perr(line, format!("unexpected {other:?}"))),
            }
        }
    }

    fn body_directive(&mut self, f: &mut Func, d: &str, line: u32) -> Result<(), EmuError> {
        match d {
            ".reg" => {
                let mut ty = None;
                loop {
                    match self.peek() {
                        Some(Tok::Ident(t)) if t.starts_with('.') => {
                            let t = t.clone();
                            self.pos += 1;
                            if t.starts_with(".v") && t.len() == 3 {
                                return Err(perr(line, "vector registers (.reg .vN) are not supported"));
                            }
                            ty =
                                Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("bad register type `{t}`")))?);
                        }
                        _ => break,
                    }
                }
                let ty = ty.ok_or_else(|| perr(line, ".reg without a type"))?;
                loop {
                    let name = self.ident()?;
                    if self.eat_punct('<') {
                        let n = self.number()?;
                        self.expect_punct('>')?;
                        for i in 0..n {
                            declare(f, format!("{name}{i}"), ty);
                        }
                    } else {
                        declare(f, name, ty);
                    }
                    if !self.eat_punct(',') {
                        break;
                    }
                }
                self.expect_punct(';')
            }
            ".shared" => {
                let (name, align, size) = self.var_decl(false)?;
                let offset = align_up(f.shared_size, align);
                f.shared_size = offset + size;
                f.shared.insert(name, SharedVar { offset });
                Ok(())
            }
            ".extern" => {
                let next = self.ident()?;
                if next != ".shared" {
                    return Err(perr(line, format!("unsupported `.extern {next}` in a function")));
                }
                let (name, align, _) = self.var_decl(true)?;
                f.dyn_shared.push(name);
                f.dyn_align = f.dyn_align.max(align);
                Ok(())
            }
            ".pragma" => {
                self.next()?;
                self.expect_punct(';')
            }
            ".loc" | ".file" => {
                self.skip_line(line);
                Ok(())
            }
            other => Err(perr(
                line,
                format!("unsupported directive `{other}` in a function body"),
            )),
        }
    }

    fn operand(&mut self) -> Result<Raw, EmuError> {
        let line = self.line();
        match self.next()? {
            Tok::Punct('{') => {
                let mut v = Vec::new();
                if !self.eat_punct('}') {
                    loop {
                        v.push(self.operand()?);
                        if self.eat_punct('}') {
                            break;
                        }
                        self.expect_punct(',')?;
                    }
                }
                Ok(Raw::Vec(v))
            }
            Tok::Punct('[') => {
                let base = match self.peek().cloned() {
                    Some(Tok::Ident(s)) => {
                        self.pos += 1;
                        Some(s)
                    }
                    _ => None,
                };
                // `[imm]`, `[name]`, `[name+imm]`, `[name+-imm]`, `[name-imm]`
                let has_off = base.is_none() || self.eat_punct('+') || self.is_punct('-');
                let off = if has_off { self.number()? as i64 } else { 0 };
                self.expect_punct(']')?;
                Ok(Raw::Addr(base, off))
            }
            Tok::Punct('!') => Ok(Raw::Not(self.ident()?)),
            Tok::Punct('-') => match self.next()? {
                Tok::Num(s) => Ok(Raw::Lit(neg_lit(parse_lit(&s, line)?))),
                t => Err(perr(line, format!("expected a number after `-`, found {t:?}"))),
            },
            Tok::Num(s) => Ok(Raw::Lit(parse_lit(&s, line)?)),
            Tok::Ident(s) if s == "_" => Ok(Raw::Sink),
            Tok::Ident(s) => {
                if self.eat_punct('|') {
                    return Ok(Raw::Pipe(s, self.ident()?));
                }
                if self.eat_punct('+') {
                    let off = self.number()? as i64;
                    return Ok(Raw::Name(s, off));
                }
                Ok(Raw::Name(s, 0))
            }
            t => Err(perr(line, format!("unexpected {t:?} in an operand"))),
        }
    }

    fn instruction(&mut self, f: &mut Func, guard: Option<PredSrc>, opcode: String, line: u32) -> Result<(), EmuError> {
        let mut ops = Vec::new();
        if !self.eat_punct(';') {
            loop {
                ops.push(self.operand()?);
                if self.eat_punct(';') {
                    break;
                }
                self.expect_punct(',')?;
            }
        }
        let text = self
            .lines
            .get(line as usize - 1)
            .map_or(opcode.clone(), |l| l.trim().to_string());
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or_default().to_string();
        let mods = Mods {
            list: parts.map(str::to_string).collect(),
        };
        let mut d = Decoder {
            f,
            shared: &self.shared,
            dyn_shared: &self.dyn_shared,
            consts: &self.consts,
        };
        let op = d.decode(&base, mods, &ops).map_err(|msg| EmuError::Unsupported {
            line,
            inst: text.clone(),
            msg,
        })?;
        if let Op::Bra { .. } = op {
            let Some(Raw::Name(label, 0)) = ops.first() else {
                return Err(EmuError::Unsupported {
                    line,
                    inst: text,
                    msg: "bra needs a label".into(),
                });
            };
            f.fixups.push((f.insts.len(), label.clone(), line));
        }
        f.insts.push(Inst { guard, op, line, text });
        Ok(())
    }
}

fn declare(f: &mut Func, name: String, ty: Ty) {
    let r = if ty == Ty::Pred {
        f.npreds += 1;
        RegRef::P(f.npreds - 1)
    } else {
        f.reg_bits.push(ty.bits());
        RegRef::R(f.reg_bits.len() as u32 - 1, ty)
    };
    f.scopes.last_mut().expect("a scope").insert(name, r);
}

fn lookup(f: &Func, name: &str) -> Option<RegRef> {
    f.scopes.iter().rev().find_map(|s| s.get(name).copied())
}

struct Decoder<'a> {
    f: &'a mut Func,
    shared: &'a HashMap<String, SharedVar>,
    dyn_shared: &'a Vec<String>,
    consts: &'a HashMap<String, u64>,
}

type DResult<T> = Result<T, String>;

fn n_ops(ops: &[Raw], n: usize) -> DResult<()> {
    if ops.len() == n {
        Ok(())
    } else {
        Err(format!("expected {n} operands, found {}", ops.len()))
    }
}

impl Decoder<'_> {
    /// The shared-window offset of a `.shared` variable, if `name` is one.
    fn shared_var(&self, name: &str) -> Option<u64> {
        if let Some(v) = self.f.shared.get(name).or_else(|| self.shared.get(name)) {
            return Some(v.offset);
        }
        let dyn_align = self.f.dyn_align.max(16);
        if self.f.dyn_shared.iter().any(|n| n == name) || self.dyn_shared.iter().any(|n| n == name) {
            return Some(align_up(self.f.shared_size, dyn_align));
        }
        None
    }

    fn reg(&self, name: &str) -> DResult<(u32, Ty)> {
        match lookup(self.f, name) {
            Some(RegRef::R(i, t)) => Ok((i, t)),
            Some(RegRef::P(_)) => Err(format!("`{name}` is a predicate, not a data register")),
            None => Err(format!("undeclared register `{name}`")),
        }
    }

    fn pred(&self, name: &str) -> DResult<u32> {
        match lookup(self.f, name) {
            Some(RegRef::P(i)) => Ok(i),
            _ => Err(format!("`{name}` is not a declared predicate")),
        }
    }

    fn pred_src(&self, r: &Raw) -> DResult<PredSrc> {
        match r {
            Raw::Name(n, 0) => Ok(PredSrc {
                idx: self.pred(n)?,
                neg: false,
            }),
            Raw::Not(n) => Ok(PredSrc {
                idx: self.pred(n)?,
                neg: true,
            }),
            _ => Err(format!("expected a predicate, found {r:?}")),
        }
    }

    fn pred_dst(&self, r: &Raw) -> DResult<u32> {
        match r {
            Raw::Name(n, 0) => self.pred(n),
            _ => Err(format!("expected a predicate destination, found {r:?}")),
        }
    }

    /// A source of instruction type `ty`; `wide` allows wider registers (ld,
    /// st, cvt).
    fn src_w(&self, r: &Raw, ty: Ty, wide: bool) -> DResult<Src> {
        match r {
            Raw::Lit(l) => Ok(Src::Imm(lit_bits(*l, ty)?)),
            Raw::Name(n, off) => {
                if let Some(sr) = Sreg::parse(n) {
                    if *off != 0 || ty.bits() != 32 || ty.is_float() {
                        return Err(format!(
                            "special register {n} is .u32; it cannot be a .{} operand",
                            ty.name()
                        ));
                    }
                    return Ok(Src::Sreg(sr));
                }
                if let Some(o) = lookup(self.f, n) {
                    let RegRef::R(i, rt) = o else {
                        return Err(format!("`{n}` is a predicate, not a data register"));
                    };
                    if *off != 0 {
                        return Err(format!("`{n}+{off}` is not an operand"));
                    }
                    let ok = if wide { relaxed(rt, ty) } else { compatible(rt, ty) };
                    if !ok {
                        return Err(format!(
                            "register `{n}` (.{}) is not a .{} operand",
                            rt.name(),
                            ty.name()
                        ));
                    }
                    return Ok(Src::Reg(i));
                }
                if let Some(addr) = self.shared_var(n).or_else(|| self.consts.get(n).copied()) {
                    if ty.bits() < 32 || ty.is_float() {
                        return Err(format!("the address of `{n}` is not a .{} value", ty.name()));
                    }
                    return Ok(Src::Imm((addr as i64 + off) as u64 & mask(ty.bits())));
                }
                Err(format!("unknown operand `{n}`"))
            }
            _ => Err(format!("expected a .{} operand, found {r:?}", ty.name())),
        }
    }

    fn src(&self, r: &Raw, ty: Ty) -> DResult<Src> {
        self.src_w(r, ty, false)
    }

    fn dst_w(&self, r: &Raw, ty: Ty, wide: bool) -> DResult<Dst> {
        match r {
            Raw::Sink => Ok(Dst::Sink),
            Raw::Name(n, 0) => {
                let (i, rt) = self.reg(n)?;
                let ok = if wide { relaxed(rt, ty) } else { compatible(rt, ty) };
                if !ok {
                    return Err(format!(
                        "register `{n}` (.{}) cannot receive a .{} result",
                        rt.name(),
                        ty.name()
                    ));
                }
                Ok(Dst::Reg {
                    idx: i,
                    bits: rt.bits(),
                })
            }
            _ => Err(format!("expected a destination register, found {r:?}")),
        }
    }

    fn dst(&self, r: &Raw, ty: Ty) -> DResult<Dst> {
        self.dst_w(r, ty, false)
    }

    /// `[...]` in state space `space`.
    fn addr(&self, r: &Raw, space: Space) -> DResult<Addr> {
        let Raw::Addr(base, off) = r else {
            return Err(format!("expected an address `[...]`, found {r:?}"));
        };
        let Some(b) = base else {
            return Ok(Addr { base: None, off: *off });
        };
        if let Some(o) = lookup(self.f, b) {
            let RegRef::R(i, t) = o else {
                return Err(format!("`{b}` is a predicate, not an address"));
            };
            if !(t.bits() == 32 || t.bits() == 64) || t.is_float() {
                return Err(format!("address register `{b}` must be a 32- or 64-bit integer"));
            }
            return Ok(Addr {
                base: Some(i),
                off: *off,
            });
        }
        if let Some(a) = self.shared_var(b) {
            return match space {
                Space::Shared => Ok(Addr {
                    base: None,
                    off: a as i64 + off,
                }),
                Space::Generic => Ok(Addr {
                    base: None,
                    off: (SHARED_WINDOW + a) as i64 + off,
                }),
                _ => Err(format!("`{b}` is a .shared variable, not in .{}", space.name())),
            };
        }
        if let Some(&a) = self.consts.get(b) {
            return match space {
                Space::Const => Ok(Addr {
                    base: None,
                    off: a as i64 + off,
                }),
                Space::Generic => Ok(Addr {
                    base: None,
                    off: (CONST_WINDOW + a) as i64 + off,
                }),
                _ => Err(format!("`{b}` is a .const variable, not in .{}", space.name())),
            };
        }
        if let Some((o, _)) = self.f.params.get(b) {
            return match space {
                Space::Param => Ok(Addr {
                    base: None,
                    off: *o as i64 + off,
                }),
                _ => Err(format!("kernel parameter `{b}` must be read with ld.param")),
            };
        }
        Err(format!("unknown address `{b}`"))
    }

    fn vec_or_one<'r>(&self, r: &'r Raw) -> Vec<&'r Raw> {
        match r {
            Raw::Vec(v) => v.iter().collect(),
            other => vec![other],
        }
    }

    fn space(&self, m: &mut Mods, allowed: &[Space]) -> DResult<Space> {
        let s = match m.take_any(&["global", "shared", "shared::cta", "param", "const", "local"]) {
            None => Space::Generic,
            Some(s) => match s.as_str() {
                "global" => Space::Global,
                "shared" | "shared::cta" => Space::Shared,
                "param" => Space::Param,
                "const" => Space::Const,
                other => return Err(format!("state space .{other} is not supported")),
            },
        };
        if allowed.contains(&s) {
            Ok(s)
        } else {
            Err(format!("state space .{} is not allowed here", s.name()))
        }
    }

    fn decode(&mut self, base: &str, mut m: Mods, ops: &[Raw]) -> DResult<Op> {
        let op = match base {
            "mov" => self.mov(&mut m, ops)?,
            "ld" | "st" => self.ld_st(base == "ld", &mut m, ops)?,
            "cvta" => {
                let to = m.take("to");
                let shared = match m.take_any(&["global", "shared", "shared::cta"]).as_deref() {
                    Some("global") => false,
                    Some(_) => true,
                    None => return Err("cvta needs .global or .shared".into()),
                };
                let ty = m.take_ty().ok_or("cvta needs a type")?;
                if !matches!(ty, Ty::U32 | Ty::U64) {
                    return Err("cvta type must be .u32 or .u64".into());
                }
                n_ops(ops, 2)?;
                Op::Cvta {
                    to,
                    shared,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                }
            }
            "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" => {
                self.binary(base, &mut m, ops)?
            }
            "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "rcp" | "sqrt" | "rsqrt" | "ex2" | "lg2"
            | "sin" | "cos" | "tanh" => self.unary(base, &mut m, ops)?,
            "mad" | "fma" => self.mad(base, &mut m, ops)?,
            "bfe" => {
                let ty = m.take_ty().ok_or("bfe needs a type")?;
                if !matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64) {
                    return Err("bfe type must be .u32/.s32/.u64/.s64".into());
                }
                n_ops(ops, 4)?;
                Op::Bfe {
                    ty,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    b: self.src(&ops[2], Ty::U32)?,
                    c: self.src(&ops[3], Ty::U32)?,
                }
            }
            "prmt" => {
                if m.take_ty() != Some(Ty::B32) {
                    return Err("prmt is .b32 (only the default mode is supported)".into());
                }
                n_ops(ops, 4)?;
                Op::Prmt {
                    d: self.dst(&ops[0], Ty::B32)?,
                    a: self.src(&ops[1], Ty::B32)?,
                    b: self.src(&ops[2], Ty::B32)?,
                    c: self.src(&ops[3], Ty::B32)?,
                }
            }
            "setp" => self.setp(&mut m, ops)?,
            "selp" => {
                let ty = m.take_ty().ok_or("selp needs a type")?;
                if ty == Ty::Pred || ty.bits() < 16 {
                    return Err(format!("selp.{} is not a valid type", ty.name()));
                }
                n_ops(ops, 4)?;
                Op::Selp {
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    b: self.src(&ops[2], ty)?,
                    c: self.pred_src(&ops[3])?,
                }
            }
            "cvt" => self.cvt(&mut m, ops)?,
            "shfl" => {
                if !m.take("sync") {
                    return Err("shfl without .sync is not supported on sm_70+".into());
                }
                let mode = match m.take_any(&["up", "down", "bfly", "idx"]).as_deref() {
                    Some("up") => ShflMode::Up,
                    Some("down") => ShflMode::Down,
                    Some("bfly") => ShflMode::Bfly,
                    Some(_) => ShflMode::Idx,
                    None => return Err("shfl needs a mode".into()),
                };
                if m.take_ty() != Some(Ty::B32) {
                    return Err("shfl.sync is .b32".into());
                }
                n_ops(ops, 5)?;
                let (d, p) = match &ops[0] {
                    Raw::Pipe(d, p) => (self.dst(&Raw::Name(d.clone(), 0), Ty::B32)?, Some(self.pred(p)?)),
                    other => (self.dst(other, Ty::B32)?, None),
                };
                Op::Shfl {
                    mode,
                    d,
                    p,
                    a: self.src(&ops[1], Ty::B32)?,
                    b: self.src(&ops[2], Ty::B32)?,
                    c: self.src(&ops[3], Ty::B32)?,
                    mask: self.src(&ops[4], Ty::B32)?,
                }
            }
            "vote" => {
                if !m.take("sync") {
                    return Err("vote without .sync is not supported on sm_70+".into());
                }
                let mode = match m.take_any(&["all", "any", "uni", "ballot"]).as_deref() {
                    Some("all") => VoteMode::All,
                    Some("any") => VoteMode::Any,
                    Some("uni") => VoteMode::Uni,
                    Some(_) => VoteMode::Ballot,
                    None => return Err("vote needs a mode".into()),
                };
                let ty = m.take_ty().ok_or("vote needs a type")?;
                n_ops(ops, 3)?;
                let (d, dp) = if mode == VoteMode::Ballot {
                    if ty != Ty::B32 {
                        return Err("vote.ballot is .b32".into());
                    }
                    (self.dst(&ops[0], Ty::B32)?, None)
                } else {
                    if ty != Ty::Pred {
                        return Err("vote.all/any/uni is .pred".into());
                    }
                    (Dst::Sink, Some(self.pred_dst(&ops[0])?))
                };
                Op::Vote {
                    mode,
                    d,
                    dp,
                    a: self.pred_src(&ops[1])?,
                    mask: self.src(&ops[2], Ty::B32)?,
                }
            }
            "redux" => {
                if !m.take("sync") {
                    return Err("redux needs .sync".into());
                }
                let op = match m.take_any(&["add", "min", "max", "and", "or", "xor"]).as_deref() {
                    Some("add") => ReduxOp::Add,
                    Some("min") => ReduxOp::Min,
                    Some("max") => ReduxOp::Max,
                    Some("and") => ReduxOp::And,
                    Some("or") => ReduxOp::Or,
                    Some(_) => ReduxOp::Xor,
                    None => return Err("redux needs an operation".into()),
                };
                let ty = m.take_ty().ok_or("redux needs a type")?;
                let ok = match op {
                    ReduxOp::And | ReduxOp::Or | ReduxOp::Xor => ty == Ty::B32,
                    _ => matches!(ty, Ty::U32 | Ty::S32),
                };
                if !ok {
                    return Err(format!("redux type .{} is not valid for this operation", ty.name()));
                }
                n_ops(ops, 3)?;
                Op::Redux {
                    op,
                    ty,
                    d: self.dst(&ops[0], ty)?,
                    a: self.src(&ops[1], ty)?,
                    mask: self.src(&ops[2], Ty::B32)?,
                }
            }
            "activemask" => {
                if m.take_ty() != Some(Ty::B32) {
                    return Err("activemask is .b32".into());
                }
                n_ops(ops, 1)?;
                Op::Activemask {
                    d: self.dst(&ops[0], Ty::B32)?,
                }
            }
            "bra" => {
                let uni = m.take("uni");
                n_ops(ops, 1)?;
                Op::Bra { target: u32::MAX, uni }
            }
            "ret" | "exit" => {
                n_ops(ops, 0)?;
                Op::Exit
            }
            "bar" | "barrier" => {
                m.take("cta");
                if base == "bar" && m.take("warp") {
                    if !m.take("sync") {
                        return Err("bar.warp needs .sync".into());
                    }
                    m.done()?;
                    n_ops(ops, 1)?;
                    return Ok(Op::BarWarp {
                        mask: self.src(&ops[0], Ty::B32)?,
                    });
                }
                if !m.take("sync") {
                    return Err("only bar.sync / barrier.sync are supported".into());
                }
                let aligned = base == "bar" || m.take("aligned");
                if ops.is_empty() || ops.len() > 2 {
                    return Err("bar.sync takes a barrier and an optional thread count".into());
                }
                Op::Bar {
                    id: self.src(&ops[0], Ty::U32)?,
                    count: ops.get(1).map(|o| self.src(o, Ty::U32)).transpose()?,
                    aligned,
                }
            }
            "membar" => {
                m.take_any(&["cta", "gl", "sys"]).ok_or("membar needs a level")?;
                n_ops(ops, 0)?;
                Op::Nop
            }
            "fence" => {
                m.take_any(&["sc", "acq_rel"]);
                m.take_any(&["cta", "gpu", "sys"]).ok_or("fence needs a scope")?;
                n_ops(ops, 0)?;
                Op::Nop
            }
            "cp" => self.cp_async(&mut m, ops)?,
            "ldmatrix" => {
                for q in ["sync", "aligned", "m8n8"] {
                    if !m.take(q) {
                        return Err(format!("ldmatrix needs .{q} (only .m8n8 is supported)"));
                    }
                }
                let num = match m.take_any(&["x1", "x2", "x4"]).as_deref() {
                    Some("x1") => 1,
                    Some("x2") => 2,
                    Some(_) => 4,
                    None => return Err("ldmatrix needs .x1/.x2/.x4".into()),
                };
                let trans = m.take("trans");
                self.space(&mut m, &[Space::Shared])
                    .map_err(|_| "ldmatrix reads .shared (generic addressing is not supported)".to_string())?;
                if m.take_ty() != Some(Ty::B16) {
                    return Err("ldmatrix.m8n8 is .b16".into());
                }
                n_ops(ops, 2)?;
                let ds = self.vec_or_one(&ops[0]);
                if ds.len() != num || !matches!(ops[0], Raw::Vec(_)) {
                    return Err(format!("ldmatrix .x{num} needs a vector of {num} registers"));
                }
                let ds = ds
                    .into_iter()
                    .map(|r| self.dst(r, Ty::B32))
                    .collect::<DResult<Vec<_>>>()?;
                Op::Ldmatrix {
                    trans,
                    ds,
                    addr: self.addr(&ops[1], Space::Shared)?,
                }
            }
            "mma" => self.mma(&mut m, ops)?,
            "atom" | "red" => self.atom(base == "atom", &mut m, ops)?,
            other => return Err(format!("unknown or unsupported instruction `{other}`")),
        };
        m.done()?;
        Ok(op)
    }

    fn mov(&self, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let ty = m.take_ty().ok_or("mov needs a type")?;
        n_ops(ops, 2)?;
        if ty == Ty::Pred {
            let d = self.pred_dst(&ops[0])?;
            return Ok(match &ops[1] {
                Raw::Lit(Lit::Int(v)) => Op::SetPredConst { d, v: *v != 0 },
                other => Op::MovPred {
                    d,
                    a: self.pred_src(other)?,
                },
            });
        }
        if matches!(ty, Ty::B8 | Ty::U8 | Ty::S8) {
            return Err("mov has no 8-bit types".into());
        }
        if let Raw::Vec(parts) = &ops[0] {
            if !ty.is_bit() || !(parts.len() == 2 || parts.len() == 4) {
                return Err("unpacking mov needs .b32/.b64 and 2 or 4 elements".into());
            }
            let part_bits = ty.bits() / parts.len() as u32;
            let pty = bit_ty(part_bits)?;
            let ds = parts.iter().map(|r| self.dst(r, pty)).collect::<DResult<Vec<_>>>()?;
            return Ok(Op::Unpack {
                ds,
                a: self.src(&ops[1], ty)?,
                part_bits,
            });
        }
        if let Raw::Vec(parts) = &ops[1] {
            if !ty.is_bit() || !(parts.len() == 2 || parts.len() == 4) {
                return Err("packing mov needs .b32/.b64 and 2 or 4 elements".into());
            }
            let part_bits = ty.bits() / parts.len() as u32;
            let pty = bit_ty(part_bits)?;
            let parts = parts.iter().map(|r| self.src(r, pty)).collect::<DResult<Vec<_>>>()?;
            return Ok(Op::Pack {
                d: self.dst(&ops[0], ty)?,
                parts,
                part_bits,
            });
        }
        Ok(Op::Mov {
            d: self.dst(&ops[0], ty)?,
            a: self.src(&ops[1], ty)?,
            bits: ty.bits(),
        })
    }

    fn ld_st(&self, is_ld: bool, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let space = self.space(
            m,
            &[Space::Global, Space::Shared, Space::Param, Space::Const, Space::Generic],
        )?;
        if space == Space::Const && !is_ld {
            return Err("st.const is not allowed".into());
        }
        let nc = m.take("nc");
        if nc && (space != Space::Global || !is_ld) {
            return Err(".nc is only for ld.global".into());
        }
        m.take("volatile");
        m.take_any(&["ca", "cg", "cs", "lu", "cv", "wb", "wt"]);
        m.take_any(&[
            "L1::evict_normal",
            "L1::evict_unchanged",
            "L1::evict_first",
            "L1::evict_last",
            "L1::no_allocate",
        ]);
        m.take_any(&["L2::64B", "L2::128B", "L2::256B"]);
        let n = match m.take_any(&["v2", "v4"]).as_deref() {
            Some("v2") => 2,
            Some(_) => 4,
            None => 1,
        };
        let ty = m.take_ty().ok_or("ld/st needs a type")?;
        if !(ty.is_bit() || ty.is_int() || matches!(ty, Ty::F32 | Ty::F64)) {
            return Err(format!(
                "ld/st.{} is not supported (use .b16 for 16-bit floats)",
                ty.name()
            ));
        }
        if ty.bytes() * n > 16 {
            return Err("vector accesses are at most 16 bytes".into());
        }
        if space == Space::Param && n != 1 && !is_ld {
            return Err("st.param is not supported".into());
        }
        n_ops(ops, 2)?;
        let (data, addr) = if is_ld { (&ops[0], &ops[1]) } else { (&ops[1], &ops[0]) };
        if n > 1 && !matches!(data, Raw::Vec(v) if v.len() == n as usize) {
            return Err(format!(".v{n} needs a vector of {n} operands"));
        }
        if n == 1 && matches!(data, Raw::Vec(_)) {
            return Err("a vector operand needs .v2/.v4".into());
        }
        let addr = self.addr(addr, space)?;
        let elems = self.vec_or_one(data);
        if is_ld {
            let ds = elems
                .iter()
                .map(|r| self.dst_w(r, ty, true))
                .collect::<DResult<Vec<_>>>()?;
            Ok(Op::Ld { space, ty, ds, addr })
        } else {
            if space == Space::Param {
                return Err("st.param is not supported".into());
            }
            let srcs = elems
                .iter()
                .map(|r| self.src_w(r, ty, true))
                .collect::<DResult<Vec<_>>>()?;
            Ok(Op::St { space, ty, srcs, addr })
        }
    }

    fn fmods(&self, m: &mut Mods, ty: Ty) -> DResult<FMods> {
        let fm = FMods {
            ftz: m.take("ftz"),
            sat: m.take("sat"),
        };
        if (fm.ftz || fm.sat) && ty != Ty::F32 {
            return Err(".ftz/.sat are only supported on .f32".into());
        }
        Ok(fm)
    }

    fn binary(&self, base: &str, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let rnd = m.take_round();
        if let Some(r) = rnd
            && r != Round::Nearest
        {
            return Err(format!("rounding mode {r:?} is not emulated (only .rn)"));
        }
        let kind = m.take_any(&["lo", "hi", "wide"]);
        let approx = m.take_any(&["approx", "full"]);
        let nan = m.take("NaN");
        let sat_int = m.take("sat");
        let ftz = m.take("ftz");
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = FMods {
            ftz,
            sat: sat_int && ty.is_float(),
        };
        if (ftz || fm.sat) && ty != Ty::F32 {
            return Err(".ftz/.sat are only supported on .f32 here".into());
        }
        if nan && !ty.is_float() {
            return Err(".NaN is only for floats".into());
        }
        if nan {
            return Err(".NaN min/max is not emulated".into());
        }
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        let is_f = ty.is_float();
        let logic = matches!(base, "and" | "or" | "xor");
        if logic && !(ty.is_bit() && ty.bits() >= 16 || ty == Ty::Pred) {
            return Err(format!("{base} takes .pred or .b16/.b32/.b64"));
        }
        if logic && ty == Ty::Pred {
            n_ops(ops, 3)?;
            let op = match base {
                "and" => BoolOp::And,
                "or" => BoolOp::Or,
                _ => BoolOp::Xor,
            };
            return Ok(Op::PredLogic {
                op,
                d: self.pred_dst(&ops[0])?,
                a: self.pred_src(&ops[1])?,
                b: self.pred_src(&ops[2])?,
            });
        }
        if ty.bits() < 16 {
            return Err(format!("{base}.{} is not a valid type", ty.name()));
        }
        if (rnd.is_some() || approx.is_some()) && !is_f {
            return Err("rounding modifiers are for float types".into());
        }
        if !logic && !matches!(base, "shl" | "shr") && ty.is_bit() {
            return Err(format!("{base} needs a typed (not .b) operand type"));
        }
        if sat_int && !is_f && !(matches!(base, "add" | "sub") && ty == Ty::S32) {
            return Err(".sat on integers is only add/sub.s32".into());
        }
        let op = match base {
            "add" if sat_int && !is_f => BinOp::AddSat,
            "sub" if sat_int && !is_f => BinOp::SubSat,
            "add" => BinOp::Add,
            "sub" => BinOp::Sub,
            "mul" if is_f => {
                if kind.is_some() {
                    return Err("mul.lo/hi/wide are integer forms".into());
                }
                BinOp::Mul
            }
            "mul" => match kind.as_deref() {
                Some("lo") => BinOp::MulLo,
                Some("hi") => BinOp::MulHi,
                Some(_) => BinOp::MulWide,
                None => return Err("integer mul needs .lo, .hi or .wide".into()),
            },
            "div" => {
                if is_f && ty == Ty::F32 && approx.is_none() && rnd.is_none() {
                    return Err("div.f32 needs .approx, .full or .rn".into());
                }
                BinOp::Div
            }
            "rem" => BinOp::Rem,
            "min" => BinOp::Min,
            "max" => BinOp::Max,
            "and" => BinOp::And,
            "or" => BinOp::Or,
            "xor" => BinOp::Xor,
            "shl" => BinOp::Shl,
            _ => BinOp::Shr,
        };
        if kind.is_some() && op != BinOp::MulLo && op != BinOp::MulHi && op != BinOp::MulWide {
            return Err(format!(".{} is not a modifier of {base}", kind.unwrap_or_default()));
        }
        if approx.is_some() && op != BinOp::Div {
            return Err(".approx/.full are div modifiers".into());
        }
        if is_f && matches!(op, BinOp::Rem | BinOp::Shl | BinOp::Shr) {
            return Err(format!("{base} has no float form"));
        }
        if op == BinOp::Shl && !ty.is_bit() {
            return Err("shl is .b16/.b32/.b64".into());
        }
        n_ops(ops, 3)?;
        let dty = if op == BinOp::MulWide {
            if ty.bits() == 64 {
                return Err("mul.wide takes 16- or 32-bit operands".into());
            }
            wide_ty(ty)
        } else {
            ty
        };
        let bty = if matches!(op, BinOp::Shl | BinOp::Shr) {
            Ty::U32
        } else {
            ty
        };
        Ok(Op::Bin {
            op,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], bty)?,
            fm,
        })
    }

    fn unary(&self, base: &str, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let approx = m.take("approx");
        let rnd = m.take_round();
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = self.fmods(m, ty)?;
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        if let Some(r) = rnd
            && r != Round::Nearest
        {
            return Err(format!("rounding mode {r:?} is not emulated (only .rn)"));
        }
        let op = match base {
            "neg" => UnOp::Neg,
            "abs" => UnOp::Abs,
            "not" => UnOp::Not,
            "cnot" => UnOp::Cnot,
            "popc" => UnOp::Popc,
            "clz" => UnOp::Clz,
            "brev" => UnOp::Brev,
            "rcp" => UnOp::Rcp,
            "sqrt" => UnOp::Sqrt,
            "rsqrt" => UnOp::Rsqrt,
            "ex2" => UnOp::Ex2,
            "lg2" => UnOp::Lg2,
            "sin" => UnOp::Sin,
            "cos" => UnOp::Cos,
            _ => UnOp::Tanh,
        };
        n_ops(ops, 2)?;
        if op == UnOp::Not && ty == Ty::Pred {
            return Ok(Op::PredNot {
                d: self.pred_dst(&ops[0])?,
                a: self.pred_src(&ops[1])?,
            });
        }
        let float_only = matches!(
            op,
            UnOp::Rcp | UnOp::Sqrt | UnOp::Rsqrt | UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh
        );
        let bit_only = matches!(op, UnOp::Not | UnOp::Cnot | UnOp::Popc | UnOp::Clz | UnOp::Brev);
        if float_only {
            if !matches!(ty, Ty::F32 | Ty::F64) {
                return Err(format!("{base} is a float instruction"));
            }
            let needs_approx = matches!(
                op,
                UnOp::Rsqrt | UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh
            );
            if needs_approx && !approx {
                return Err(format!("{base} needs .approx"));
            }
            if matches!(op, UnOp::Rcp | UnOp::Sqrt) && approx == rnd.is_some() {
                return Err(format!("{base} needs exactly one of .approx or .rn"));
            }
            if matches!(op, UnOp::Ex2 | UnOp::Lg2 | UnOp::Sin | UnOp::Cos | UnOp::Tanh) && ty != Ty::F32 {
                return Err(format!("{base}.approx is .f32"));
            }
        } else if approx || rnd.is_some() {
            return Err(format!("{base} takes no rounding modifier"));
        }
        if bit_only && !(ty.is_bit() && ty.bits() >= 16) {
            return Err(format!("{base} is a .b16/.b32/.b64 instruction"));
        }
        if matches!(op, UnOp::Popc | UnOp::Clz) && ty.bits() < 32 {
            return Err(format!("{base} is .b32/.b64"));
        }
        if matches!(op, UnOp::Neg | UnOp::Abs)
            && !(ty.is_signed() && ty.bits() >= 16 || matches!(ty, Ty::F32 | Ty::F64))
        {
            return Err(format!("{base} takes .s16/.s32/.s64/.f32/.f64"));
        }
        let dty = if matches!(op, UnOp::Popc | UnOp::Clz) {
            Ty::U32
        } else {
            ty
        };
        Ok(Op::Un {
            op,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            fm,
        })
    }

    fn mad(&self, base: &str, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let rnd = m.take_round();
        let kind = m.take_any(&["lo", "hi", "wide"]);
        let ty = m.take_ty().ok_or_else(|| format!("{base} needs a type"))?;
        let fm = self.fmods(m, ty)?;
        n_ops(ops, 4)?;
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!(
                "{base}.{} (16-bit float arithmetic) is not emulated",
                ty.name()
            ));
        }
        if ty.is_float() {
            if kind.is_some() {
                return Err(format!("{base}.{} takes no .lo/.hi/.wide", ty.name()));
            }
            match rnd {
                Some(Round::Nearest) => {}
                Some(r) => return Err(format!("rounding mode {r:?} is not emulated (only .rn)")),
                None => return Err(format!("{base}.{} needs a rounding modifier", ty.name())),
            }
            return Ok(Op::Fma {
                ty,
                d: self.dst(&ops[0], ty)?,
                a: self.src(&ops[1], ty)?,
                b: self.src(&ops[2], ty)?,
                c: self.src(&ops[3], ty)?,
                fm,
            });
        }
        if base == "fma" {
            return Err("fma is a float instruction".into());
        }
        if !ty.is_int() || ty.bits() < 16 || rnd.is_some() {
            return Err(format!("mad.{} is not valid", ty.name()));
        }
        let kind = match kind.as_deref() {
            Some("lo") => MadKind::Lo,
            Some("hi") => MadKind::Hi,
            Some(_) => MadKind::Wide,
            None => return Err("integer mad needs .lo, .hi or .wide".into()),
        };
        let dty = if kind == MadKind::Wide {
            if ty.bits() == 64 {
                return Err("mad.wide takes 16- or 32-bit operands".into());
            }
            wide_ty(ty)
        } else {
            ty
        };
        Ok(Op::Mad {
            kind,
            ty,
            d: self.dst(&ops[0], dty)?,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], ty)?,
            c: self.src(&ops[3], dty)?,
        })
    }

    fn setp(&self, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let cmp = match m
            .take_any(&[
                "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu", "leu", "gtu", "geu",
                "num", "nan",
            ])
            .as_deref()
        {
            Some("eq") => Cmp::Eq,
            Some("ne") => Cmp::Ne,
            Some("lt") => Cmp::Lt,
            Some("le") => Cmp::Le,
            Some("gt") => Cmp::Gt,
            Some("ge") => Cmp::Ge,
            Some("lo") => Cmp::Lo,
            Some("ls") => Cmp::Ls,
            Some("hi") => Cmp::Hi,
            Some("hs") => Cmp::Hs,
            Some("equ") => Cmp::Equ,
            Some("neu") => Cmp::Neu,
            Some("ltu") => Cmp::Ltu,
            Some("leu") => Cmp::Leu,
            Some("gtu") => Cmp::Gtu,
            Some("geu") => Cmp::Geu,
            Some("num") => Cmp::Num,
            Some(_) => Cmp::Nan,
            None => return Err("setp needs a comparison".into()),
        };
        let bop = match m.take_any(&["and", "or", "xor"]).as_deref() {
            Some("and") => Some(BoolOp::And),
            Some("or") => Some(BoolOp::Or),
            Some(_) => Some(BoolOp::Xor),
            None => None,
        };
        let ftz = m.take("ftz");
        let ty = m.take_ty().ok_or("setp needs a type")?;
        if ty == Ty::Pred || ty.bits() < 16 || matches!(ty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(format!("setp.{} is not supported", ty.name()));
        }
        if ftz && ty != Ty::F32 {
            return Err(".ftz is only for .f32".into());
        }
        let float_cmp = matches!(
            cmp,
            Cmp::Equ | Cmp::Neu | Cmp::Ltu | Cmp::Leu | Cmp::Gtu | Cmp::Geu | Cmp::Num | Cmp::Nan
        );
        let uns_cmp = matches!(cmp, Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs);
        if float_cmp && !ty.is_float() {
            return Err(format!("comparison {cmp:?} is for floats"));
        }
        if uns_cmp && !(ty.is_unsigned() || ty.is_bit()) {
            return Err(format!("comparison {cmp:?} is for unsigned integers"));
        }
        if ty.is_bit() && !matches!(cmp, Cmp::Eq | Cmp::Ne) {
            return Err("bit types compare only with .eq/.ne".into());
        }
        let n = if bop.is_some() { 4 } else { 3 };
        n_ops(ops, n)?;
        let (p, q) = match &ops[0] {
            Raw::Pipe(p, q) => (Some(self.pred(p)?), Some(self.pred(q)?)),
            Raw::Sink => (None, None),
            other => (Some(self.pred_dst(other)?), None),
        };
        let comb = match bop {
            Some(b) => Some((b, self.pred_src(&ops[3])?)),
            None => None,
        };
        Ok(Op::Setp {
            cmp,
            ty,
            ftz,
            p,
            q,
            a: self.src(&ops[1], ty)?,
            b: self.src(&ops[2], ty)?,
            comb,
        })
    }

    fn cvt(&self, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        let irnd = m.take_iround();
        let frnd = m.take_round();
        let ftz = m.take("ftz");
        let sat = m.take("sat");
        let relu = m.take("relu");
        let satfinite = m.take("satfinite");
        let dty = m.take_ty().ok_or("cvt needs a destination type")?;
        let aty = if matches!(dty, Ty::F16x2 | Ty::Bf16x2) {
            Ty::F32
        } else {
            m.take_ty().ok_or("cvt needs a source type")?
        };
        if matches!(dty, Ty::F16x2 | Ty::Bf16x2) && m.take_ty() != Some(Ty::F32) {
            return Err("cvt to .f16x2/.bf16x2 converts two .f32".into());
        }
        if irnd.is_some() && frnd.is_some() {
            return Err("cvt takes one rounding modifier".into());
        }
        for t in [dty, aty] {
            if t == Ty::Pred || t.is_bit() {
                return Err(format!("cvt has no .{} type", t.name()));
            }
        }
        let df = dty.is_float();
        let af = aty.is_float();
        let rnd = match (irnd, frnd) {
            (Some(r), None) => {
                if !af {
                    return Err("integer rounding (.rni...) needs a float source".into());
                }
                CvtRound::Int(r)
            }
            (None, Some(r)) => {
                if !df {
                    return Err("float rounding (.rn...) needs a float destination".into());
                }
                CvtRound::Float(r)
            }
            _ => CvtRound::None,
        };
        // Rounding is mandatory for narrowing float conversions, float->int,
        // int->float and packed conversions.
        let narrowing_f = df && af && dty.bits() < aty.bits();
        let need_f = narrowing_f || (df && !af) || matches!(dty, Ty::F16x2 | Ty::Bf16x2);
        let need_i = af && !df;
        match rnd {
            CvtRound::None if need_f || need_i => return Err("this cvt needs a rounding modifier".into()),
            CvtRound::Float(_) if !need_f => return Err("this cvt takes no float rounding modifier".into()),
            CvtRound::Int(_) if !(need_i || (df && af && dty == aty)) => {
                return Err("integer rounding is for float->int or float->same-float".into());
            }
            _ => {}
        }
        if let CvtRound::Float(r) = rnd
            && matches!(dty, Ty::Bf16 | Ty::Bf16x2 | Ty::F16 | Ty::F16x2)
            && aty == Ty::F32
            && !matches!(r, Round::Nearest | Round::Zero)
        {
            return Err("cvt to 16-bit floats rounds with .rn or .rz".into());
        }
        if (relu || satfinite) && !matches!(dty, Ty::F16 | Ty::F16x2 | Ty::Bf16 | Ty::Bf16x2) {
            return Err(".relu/.satfinite are for 16-bit float destinations".into());
        }
        if ftz && !(aty == Ty::F32 || dty == Ty::F32) {
            return Err(".ftz needs an .f32 operand".into());
        }
        let packed = matches!(dty, Ty::F16x2 | Ty::Bf16x2);
        n_ops(ops, if packed { 3 } else { 2 })?;
        let d = self.dst_w(&ops[0], dty, !df)?;
        let a = self.src_w(&ops[1], aty, !af)?;
        let b = if packed {
            Some(self.src(&ops[2], Ty::F32)?)
        } else {
            None
        };
        Ok(Op::Cvt {
            dty,
            aty,
            rnd,
            ftz,
            sat,
            relu,
            satfinite,
            d,
            a,
            b,
        })
    }

    fn cp_async(&self, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        if !m.take("async") {
            return Err("only cp.async is supported".into());
        }
        if m.take("commit_group") {
            n_ops(ops, 0)?;
            return Ok(Op::CpCommit);
        }
        if m.take("wait_group") {
            n_ops(ops, 1)?;
            let Raw::Lit(Lit::Int(n)) = ops[0] else {
                return Err("cp.async.wait_group takes an integer constant".into());
            };
            return Ok(Op::CpWait {
                n: n as u32,
                all: false,
            });
        }
        if m.take("wait_all") {
            n_ops(ops, 0)?;
            return Ok(Op::CpWait { n: 0, all: true });
        }
        let cg = match m.take_any(&["ca", "cg"]).as_deref() {
            Some("cg") => true,
            Some(_) => false,
            None => return Err("cp.async needs .ca or .cg".into()),
        };
        if !(m.take("shared") || m.take("shared::cta")) || !m.take("global") {
            return Err("cp.async copies .shared{::cta}.global".into());
        }
        m.take_any(&["L2::64B", "L2::128B", "L2::256B"]);
        if m.take("L2::cache_hint") {
            return Err(".L2::cache_hint is not supported".into());
        }
        if ops.len() < 3 || ops.len() > 4 {
            return Err("cp.async takes [dst], [src], cp-size{, src-size | ignore-src}".into());
        }
        let size = match ops[2] {
            Raw::Lit(Lit::Int(s)) if s == 4 || s == 8 || s == 16 => s as u32,
            _ => return Err("cp-size must be 4, 8 or 16".into()),
        };
        if cg && size != 16 {
            return Err("cp.async.cg copies 16 bytes".into());
        }
        let (mut src_size, mut ignore) = (None, None);
        if let Some(x) = ops.get(3) {
            let is_pred = match x {
                Raw::Not(_) => true,
                Raw::Name(n, 0) => matches!(lookup(self.f, n), Some(RegRef::P(_))),
                _ => false,
            };
            if is_pred {
                ignore = Some(self.pred_src(x)?);
            } else {
                let s = self.src(x, Ty::U32)?;
                if let Src::Imm(v) = s
                    && v > u64::from(size)
                {
                    return Err("src-size larger than cp-size".into());
                }
                src_size = Some(s);
            }
        }
        Ok(Op::CpAsync {
            dst: self.addr(&ops[0], Space::Shared)?,
            src: self.addr(&ops[1], Space::Global)?,
            size,
            src_size,
            ignore,
        })
    }

    fn mma(&self, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        for q in ["sync", "aligned"] {
            if !m.take(q) {
                return Err(format!("mma needs .{q}"));
            }
        }
        let k = match m.take_any(&["m16n8k16", "m16n8k8"]).as_deref() {
            Some("m16n8k16") => 16,
            Some(_) => 8,
            None => return Err("only mma .m16n8k16 and .m16n8k8 are supported".into()),
        };
        if !m.take("row") || !m.take("col") {
            return Err("mma.m16n8k* is .row.col".into());
        }
        let dty = m.take_ty().ok_or("mma needs types")?;
        let aty = m.take_ty().ok_or("mma needs types")?;
        let bty = m.take_ty().ok_or("mma needs types")?;
        let cty = m.take_ty().ok_or("mma needs types")?;
        let f16_inputs = match (aty, bty) {
            (Ty::Bf16, Ty::Bf16) => false,
            (Ty::F16, Ty::F16) => true,
            _ => return Err("mma supports .bf16.bf16 and .f16.f16 inputs".into()),
        };
        let acc_ok = |t: Ty| t == Ty::F32 || (f16_inputs && t == Ty::F16);
        if !acc_ok(dty) || !acc_ok(cty) {
            return Err("mma accumulators are .f32 (or .f16 with .f16 inputs)".into());
        }
        n_ops(ops, 4)?;
        let regs = |r: &Raw, n: usize, what: &str| -> DResult<Vec<Raw>> {
            match r {
                Raw::Vec(v) if v.len() == n => Ok(v.clone()),
                _ => Err(format!("mma operand {what} needs a vector of {n} registers")),
            }
        };
        let nd = if dty == Ty::F32 { 4 } else { 2 };
        let nc = if cty == Ty::F32 { 4 } else { 2 };
        let na = if k == 16 { 4 } else { 2 };
        let nb = if k == 16 { 2 } else { 1 };
        let dt = if dty == Ty::F32 { Ty::F32 } else { Ty::B32 };
        let ct = if cty == Ty::F32 { Ty::F32 } else { Ty::B32 };
        let d = regs(&ops[0], nd, "d")?
            .iter()
            .map(|r| self.dst(r, dt))
            .collect::<DResult<Vec<_>>>()?;
        let a = regs(&ops[1], na, "a")?
            .iter()
            .map(|r| self.src(r, Ty::B32))
            .collect::<DResult<Vec<_>>>()?;
        let b = regs(&ops[2], nb, "b")?
            .iter()
            .map(|r| self.src(r, Ty::B32))
            .collect::<DResult<Vec<_>>>()?;
        let c = regs(&ops[3], nc, "c")?
            .iter()
            .map(|r| self.src(r, ct))
            .collect::<DResult<Vec<_>>>()?;
        Ok(Op::Mma {
            k,
            f16_inputs,
            c_f16: cty == Ty::F16,
            d_f16: dty == Ty::F16,
            d,
            a,
            b,
            c,
        })
    }

    fn atom(&self, is_atom: bool, m: &mut Mods, ops: &[Raw]) -> DResult<Op> {
        m.take_any(&["relaxed", "acquire", "release", "acq_rel"]);
        m.take_any(&["cta", "gpu", "sys"]);
        let space = self.space(m, &[Space::Global, Space::Shared, Space::Generic])?;
        let op = match m
            .take_any(&["add", "min", "max", "and", "or", "xor", "exch", "cas"])
            .as_deref()
        {
            Some("add") => AtomOp::Add,
            Some("min") => AtomOp::Min,
            Some("max") => AtomOp::Max,
            Some("and") => AtomOp::And,
            Some("or") => AtomOp::Or,
            Some("xor") => AtomOp::Xor,
            Some("exch") => AtomOp::Exch,
            Some("cas") => AtomOp::Cas,
            _ => return Err("unsupported atomic operation".into()),
        };
        let ty = m.take_ty().ok_or("atom needs a type")?;
        let ok = match op {
            AtomOp::Add => matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::F32 | Ty::F64),
            AtomOp::Min | AtomOp::Max => matches!(ty, Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64),
            AtomOp::And | AtomOp::Or | AtomOp::Xor => matches!(ty, Ty::B32 | Ty::B64),
            AtomOp::Exch | AtomOp::Cas => matches!(ty, Ty::B32 | Ty::B64),
        };
        if !ok {
            return Err(format!("atomic {op:?} on .{} is not supported", ty.name()));
        }
        if !is_atom && matches!(op, AtomOp::Exch | AtomOp::Cas) {
            return Err("red has no exch/cas".into());
        }
        let n = usize::from(is_atom) + 2 + usize::from(op == AtomOp::Cas);
        n_ops(ops, n)?;
        let (d, rest) = if is_atom {
            (self.dst(&ops[0], ty)?, &ops[1..])
        } else {
            (Dst::Sink, ops)
        };
        Ok(Op::Atom {
            space,
            op,
            ty,
            d,
            addr: self.addr(&rest[0], space)?,
            b: self.src(&rest[1], ty)?,
            c: rest.get(2).map(|r| self.src(r, ty)).transpose()?,
        })
    }
}

fn bit_ty(bits: u32) -> DResult<Ty> {
    Ok(match bits {
        16 => Ty::B16,
        32 => Ty::B32,
        8 => return Err("8-bit packing is not supported".into()),
        _ => return Err(format!("bad element width {bits}")),
    })
}

fn wide_ty(t: Ty) -> Ty {
    match t {
        Ty::U16 => Ty::U32,
        Ty::S16 => Ty::S32,
        Ty::U32 => Ty::U64,
        _ => Ty::S64,
    }
}

pub(crate) fn parse_module(src: &str) -> Result<Module, EmuError> {
    let toks = lex(src)?;
    let p = Parser {
        toks,
        pos: 0,
        lines: src.lines().collect(),
        shared: HashMap::new(),
        shared_size: 0,
        dyn_shared: Vec::new(),
        dyn_align: 16,
        consts: HashMap::new(),
        const_data: Vec::new(),
    };
    p.module()
}
