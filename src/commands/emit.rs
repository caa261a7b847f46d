use super::{build_source, print_out};
use crate::cli::{ModelFlags, SourceArgs};
use anyhow::{Result, bail};
use ouroc_kernels::Program;

pub fn ir(source: &SourceArgs, flags: &ModelFlags, after: Option<&str>) -> Result<()> {
    let mut graph = build_source(source, flags)?;
    if let Some(pass) = after {
        let (g, _) = ouroc_passes::default_pipeline().run(&graph, Some(pass))?;
        graph = g;
    }
    print_out(&ouroc_ir::print(&graph))
}

/// The optimised graph of `source` lowered to a Program.
pub fn program(source: &SourceArgs, flags: &ModelFlags) -> Result<Program> {
    let graph = build_source(source, flags)?;
    let (optimised, _) = ouroc_passes::default_pipeline().run(&graph, None)?;
    ouroc_kernels::lower(&optimised).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn clif(source: &SourceArgs, flags: &ModelFlags, kernel: Option<&str>) -> Result<()> {
    let program = program(source, flags)?;
    let chosen: Vec<&ouroc_kernels::Kernel> = match kernel {
        Some(name) => match program.kernel(name) {
            Some(k) => vec![k],
            None => {
                let names: Vec<&str> = program.kernels().map(|k| k.spec.name.as_str()).collect();
                bail!("no kernel named `{name}`; this program's kernels: {}", names.join(", "))
            }
        },
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
