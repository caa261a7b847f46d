use super::build_source;
use crate::cli::{ModelFlags, SourceArgs};
use anyhow::Result;

pub fn ir(source: &SourceArgs, flags: &ModelFlags, after: Option<&str>) -> Result<()> {
    let mut graph = build_source(source, flags)?;
    if let Some(pass) = after {
        let (g, _) = ouroc_passes::default_pipeline().run(&graph, Some(pass))?;
        graph = g;
    }
    print!("{}", ouroc_ir::print(&graph));
    Ok(())
}
