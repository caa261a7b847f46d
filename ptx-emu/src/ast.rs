//! The syntax tree of a PTX module as written: directives, declarations,
//! labels and instructions with their operands. Nothing is resolved yet:
//! names are strings, opcodes keep their dotted modifiers.

use crate::ty::Ty;

/// A module: the header directives and the module-scope items in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyntaxModule {
    pub version: Option<String>,
    pub target: Vec<String>,
    pub address_size: Option<u32>,
    pub items: Vec<Item>,
}

/// A module-scope declaration. Order matters: an entry sees only the
/// variables declared before it.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Entry(Entry),
    Shared(VarDecl),
    ExternShared(VarDecl),
    Const(ConstDecl),
}

/// `.entry name(.param ...) .reqntid ... { body }`.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    pub params: Vec<ParamSyntax>,
    pub reqntid: Option<[u32; 3]>,
    pub maxntid: Option<[u32; 3]>,
    pub body: Vec<Stmt>,
}

/// `.param [.align N] .type name[count]`.
#[derive(Debug, Clone)]
pub(crate) struct ParamSyntax {
    pub name: String,
    pub ty: Ty,
    pub align: Option<u64>,
    pub count: u64,
}

/// A `.shared` variable: alignment and size in bytes (0 for the unsized
/// array of `.extern .shared`).
#[derive(Debug, Clone)]
pub(crate) struct VarDecl {
    pub name: String,
    pub align: u64,
    pub size: u64,
}

/// `.const [.align N] .type name[dims] [= init];`.
#[derive(Debug, Clone)]
pub(crate) struct ConstDecl {
    pub name: String,
    pub ty: Ty,
    pub align: Option<u64>,
    pub count: u64,
    pub values: Vec<Lit>,
    pub line: u32,
}

/// A statement of a function body.
#[derive(Debug, Clone)]
pub(crate) enum Stmt {
    /// A nested `{ }` scope.
    Block(Vec<Stmt>),
    /// `.reg .type a, b<N>`: names with an optional `<N>` range.
    Reg {
        ty: Ty,
        names: Vec<(String, Option<i128>)>,
    },
    Shared(VarDecl),
    ExternShared(VarDecl),
    Label {
        name: String,
        line: u32,
    },
    Inst(Instruction),
}

/// `[@{!}guard] opcode.mods operand, ...;`.
#[derive(Debug, Clone)]
pub(crate) struct Instruction {
    /// The guard predicate's name and whether it is negated.
    pub guard: Option<(String, bool)>,
    pub opcode: String,
    pub operands: Vec<Operand>,
    pub line: u32,
    /// The source line, for messages.
    pub text: String,
}

/// A literal as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Lit {
    Int(i128),
    F32(u32),
    F64(u64),
    Dec(f64),
}

/// An operand as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    /// A name with an optional `+imm` (`smem+16`).
    Name(String, i64),
    /// `!%p`
    Not(String),
    Lit(Lit),
    Vec(Vec<Operand>),
    /// `[base+off]`; base is a name or absent (absolute address).
    Addr(Option<String>, i64),
    /// `%r|%p`
    Pipe(String, String),
    Sink,
}
