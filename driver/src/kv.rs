//! KV bookkeeping: which device store each (loop step, layer) slot of each
//! sequence uses, how many positions it holds, decode-time sharing
//! ([`KvMode`]) and the fill of skipped steps' slots. The exact semantics
//! are in the crate docs ("KV cache").

use crate::device::{Device, DeviceError, KvArg, KvLayout, KvStore};
use std::collections::BTreeMap;
use std::fmt;

/// How decode shares the KV cache across loop steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvMode {
    /// One cache per (loop step, layer), in prefill and decode.
    #[default]
    Full,
    /// Decode: one cache per layer, step R-1's after prefill; each token's
    /// rows hold the K/V of the last step it ran.
    Last,
    /// Decode: one cache per layer, the mean over steps of the R caches
    /// after prefill; each token's rows hold the mean over the steps it ran.
    Mean,
}

impl KvMode {
    /// Every mode, in the order `--kv` lists them.
    pub const ALL: [KvMode; 3] = [KvMode::Full, KvMode::Last, KvMode::Mean];

    /// The name `--kv` takes: `full`, `last`, `mean`.
    pub fn name(self) -> &'static str {
        match self {
            KvMode::Full => "full",
            KvMode::Last => "last",
            KvMode::Mean => "mean",
        }
    }

    /// Parse a name (`full`, `last`, `mean`).
    pub fn parse(s: &str) -> Result<KvMode, String> {
        KvMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = KvMode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown KV mode `{s}`; valid modes: {}", names.join(", "))
        })
    }
}

impl fmt::Display for KvMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvMode {
    type Err = String;

    fn from_str(s: &str) -> Result<KvMode, String> {
        KvMode::parse(s)
    }
}

/// A store and the positions it holds.
#[derive(Clone, Copy, Debug)]
struct Held {
    store: KvStore,
    len: usize,
    layout: KvLayout,
}

/// One sequence's cache.
#[derive(Default)]
struct SeqKv {
    /// (step, layer) -> store; attention outside the loop uses step 0. The
    /// loop layers' are gone while `shared` is in use.
    slots: BTreeMap<(usize, usize), Held>,
    /// `last` / `mean` after the first decode call: one store per loop layer.
    shared: Option<BTreeMap<usize, Held>>,
    /// `mean`, shared: per loop layer, the f32 sums of the call's new K then
    /// V rows over the steps run so far.
    acc: BTreeMap<usize, (Vec<f32>, Vec<f32>)>,
}

/// The KV cache of every sequence.
pub(crate) struct KvCache {
    pub mode: KvMode,
    /// Loop steps (1 without a loop).
    steps: usize,
    /// Attention layers outside the loop and in it, with their layouts.
    outer: Vec<(usize, KvLayout)>,
    inner: Vec<(usize, KvLayout)>,
    seqs: Vec<SeqKv>,
}

impl KvCache {
    pub fn new(mode: KvMode, steps: usize, outer: Vec<(usize, KvLayout)>, inner: Vec<(usize, KvLayout)>) -> KvCache {
        KvCache {
            mode,
            steps,
            outer,
            inner,
            seqs: Vec::new(),
        }
    }

    /// A cache of the same mode and slots, without sequences.
    pub fn empty_like(&self) -> KvCache {
        KvCache::new(self.mode, self.steps, self.outer.clone(), self.inner.clone())
    }

    /// Sequences with stores.
    pub fn batch(&self) -> usize {
        self.seqs.len()
    }

    /// Whether decode calls share one store per loop layer now.
    pub fn shared(&self) -> bool {
        self.seqs.first().is_some_and(|s| s.shared.is_some())
    }

    /// Stores for `batch` sequences, every (step, layer) slot empty.
    pub fn open<D: Device>(&mut self, dev: &mut D, batch: usize) -> Result<(), DeviceError> {
        self.close(dev)?;
        for _ in 0..batch {
            let mut s = SeqKv::default();
            let keys = self
                .outer
                .iter()
                .map(|&(l, lay)| (0, l, lay))
                .chain((0..self.steps).flat_map(|r| self.inner.iter().map(move |&(l, lay)| (r, l, lay))));
            for (r, layer, layout) in keys {
                if s.slots.contains_key(&(r, layer)) {
                    return Err(DeviceError::Program(format!(
                        "two attention kernels use the KV slot of step {r}, layer {layer}"
                    )));
                }
                let store = dev.kv_alloc(layout)?;
                s.slots.insert((r, layer), Held { store, len: 0, layout });
            }
            self.seqs.push(s);
        }
        Ok(())
    }

    /// Free every store.
    pub fn close<D: Device>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        for s in self.seqs.drain(..) {
            for h in s.slots.values().chain(s.shared.iter().flat_map(|m| m.values())) {
                dev.kv_free(h.store)?;
            }
        }
        Ok(())
    }

    fn held(&self, b: usize, in_loop: bool, step: usize, layer: usize) -> Option<&Held> {
        let s = self.seqs.get(b)?;
        match &s.shared {
            Some(sh) if in_loop => sh.get(&layer),
            _ => s.slots.get(&(if in_loop { step } else { 0 }, layer)),
        }
    }

    /// The store sequence `b`'s attention of `layer` at `step` uses, with
    /// its filled positions.
    pub fn arg(&self, b: usize, in_loop: bool, step: usize, layer: usize) -> KvArg {
        let h = self.held(b, in_loop, step, layer).expect("a store per attention slot");
        KvArg {
            store: h.store,
            past: h.len,
        }
    }

    /// Every store in use, with its filled positions.
    pub fn all_args(&self) -> Vec<KvArg> {
        self.helds()
            .map(|h| KvArg {
                store: h.store,
                past: h.len,
            })
            .collect()
    }

    fn helds(&self) -> impl Iterator<Item = &Held> {
        self.seqs
            .iter()
            .flat_map(|s| s.slots.values().chain(s.shared.iter().flat_map(|m| m.values())))
    }

    /// Make every store hold at least `positions` positions (a call's last
    /// position + 1; a verification's stores of the drafted steps already
    /// hold them).
    pub fn reserve<D: Device>(&self, dev: &mut D, positions: usize) -> Result<(), DeviceError> {
        for h in self.helds() {
            dev.kv_reserve(h.store, positions.max(h.len))?;
        }
        Ok(())
    }

    /// After an attention launch of `seq` new rows: a slot of its own keeps
    /// them; a shared store keeps them only at the end of the call (`mean`
    /// sums them meanwhile).
    pub fn appended<D: Device>(
        &mut self,
        dev: &mut D,
        in_loop: bool,
        step: usize,
        layer: usize,
        seq: usize,
    ) -> Result<(), DeviceError> {
        let mode = self.mode;
        for s in &mut self.seqs {
            match &s.shared {
                Some(sh) if in_loop => {
                    if mode == KvMode::Mean {
                        let h = sh[&layer];
                        let (k, v) = dev.kv_read(h.store, h.len..h.len + seq)?;
                        let acc = s
                            .acc
                            .entry(layer)
                            .or_insert_with(|| (vec![0.0; k.len()], vec![0.0; v.len()]));
                        acc.0.iter_mut().zip(&k).for_each(|(a, x)| *a += x);
                        acc.1.iter_mut().zip(&v).for_each(|(a, x)| *a += x);
                    }
                }
                _ => {
                    let key = (if in_loop { step } else { 0 }, layer);
                    s.slots.get_mut(&key).expect("a store per attention slot").len += seq;
                }
            }
        }
        Ok(())
    }

    /// `last` / `mean` at the first decode call: the R stores of each loop
    /// layer become one (step R-1's, or their mean) and the others are freed.
    pub fn collapse<D: Device>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        let r = self.steps;
        for s in &mut self.seqs {
            let mut shared = BTreeMap::new();
            for &(layer, layout) in &self.inner {
                let stores: Vec<Held> = (0..r)
                    .map(|step| s.slots.remove(&(step, layer)).expect("a store per (step, layer)"))
                    .collect();
                let keep = match self.mode {
                    KvMode::Mean => {
                        let len = stores[0].len;
                        let (mut k, mut v) = (
                            vec![0.0f32; len * layout.row_elems()],
                            vec![0.0f32; len * layout.row_elems()],
                        );
                        for h in &stores {
                            let (hk, hv) = dev.kv_read(h.store, 0..len)?;
                            k.iter_mut().zip(&hk).for_each(|(a, x)| *a += x);
                            v.iter_mut().zip(&hv).for_each(|(a, x)| *a += x);
                        }
                        k.iter_mut().chain(v.iter_mut()).for_each(|x| *x /= r as f32);
                        let store = dev.kv_alloc(layout)?;
                        dev.kv_reserve(store, len + 1)?;
                        dev.kv_write(store, 0, &k, &v)?;
                        for h in &stores {
                            dev.kv_free(h.store)?;
                        }
                        Held { store, len, layout }
                    }
                    _ => {
                        for h in &stores[..r - 1] {
                            dev.kv_free(h.store)?;
                        }
                        stores[r - 1]
                    }
                };
                shared.insert(layer, keep);
            }
            s.shared = Some(shared);
        }
        Ok(())
    }

    /// Shared, after the call's last step: keep its new rows (the last
    /// step's as written, or the mean over the `steps_run` steps) and
    /// advance.
    pub fn finish_shared<D: Device>(&mut self, dev: &mut D, seq: usize, steps_run: usize) -> Result<(), DeviceError> {
        let mean = self.mode == KvMode::Mean;
        for s in &mut self.seqs {
            let mut acc = std::mem::take(&mut s.acc);
            let Some(sh) = s.shared.as_mut() else { continue };
            for (layer, h) in sh.iter_mut() {
                if mean {
                    let (mut k, mut v) = acc.remove(layer).expect("every loop layer ran at least once");
                    k.iter_mut().chain(v.iter_mut()).for_each(|x| *x /= steps_run as f32);
                    dev.kv_write(h.store, h.len, &k, &v)?;
                }
                h.len += seq;
            }
        }
        Ok(())
    }

    /// Full, after a decode call stopped at step `last`: copy step `last`'s
    /// new rows into the slots of every later step.
    pub fn fill_skipped<D: Device>(&mut self, dev: &mut D, last: usize, seq: usize) -> Result<(), DeviceError> {
        for s in &mut self.seqs {
            for &(layer, _) in &self.inner {
                let src = s.slots[&(last, layer)];
                for step in last + 1..self.steps {
                    let dst = s.slots.get_mut(&(step, layer)).expect("a store per (step, layer)");
                    dev.kv_copy(dst.store, src.store, dst.len..dst.len + seq)?;
                    dst.len += seq;
                }
            }
        }
        Ok(())
    }

    /// Keep at most `positions` positions in every store.
    pub fn truncate(&mut self, positions: usize) {
        for s in &mut self.seqs {
            for h in s
                .slots
                .values_mut()
                .chain(s.shared.iter_mut().flat_map(|m| m.values_mut()))
            {
                h.len = h.len.min(positions);
            }
        }
    }

    /// Full: copy step `last`'s rows at `position` into the slots of every
    /// later step (as [`KvCache::fill_skipped`] does for a call's new rows).
    pub fn fill_position<D: Device>(&mut self, dev: &mut D, position: usize, last: usize) -> Result<(), DeviceError> {
        for s in &mut self.seqs {
            for &(layer, _) in &self.inner {
                let src = s.slots[&(last, layer)].store;
                for step in last + 1..self.steps {
                    let dst = s.slots[&(step, layer)];
                    if dst.len <= position {
                        return Err(DeviceError::Program(format!(
                            "KV slot of step {step}, layer {layer} holds no position {position}"
                        )));
                    }
                    dev.kv_copy(dst.store, src, position..position + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Back to one empty store per (step, layer) (the stores are reused).
    pub fn reset<D: Device>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        let batch = self.seqs.len();
        if self.shared() {
            return self.open(dev, batch);
        }
        for s in &mut self.seqs {
            s.acc.clear();
            s.slots.values_mut().for_each(|h| h.len = 0);
        }
        Ok(())
    }

    /// Bytes of K and V rows stored, over every store.
    pub fn bytes(&self) -> usize {
        self.helds().map(|h| 2 * h.len * h.layout.row_bytes()).sum()
    }

    /// Bytes the stores have allocated.
    pub fn reserved<D: Device>(&self, dev: &D) -> usize {
        self.helds().map(|h| dev.kv_reserved(h.store)).sum()
    }

    /// The store sequence `b`'s step `step` reads for past positions of
    /// `layer`, with its filled positions: its own slot, or the layer's
    /// shared store once decode shares one.
    pub fn lookup(&self, b: usize, step: usize, layer: usize) -> Option<(KvStore, usize, KvLayout)> {
        if step >= self.steps {
            return None;
        }
        let in_loop = self.inner.iter().any(|l| l.0 == layer);
        if !in_loop && step > 0 {
            return None;
        }
        self.held(b, in_loop, step, layer).map(|h| (h.store, h.len, h.layout))
    }
}
