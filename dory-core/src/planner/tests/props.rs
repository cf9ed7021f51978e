//! Property tests: random worlds, invariants every plan must keep.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const NODE_IDS: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];
/// Instances and pins may name a node that is not observed.
const ANY_NODE: [&str; 6] = ["n0", "n1", "n2", "n3", "n4", "gone"];
const PROCESSOR_IDS: [&str; 6] = ["p0", "p1", "p2", "p3", "p4", "p5"];

fn arb_node(id: &'static str) -> impl Strategy<Value = Node> {
    (
        any::<bool>(),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.8),
        prop::sample::select(vec![0, NOW - 100_000, NOW - 30_000, NOW - 1_000]),
        prop::sample::select(vec![0u64, 1000, 2000, 4000]),
        prop::sample::select(vec![0u64, 1024, 4096]),
        prop::option::weighted(
            0.2,
            prop::option::of(prop::sample::select(vec![
                NOW - 1_000,
                NOW + 5_000,
                NOW + 60_000,
            ])),
        ),
    )
        .prop_map(
            move |(edge, schedulable, ready, since, cpu, mem, interruption)| Node {
                id: nid(id),
                site: if edge { Site::Edge } else { Site::Cloud },
                schedulable,
                ready,
                ready_since: at(since),
                capacity: Resources::new(cpu, mem),
                interruption: interruption.map(|deadline| Interruption {
                    reason: InterruptionReason::SpotReclaim,
                    deadline: deadline.map(Timestamp),
                }),
            },
        )
}

fn arb_phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(vec![
        Phase::Starting,
        Phase::Standby,
        Phase::Running,
        Phase::Running,
        Phase::Running,
        Phase::Frozen,
        Phase::Terminating,
        Phase::Exited { code: 0 },
        Phase::Exited { code: 1 },
        Phase::Failed {
            reason: "crashed".into(),
        },
    ])
}

/// Everything about one processor id.
#[derive(Clone, Debug)]
struct Proc {
    desired: bool,
    invalid: bool,
    busy: bool,
    spec: ProcessorSpec,
    instances: Vec<Instance>,
    ownership: Option<Ownership>,
    history: Option<RestartHistory>,
}

fn arb_proc(id: &'static str) -> impl Strategy<Value = Proc> {
    let spec = (
        prop::sample::select(vec![
            SitePreference::Any,
            SitePreference::Edge,
            SitePreference::Cloud,
        ]),
        any::<bool>(),
        prop::sample::select(vec![0u64, 500, 1000, 3000]),
        prop::sample::select(vec![0u64, 512, 2048]),
        prop::option::weighted(0.2, 0..ANY_NODE.len()),
        prop::sample::select(vec![
            RestartMode::Never,
            RestartMode::OnFailure,
            RestartMode::Always,
        ]),
        any::<bool>(),
    )
        .prop_map(move |(site, fallback, cpu, mem, pin, mode, v2)| {
            let mut s = ProcessorSpec::new(pid(id));
            s.site = site;
            s.fallback = fallback;
            s.resources = Resources::new(cpu, mem);
            s.pin = pin.map(|i| nid(ANY_NODE[i]));
            s.restart.mode = mode;
            if v2 {
                s.workload.version = Some("2".into());
            }
            s
        });
    let instances = prop::collection::vec(
        (
            1u64..5,
            0..ANY_NODE.len(),
            arb_phase(),
            any::<bool>(),
            0u64..200_000,
        ),
        0..3,
    );
    let ownership = prop::option::weighted(
        0.8,
        (
            prop::option::weighted(0.85, 1u64..5),
            prop::option::of(prop::sample::select(vec![NOW - 10_000, NOW + 5_000])),
        ),
    );
    let history = prop::option::weighted(
        0.4,
        (
            0u32..6,
            prop::collection::vec(0u64..400_000, 0..7),
            prop::option::weighted(0.2, any::<bool>()),
        ),
    );
    (
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
        spec,
        instances,
        ownership,
        history,
    )
        .prop_map(
            move |(desired, invalid, busy, spec, instances, ownership, history)| {
                let revision = spec.revision();
                let mut instances: Vec<Instance> = instances
                    .into_iter()
                    .map(|(epoch, node, phase, same_revision, age)| Instance {
                        processor: pid(id),
                        epoch: Epoch(epoch),
                        node: nid(ANY_NODE[node]),
                        phase,
                        revision: if same_revision {
                            revision
                        } else {
                            revision ^ 1
                        },
                        started_at: at(NOW - age),
                        endpoint: None,
                    })
                    .collect();
                instances.sort_by_key(|i| i.epoch);
                instances.dedup_by_key(|i| i.epoch);
                let history = history.map(|(restarts, ages, failed)| {
                    let mut recent: Vec<Timestamp> =
                        ages.into_iter().map(|a| at(NOW - a)).collect();
                    recent.sort();
                    RestartHistory {
                        restarts,
                        recent_failures: recent,
                        failed: failed.map(|_| "crash loop".to_string()),
                        failed_revision: failed
                            .map(|same| if same { revision } else { revision ^ 1 }),
                    }
                });
                Proc {
                    desired,
                    invalid,
                    busy,
                    spec,
                    instances,
                    ownership: ownership.map(|(owner, lease)| own(id, owner, lease)),
                    history,
                }
            },
        )
}

fn arb_world() -> impl Strategy<Value = World> {
    let nodes: Vec<_> = NODE_IDS
        .iter()
        .map(|id| prop::option::weighted(0.8, arb_node(id)))
        .collect();
    let procs: Vec<_> = PROCESSOR_IDS.iter().map(|id| arb_proc(id)).collect();
    (
        nodes,
        procs,
        prop::collection::vec(prop::bool::weighted(0.1), NODE_IDS.len()),
        0usize..3,
        0usize..6,
    )
        .prop_map(|(nodes, procs, cordoned, in_flight, bound)| {
            let mut w = World::new();
            w.observed.nodes = nodes.into_iter().flatten().collect();
            w.config.max_concurrent_moves = bound;
            w.observed.moves_in_flight = in_flight;
            for (id, c) in NODE_IDS.iter().zip(cordoned) {
                if c {
                    w.desired.cordoned.insert(nid(id));
                }
            }
            for p in procs {
                let id = p.spec.id.clone();
                if p.desired {
                    w.desired.processors.push(p.spec);
                }
                if p.invalid {
                    w.desired.invalid.push(InvalidEntry {
                        id: id.to_string(),
                        error: "bad".into(),
                    });
                }
                if p.busy {
                    w.observed.busy.insert(id.clone());
                }
                w.observed.instances.extend(p.instances);
                w.observed.ownership.extend(p.ownership);
                if let Some(h) = p.history {
                    w.observed.history.insert(id, h);
                }
            }
            w
        })
}

/// Where each action places an instance, if it does.
fn target(action: &Action) -> Option<&NodeId> {
    match action {
        Action::Start { node, .. } => Some(node),
        Action::Move { to, .. } | Action::Evacuate { to, .. } => Some(to),
        _ => None,
    }
}

fn check_invariants(w: &World, plan: &Plan) {
    let specs: BTreeMap<&ProcessorId, &ProcessorSpec> =
        w.desired.processors.iter().map(|s| (&s.id, s)).collect();
    let nodes: BTreeMap<&NodeId, &Node> = w.observed.nodes.iter().map(|n| (&n.id, n)).collect();
    let owners: BTreeMap<&ProcessorId, Option<Epoch>> = w
        .observed
        .ownership
        .iter()
        .map(|o| (&o.processor, o.owner))
        .collect();
    let invalid: BTreeSet<&str> = w.desired.invalid.iter().map(|e| e.id.as_str()).collect();

    let mut seen = BTreeSet::new();
    for action in &plan.actions {
        let p = action.processor();
        assert!(seen.insert(p), "two actions for {p}");
        assert!(!w.observed.busy.contains(p), "action for busy {p}");
        assert!(!invalid.contains(p.as_str()), "action for invalid {p}");
        if let Some(note) = plan.waiting.get(p) {
            assert!(
                matches!(action, Action::Forget { .. }),
                "{p} waits ({note}) yet gets {action:?}"
            );
        }
        if action.is_move() {
            assert!(specs.contains_key(p), "undesired {p} placed: {action:?}");
        }
        let owner = owners.get(p).copied().flatten();
        let owner_instance = w
            .observed
            .instances
            .iter()
            .find(|i| &i.processor == p && Some(i.epoch) == owner);
        match action {
            Action::Start { expected_owner, .. } => {
                assert_eq!(
                    *expected_owner, owner,
                    "{p}: start expects the store's owner"
                );
                if let Some(i) = owner_instance
                    && !i.phase.is_gone()
                {
                    let node_ready = nodes.get(&i.node).is_some_and(|n| n.ready);
                    assert!(
                        !node_ready,
                        "{p}: start while owner {i:?} lives on a ready node"
                    );
                }
                // Never two writers: an owner that did not say it exited may still be running
                // somewhere until its lease (plus the margin) is over and, when its node is
                // merely not ready, until the node counts as lost.
                let exited =
                    owner_instance.is_some_and(|i| matches!(i.phase, Phase::Exited { .. }));
                if owner.is_some() && !exited {
                    let row = w
                        .observed
                        .ownership
                        .iter()
                        .find(|o| &o.processor == p)
                        .unwrap();
                    if let Some(lease) = row.lease_expires {
                        assert!(
                            lease.plus(w.config.lease_margin) <= w.now,
                            "{p}: started before the lease of {owner:?} ran out"
                        );
                    }
                    if let Some(node) = owner_instance.and_then(|i| nodes.get(&i.node))
                        && !node.ready
                    {
                        assert!(
                            w.now.since(node.ready_since) > w.config.node_lost_grace,
                            "{p}: failed over within the grace period"
                        );
                    }
                }
                // A stray on a node that is not ready cannot be reached and cannot commit
                // (the store fences it); one that can be reached is settled first.
                let others_alive = w.observed.instances.iter().any(|i| {
                    &i.processor == p
                        && Some(i.epoch) != owner
                        && i.phase.is_alive()
                        && nodes.get(&i.node).is_some_and(|n| n.ready)
                });
                assert!(!others_alive, "{p}: start beside a reachable stray");
            }
            Action::Move { from, .. } | Action::Evacuate { from, .. } => {
                assert_eq!(Some(*from), owner, "{p}: moves the owner");
                assert_eq!(owner_instance.map(|i| &i.phase), Some(&Phase::Running));
            }
            _ => {}
        }
    }

    // Placements: usable nodes only, with room.
    let mut placed: BTreeMap<&NodeId, Resources> = BTreeMap::new();
    for action in &plan.actions {
        let Some(to) = target(action) else { continue };
        let node = nodes
            .get(to)
            .unwrap_or_else(|| panic!("{action:?}: unknown node"));
        assert!(node.ready && node.schedulable, "{action:?} on {node:?}");
        assert!(node.interruption.is_none(), "{action:?} on {node:?}");
        assert!(!w.desired.cordoned.contains(to), "{action:?} on cordoned");
        let need = specs[action.processor()].resources;
        let sum = placed.entry(to).or_default();
        *sum = sum.plus(&need);
    }
    for (id, sum) in placed {
        let used = w
            .observed
            .instances
            .iter()
            .filter(|i| &i.node == id && i.phase.is_alive())
            .filter_map(|i| specs.get(&i.processor))
            .fold(Resources::default(), |acc, s| acc.plus(&s.resources));
        let free = nodes[id].capacity.minus(&used);
        assert!(free.fits(&sum), "{id}: placed {sum:?} with {free:?} free");
    }

    let moves = plan.actions.iter().filter(|a| a.is_move()).count();
    let budget = w
        .config
        .max_concurrent_moves
        .saturating_sub(w.observed.moves_in_flight);
    assert!(moves <= budget, "{moves} moves over a budget of {budget}");

    if let Some(wake) = plan.wake_at {
        assert!(wake > w.now, "wake_at {wake} is not ahead of now");
    }
}

/// The same world with every input list in reverse order.
fn reversed(w: &World) -> World {
    let mut r = w.clone();
    r.desired.processors.reverse();
    r.observed.nodes.reverse();
    r.observed.instances.reverse();
    r.observed.ownership.reverse();
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plans_keep_the_invariants(w in arb_world()) {
        let plan = w.plan();
        check_invariants(&w, &plan);
        prop_assert_eq!(&plan, &w.plan(), "same input, same plan");
        prop_assert_eq!(&plan, &reversed(&w).plan(), "input order does not matter");
    }

    #[test]
    fn a_settled_world_stays_settled(w in arb_world()) {
        // Every desired processor running alone on a usable node with its current spec and
        // nothing pinned elsewhere: the plan holds nothing but clean-up.
        let mut w = w;
        w.observed.busy.clear();
        w.desired.invalid.clear();
        w.desired.cordoned.clear();
        w.observed.history.clear();
        for n in &mut w.observed.nodes {
            n.ready = true;
            n.schedulable = true;
            n.interruption = None;
            n.ready_since = Timestamp(0);
            n.capacity = Resources::new(1_000_000, 1_000_000);
        }
        let Some(home) = w.observed.nodes.first().map(|n| n.id.clone()) else {
            return Ok(());
        };
        w.observed.instances.clear();
        w.observed.ownership.clear();
        for s in &mut w.desired.processors {
            s.pin = None;
            s.site = SitePreference::Any;
            w.observed.instances.push(Instance {
                processor: s.id.clone(),
                epoch: Epoch(1),
                node: home.clone(),
                phase: Phase::Running,
                revision: s.revision(),
                started_at: Timestamp(0),
                endpoint: None,
            });
            w.observed.ownership.push(own(s.id.as_str(), Some(1), Some(NOW + 1)));
        }
        let plan = w.plan();
        prop_assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        prop_assert!(plan.waiting.is_empty(), "{:?}", plan.waiting);
        prop_assert_eq!(plan.wake_at, None);
    }
}
