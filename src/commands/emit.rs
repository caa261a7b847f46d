use super::{build_source, print_out};
use crate::cli::{ModelFlags, SourceArgs};
use anyhow::{Result, bail};
use ouroc_kernels::Program;

pub fn ir(source: &SourceArgs, flags: &ModelFlags, after: Option<&str>) -> Result<()> {
    let mut graph = build_source(source, flags)?;
    if let Some(pass) = after {
        let passes = flags.pipeline(false).map_err(anyhow::Error::msg)?;
        graph = ouroc_compile::optimise_with(&graph, &passes, Some(pass))?.0;
    }
    print_out(&ouroc_ir::print(&graph))
}

/// The optimised graph of `source` lowered to a Program.
pub fn program(source: &SourceArgs, flags: &ModelFlags) -> Result<Program> {
    let passes = flags.pipeline(false).map_err(anyhow::Error::msg)?;
    super::lower(build_source(source, flags)?, &passes, flags)
}

/// The kernel of `program` named `name`, or an error listing the names.
fn named_kernel<'p>(program: &'p Program, name: &str) -> Result<&'p ouroc_kernels::Kernel> {
    match program.kernel(name) {
        Some(k) => Ok(k),
        None => {
            let names: Vec<&str> = program.kernels().map(|k| k.spec.name.as_str()).collect();
            bail!("no kernel named `{name}`; this program's kernels: {}", names.join(", "))
        }
    }
}

pub fn ptx(source: &SourceArgs, flags: &ModelFlags, kernel: Option<&str>) -> Result<()> {
    use ouroc_codegen::ptx;
    let program = program(source, flags)?;
    let (text, abis) = match kernel {
        Some(name) => {
            let k = ptx::emit(&named_kernel(&program, name)?.spec)?;
            (k.text, vec![k.abi])
        }
        None => {
            let m = ptx::module(&program)?;
            (m.text, m.kernels)
        }
    };
    // One line per entry, naming every kernel that launches it (layers share code).
    let mut lines: Vec<(String, Vec<&str>)> = Vec::new();
    for abi in &abis {
        for e in &abi.entries {
            let line = format!(
                "{} when {:?}, launch {}",
                e.entry,
                e.when,
                serde_json::to_string(&e.launch)?
            );
            match lines.iter_mut().find(|(l, _)| *l == line) {
                Some((_, users)) => users.push(&abi.name),
                None => lines.push((line, vec![&abi.name])),
            }
        }
    }
    let mut out = String::new();
    for (line, users) in &lines {
        out += &format!("// {line} ({})\n", users.join(", "));
    }
    out += "\n";
    out += &text;
    print_out(&out)
}

pub fn clif(source: &SourceArgs, flags: &ModelFlags, kernel: Option<&str>) -> Result<()> {
    let program = program(source, flags)?;
    let chosen: Vec<&ouroc_kernels::Kernel> = match kernel {
        Some(name) => vec![named_kernel(&program, name)?],
        // Kernels with the same code key share one function: print it once,
        // naming every kernel that uses it.
        None => {
            let mut seen = std::collections::HashSet::new();
            program.kernels().filter(|k| seen.insert(k.spec.code_key())).collect()
        }
    };
    let mut text = String::new();
    for k in chosen {
        let users: Vec<&str> = program
            .kernels()
            .filter(|o| o.spec.code_key() == k.spec.code_key())
            .map(|o| o.spec.name.as_str())
            .collect();
        text += &format!(
            "; {}: {}\n{}\n",
            users.join(", "),
            k.spec,
            ouroc_codegen::cpu::clif_text(&k.spec)?
        );
    }
    print_out(&text)
}

/// The MLIR module of the graph as imported, or after the pass `after`.
pub fn mlir(source: &SourceArgs, flags: &ModelFlags, after: Option<&str>, locations: bool) -> Result<()> {
    let mut graph = build_source(source, flags)?;
    if let Some(pass) = after {
        let passes = flags.pipeline(false).map_err(anyhow::Error::msg)?;
        graph = ouroc_compile::optimise_with(&graph, &passes, Some(pass))?.0;
    }
    print_out(&mlir_text(&graph, locations)?)
}

#[cfg(feature = "mlir")]
fn mlir_text(graph: &ouroc_ir::Graph, locations: bool) -> Result<String> {
    use ouroc_codegen::mlir;
    Ok(mlir::export_with(graph, mlir::PrintOptions { locations })?)
}

#[cfg(not(feature = "mlir"))]
fn mlir_text(_: &ouroc_ir::Graph, _: bool) -> Result<String> {
    bail!(
        "this ouroc was built without MLIR export: rebuild with `cargo build --features mlir` \
         (needs LLVM/MLIR 19: apt-get install libmlir-19-dev mlir-19-tools llvm-19-dev libclang-19-dev \
         libpolly-19-dev libzstd-dev; see README.md, \"MLIR export\")"
    )
}
