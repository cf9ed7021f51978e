//! Node choice: which node takes a new instance, and how much room each node has left.
//!
//! A full plan places up to one instance per processor, so node choice must not scan every
//! node per processor. Usable nodes are kept in ordered sets keyed by free memory and by free
//! CPU, one pair per (site, stable) group, and re-keyed as the plan places instances.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use crate::model::{Node, NodeId, Resources, Site, SitePreference, Timestamp};

/// Every site, in the order their groups are stored.
const SITES: [Site; 2] = [Site::Edge, Site::Cloud];

fn site_index(site: Site) -> usize {
    match site {
        Site::Edge => 0,
        Site::Cloud => 1,
    }
}

/// Why a node cannot take an instance (for the waiting note).
pub(super) fn unusable_reason(node: &Node, cordoned: bool) -> Option<&'static str> {
    if !node.ready {
        Some("not ready")
    } else if node.interruption.is_some() {
        Some("being interrupted")
    } else if cordoned {
        Some("cordoned through Dory")
    } else if !node.schedulable {
        Some("unschedulable")
    } else {
        None
    }
}

/// Hashes each written slice in one xxh3 call: node ids are short, and the streaming
/// hasher's per-call set-up showed up in profiles of a 100k-instance plan.
#[derive(Default)]
struct OneShot(u64);

impl Hasher for OneShot {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// (free of the resource the set is ordered by, free of the other one, node index): most
/// free first, ties by node order.
type Key = (Reverse<u64>, Reverse<u64>, u32);

#[derive(Default)]
struct Group {
    by_mem: BTreeSet<Key>,
    by_cpu: BTreeSet<Key>,
}

impl Group {
    fn insert(&mut self, idx: u32, free: Resources) {
        self.by_mem
            .insert((Reverse(free.memory_mib), Reverse(free.cpu_millis), idx));
        self.by_cpu
            .insert((Reverse(free.cpu_millis), Reverse(free.memory_mib), idx));
    }

    fn remove(&mut self, idx: u32, free: Resources) {
        self.by_mem
            .remove(&(Reverse(free.memory_mib), Reverse(free.cpu_millis), idx));
        self.by_cpu
            .remove(&(Reverse(free.cpu_millis), Reverse(free.memory_mib), idx));
    }

    /// A node with room for `need`, preferring the most free memory.
    ///
    /// Walks the memory order and the CPU order in lockstep. Either walk proves that nothing
    /// fits as soon as it reaches a node short of its own resource (every later node in that
    /// order has less), so the cost is the shorter of the two walks: one step when one
    /// resource is scarce everywhere (a CPU-bound cluster has plenty of memory left on full
    /// nodes), and one step when nothing fits for lack of either.
    fn find(&self, need: Resources) -> Option<u32> {
        let mut by_mem = self.by_mem.iter();
        let mut by_cpu = self.by_cpu.iter();
        loop {
            let &(Reverse(mem), Reverse(cpu), idx) = by_mem.next()?;
            if mem < need.memory_mib {
                return None;
            }
            if cpu >= need.cpu_millis {
                return Some(idx);
            }
            let &(Reverse(cpu), Reverse(mem), idx) = by_cpu.next()?;
            if cpu < need.cpu_millis {
                return None;
            }
            if mem >= need.memory_mib {
                return Some(idx);
            }
        }
    }
}

struct Slot {
    free: Resources,
    usable: bool,
    stable: bool,
}

/// The nodes as the planner sees them: looked up by id, with their remaining room.
pub(super) struct Nodes<'a> {
    /// Observed nodes sorted by id, duplicates dropped.
    nodes: Vec<&'a Node>,
    /// Index into `nodes` by id. Every instance's node is looked up, and a binary search over
    /// string ids was the largest single cost in profiles of a 100k-instance plan. Only ever
    /// looked up, never iterated, and the hasher has a fixed seed, so nothing about it can
    /// reach the plan.
    by_id: HashMap<&'a str, u32, BuildHasherDefault<OneShot>>,
    slots: Vec<Slot>,
    /// One group per (site, stable): `site_index * 2 + stable as usize`.
    groups: [Group; 4],
    /// Per site: the earliest time a usable, not yet stable node becomes stable.
    next_stable: [Option<Timestamp>; 2],
    indexed: bool,
}

impl<'a> Nodes<'a> {
    /// Classifies `nodes`; call [`Nodes::charge`] for every existing instance, then
    /// [`Nodes::index`] before choosing nodes.
    pub(super) fn new(
        nodes: &'a [Node],
        cordoned: &BTreeSet<NodeId>,
        now: Timestamp,
        stabilisation: Duration,
    ) -> Self {
        let mut sorted: Vec<&Node> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|a, b| a.id == b.id);
        let mut next_stable = [None; 2];
        let slots = sorted
            .iter()
            .map(|n| {
                let usable = unusable_reason(n, cordoned.contains(&n.id)).is_none();
                let stable = now.since(n.ready_since) >= stabilisation;
                if usable && !stable {
                    let at = n.ready_since.plus(stabilisation);
                    let slot: &mut Option<Timestamp> = &mut next_stable[site_index(n.site)];
                    *slot = Some(slot.map_or(at, |t| t.min(at)));
                }
                Slot {
                    free: n.capacity,
                    usable,
                    stable,
                }
            })
            .collect();
        let mut by_id = HashMap::with_capacity_and_hasher(sorted.len(), Default::default());
        for (idx, n) in sorted.iter().enumerate() {
            by_id.insert(n.id.as_str(), idx as u32);
        }
        Nodes {
            nodes: sorted,
            by_id,
            slots,
            groups: Default::default(),
            next_stable,
            indexed: false,
        }
    }

    /// The index of node `id`, if it exists.
    pub(super) fn find(&self, id: &NodeId) -> Option<usize> {
        self.by_id.get(id.as_str()).map(|idx| *idx as usize)
    }

    /// The node at `idx`.
    pub(super) fn node(&self, idx: usize) -> &'a Node {
        self.nodes[idx]
    }

    /// Counts an existing instance's resources against its node. Only before
    /// [`Nodes::index`]: charging is a plain subtraction until then.
    pub(super) fn charge(&mut self, idx: usize, need: Resources) {
        debug_assert!(!self.indexed);
        let slot = &mut self.slots[idx];
        slot.free = slot.free.minus(&need);
    }

    /// Builds the ordered sets once every existing instance has been charged.
    pub(super) fn index(&mut self) {
        for (idx, slot) in self.slots.iter().enumerate() {
            if slot.usable {
                let site = site_index(self.nodes[idx].site);
                self.groups[site * 2 + slot.stable as usize].insert(idx as u32, slot.free);
            }
        }
        self.indexed = true;
    }

    /// Whether node `idx` may take `need` now.
    pub(super) fn fits(&self, idx: usize, need: Resources) -> bool {
        let slot = &self.slots[idx];
        slot.usable && slot.free.fits(&need)
    }

    /// Reserves `need` on node `idx` for an instance this plan places there.
    pub(super) fn take(&mut self, idx: usize, need: Resources) {
        debug_assert!(self.indexed && self.fits(idx, need));
        let slot = &mut self.slots[idx];
        let group = &mut self.groups[site_index(self.nodes[idx].site) * 2 + slot.stable as usize];
        group.remove(idx as u32, slot.free);
        slot.free = slot.free.minus(&need);
        group.insert(idx as u32, slot.free);
    }

    /// The best node on `site` for `need`: most free memory among those with room, from the
    /// stable nodes only when `stable_only`.
    fn best_on(&self, site: Site, stable_only: bool, need: Resources) -> Option<usize> {
        let base = site_index(site) * 2;
        let stable = self.groups[base + 1].find(need);
        let unstable = if stable_only {
            None
        } else {
            self.groups[base].find(need)
        };
        self.better(stable.map(|i| i as usize), unstable.map(|i| i as usize))
    }

    fn better(&self, a: Option<usize>, b: Option<usize>) -> Option<usize> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let key = |i: usize| {
                    let f = self.slots[i].free;
                    (f.memory_mib, f.cpu_millis, Reverse(i))
                };
                Some(if key(a) >= key(b) { a } else { b })
            }
            (a, b) => a.or(b),
        }
    }

    fn best_where(
        &self,
        want: impl Fn(Site) -> bool,
        stable_only: bool,
        need: Resources,
    ) -> Option<usize> {
        SITES
            .into_iter()
            .filter(|s| want(*s))
            .fold(None, |best, s| {
                self.better(best, self.best_on(s, stable_only, need))
            })
    }

    /// A node for `need` on a preferred site, else (with `fallback`) on any other site.
    pub(super) fn choose(
        &self,
        pref: SitePreference,
        fallback: bool,
        need: Resources,
    ) -> Option<usize> {
        self.best_where(|s| pref.prefers(s), false, need)
            .or_else(|| {
                if fallback {
                    self.best_where(|s| !pref.prefers(s), false, need)
                } else {
                    None
                }
            })
    }

    /// A node for `need` on a preferred site that has been ready for the stabilisation
    /// period.
    pub(super) fn choose_stable(&self, pref: SitePreference, need: Resources) -> Option<usize> {
        self.best_where(|s| pref.prefers(s), true, need)
    }

    /// Whether a preferred site has a usable node that has been ready for the stabilisation
    /// period.
    pub(super) fn has_stable(&self, pref: SitePreference) -> bool {
        SITES
            .into_iter()
            .any(|s| pref.prefers(s) && !self.groups[site_index(s) * 2 + 1].by_mem.is_empty())
    }

    /// When the first usable node on a preferred site becomes stable.
    pub(super) fn next_stable(&self, pref: SitePreference) -> Option<Timestamp> {
        SITES
            .into_iter()
            .filter(|s| pref.prefers(*s))
            .filter_map(|s| self.next_stable[site_index(s)])
            .min()
    }
}
