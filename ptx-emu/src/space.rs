//! Where an address of a state space lands: generic addresses resolved
//! through the shared and const windows, and bounds-checked reads and
//! writes of global, shared, `.param` and `.const` memory.

use crate::exec::Ctx;
use crate::ir::Space;
use crate::{CONST_WINDOW, Memory, SHARED_WINDOW};

/// Where an address of a state space lands.
enum Loc {
    Global(u64),
    Shared(usize),
    Param(usize),
    Const(usize),
}

fn resolve(space: Space, addr: u64) -> Loc {
    match space {
        Space::Global => Loc::Global(addr),
        Space::Shared => Loc::Shared(addr as usize),
        Space::Param => Loc::Param(addr as usize),
        Space::Const => Loc::Const(addr as usize),
        Space::Generic => {
            if (SHARED_WINDOW..SHARED_WINDOW + (1 << 32)).contains(&addr) {
                Loc::Shared((addr - SHARED_WINDOW) as usize)
            } else if (CONST_WINDOW..CONST_WINDOW + (1 << 32)).contains(&addr) {
                Loc::Const((addr - CONST_WINDOW) as usize)
            } else {
                Loc::Global(addr)
            }
        }
    }
}

pub(crate) fn read_mem(
    ctx: &Ctx,
    space: Space,
    addr: u64,
    buf: &mut [u8],
    shared: &[u8],
    mem: &Memory,
) -> Result<(), String> {
    let n = buf.len();
    match resolve(space, addr) {
        Loc::Global(a) => buf.copy_from_slice(mem.slice(a, n)?),
        Loc::Shared(o) => {
            let s = shared.get(o..o.wrapping_add(n)).ok_or_else(|| {
                format!(
                    "shared access of {n} bytes at offset {o:#x} is out of bounds ({} bytes of shared memory)",
                    shared.len()
                )
            })?;
            buf.copy_from_slice(s);
        }
        Loc::Param(o) => {
            let s = ctx
                .params
                .get(o..o.wrapping_add(n))
                .ok_or_else(|| format!("param access of {n} bytes at offset {o} is out of bounds"))?;
            buf.copy_from_slice(s);
        }
        Loc::Const(o) => {
            let s = ctx.consts.get(o..o.wrapping_add(n)).ok_or_else(|| {
                format!(
                    "const access of {n} bytes at offset {o:#x} is out of bounds ({} bytes of .const data)",
                    ctx.consts.len()
                )
            })?;
            buf.copy_from_slice(s);
        }
    }
    Ok(())
}

pub(crate) fn write_mem(
    space: Space,
    addr: u64,
    data: &[u8],
    shared: &mut [u8],
    mem: &mut Memory,
) -> Result<(), String> {
    let n = data.len();
    match resolve(space, addr) {
        Loc::Global(a) => mem.slice_mut(a, n)?.copy_from_slice(data),
        Loc::Shared(o) => {
            let len = shared.len();
            let s = shared.get_mut(o..o.wrapping_add(n)).ok_or_else(|| {
                format!("shared access of {n} bytes at offset {o:#x} is out of bounds ({len} bytes of shared memory)")
            })?;
            s.copy_from_slice(data);
        }
        Loc::Param(_) => return Err("writes to .param are not allowed".into()),
        Loc::Const(_) => return Err("writes to .const are not allowed".into()),
    }
    Ok(())
}
