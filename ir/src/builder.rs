//! Building graphs in textual order, so built graphs are already canonical
//! (value numbers increase down the printed text).

use crate::graph::{Block, Graph, Loop, Op, OpKind, Terminator, ValueId};
use crate::infer::infer;
use crate::policy::ExitPolicy;
use crate::types::{DType, Type};

pub struct GraphBuilder {
    name: String,
    types: Vec<Type>,
    /// Open blocks: the top block, then each loop body being built.
    stack: Vec<OpenBlock>,
}

struct OpenBlock {
    args: Vec<ValueId>,
    ops: Vec<Op>,
    /// For a loop body: the loop's reserved result id and initial values.
    loop_result: Option<(ValueId, Vec<ValueId>)>,
}

impl GraphBuilder {
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder {
            name: name.to_string(),
            types: Vec::new(),
            stack: vec![OpenBlock {
                args: Vec::new(),
                ops: Vec::new(),
                loop_result: None,
            }],
        }
    }

    fn fresh(&mut self, ty: Type) -> ValueId {
        self.types.push(ty);
        ValueId((self.types.len() - 1) as u32)
    }

    fn top(&mut self) -> &mut OpenBlock {
        self.stack.last_mut().expect("builder always has an open block")
    }

    pub fn ty(&self, v: ValueId) -> &Type {
        &self.types[v.index()]
    }

    /// A graph input (argument of the top block).
    pub fn input(&mut self, ty: Type) -> ValueId {
        assert_eq!(self.stack.len(), 1, "inputs belong to the top block");
        let v = self.fresh(ty);
        self.stack[0].args.push(v);
        v
    }

    pub fn weight(&mut self, name: &str, ty: Type) -> ValueId {
        let v = self.fresh(ty);
        self.top().ops.push(Op {
            results: vec![v],
            kind: OpKind::Weight { name: name.to_string() },
            inputs: vec![],
        });
        v
    }

    /// Add a single-result op whose type is inferred; `dtype` is used only
    /// by ops whose inputs do not fix the result dtype (RoPE tables).
    pub fn op(&mut self, kind: OpKind, inputs: &[ValueId], dtype: DType) -> Result<ValueId, String> {
        let name = kind.name();
        let rs = self.op_multi(kind, inputs, dtype)?;
        match rs.as_slice() {
            [v] => Ok(*v),
            _ => Err(format!("building {name}: it has {} results; use op_multi", rs.len())),
        }
    }

    /// Add an op with any number of results, typed by inference.
    pub fn op_multi(&mut self, kind: OpKind, inputs: &[ValueId], dtype: DType) -> Result<Vec<ValueId>, String> {
        let tys: Vec<&Type> = inputs.iter().map(|v| &self.types[v.index()]).collect();
        let tys = infer(&kind, &tys, dtype).map_err(|e| format!("building {}: {e}", kind.name()))?;
        let results: Vec<ValueId> = tys.into_iter().map(|t| self.fresh(t)).collect();
        self.top().ops.push(Op {
            results: results.clone(),
            kind,
            inputs: inputs.to_vec(),
        });
        Ok(results)
    }

    /// Open a loop body. Returns the step index value and the carried values
    /// (one per initial value). Ops added until `end_loop` go into the body.
    pub fn begin_loop(&mut self, init: &[ValueId]) -> (ValueId, Vec<ValueId>) {
        // Reserve the loop's result before its body so numbering is textual.
        let result = self.fresh(Type::scalar(DType::F32));
        let step = self.fresh(Type::scalar(DType::I32));
        let carried: Vec<ValueId> = init.iter().map(|v| self.fresh(self.types[v.index()].clone())).collect();
        let mut args = vec![step];
        args.extend(&carried);
        self.stack.push(OpenBlock {
            args,
            ops: Vec::new(),
            loop_result: Some((result, init.to_vec())),
        });
        (step, carried)
    }

    /// Close the innermost loop body; the loop's result has `out`'s type.
    pub fn end_loop(
        &mut self,
        steps: usize,
        policy: ExitPolicy,
        next: &[ValueId],
        out: ValueId,
        exit: Option<ValueId>,
    ) -> ValueId {
        let body = self.stack.pop().expect("end_loop without begin_loop");
        let (result, init) = body.loop_result.expect("end_loop without begin_loop");
        self.types[result.index()] = self.types[out.index()].clone();
        let block = Block {
            args: body.args,
            ops: body.ops,
            term: Terminator::Yield {
                next: next.to_vec(),
                out,
                exit,
            },
        };
        self.top().ops.push(Op {
            results: vec![result],
            kind: OpKind::Loop(Box::new(Loop {
                steps,
                policy,
                body: block,
            })),
            inputs: init,
        });
        result
    }

    pub fn finish(mut self, outputs: &[ValueId]) -> Graph {
        assert_eq!(self.stack.len(), 1, "finish with an open loop");
        let top = self.stack.pop().expect("top block");
        Graph {
            name: self.name,
            types: self.types,
            body: Block {
                args: top.args,
                ops: top.ops,
                term: Terminator::Return(outputs.to_vec()),
            },
        }
    }
}
