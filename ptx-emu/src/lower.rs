//! Syntax tree -> [`Module`]: lays out `.shared`, `.const` and `.param`
//! space, resolves register names in their scopes and labels to instruction
//! indices, and has [`decode`](crate::decode) turn each instruction into an
//! [`Op`].

use std::collections::HashMap;

use crate::ast::{ConstDecl, Entry, Item, Operand, Stmt, SyntaxModule, VarDecl};
use crate::decode::Decoder;
use crate::ir::{Inst, Op, PredSrc};
use crate::module::{Kernel, Module, ParamDecl};
use crate::operand::lit_bits;
use crate::parse::perr;
use crate::ty::Ty;
use crate::{EmuError, MAX_CONST};

/// What a register name refers to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RegRef {
    /// A data register and its declared type.
    R(u32, Ty),
    /// A predicate.
    P(u32),
}

/// Module-scope variables declared so far.
pub(crate) struct Globals {
    /// `.shared` variables: offsets in the CTA's shared window
    pub shared: HashMap<String, u64>,
    pub shared_size: u64,
    /// `.extern .shared` names and the largest alignment
    pub dyn_shared: Vec<String>,
    pub dyn_align: u64,
    /// `.const` variables: offsets into `const_data`
    pub consts: HashMap<String, u64>,
    pub const_data: Vec<u8>,
}

/// The names of one function while its body is decoded.
pub(crate) struct Func {
    scopes: Vec<HashMap<String, RegRef>>,
    reg_bits: Vec<u32>,
    npreds: u32,
    pub shared: HashMap<String, u64>,
    pub shared_size: u64,
    pub dyn_shared: Vec<String>,
    pub dyn_align: u64,
    /// `.param` offsets
    pub params: HashMap<String, u64>,
}

impl Func {
    /// The innermost declaration of `name`.
    pub(crate) fn lookup(&self, name: &str) -> Option<RegRef> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }

    fn declare(&mut self, name: String, ty: Ty) {
        let r = if ty == Ty::Pred {
            self.npreds += 1;
            RegRef::P(self.npreds - 1)
        } else {
            self.reg_bits.push(ty.bits());
            RegRef::R(self.reg_bits.len() as u32 - 1, ty)
        };
        self.scopes.last_mut().expect("a scope").insert(name, r);
    }
}

/// Instructions and labels of a body as it is walked.
#[derive(Default)]
struct Code {
    insts: Vec<Inst>,
    labels: HashMap<String, u32>,
    /// branches to patch: instruction index, label, line
    fixups: Vec<(usize, String, u32)>,
}

pub(crate) fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a.max(1)) * a.max(1)
}

/// Lays out and decodes a parsed module.
pub(crate) fn lower_module(syntax: SyntaxModule) -> Result<Module, EmuError> {
    let mut g = Globals {
        shared: HashMap::new(),
        shared_size: 0,
        dyn_shared: Vec::new(),
        dyn_align: 16,
        consts: HashMap::new(),
        const_data: Vec::new(),
    };
    let mut kernels = Vec::new();
    for item in syntax.items {
        match item {
            Item::Entry(e) => kernels.push(entry(&g, e)?),
            Item::Shared(v) => {
                let offset = align_up(g.shared_size, v.align);
                g.shared_size = offset + v.size;
                g.shared.insert(v.name, offset);
            }
            Item::ExternShared(v) => {
                g.dyn_shared.push(v.name);
                g.dyn_align = g.dyn_align.max(v.align);
            }
            Item::Const(c) => const_decl(&mut g, c)?,
        }
    }
    Ok(Module::new(
        syntax.version,
        syntax.target,
        syntax.address_size,
        kernels,
        g.const_data,
    ))
}

/// Places a `.const` variable and writes its initialisers.
fn const_decl(g: &mut Globals, c: ConstDecl) -> Result<(), EmuError> {
    let (name, ty, count, line) = (c.name, c.ty, c.count, c.line);
    let values = c.values;
    if values.len() as u64 > count {
        return Err(perr(
            line,
            format!("`{name}` has {} initialisers for {count} elements", values.len()),
        ));
    }
    let align = c.align.unwrap_or(u64::from(ty.bytes()));
    let offset = align_up(g.const_data.len() as u64, align);
    let size = count * u64::from(ty.bytes());
    if offset + size > MAX_CONST as u64 {
        return Err(perr(line, format!("`{name}`: .const data exceeds {MAX_CONST} bytes")));
    }
    g.const_data.resize((offset + size) as usize, 0);
    let n = ty.bytes() as usize;
    for (i, v) in values.into_iter().enumerate() {
        let bits = lit_bits(v, ty).map_err(|e| perr(line, format!("`{name}`: {e}")))?;
        let at = offset as usize + i * n;
        g.const_data[at..at + n].copy_from_slice(&bits.to_le_bytes()[..n]);
    }
    if g.consts.insert(name.clone(), offset).is_some() || g.shared.contains_key(&name) {
        return Err(perr(line, format!("`{name}` is declared twice")));
    }
    Ok(())
}

fn entry(g: &Globals, e: Entry) -> Result<Kernel, EmuError> {
    let mut f = Func {
        scopes: vec![HashMap::new()],
        reg_bits: Vec::new(),
        npreds: 0,
        shared: HashMap::new(),
        shared_size: g.shared_size,
        dyn_shared: Vec::new(),
        dyn_align: g.dyn_align,
        params: HashMap::new(),
    };
    let mut params = Vec::new();
    let mut param_bytes = 0u64;
    for p in e.params {
        let size = p.count * u64::from(p.ty.bytes());
        let offset = align_up(param_bytes, p.align.unwrap_or(u64::from(p.ty.bytes())));
        param_bytes = offset + size;
        f.params.insert(p.name.clone(), offset);
        params.push(ParamDecl {
            name: p.name,
            ty_name: p.ty.name(),
            size: size as usize,
            offset: offset as usize,
            array: p.count > 1 || p.ty == Ty::B8,
        });
    }
    let mut code = Code::default();
    body(g, &mut f, &mut code, &e.body)?;
    for (idx, label, line) in std::mem::take(&mut code.fixups) {
        let target = *code
            .labels
            .get(&label)
            .ok_or_else(|| perr(line, format!("undefined label `{label}`")))?;
        if let Op::Bra { target: t, .. } = &mut code.insts[idx].op {
            *t = target;
        }
    }
    let dyn_align = f.dyn_align.max(16);
    Ok(Kernel {
        name: e.name,
        params,
        param_bytes: param_bytes as usize,
        insts: code.insts,
        reg_bits: f.reg_bits,
        npreds: f.npreds as usize,
        static_shared: f.shared_size as usize,
        dyn_shared_offset: align_up(f.shared_size, dyn_align) as usize,
        reqntid: e.reqntid,
        maxntid: e.maxntid,
    })
}

/// Walks a scope's statements in order.
fn body(g: &Globals, f: &mut Func, code: &mut Code, stmts: &[Stmt]) -> Result<(), EmuError> {
    for s in stmts {
        match s {
            Stmt::Block(inner) => {
                f.scopes.push(HashMap::new());
                body(g, f, code, inner)?;
                f.scopes.pop();
            }
            Stmt::Reg { ty, names } => {
                for (name, range) in names {
                    match range {
                        Some(n) => {
                            for i in 0..*n {
                                f.declare(format!("{name}{i}"), *ty);
                            }
                        }
                        None => f.declare(name.clone(), *ty),
                    }
                }
            }
            Stmt::Shared(VarDecl { name, align, size }) => {
                let offset = align_up(f.shared_size, *align);
                f.shared_size = offset + size;
                f.shared.insert(name.clone(), offset);
            }
            Stmt::ExternShared(v) => {
                f.dyn_shared.push(v.name.clone());
                f.dyn_align = f.dyn_align.max(v.align);
            }
            Stmt::Label { name, line } => {
                if code.labels.insert(name.clone(), code.insts.len() as u32).is_some() {
                    return Err(perr(*line, format!("duplicate label `{name}`")));
                }
            }
            Stmt::Inst(i) => {
                let guard = match &i.guard {
                    None => None,
                    Some((pname, neg)) => match f.lookup(pname) {
                        Some(RegRef::P(idx)) => Some(PredSrc { idx, neg: *neg }),
                        _ => return Err(perr(i.line, format!("guard `{pname}` is not a declared predicate"))),
                    },
                };
                let unsupported = |msg: String| EmuError::Unsupported {
                    line: i.line,
                    inst: i.text.clone(),
                    msg,
                };
                let op = Decoder { f, g }.decode(&i.opcode, &i.operands).map_err(unsupported)?;
                if let Op::Bra { .. } = op {
                    let Some(Operand::Name(label, 0)) = i.operands.first() else {
                        return Err(unsupported("bra needs a label".into()));
                    };
                    code.fixups.push((code.insts.len(), label.clone(), i.line));
                }
                code.insts.push(Inst {
                    guard,
                    op,
                    line: i.line,
                    text: i.text.clone(),
                });
            }
        }
    }
    Ok(())
}
