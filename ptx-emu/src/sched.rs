//! The SIMT scheduler of one CTA: warps of 32 lanes with per-lane program
//! counters (a warp issues the group of its runnable lanes at the lowest
//! PC, so divergent paths run one after the other and reconverge where the
//! PCs meet), warp-granular barriers with deadlock detection, and the
//! per-lane `cp.async` groups whose shared-memory writes wait for
//! `wait_group`. What an instruction computes is [`crate::exec`]'s.

use std::collections::VecDeque;

use crate::exec::{self, AsyncCopy, Ctx, Issue, WarpRegs, lanes, pred};
use crate::ir::{Inst, Op, Src};
use crate::num::mask;
use crate::{EmuError, LaunchStats, Memory};

/// Bytes fresh shared memory is filled with: 0xff makes any f32/bf16 read of
/// unwritten shared memory a NaN.
const SHARED_POISON: u8 = 0xff;

/// One lane's `cp.async` copies: issued but not committed, and committed
/// groups oldest first.
#[derive(Debug, Default, Clone)]
struct LaneAsync {
    pending: Vec<AsyncCopy>,
    groups: VecDeque<Vec<AsyncCopy>>,
}

impl LaneAsync {
    fn commit(&mut self) {
        let g = std::mem::take(&mut self.pending);
        self.groups.push_back(g);
    }

    /// Writes the oldest groups to shared memory until at most `n` remain
    /// pending.
    fn wait(&mut self, n: usize, shared: &mut [u8]) {
        while self.groups.len() > n {
            for c in self.groups.pop_front().unwrap_or_default() {
                let o = c.dst as usize;
                shared[o..o + c.len as usize].copy_from_slice(&c.data[..c.len as usize]);
            }
        }
    }
}

/// A warp: its registers and what the scheduler tracks per lane.
struct Warp {
    regs: WarpRegs,
    pc: [u32; 32],
    /// lanes that exist and have not exited
    live: u32,
    /// lanes blocked at a barrier
    waiting: u32,
    bar_id: u32,
    bar_expected: u32,
    arrived: bool,
    asyncs: Vec<LaneAsync>,
}

/// One of the 16 barriers: the warps arrived so far.
#[derive(Default, Clone)]
struct BarState {
    arrived: u32,
    expected: u32,
    warps: Vec<usize>,
}

/// One CTA being run.
pub(crate) struct Cta<'a, 'm> {
    ctx: &'a Ctx<'a>,
    mem: &'m mut Memory,
    shared: Vec<u8>,
    warps: Vec<Warp>,
    bars: Vec<BarState>,
    stats: &'a mut LaunchStats,
    step_limit: u64,
}

impl<'a, 'm> Cta<'a, 'm> {
    pub(crate) fn new(ctx: &'a Ctx<'a>, mem: &'m mut Memory, stats: &'a mut LaunchStats, step_limit: u64) -> Self {
        let k = ctx.k;
        let (bx, by, bz) = ctx.dims.block;
        let nthreads = bx * by * bz;
        let shared_len = (k.dyn_shared_offset + ctx.dims.shared_bytes as usize).max(k.static_shared);
        let mut warps = Vec::with_capacity(ctx.nwarps as usize);
        let mut regs0 = vec![0u64; k.reg_bits.len() * 32];
        for (r, &bits) in k.reg_bits.iter().enumerate() {
            regs0[r * 32..r * 32 + 32].fill(mask(bits));
        }
        for wid in 0..ctx.nwarps {
            let mut tid = [[0u32; 3]; 32];
            let mut live = 0u32;
            for (l, t) in tid.iter_mut().enumerate() {
                let lin = wid * 32 + l as u32;
                if lin < nthreads {
                    live |= 1 << l;
                    *t = [lin % bx, (lin / bx) % by, lin / (bx * by)];
                }
            }
            warps.push(Warp {
                regs: WarpRegs {
                    id: wid,
                    tid,
                    vals: regs0.clone(),
                    preds: vec![0; k.npreds],
                },
                pc: [0; 32],
                live,
                waiting: 0,
                bar_id: 0,
                bar_expected: 0,
                arrived: false,
                asyncs: vec![LaneAsync::default(); 32],
            });
        }
        Cta {
            ctx,
            mem,
            shared: vec![SHARED_POISON; shared_len],
            warps,
            bars: vec![BarState::default(); 16],
            stats,
            step_limit,
        }
    }

    pub(crate) fn run(&mut self) -> Result<(), EmuError> {
        loop {
            let mut progress = false;
            for w in 0..self.warps.len() {
                while self.step(w)? {
                    progress = true;
                    self.check_arrival(w)?;
                }
                self.check_arrival(w)?;
            }
            if self.warps.iter().all(|w| w.live == 0) {
                return Ok(());
            }
            if !progress {
                return Err(self.deadlock());
            }
        }
    }

    fn deadlock(&self) -> EmuError {
        let mut parts = Vec::new();
        for (id, b) in self.bars.iter().enumerate() {
            if b.arrived > 0 {
                let line = self.warps[b.warps[0]]
                    .pc
                    .iter()
                    .zip(0..)
                    .find(|(_, l)| self.warps[b.warps[0]].waiting >> l & 1 == 1);
                let at = line
                    .and_then(|(pc, _)| self.ctx.k.insts.get(*pc as usize))
                    .map(|i| format!(" (line {} `{}`)", i.line, i.text))
                    .unwrap_or_default();
                parts.push(format!(
                    "barrier {id}{at} reached by {} of {} warps (warps {:?})",
                    b.arrived, b.expected, b.warps
                ));
            }
        }
        let exited: Vec<u32> = self.warps.iter().filter(|w| w.live == 0).map(|w| w.regs.id).collect();
        if !exited.is_empty() {
            parts.push(format!("warps {exited:?} exited without reaching it"));
        }
        let partial: Vec<u32> = self
            .warps
            .iter()
            .filter(|w| w.live != 0 && w.waiting != 0 && !w.arrived)
            .map(|w| w.regs.id)
            .collect();
        if !partial.is_empty() {
            parts.push(format!(
                "warps {partial:?} have lanes blocked at a barrier while others cannot run"
            ));
        }
        EmuError::Deadlock {
            kernel: self.ctx.k.name.clone(),
            cta: self.ctx.ctaid,
            msg: parts.join("; "),
        }
    }

    /// A warp arrives at its barrier once every non-exited lane waits there.
    fn check_arrival(&mut self, w: usize) -> Result<(), EmuError> {
        let warp = &self.warps[w];
        if warp.arrived || warp.waiting == 0 || warp.live & !warp.waiting != 0 {
            return Ok(());
        }
        let (id, expected) = (warp.bar_id as usize, warp.bar_expected);
        let st = &mut self.bars[id];
        if st.arrived == 0 {
            st.expected = expected;
        } else if st.expected != expected {
            let lane = warp.waiting.trailing_zeros() as usize;
            let inst = &self.ctx.k.insts[warp.pc[lane] as usize];
            return Err(self.ctx.fault(
                inst,
                &warp.regs,
                lane,
                format!(
                    "barrier {id} expects {expected} warps here but {} elsewhere",
                    st.expected
                ),
            ));
        }
        st.arrived += 1;
        st.warps.push(w);
        self.warps[w].arrived = true;
        if self.bars[id].arrived == self.bars[id].expected {
            let st = std::mem::take(&mut self.bars[id]);
            self.stats.barriers += 1;
            for wi in st.warps {
                let wp = &mut self.warps[wi];
                for l in lanes(wp.waiting) {
                    wp.pc[l] += 1;
                }
                wp.waiting = 0;
                wp.arrived = false;
            }
        }
        Ok(())
    }

    /// Runs one warp-instruction of warp `w`; false when no lane can run.
    fn step(&mut self, w: usize) -> Result<bool, EmuError> {
        let ctx = self.ctx;
        let k = ctx.k;
        let warp = &mut self.warps[w];
        let runnable = warp.live & !warp.waiting;
        if runnable == 0 {
            return Ok(false);
        }
        let mut pc = u32::MAX;
        for l in lanes(runnable) {
            pc = pc.min(warp.pc[l]);
        }
        let mut active = 0u32;
        for l in lanes(runnable) {
            if warp.pc[l] == pc {
                active |= 1 << l;
            }
        }
        let Some(inst) = k.insts.get(pc as usize) else {
            // falling off the end of the kernel ends the threads
            warp.live &= !active;
            return Ok(true);
        };
        self.stats.warp_instructions += 1;
        if self.stats.warp_instructions > self.step_limit {
            return Err(EmuError::StepLimit {
                kernel: k.name.clone(),
                limit: self.step_limit,
            });
        }
        let exec = match inst.guard {
            None => active,
            Some(g) => active & pred(&warp.regs, g),
        };
        self.stats.thread_instructions += u64::from(exec.count_ones());
        let issue = Issue {
            exec,
            active,
            live: warp.live,
        };
        let mut advance = active;
        match &inst.op {
            Op::Bra { target, uni } => {
                if *uni && exec != active && exec != 0 {
                    return Err(ctx.fault(
                        inst,
                        &warp.regs,
                        exec.trailing_zeros() as usize,
                        format!("bra.uni diverges: taken by lanes {exec:#010x} of {active:#010x}"),
                    ));
                }
                for l in lanes(exec) {
                    warp.pc[l] = *target;
                }
                advance &= !exec;
            }
            Op::Exit => {
                warp.live &= !exec;
                advance &= !exec;
            }
            Op::Bar { id, count, aligned } => {
                if exec != 0 {
                    wait_at_barrier(ctx, inst, warp, exec, *id, *count, *aligned)?;
                    advance &= !exec;
                }
            }
            Op::CpAsync(cp) => {
                let copies = exec::cp_async(ctx, inst, cp, &warp.regs, exec, self.shared.len(), self.mem)?;
                for (l, c) in copies {
                    warp.asyncs[l].pending.push(c);
                }
            }
            Op::CpCommit => {
                for l in lanes(exec) {
                    warp.asyncs[l].commit();
                }
            }
            Op::CpWait { n, all } => {
                for l in lanes(exec) {
                    let a = &mut warp.asyncs[l];
                    if *all {
                        a.commit();
                    }
                    a.wait(*n as usize, &mut self.shared);
                }
            }
            _ => exec::execute(ctx, inst, &mut warp.regs, issue, &mut self.shared, self.mem)?,
        }
        for l in lanes(advance) {
            warp.pc[l] += 1;
        }
        Ok(true)
    }
}

/// Blocks the lanes of `exec` at barrier `id` (the whole CTA, or `count`
/// threads).
fn wait_at_barrier(
    ctx: &Ctx,
    inst: &Inst,
    warp: &mut Warp,
    exec: u32,
    id: Src,
    count: Option<Src>,
    aligned: bool,
) -> Result<(), EmuError> {
    let first = exec.trailing_zeros() as usize;
    if aligned && exec != warp.live {
        return Err(ctx.fault(
            inst,
            &warp.regs,
            first,
            format!(
                "bar.sync (aligned) executed by lanes {exec:#010x} but live lanes are {:#010x}: \
                 the warp is not converged (use barrier.sync for divergent code)",
                warp.live
            ),
        ));
    }
    let bid = ctx.rd(&warp.regs, id, first);
    let cnt = count.map(|c| ctx.rd(&warp.regs, c, first));
    for l in lanes(exec) {
        if ctx.rd(&warp.regs, id, l) != bid || count.map(|c| ctx.rd(&warp.regs, c, l)) != cnt {
            return Err(ctx.fault(inst, &warp.regs, l, "barrier id/count differ between lanes"));
        }
    }
    if bid >= 16 {
        return Err(ctx.fault(inst, &warp.regs, first, format!("barrier {bid} is out of range 0..15")));
    }
    let expected = match cnt {
        None => ctx.nwarps,
        Some(c) => {
            if c == 0 || !c.is_multiple_of(32) {
                return Err(ctx.fault(
                    inst,
                    &warp.regs,
                    first,
                    format!("thread count {c} is not a positive multiple of 32"),
                ));
            }
            (c / 32) as u32
        }
    };
    if warp.waiting != 0 && (warp.bar_id != bid as u32 || warp.bar_expected != expected) {
        return Err(ctx.fault(inst, &warp.regs, first, "lanes of one warp wait at different barriers"));
    }
    warp.waiting |= exec;
    warp.bar_id = bid as u32;
    warp.bar_expected = expected;
    Ok(())
}
