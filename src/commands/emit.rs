use super::{build, open};
use crate::cli::ModelFlags;
use anyhow::Result;
use std::path::Path;

pub fn ir(dir: &Path, flags: &ModelFlags) -> Result<()> {
    let ckpt = open(dir)?;
    let graph = build(&ckpt, flags)?;
    print!("{}", ouroc_ir::print(&graph));
    Ok(())
}
