//! ouroc-ir: the graph IR of ouroc.
//!
//! - [`types`]: dtypes and shapes with symbolic dims;
//! - [`graph`]: SSA values, ops, blocks and the `loop` region with its exit policy;
//! - [`policy`]: exit policies and the arithmetic that picks a token's exit step;
//! - [`builder`]: building graphs in textual order;
//! - [`print`] / [`parse`]: the stable text form (round-trips);
//! - [`verify`]: the verifier;
//! - [`interp`]: the reference interpreter, the executable meaning of the IR.

pub mod builder;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod parse;
pub mod policy;
pub mod print;
pub mod tensor;
pub mod types;
pub mod verify;

pub use builder::GraphBuilder;
pub use graph::{Attention, Block, Graph, Loop, Op, OpKind, RopeTable, Terminator, ValueId};
pub use interp::{InterpError, Interpreter, LoopTrace, Options, RunOutput, WeightSource};
pub use parse::{ParseError, parse};
pub use policy::{ExitPolicy, exit_distribution};
pub use print::print;
pub use tensor::Tensor;
pub use types::{DType, Dim, Type};
pub use verify::{VerifyError, verify};
