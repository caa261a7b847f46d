//! Tokens -> [`SyntaxModule`]: directives, entry signatures, declarations,
//! labels and instructions with their operands. Only the grammar is checked
//! here; names, types of operands and modifiers are the decoder's.

use crate::EmuError;
use crate::ast::*;
use crate::lex::{Tok, Token, lex};
use crate::ty::Ty;

/// Registers one `.reg` declaration may name (`%r<N>`); ptxas-generated code uses a few thousand.
const MAX_REGISTERS: i128 = 1 << 16;
/// Elements of one array variable (`.shared`, `.const`): shared memory is at most 228 KiB.
const MAX_ELEMENTS: u64 = 1 << 24;
/// `.align N`: a power of two up to this.
const MAX_ALIGN: i128 = 1 << 12;

pub(crate) fn perr(line: u32, msg: impl Into<String>) -> EmuError {
    EmuError::Parse { line, msg: msg.into() }
}

/// Parses PTX text into its syntax tree.
pub(crate) fn parse_syntax(src: &str) -> Result<SyntaxModule, EmuError> {
    let p = Parser {
        toks: lex(src)?,
        pos: 0,
        lines: src.lines().collect(),
    };
    p.module()
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

struct Parser<'a> {
    toks: Vec<Token>,
    pos: usize,
    lines: Vec<&'a str>,
}

impl Parser<'_> {
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
    /// `[N]` after a variable's name, multiplied into `count`: at most [`MAX_ELEMENTS`] in all
    /// (a hostile module must not make the emulator allocate without bound).
    fn dimension(&mut self, count: u64) -> Result<u64, EmuError> {
        let line = self.line();
        let n = self.number()?;
        u64::try_from(n)
            .ok()
            .and_then(|n| count.checked_mul(n))
            .filter(|&c| c <= MAX_ELEMENTS)
            .ok_or_else(|| {
                perr(
                    line,
                    format!("array size {n} (x {count}) is negative or above {MAX_ELEMENTS} elements"),
                )
            })
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
    /// `[.align N] .type name`: the alignment, the type (`what` names it in
    /// errors) and the name. `skip` lists qualifiers to ignore.
    fn typed_name(
        &mut self,
        line: u32,
        what: &str,
        skip: &[&str],
    ) -> Result<(Option<u64>, Option<Ty>, String), EmuError> {
        let mut align = None;
        let mut ty = None;
        let name = loop {
            let t = self.ident()?;
            match t.as_str() {
                ".align" => {
                    let a = self.number()?;
                    if !(1..=MAX_ALIGN).contains(&a) || !(a as u64).is_power_of_two() {
                        return Err(perr(line, format!(".align {a}: a power of two up to {MAX_ALIGN}")));
                    }
                    align = Some(a as u64);
                }
                _ if skip.contains(&t.as_str()) => {}
                _ if t.starts_with('.') => {
                    ty = Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("{what} `{t}`")))?);
                }
                _ => break t,
            }
        };
        Ok((align, ty, name))
    }

    fn module(mut self) -> Result<SyntaxModule, EmuError> {
        let mut m = SyntaxModule::default();
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
                ".entry" => m.items.push(Item::Entry(self.entry()?)),
                ".extern" => {
                    let next = self.ident()?;
                    if next != ".shared" {
                        return Err(perr(line, format!("unsupported `.extern {next}`")));
                    }
                    m.items.push(Item::ExternShared(self.var_decl(true)?));
                }
                ".shared" => m.items.push(Item::Shared(self.var_decl(false)?)),
                ".const" => m.items.push(Item::Const(self.const_decl()?)),
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
        Ok(m)
    }

    /// `[.align N] .type name[dims] [= init];` after `.const`; initialisers
    /// are a literal or a (nested) brace list of literals.
    fn const_decl(&mut self) -> Result<ConstDecl, EmuError> {
        let line = self.line();
        let (align, ty, name) = self.typed_name(line, "unsupported .const type", &[])?;
        let ty = ty.ok_or_else(|| perr(line, format!("`{name}` has no type")))?;
        if ty == Ty::Pred {
            return Err(perr(line, "a .const variable cannot be .pred"));
        }
        let mut count = 1u64;
        while self.eat_punct('[') {
            count = self.dimension(count)?;
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
        Ok(ConstDecl {
            name,
            ty,
            align,
            count,
            values,
            line,
        })
    }

    /// `[.align N] .type name[dims]...;` after `.shared`; the size is 0 for
    /// `[]`, which only `.extern` may use (and must).
    fn var_decl(&mut self, is_extern: bool) -> Result<VarDecl, EmuError> {
        let line = self.line();
        let (align, ty, name) = self.typed_name(line, "unsupported variable type", &[])?;
        let ty = ty.ok_or_else(|| perr(line, format!("variable `{name}` has no type")))?;
        let mut count = 1u64;
        let mut unsized_array = false;
        while self.eat_punct('[') {
            if self.eat_punct(']') {
                unsized_array = true;
                continue;
            }
            count = self.dimension(count)?;
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
        Ok(VarDecl {
            name,
            align,
            size: count * u64::from(ty.bytes()),
        })
    }

    fn entry(&mut self) -> Result<Entry, EmuError> {
        let name = self.ident()?;
        let mut params = Vec::new();
        self.expect_punct('(')?;
        if !self.eat_punct(')') {
            loop {
                let line = self.line();
                let kw = self.ident()?;
                if kw != ".param" {
                    return Err(perr(line, format!("expected .param, found `{kw}`")));
                }
                let (align, ty, pname) = self.typed_name(
                    line,
                    "bad param type",
                    &[".ptr", ".global", ".shared", ".const", ".local"],
                )?;
                let ty = ty.ok_or_else(|| perr(line, format!("param `{pname}` has no type")))?;
                let mut count = 1u64;
                while self.eat_punct('[') {
                    count = self.dimension(count)?;
                    self.expect_punct(']')?;
                }
                params.push(ParamSyntax {
                    name: pname,
                    ty,
                    align,
                    count,
                });
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
                                let n = self.number()?;
                                *slot = u32::try_from(n)
                                    .ok()
                                    .filter(|&n| (1..=1024).contains(&n))
                                    .ok_or_else(|| perr(line, format!("{d} {n}: each dimension is 1 to 1024")))?;
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
        let body = self.block()?;
        Ok(Entry {
            name,
            params,
            reqntid,
            maxntid,
            body,
        })
    }

    /// The statements up to the `}` closing a scope.
    fn block(&mut self) -> Result<Vec<Stmt>, EmuError> {
        let mut stmts = Vec::new();
        loop {
            let line = self.line();
            let Some(tok) = self.peek().cloned() else {
                return Err(perr(line, "unterminated function body"));
            };
            match tok {
                Tok::Punct('}') => {
                    self.pos += 1;
                    return Ok(stmts);
                }
                Tok::Punct('{') => {
                    self.pos += 1;
                    stmts.push(Stmt::Block(self.block()?));
                }
                Tok::Punct('@') => {
                    self.pos += 1;
                    let neg = self.eat_punct('!');
                    let pname = self.ident()?;
                    let op = self.ident()?;
                    stmts.push(self.instruction(Some((pname, neg)), op, line)?);
                }
                Tok::Ident(s) if self.peek_at(1) == Some(&Tok::Punct(':')) && !s.starts_with('.') => {
                    self.pos += 2;
                    stmts.push(Stmt::Label { name: s, line });
                }
                Tok::Ident(s) if s.starts_with('.') => {
                    self.pos += 1;
                    if let Some(stmt) = self.body_directive(&s, line)? {
                        stmts.push(stmt);
                    }
                }
                Tok::Ident(s) => {
                    self.pos += 1;
                    stmts.push(self.instruction(None, s, line)?);
                }
                other => return Err(perr(line, format!("unexpected {other:?}"))),
            }
        }
    }

    fn body_directive(&mut self, d: &str, line: u32) -> Result<Option<Stmt>, EmuError> {
        match d {
            ".reg" => {
                let mut ty = None;
                while let Some(Tok::Ident(t)) = self.peek()
                    && t.starts_with('.')
                {
                    let t = t.clone();
                    self.pos += 1;
                    if t.starts_with(".v") && t.len() == 3 {
                        return Err(perr(line, "vector registers (.reg .vN) are not supported"));
                    }
                    ty = Some(Ty::parse(&t[1..]).ok_or_else(|| perr(line, format!("bad register type `{t}`")))?);
                }
                let ty = ty.ok_or_else(|| perr(line, ".reg without a type"))?;
                let mut names = Vec::new();
                loop {
                    let name = self.ident()?;
                    if self.eat_punct('<') {
                        let n = self.number()?;
                        if !(0..=MAX_REGISTERS).contains(&n) {
                            return Err(perr(
                                line,
                                format!("`{name}<{n}>`: at most {MAX_REGISTERS} registers per declaration"),
                            ));
                        }
                        self.expect_punct('>')?;
                        names.push((name, Some(n)));
                    } else {
                        names.push((name, None));
                    }
                    if !self.eat_punct(',') {
                        break;
                    }
                }
                self.expect_punct(';')?;
                Ok(Some(Stmt::Reg { ty, names }))
            }
            ".shared" => Ok(Some(Stmt::Shared(self.var_decl(false)?))),
            ".extern" => {
                let next = self.ident()?;
                if next != ".shared" {
                    return Err(perr(line, format!("unsupported `.extern {next}` in a function")));
                }
                Ok(Some(Stmt::ExternShared(self.var_decl(true)?)))
            }
            ".pragma" => {
                self.next()?;
                self.expect_punct(';')?;
                Ok(None)
            }
            ".loc" | ".file" => {
                self.skip_line(line);
                Ok(None)
            }
            other => Err(perr(
                line,
                format!("unsupported directive `{other}` in a function body"),
            )),
        }
    }

    fn operand(&mut self) -> Result<Operand, EmuError> {
        let line = self.line();
        match self.next()? {
            Tok::Punct('{') => Ok(Operand::Vec(self.operands_until('}')?)),
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
                Ok(Operand::Addr(base, off))
            }
            Tok::Punct('!') => Ok(Operand::Not(self.ident()?)),
            Tok::Punct('-') => match self.next()? {
                Tok::Num(s) => Ok(Operand::Lit(neg_lit(parse_lit(&s, line)?))),
                t => Err(perr(line, format!("expected a number after `-`, found {t:?}"))),
            },
            Tok::Num(s) => Ok(Operand::Lit(parse_lit(&s, line)?)),
            Tok::Ident(s) if s == "_" => Ok(Operand::Sink),
            Tok::Ident(s) => {
                if self.eat_punct('|') {
                    return Ok(Operand::Pipe(s, self.ident()?));
                }
                if self.eat_punct('+') {
                    let off = self.number()? as i64;
                    return Ok(Operand::Name(s, off));
                }
                Ok(Operand::Name(s, 0))
            }
            t => Err(perr(line, format!("unexpected {t:?} in an operand"))),
        }
    }

    /// Operands separated by `,` up to `close` (possibly none).
    fn operands_until(&mut self, close: char) -> Result<Vec<Operand>, EmuError> {
        let mut v = Vec::new();
        if !self.eat_punct(close) {
            loop {
                v.push(self.operand()?);
                if self.eat_punct(close) {
                    break;
                }
                self.expect_punct(',')?;
            }
        }
        Ok(v)
    }

    fn instruction(&mut self, guard: Option<(String, bool)>, opcode: String, line: u32) -> Result<Stmt, EmuError> {
        let operands = self.operands_until(';')?;
        let text = self
            .lines
            .get(line as usize - 1)
            .map_or(opcode.clone(), |l| l.trim().to_string());
        Ok(Stmt::Inst(Instruction {
            guard,
            opcode,
            operands,
            line,
            text,
        }))
    }
}
