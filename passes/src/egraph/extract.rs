//! DAG-aware extraction: choose one e-node per e-class so that the graph
//! reachable from the roots is cheapest, counting every chosen node once
//! however many users it has.
//!
//! A tree extractor (egg's `Extractor`) prices a class as if each user had
//! its own copy of it, so it can never see why a merged q/k/v linear (one
//! node shared by three slices) or an add_rms_norm (one tuple read by two
//! projections) is cheaper. An ILP would be exact but needs a solver; this
//! is a local search instead:
//!
//! 1. start from the input graph itself (each class's original node; new
//!    classes take their cheapest tree choice), so the result is never
//!    worse than the input;
//! 2. a *move* forces one class of the current graph to another of its
//!    nodes, then re-optimises greedily around the change: each class whose
//!    situation changed (a class that appeared, one that can now reuse what
//!    appeared, one whose operand lost a user) switches to the node that
//!    lowers the total most, until none does;
//! 3. a move is kept when the total dropped, and undone otherwise; moves
//!    repeat until a sweep over all classes keeps none.
//!
//! The total is kept exactly and incrementally with use counts, so a move
//! costs only what it touches. Costs are integers (bytes-equivalents, see
//! [`super::cost`]) and classes are visited in index order, so the result is
//! deterministic. Nodes on a cycle of the e-graph (none of the current rules
//! makes one) are left out, so every choice is acyclic.

use egg::Id;
use std::collections::{BTreeSet, HashMap};

const NONE: usize = usize::MAX;

/// One candidate node of a class.
pub struct Cand {
    /// Classes (as indices) of the node's children, deduplicated.
    pub children: Vec<usize>,
    pub cost: u64,
}

/// The extraction problem: classes (by index), their candidates, roots.
pub struct Problem {
    pub ids: Vec<Id>,
    pub index: HashMap<Id, usize>,
    /// Per class, its nodes in e-class order: None where not extractable.
    pub cands: Vec<Vec<Option<Cand>>>,
    pub roots: Vec<usize>,
}

impl Problem {
    fn n(&self) -> usize {
        self.ids.len()
    }

    fn cand(&self, c: usize, k: usize) -> Option<&Cand> {
        self.cands[c].get(k)?.as_ref()
    }

    /// Classes reachable from the roots in post-order (operands first, the
    /// roots' operands in order), or None if the choice has a cycle or
    /// leaves a reachable class without a node.
    pub fn post_order(&self, choice: &[usize]) -> Option<Vec<usize>> {
        let mut state = vec![0u8; self.n()]; // 0 new, 1 on the stack, 2 done
        let mut order = Vec::new();
        for &r in &self.roots {
            if state[r] == 2 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(r, 0)];
            state[r] = 1;
            while let Some(top) = stack.last_mut() {
                let c = top.0;
                let cand = self.cand(c, choice[c])?;
                if let Some(&child) = cand.children.get(top.1) {
                    top.1 += 1;
                    match state[child] {
                        0 => {
                            state[child] = 1;
                            stack.push((child, 0));
                        }
                        1 => return None,
                        _ => {}
                    }
                } else {
                    state[c] = 2;
                    order.push(c);
                    stack.pop();
                }
            }
        }
        Some(order)
    }

    /// Total cost of the graph a choice extracts (None: cyclic or incomplete).
    pub fn total(&self, choice: &[usize]) -> Option<u64> {
        let order = self.post_order(choice)?;
        Some(
            order
                .iter()
                .map(|&c| self.cands[c][choice[c]].as_ref().map_or(0, |n| n.cost))
                .sum(),
        )
    }

    /// Per class, the candidates that may be chosen: extractable, not on a
    /// cycle (an edge inside a strongly connected component of the class
    /// graph), and with every operand class extractable itself.
    fn usable(&self) -> Vec<Vec<usize>> {
        let scc = self.components();
        let mut usable: Vec<Vec<usize>> = (0..self.n())
            .map(|c| {
                (0..self.cands[c].len())
                    .filter(|&k| {
                        self.cand(c, k)
                            .is_some_and(|n| n.children.iter().all(|&ch| scc[ch] != scc[c]))
                    })
                    .collect()
            })
            .collect();
        // Drop candidates with an operand class that has none, to a fixpoint.
        loop {
            let empty: Vec<bool> = usable.iter().map(Vec::is_empty).collect();
            let mut changed = false;
            for (c, ks) in usable.iter_mut().enumerate() {
                let before = ks.len();
                ks.retain(|&k| {
                    self.cands[c][k]
                        .as_ref()
                        .is_some_and(|n| n.children.iter().all(|&ch| !empty[ch]))
                });
                changed |= ks.len() != before;
            }
            if !changed {
                return usable;
            }
        }
    }

    /// Strongly connected components of the class graph (every extractable
    /// node's edges), by Tarjan's algorithm without recursion.
    fn components(&self) -> Vec<usize> {
        let n = self.n();
        let edges: Vec<Vec<usize>> = (0..n)
            .map(|c| {
                self.cands[c]
                    .iter()
                    .flatten()
                    .flat_map(|x| x.children.iter().copied())
                    .collect()
            })
            .collect();
        let (mut index, mut low, mut comp) = (vec![NONE; n], vec![0; n], vec![NONE; n]);
        let (mut on_stack, mut stack, mut next, mut ncomp) = (vec![false; n], Vec::new(), 0, 0);
        for root in 0..n {
            if index[root] != NONE {
                continue;
            }
            let mut call: Vec<(usize, usize)> = vec![(root, 0)];
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root);
            on_stack[root] = true;
            while let Some(&mut (v, ref mut i)) = call.last_mut() {
                if let Some(&w) = edges[v].get(*i) {
                    *i += 1;
                    if index[w] == NONE {
                        index[w] = next;
                        low[w] = next;
                        next += 1;
                        stack.push(w);
                        on_stack[w] = true;
                        call.push((w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                } else {
                    call.pop();
                    if let Some(&(u, _)) = call.last() {
                        low[u] = low[u].min(low[v]);
                    }
                    if low[v] == index[v] {
                        while let Some(w) = stack.pop() {
                            on_stack[w] = false;
                            comp[w] = ncomp;
                            if w == v {
                                break;
                            }
                        }
                        ncomp += 1;
                    }
                }
            }
        }
        comp
    }

    /// Cheapest tree cost per class over usable candidates (shared operands
    /// counted per use; f64 as such costs grow exponentially with depth),
    /// and the node achieving it.
    fn tree_best(&self, usable: &[Vec<usize>]) -> Vec<usize> {
        let mut best = vec![f64::INFINITY; self.n()];
        let mut pick = vec![NONE; self.n()];
        loop {
            let mut changed = false;
            for c in 0..self.n() {
                for &k in &usable[c] {
                    let cand = self.cands[c][k].as_ref().expect("usable candidates exist");
                    let cost = cand.cost as f64 + cand.children.iter().map(|&ch| best[ch]).sum::<f64>();
                    if cost < best[c] {
                        best[c] = cost;
                        pick[c] = k;
                        changed = true;
                    }
                }
            }
            if !changed {
                return pick;
            }
        }
    }

    /// Solve: `initial[c]` is the class's node in the input graph, if any.
    /// Returns the choice (a node index per class; only the classes
    /// reachable from the roots matter) and its total cost.
    pub fn solve(&self, initial: &[usize]) -> Option<(Vec<usize>, u64)> {
        let usable = self.usable();
        let tree = self.tree_best(&usable);
        let choice: Vec<usize> = (0..self.n())
            .map(|c| {
                if usable[c].contains(&initial[c]) {
                    initial[c]
                } else {
                    tree[c]
                }
            })
            .collect();
        let choice = if self.post_order(&choice).is_some() {
            choice
        } else {
            tree
        };
        self.post_order(&choice)?;
        let mut s = Search::new(self, usable, choice);
        s.run();
        Some((s.choice, s.total))
    }
}

/// The local search's state: a choice, the use count of every class (how
/// many chosen nodes of classes in the graph, or roots, read it) and the
/// total cost of the classes in the graph (use count > 0).
struct Search<'p> {
    p: &'p Problem,
    usable: Vec<Vec<usize>>,
    /// For each class, the (class, candidate) pairs that read it.
    readers: Vec<Vec<(usize, usize)>>,
    choice: Vec<usize>,
    uses: Vec<u32>,
    total: u64,
    /// Classes that entered the graph, and classes that lost a reader but
    /// stayed, since last looked at.
    appeared: Vec<usize>,
    lost: Vec<usize>,
}

impl<'p> Search<'p> {
    fn new(p: &'p Problem, usable: Vec<Vec<usize>>, choice: Vec<usize>) -> Search<'p> {
        let mut readers = vec![vec![]; p.n()];
        for (c, ks) in usable.iter().enumerate() {
            for &k in ks {
                for &ch in &p.cands[c][k].as_ref().expect("usable").children {
                    readers[ch].push((c, k));
                }
            }
        }
        let mut s = Search {
            p,
            usable,
            readers,
            choice,
            uses: vec![0; p.n()],
            total: 0,
            appeared: vec![],
            lost: vec![],
        };
        for r in p.roots.clone() {
            s.inc(r);
        }
        s.appeared.clear();
        s
    }

    fn node(&self, c: usize) -> &'p Cand {
        let p = self.p;
        p.cands[c][self.choice[c]].as_ref().expect("chosen candidates exist")
    }

    fn inc(&mut self, c: usize) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            self.uses[c] += 1;
            if self.uses[c] == 1 {
                self.appeared.push(c);
                let n = self.node(c);
                self.total += n.cost;
                stack.extend(&n.children);
            }
        }
    }

    fn dec(&mut self, c: usize) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            self.uses[c] -= 1;
            if self.uses[c] == 0 {
                let n = self.node(c);
                self.total -= n.cost;
                stack.extend(&n.children);
            } else {
                self.lost.push(c);
            }
        }
    }

    /// Choose node `k` for class `d`, keeping uses and the total exact.
    fn switch(&mut self, d: usize, k: usize) {
        let old = self.choice[d];
        if old == k {
            return;
        }
        if self.uses[d] == 0 {
            self.choice[d] = k;
            return;
        }
        let old_node = self.node(d);
        self.choice[d] = k;
        let new_node = self.node(d);
        self.total = self.total + new_node.cost - old_node.cost;
        for &ch in &new_node.children {
            self.inc(ch);
        }
        for &ch in &old_node.children {
            self.dec(ch);
        }
    }

    /// The total after switching `d` to `k`, leaving everything as it was.
    fn price(&mut self, d: usize, k: usize) -> u64 {
        let (a, l) = (self.appeared.len(), self.lost.len());
        let old = self.choice[d];
        self.switch(d, k);
        let t = self.total;
        self.switch(d, old);
        self.appeared.truncate(a);
        self.lost.truncate(l);
        t
    }

    /// Queue the classes whose best node may have changed.
    fn affected(&mut self, queue: &mut BTreeSet<usize>, forced: usize) {
        // A free leaf (an attribute, an outside value) is the same to every
        // reader whether or not it is in the graph: skipping it keeps a move
        // from touching every reader of a shared attribute.
        let free_leaf = |s: &Self, x: usize| {
            let n = s.node(x);
            n.cost == 0 && n.children.is_empty()
        };
        for x in std::mem::take(&mut self.appeared) {
            if free_leaf(self, x) {
                continue;
            }
            queue.insert(x);
            // Readers of a class now computed anyway may reuse it.
            queue.extend(self.readers[x].iter().map(|r| r.0));
        }
        for x in std::mem::take(&mut self.lost) {
            if free_leaf(self, x) {
                continue;
            }
            // The remaining readers of a class that lost one may free it.
            let readers = self.readers[x].iter().filter(|&&(d, k)| self.choice[d] == k);
            queue.extend(readers.map(|r| r.0));
        }
        queue.remove(&forced);
    }

    /// Force `c` to node `k`, re-optimise around it, keep it if cheaper.
    fn try_move(&mut self, c: usize, k: usize) -> bool {
        let start = self.total;
        let mut log = vec![(c, self.choice[c])];
        self.appeared.clear();
        self.lost.clear();
        self.switch(c, k);
        let mut queue = BTreeSet::new();
        self.affected(&mut queue, c);
        while let Some(d) = queue.pop_first() {
            if self.uses[d] == 0 || self.usable[d].len() < 2 {
                continue;
            }
            let (cur, base) = (self.choice[d], self.total);
            let mut best = (base, cur);
            for i in 0..self.usable[d].len() {
                let k2 = self.usable[d][i];
                if k2 != cur {
                    let t = self.price(d, k2);
                    if t < best.0 {
                        best = (t, k2);
                    }
                }
            }
            if best.1 != cur {
                log.push((d, cur));
                self.switch(d, best.1);
                self.affected(&mut queue, c);
            }
        }
        if self.total < start {
            return true;
        }
        for (d, old) in log.into_iter().rev() {
            self.switch(d, old);
        }
        self.appeared.clear();
        self.lost.clear();
        debug_assert_eq!(self.total, start);
        false
    }

    fn run(&mut self) {
        for _sweep in 0..64 {
            let mut improved = false;
            for c in 0..self.p.n() {
                for i in 0..self.usable[c].len() {
                    let k = self.usable[c][i];
                    if self.uses[c] > 0 && self.usable[c].len() > 1 && k != self.choice[c] && self.try_move(c, k) {
                        improved = true;
                    }
                }
            }
            if !improved {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(cands: Vec<Vec<(u64, Vec<usize>)>>, roots: Vec<usize>) -> Problem {
        let ids: Vec<Id> = (0..cands.len()).map(Id::from).collect();
        Problem {
            index: ids.iter().enumerate().map(|(i, &id)| (id, i)).collect(),
            ids,
            cands: cands
                .into_iter()
                .map(|ns| {
                    ns.into_iter()
                        .map(|(cost, children)| Some(Cand { children, cost }))
                        .collect()
                })
                .collect(),
            roots,
        }
    }

    #[test]
    fn shared_merged_node_beats_separate_ones() {
        // Classes: 0 = x (free), 1 = merged M(x) costing 15, and three
        // results that are either their own node (10 each) or a view of M (1).
        let p = problem(
            vec![
                vec![(0, vec![])],
                vec![(15, vec![0])],
                vec![(10, vec![0]), (1, vec![1])],
                vec![(10, vec![0]), (1, vec![1])],
                vec![(10, vec![0]), (1, vec![1])],
            ],
            vec![2, 3, 4],
        );
        let initial = [0, 0, 0, 0, 0];
        assert_eq!(p.total(&initial), Some(30));
        let (choice, cost) = p.solve(&initial).unwrap();
        assert_eq!(cost, 18);
        assert_eq!(&choice[2..], &[1, 1, 1]);
    }

    #[test]
    fn a_fused_tuple_replaces_both_of_its_parts() {
        // 0, 1 = h, a (free); 2 = add(h, a) or get 0 of the tuple 4;
        // 3 = norm(add) or get 1 of the tuple 4; 4 = the fused op (12).
        // Both projections must switch together to free the add and norm.
        let p = problem(
            vec![
                vec![(0, vec![])],
                vec![(0, vec![])],
                vec![(10, vec![0, 1]), (0, vec![4])],
                vec![(10, vec![2]), (0, vec![4])],
                vec![(12, vec![0, 1])],
            ],
            vec![2, 3],
        );
        let (choice, cost) = p.solve(&[0, 0, 0, 0, 0]).unwrap();
        assert_eq!(cost, 12);
        assert_eq!((choice[2], choice[3]), (1, 1));
    }

    #[test]
    fn nodes_on_a_cycle_are_never_chosen() {
        // Class 1 holds a cheap node reading itself (x = x * 1 style).
        let p = problem(vec![vec![(0, vec![])], vec![(5, vec![0]), (0, vec![1])]], vec![1]);
        let (choice, cost) = p.solve(&[0, 0]).unwrap();
        assert_eq!((choice[1], cost), (0, 5));
        assert!(p.post_order(&[0, 1]).is_none());
    }
}
