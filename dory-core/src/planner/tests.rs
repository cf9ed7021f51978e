//! The planner's rules, one table per rule, and property tests over random worlds.
//!
//! Test names carry the number of the rule in the planner issue's list.

use std::time::Duration;

use super::rules::backoff;
use super::*;
use crate::model::{
    DesiredState, Instance, Interruption, InterruptionReason, InvalidEntry, Node, NodeId,
    Ownership, Phase, ProcessorId, ProcessorSpec, Resources, RestartMode, Site, SitePreference,
    Timestamp,
};

mod props;

/// "Now" in every table: far enough from zero that times before it are easy to write.
const NOW: u64 = 1_000_000;

fn pid(id: &str) -> ProcessorId {
    ProcessorId::new(id).unwrap()
}

fn nid(id: &str) -> NodeId {
    NodeId::new(id)
}

fn at(ms: u64) -> Timestamp {
    Timestamp(ms)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A processor asking for 1 core and 1 GiB, preferring no site.
fn spec(id: &str) -> ProcessorSpec {
    let mut s = ProcessorSpec::new(pid(id));
    s.resources = Resources::new(1000, 1024);
    s
}

/// The revision of every [`spec`] (the id is not part of it).
fn rev() -> u64 {
    spec("x").revision()
}

/// A ready, schedulable cloud node with 4 cores and 4 GiB, ready for long.
fn node(id: &str) -> Node {
    Node::new(id, Site::Cloud, Resources::new(4000, 4096))
}

fn edge(id: &str) -> Node {
    Node::new(id, Site::Edge, Resources::new(4000, 4096))
}

fn instance(p: &str, epoch: u64, node: &str, phase: Phase) -> Instance {
    Instance {
        processor: pid(p),
        epoch: Epoch(epoch),
        node: nid(node),
        phase,
        revision: rev(),
        started_at: at(NOW - 100_000),
        endpoint: None,
    }
}

fn own(p: &str, owner: Option<u64>, lease: Option<u64>) -> Ownership {
    // Built through serde so this helper keeps compiling as the row gains optional fields.
    serde_json::from_value(serde_json::json!({
        "processor": p,
        "owner": owner,
        "highest_epoch": owner.unwrap_or(0),
        "lease_expires": lease,
        "committed": null,
    }))
    .unwrap()
}

fn exited(code: i32) -> Phase {
    Phase::Exited { code }
}

fn failed() -> Phase {
    Phase::Failed {
        reason: "crashed".into(),
    }
}

fn spot(deadline: Option<u64>) -> Option<Interruption> {
    Some(Interruption {
        reason: InterruptionReason::SpotReclaim,
        deadline: deadline.map(Timestamp),
    })
}

fn start(p: &str, node: &str, expected: Option<u64>, reason: StartReason) -> Action {
    Action::Start {
        processor: pid(p),
        node: nid(node),
        expected_owner: expected.map(Epoch),
        reason,
    }
}

fn moved(p: &str, from: u64, to: &str, reason: MoveReason) -> Action {
    Action::Move {
        processor: pid(p),
        from: Epoch(from),
        to: nid(to),
        reason,
    }
}

fn terminate(p: &str, epoch: u64, release: bool) -> Action {
    Action::Terminate {
        processor: pid(p),
        epoch: Epoch(epoch),
        release,
    }
}

fn forget(p: &str, epoch: u64) -> Action {
    Action::Forget {
        processor: pid(p),
        epoch: Epoch(epoch),
    }
}

/// One planner input, built up a piece at a time.
#[derive(Clone, Debug)]
struct World {
    desired: DesiredState,
    observed: Observed,
    now: Timestamp,
    config: PlannerConfig,
}

impl World {
    fn new() -> Self {
        World {
            desired: DesiredState::default(),
            observed: Observed::default(),
            now: at(NOW),
            config: PlannerConfig::default(),
        }
    }

    fn node(mut self, node: Node) -> Self {
        self.observed.nodes.push(node);
        self
    }

    fn nodes(self, ids: &[&str]) -> Self {
        ids.iter().fold(self, |w, id| w.node(node(id)))
    }

    fn spec(mut self, spec: ProcessorSpec) -> Self {
        self.desired.processors.push(spec);
        self
    }

    fn specs(self, ids: &[&str]) -> Self {
        ids.iter().fold(self, |w, id| w.spec(spec(id)))
    }

    fn instance(mut self, instance: Instance) -> Self {
        self.observed.instances.push(instance);
        self
    }

    fn own(mut self, row: Ownership) -> Self {
        self.observed.ownership.push(row);
        self
    }

    /// `p` owned by `epoch`, running on `node` with a live lease.
    fn running(self, p: &str, epoch: u64, node: &str) -> Self {
        self.instance(instance(p, epoch, node, Phase::Running))
            .own(own(p, Some(epoch), Some(NOW + 5_000)))
    }

    fn history(mut self, p: &str, history: RestartHistory) -> Self {
        self.observed.history.insert(pid(p), history);
        self
    }

    fn with(mut self, f: impl FnOnce(&mut World)) -> Self {
        f(&mut self);
        self
    }

    fn plan(&self) -> Plan {
        plan(&self.desired, &self.observed, self.now, &self.config)
    }
}

/// One row of a rule's table.
struct Case {
    name: &'static str,
    world: World,
    actions: Vec<Action>,
    /// (processor, a piece of its waiting note).
    waiting: Vec<(&'static str, &'static str)>,
    /// The expected `wake_at`, when the case cares.
    wake_at: Option<Option<u64>>,
}

fn case(name: &'static str, world: World, actions: Vec<Action>) -> Case {
    Case {
        name,
        world,
        actions,
        waiting: Vec::new(),
        wake_at: None,
    }
}

impl Case {
    fn waits(mut self, p: &'static str, note: &'static str) -> Self {
        self.waiting.push((p, note));
        self
    }

    fn wakes(mut self, at: Option<u64>) -> Self {
        self.wake_at = Some(at);
        self
    }
}

fn check(cases: Vec<Case>) {
    for c in cases {
        let plan = c.world.plan();
        assert_eq!(plan.actions, c.actions, "{}: actions\n{plan:#?}", c.name);
        for (p, note) in &c.waiting {
            let got = plan.waiting.get(&pid(p));
            assert!(
                got.is_some_and(|g| g.contains(note)),
                "{}: {p} should wait with {note:?}, got {got:?}",
                c.name
            );
        }
        if c.waiting.is_empty() {
            assert!(
                plan.waiting.is_empty(),
                "{}: unexpected waiting {:?}",
                c.name,
                plan.waiting
            );
        }
        if let Some(wake) = c.wake_at {
            assert_eq!(plan.wake_at, wake.map(Timestamp), "{}: wake_at", c.name);
        }
        assert_eq!(plan, c.world.plan(), "{}: not deterministic", c.name);
    }
}

#[test]
fn rule_1_starts_missing_processors() {
    let mut pinned = spec("p");
    pinned.pin = Some(nid("n1"));
    let mut big = spec("p");
    big.resources = Resources::new(8000, 1024);
    check(vec![
        case(
            "new processor",
            World::new().nodes(&["n1"]).specs(&["p"]),
            vec![start("p", "n1", None, StartReason::New)],
        ),
        case(
            "ownership row without an owner",
            World::new()
                .nodes(&["n1"])
                .specs(&["p"])
                .own(own("p", None, None)),
            vec![start("p", "n1", None, StartReason::New)],
        ),
        case(
            "most free memory wins",
            World::new()
                .nodes(&["n1", "n2"])
                .specs(&["p", "q"])
                .running("q", 1, "n1"),
            vec![start("p", "n2", None, StartReason::New)],
        ),
        case(
            "a pin decides the node",
            World::new()
                .nodes(&["n1", "n2"])
                .spec(pinned)
                .running("q", 1, "n1")
                .spec(spec("q")),
            vec![start("p", "n1", None, StartReason::New)],
        ),
        case(
            "nothing fits",
            World::new().nodes(&["n1"]).spec(big),
            vec![],
        )
        .waits("p", "no node has room for 8000m CPU"),
        case(
            "an ended instance is left to the start",
            World::new()
                .nodes(&["n1"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", exited(0))),
            vec![start("p", "n1", None, StartReason::New)],
        ),
        case(
            "no node: the ended instance is forgotten meanwhile",
            World::new()
                .specs(&["p"])
                .instance(instance("p", 1, "n1", exited(0))),
            vec![forget("p", 1)],
        )
        .waits("p", "no node has room"),
    ]);
}

#[test]
fn rule_11_never_places_on_unusable_nodes() {
    let bad: Vec<(&'static str, Node)> = vec![
        ("not ready", {
            let mut n = node("bad");
            n.ready = false;
            n
        }),
        ("unschedulable", {
            let mut n = node("bad");
            n.schedulable = false;
            n
        }),
        ("interrupted", {
            let mut n = node("bad");
            n.interruption = spot(None);
            n
        }),
        ("cordoned through Dory", node("bad")),
    ];
    let mut cases = Vec::new();
    for (name, n) in bad {
        let world = World::new().node(n).specs(&["p"]).with(|w| {
            w.desired.cordoned.insert(nid("bad"));
        });
        let alone = case(name, world.clone(), vec![]).waits("p", "no node has room");
        let with_good = case(
            name,
            world.node(node("good")),
            vec![start("p", "good", None, StartReason::New)],
        );
        cases.push(alone);
        cases.push(with_good);
    }
    check(cases);
}

#[test]
fn rule_11_counts_capacity() {
    let heavy = |id: &str| {
        let mut s = spec(id);
        s.resources = Resources::new(3000, 1024);
        s
    };
    check(vec![
        case(
            "one per node",
            World::new()
                .nodes(&["n1", "n2"])
                .spec(heavy("a"))
                .spec(heavy("b")),
            vec![
                start("a", "n1", None, StartReason::New),
                start("b", "n2", None, StartReason::New),
            ],
        ),
        case(
            "the third waits",
            World::new()
                .nodes(&["n1", "n2"])
                .spec(heavy("a"))
                .spec(heavy("b"))
                .spec(heavy("c")),
            vec![
                start("a", "n1", None, StartReason::New),
                start("b", "n2", None, StartReason::New),
            ],
        )
        .waits("c", "no node has room for 3000m CPU"),
        case(
            "a terminating instance still holds its room",
            World::new()
                .nodes(&["n1"])
                .spec(heavy("a"))
                .spec(heavy("b"))
                .instance(instance("b", 1, "n1", Phase::Terminating))
                .own(own("b", Some(1), None)),
            vec![],
        )
        .waits("a", "no node has room")
        .waits("b", "waiting for e1 to stop"),
        case(
            "CPU-bound nodes: memory alone does not decide",
            World::new()
                .node(Node::new("n1", Site::Cloud, Resources::new(500, 65536)))
                .node(Node::new("n2", Site::Cloud, Resources::new(4000, 2048)))
                .specs(&["p"]),
            vec![start("p", "n2", None, StartReason::New)],
        ),
    ]);
}

#[test]
fn rule_2_removes_undesired_processors() {
    check(vec![
        case(
            "alive owner",
            World::new().nodes(&["n1"]).running("p", 3, "n1"),
            vec![terminate("p", 3, true)],
        ),
        case(
            "alive stray without an owner",
            World::new()
                .nodes(&["n1"])
                .instance(instance("p", 2, "n1", Phase::Standby)),
            vec![terminate("p", 2, false)],
        ),
        case(
            "ended instance",
            World::new()
                .nodes(&["n1"])
                .instance(instance("p", 2, "n1", exited(0)))
                .own(own("p", Some(2), None)),
            vec![forget("p", 2)],
        ),
        case(
            "owner without an instance",
            World::new().own(own("p", Some(2), None)),
            vec![Action::Release {
                processor: pid("p"),
                epoch: Epoch(2),
            }],
        ),
        case(
            "owner still stopping",
            World::new()
                .nodes(&["n1"])
                .instance(instance("p", 2, "n1", Phase::Terminating))
                .own(own("p", Some(2), None)),
            vec![],
        )
        .waits("p", "waiting for e2 to stop"),
        case(
            "released and gone",
            World::new().own(own("p", None, None)),
            vec![],
        ),
    ]);
}

#[test]
fn rule_3_moves_off_interrupted_nodes() {
    let interrupted = |deadline: Option<u64>| {
        let mut n = node("n1");
        n.interruption = spot(deadline);
        n
    };
    let spot_move = MoveReason::Interruption(InterruptionReason::SpotReclaim);
    let evacuate = |p: &str, to: &str| Action::Evacuate {
        processor: pid(p),
        from: Epoch(1),
        to: nid(to),
        reason: InterruptionReason::SpotReclaim,
    };
    check(vec![
        case(
            "far deadline: move",
            World::new()
                .node(interrupted(Some(NOW + 60_000)))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![moved("p", 1, "n2", spot_move.clone())],
        ),
        case(
            "no deadline: move",
            World::new()
                .node(interrupted(None))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![moved("p", 1, "n2", spot_move.clone())],
        ),
        case(
            "deadline closer than a move: evacuate",
            World::new()
                .node(interrupted(Some(NOW + 14_999)))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![evacuate("p", "n2")],
        ),
        case(
            "deadline passed: evacuate",
            World::new()
                .node(interrupted(Some(NOW - 1)))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![evacuate("p", "n2")],
        ),
        case(
            "a stray on an unreachable node does not hold up the evacuation",
            World::new()
                .node(interrupted(Some(NOW + 1_000)))
                .nodes(&["n2"])
                .node({
                    let mut n = node("n3");
                    n.ready = false;
                    n
                })
                .specs(&["p"])
                .running("p", 1, "n1")
                .instance(instance("p", 0, "n3", Phase::Frozen)),
            vec![evacuate("p", "n2")],
        ),
        case(
            "unschedulable: cordon move",
            World::new()
                .node({
                    let mut n = node("n1");
                    n.schedulable = false;
                    n
                })
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![moved("p", 1, "n2", MoveReason::Cordon)],
        ),
        case(
            "cordoned through Dory: cordon move",
            World::new()
                .nodes(&["n1", "n2"])
                .specs(&["p"])
                .running("p", 1, "n1")
                .with(|w| {
                    w.desired.cordoned.insert(nid("n1"));
                }),
            vec![moved("p", 1, "n2", MoveReason::Cordon)],
        ),
        case(
            "nowhere to go: wait, wake at the evacuation threshold",
            World::new()
                .node(interrupted(Some(NOW + 60_000)))
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![],
        )
        .waits("p", "no node has room")
        .wakes(Some(NOW + 45_000)),
        case(
            "an interrupted pin node is left",
            World::new()
                .node(interrupted(None))
                .nodes(&["n2"])
                .spec({
                    let mut s = spec("p");
                    s.pin = Some(nid("n1"));
                    s
                })
                .running("p", 1, "n1"),
            vec![moved("p", 1, "n2", spot_move.clone())],
        ),
    ]);
}

#[test]
fn rule_3_and_12_earliest_deadline_first() {
    let world = || {
        World::new()
            .node({
                let mut n = node("a-late");
                n.interruption = spot(Some(NOW + 120_000));
                n
            })
            .node({
                let mut n = node("b-soon");
                n.interruption = spot(Some(NOW + 60_000));
                n
            })
            .node({
                let mut n = node("c-cordon");
                n.schedulable = false;
                n
            })
            .node(Node::new("z", Site::Cloud, Resources::new(16000, 16384)))
            .specs(&["p1", "p2", "p3"])
            .running("p1", 1, "a-late")
            .running("p2", 1, "b-soon")
            .running("p3", 1, "c-cordon")
    };
    let spot_move = MoveReason::Interruption(InterruptionReason::SpotReclaim);
    check(vec![
        case(
            "all placed, earliest deadline first, no deadline last",
            world(),
            vec![
                moved("p2", 1, "z", spot_move.clone()),
                moved("p1", 1, "z", spot_move.clone()),
                moved("p3", 1, "z", MoveReason::Cordon),
            ],
        ),
        case(
            "bound of one: the earliest deadline goes",
            world().with(|w| w.config.max_concurrent_moves = 1),
            vec![moved("p2", 1, "z", spot_move.clone())],
        )
        .waits("p1", "waiting for the move bound")
        .waits("p3", "waiting for the move bound")
        .wakes(Some(NOW + 105_000)),
    ]);
}

#[test]
fn rule_4_fails_over_lost_nodes() {
    let down = |since: u64| {
        let mut n = node("n1");
        n.ready = false;
        n.ready_since = at(since);
        n
    };
    // Grace 20s, lease margin 2s.
    check(vec![
        case(
            "not ready within grace: wait",
            World::new()
                .node(down(NOW - 10_000))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![],
        )
        .waits("p", "not ready")
        .wakes(Some(NOW + 10_001)),
        case(
            "exactly the grace: still waiting",
            World::new()
                .node(down(NOW - 20_000))
                .nodes(&["n2"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", Phase::Running))
                .own(own("p", Some(1), None)),
            vec![],
        )
        .waits("p", "not ready")
        .wakes(Some(NOW + 1)),
        case(
            "lost, lease running: wait for lease plus margin",
            World::new()
                .node(down(NOW - 30_000))
                .nodes(&["n2"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![],
        )
        .waits("p", "lease")
        .wakes(Some(NOW + 7_000)),
        case(
            "lost, lease plus margin just over: fail over",
            World::new()
                .node(down(NOW - 30_000))
                .nodes(&["n2"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", Phase::Running))
                .own(own("p", Some(1), Some(NOW - 2_000))),
            vec![start("p", "n2", Some(1), StartReason::Failover)],
        ),
        case(
            "node gone, no lease: fail over",
            World::new()
                .nodes(&["n2"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", Phase::Running))
                .own(own("p", Some(1), None)),
            vec![start("p", "n2", Some(1), StartReason::Failover)],
        ),
        case(
            "failed with a lost node: fail over, no backoff",
            World::new()
                .node(down(NOW - 30_000))
                .nodes(&["n2"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", failed()))
                .own(own("p", Some(1), Some(NOW - 5_000)))
                .history(
                    "p",
                    RestartHistory {
                        restarts: 5,
                        recent_failures: vec![at(NOW - 1_000)],
                        ..Default::default()
                    },
                ),
            vec![start("p", "n2", Some(1), StartReason::Failover)],
        ),
        case(
            "owner alive on a ready node, lease run out: never a second owner",
            World::new()
                .nodes(&["n1", "n2"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", Phase::Running))
                .own(own("p", Some(1), Some(NOW - 60_000))),
            vec![],
        ),
        case(
            "owner without any instance: wait out its lease, then start",
            World::new()
                .nodes(&["n2"])
                .specs(&["p"])
                .own(own("p", Some(4), Some(NOW + 1_000))),
            vec![],
        )
        .waits("p", "no instance")
        .wakes(Some(NOW + 3_000)),
        case(
            "owner without any instance, lease over",
            World::new()
                .nodes(&["n2"])
                .specs(&["p"])
                .own(own("p", Some(4), Some(NOW - 3_000))),
            vec![start("p", "n2", Some(4), StartReason::Failover)],
        ),
    ]);
}

#[test]
fn rule_5_restart_policy() {
    let mode = |m: RestartMode| {
        let mut s = spec("p");
        s.restart.mode = m;
        s
    };
    let ended = |m: RestartMode, phase: Phase| {
        World::new()
            .nodes(&["n1"])
            .spec(mode(m))
            .instance(instance("p", 1, "n1", phase))
            .own(own("p", Some(1), Some(NOW - 60_000)))
    };
    let restart = vec![start("p", "n1", Some(1), StartReason::Restart)];
    check(vec![
        case(
            "on-failure, clean exit: stopped",
            ended(RestartMode::OnFailure, exited(0)),
            vec![],
        )
        .waits("p", "restart policy on-failure leaves it stopped")
        .wakes(None),
        case(
            "on-failure, exit 1: restart",
            ended(RestartMode::OnFailure, exited(1)),
            restart.clone(),
        ),
        case(
            "on-failure, crash: restart",
            ended(RestartMode::OnFailure, failed()),
            restart.clone(),
        ),
        case(
            "always, clean exit: restart",
            ended(RestartMode::Always, exited(0)),
            restart.clone(),
        ),
        case(
            "never, exit 1: stopped",
            ended(RestartMode::Never, exited(1)),
            vec![],
        )
        .waits("p", "restart policy never"),
        case(
            "stopped: a non-owner ended instance is forgotten",
            ended(RestartMode::Never, exited(1)).instance(instance("p", 0, "n1", exited(0))),
            vec![forget("p", 0)],
        )
        .waits("p", "leaves it stopped"),
        case(
            "restart also covers ended non-owners (the executor forgets them)",
            ended(RestartMode::OnFailure, exited(1)).instance(instance("p", 0, "n1", exited(0))),
            restart.clone(),
        ),
    ]);
}

#[test]
fn rule_5_backoff_lease_and_breaker() {
    let p = spec("p");
    let history = |restarts: u32, failures: &[u64]| RestartHistory {
        restarts,
        recent_failures: failures.iter().map(|t| at(*t)).collect(),
        ..Default::default()
    };
    let ended = |phase: Phase, lease: Option<u64>| {
        World::new()
            .nodes(&["n1"])
            .spec(spec("p"))
            .instance(instance("p", 1, "n1", phase))
            .own(own("p", Some(1), lease))
    };
    // restarts = 2: 4s, plus up to 1s of jitter.
    let delay = backoff(&p, 2);
    assert!(delay >= secs(4) && delay < secs(5), "{delay:?}");
    assert_eq!(backoff(&p, 2), delay, "jitter is a hash, not a draw");
    assert_eq!(backoff(&p, 40), backoff(&p, 40));
    assert!(backoff(&p, 40) >= secs(60) && backoff(&p, 40) < secs(75));
    let delay = delay.as_millis() as u64;
    let failed_at = NOW - 2_000;
    let restart = vec![start("p", "n1", Some(1), StartReason::Restart)];
    check(vec![
        case(
            "within backoff: wait until it ends",
            ended(exited(1), None).history("p", history(2, &[NOW - 200_000, failed_at])),
            vec![],
        )
        .waits("p", "restart backoff")
        .wakes(Some(failed_at + delay)),
        case(
            "backoff over",
            ended(exited(1), None).history("p", history(2, &[NOW - delay - 1])),
            restart.clone(),
        ),
        case(
            "no recorded failure: measured from the start",
            ended(exited(1), None),
            restart.clone(),
        ),
        case(
            "crashed: waits for its lease plus margin too",
            ended(failed(), Some(NOW + 10_000)).history("p", history(0, &[NOW - 5_000])),
            vec![],
        )
        .waits("p", "lease")
        .wakes(Some(NOW + 12_000)),
        case(
            "exited: waits for the lease too (the store refuses to hand it on before)",
            ended(exited(1), Some(NOW + 10_000)).history("p", history(0, &[NOW - 5_000])),
            vec![],
        )
        .waits("p", "lease")
        .wakes(Some(NOW + 12_000)),
        case(
            "crash loop: mark failed",
            ended(exited(3), None).history(
                "p",
                history(
                    4,
                    &[
                        NOW - 250_000,
                        NOW - 200_000,
                        NOW - 100_000,
                        NOW - 50_000,
                        NOW - 1,
                    ],
                ),
            ),
            vec![Action::MarkFailed {
                processor: pid("p"),
                reason: "crash loop: 5 failures within 300s (last: e1 exited(3))".into(),
            }],
        ),
        case(
            "old failures fall out of the window",
            ended(exited(3), None).history(
                "p",
                history(
                    0,
                    &[
                        NOW - 400_000,
                        NOW - 200_000,
                        NOW - 100_000,
                        NOW - 50_000,
                        NOW - 2_000,
                    ],
                ),
            ),
            restart.clone(),
        ),
        case(
            "failed on this revision: stays failed",
            ended(exited(3), None).history(
                "p",
                RestartHistory {
                    failed: Some("crash loop".into()),
                    failed_revision: Some(rev()),
                    ..history(4, &[NOW - 1])
                },
            ),
            vec![],
        )
        .waits("p", "crash-loop breaker"),
        case(
            "failed: only forgets ended non-owners",
            ended(exited(3), None)
                .instance(instance("p", 0, "n1", exited(1)))
                .history(
                    "p",
                    RestartHistory {
                        failed: Some("crash loop".into()),
                        failed_revision: Some(rev()),
                        ..Default::default()
                    },
                ),
            vec![forget("p", 0)],
        )
        .waits("p", "crash-loop breaker"),
        case(
            "failed on an older revision: a clean slate",
            ended(exited(3), None).history(
                "p",
                RestartHistory {
                    failed: Some("crash loop".into()),
                    failed_revision: Some(rev() ^ 1),
                    ..history(4, &[NOW - 5, NOW - 4, NOW - 3, NOW - 2, NOW - 1])
                },
            ),
            restart.clone(),
        ),
    ]);
}

#[test]
fn rule_6_settles_half_done_moves() {
    let two = |owner: u64, a: Phase, b: Phase| {
        World::new()
            .nodes(&["n1", "n2"])
            .specs(&["p"])
            .instance(instance("p", 1, "n1", a))
            .instance(instance("p", 2, "n2", b))
            .own(own("p", Some(owner), Some(NOW + 5_000)))
    };
    check(vec![
        case(
            "committed: roll forward",
            two(2, Phase::Frozen, Phase::Standby),
            vec![Action::RollForward {
                processor: pid("p"),
                owner: Epoch(2),
                old: Epoch(1),
            }],
        ),
        case(
            "not committed: roll back",
            two(1, Phase::Frozen, Phase::Standby),
            vec![Action::RollBack {
                processor: pid("p"),
                owner: Epoch(1),
                replacement: Epoch(2),
            }],
        ),
        case(
            "replacement still starting: roll back",
            two(1, Phase::Running, Phase::Starting),
            vec![Action::RollBack {
                processor: pid("p"),
                owner: Epoch(1),
                replacement: Epoch(2),
            }],
        ),
        case(
            "a running non-owner is terminated",
            two(1, Phase::Running, Phase::Running),
            vec![terminate("p", 2, false)],
        ),
        case(
            "owner ended: the stray goes first",
            two(1, exited(1), Phase::Standby),
            vec![terminate("p", 2, false)],
        ),
        case(
            "no owner: strays go",
            World::new()
                .nodes(&["n1"])
                .specs(&["p"])
                .instance(instance("p", 1, "n1", Phase::Running))
                .own(own("p", None, None)),
            vec![terminate("p", 1, false)],
        ),
        case(
            "two strays: the lowest goes first",
            two(2, Phase::Frozen, Phase::Running).instance(instance("p", 3, "n1", Phase::Standby)),
            vec![terminate("p", 1, false)],
        ),
        case(
            "owner's node down: terminate the replacement instead of rolling back",
            two(1, Phase::Frozen, Phase::Standby).with(|w| w.observed.nodes[0].ready = false),
            vec![terminate("p", 2, false)],
        ),
    ]);
}

#[test]
fn rule_7_resumes_a_lone_frozen_or_standby_owner() {
    let resume = vec![Action::Resume {
        processor: pid("p"),
        epoch: Epoch(2),
    }];
    let one = |phase: Phase| {
        World::new()
            .nodes(&["n1"])
            .specs(&["p"])
            .instance(instance("p", 2, "n1", phase))
            .own(own("p", Some(2), Some(NOW + 5_000)))
    };
    check(vec![
        case("frozen", one(Phase::Frozen), resume.clone()),
        case("standby", one(Phase::Standby), resume.clone()),
        case(
            "an old terminating instance does not count",
            one(Phase::Standby).instance(instance("p", 1, "n1", Phase::Terminating)),
            resume.clone(),
        ),
        case("starting: nothing yet", one(Phase::Starting), vec![]),
    ]);
}

#[test]
fn rule_8_pins() {
    let pinned = |to: &str| {
        let mut s = spec("p");
        s.pin = Some(nid(to));
        s
    };
    let world = |n2: Node| {
        World::new()
            .nodes(&["n1"])
            .node(n2)
            .spec(pinned("n2"))
            .running("p", 1, "n1")
    };
    check(vec![
        case(
            "runs elsewhere: move to the pin",
            world(node("n2")),
            vec![moved("p", 1, "n2", MoveReason::Pin)],
        ),
        case(
            "already there",
            World::new()
                .nodes(&["n1", "n2"])
                .spec(pinned("n1"))
                .running("p", 1, "n1"),
            vec![],
        ),
        case(
            "pin node not ready",
            world({
                let mut n = node("n2");
                n.ready = false;
                n
            }),
            vec![],
        )
        .waits("p", "pinned to n2, which is not ready"),
        case(
            "pin node full",
            world(Node::new("n2", Site::Cloud, Resources::new(500, 4096))),
            vec![],
        )
        .waits("p", "pinned to n2, which has no room"),
        case(
            "pin node gone",
            World::new()
                .nodes(&["n1"])
                .spec(pinned("n2"))
                .running("p", 1, "n1"),
            vec![],
        )
        .waits("p", "pinned to n2, which does not exist"),
    ]);
}

#[test]
fn rule_9_spec_changes_roll_out_as_moves() {
    let changed = || {
        let mut s = spec("p");
        s.workload.version = Some("2".into());
        s
    };
    check(vec![
        case(
            "moves, to the same node when it has room for both",
            World::new()
                .nodes(&["n1"])
                .spec(changed())
                .running("p", 1, "n1"),
            vec![moved("p", 1, "n1", MoveReason::SpecChange)],
        ),
        case(
            "no room for both",
            World::new()
                .node(Node::new("n1", Site::Cloud, Resources::new(1500, 4096)))
                .spec(changed())
                .running("p", 1, "n1"),
            vec![],
        )
        .waits("p", "no node has room"),
        case(
            "unchanged: nothing",
            World::new()
                .nodes(&["n1"])
                .specs(&["p"])
                .running("p", 1, "n1"),
            vec![],
        ),
    ]);
}

#[test]
fn rule_10_site_preference_and_move_back() {
    let at_edge = |fallback: bool| {
        let mut s = spec("p");
        s.site = SitePreference::Edge;
        s.fallback = fallback;
        s
    };
    let edge_since = |since: u64| {
        let mut n = edge("e1");
        n.ready_since = at(since);
        n
    };
    let full_edge = Node::new("e1", Site::Edge, Resources::new(100, 100));
    check(vec![
        case(
            "starts at the preferred site",
            World::new()
                .node(Node::new("c1", Site::Cloud, Resources::new(64000, 65536)))
                .node(edge("e1"))
                .spec(at_edge(true)),
            vec![start("p", "e1", None, StartReason::New)],
        ),
        case(
            "falls back when the preferred site is full",
            World::new()
                .nodes(&["c1"])
                .node(full_edge.clone())
                .spec(at_edge(true)),
            vec![start("p", "c1", None, StartReason::New)],
        ),
        case(
            "no fallback: waits",
            World::new()
                .nodes(&["c1"])
                .node(full_edge.clone())
                .spec(at_edge(false)),
            vec![],
        )
        .waits("p", "on site edge (no fallback)"),
        case(
            "moves back once the preferred site is stable",
            World::new()
                .nodes(&["c1"])
                .node(edge_since(NOW - 60_000))
                .spec(at_edge(true))
                .running("p", 1, "c1"),
            vec![moved("p", 1, "e1", MoveReason::MoveBack)],
        ),
        case(
            "not yet stable: waits for it",
            World::new()
                .nodes(&["c1"])
                .node(edge_since(NOW - 59_999))
                .spec(at_edge(true))
                .running("p", 1, "c1"),
            vec![],
        )
        .waits("p", "not stable until")
        .wakes(Some(NOW + 1)),
        case(
            "preferred site down",
            World::new()
                .nodes(&["c1"])
                .node({
                    let mut n = edge_since(0);
                    n.ready = false;
                    n
                })
                .spec(at_edge(true))
                .running("p", 1, "c1"),
            vec![],
        )
        .waits("p", "no usable node")
        .wakes(None),
        case(
            "stable but full",
            World::new()
                .nodes(&["c1"])
                .node(full_edge)
                .spec(at_edge(true))
                .running("p", 1, "c1"),
            vec![],
        )
        .waits("p", "no stable edge node has room"),
    ]);
}

#[test]
fn rule_12_priorities_under_the_bound() {
    let spot_move = MoveReason::Interruption(InterruptionReason::SpotReclaim);
    let mut pinned = spec("e-pin");
    pinned.pin = Some(nid("big"));
    let mut changed = spec("f-spec");
    changed.workload.version = Some("2".into());
    let mut back = spec("g-back");
    back.site = SitePreference::Edge;
    let world = || {
        World::new()
            .node(Node::new("big", Site::Cloud, Resources::new(64000, 65536)))
            .node({
                let mut n = node("gone-soon");
                n.interruption = spot(Some(NOW + 60_000));
                n
            })
            .node({
                let mut n = node("lost");
                n.ready = false;
                n
            })
            .node(node("small"))
            .node(edge("edge"))
            .specs(&["a-new", "b-failover", "c-urgent"])
            .spec(pinned.clone())
            .spec(changed.clone())
            .instance(instance("b-failover", 1, "lost", Phase::Running))
            .own(own("b-failover", Some(1), None))
            .running("c-urgent", 1, "gone-soon")
            .running("e-pin", 1, "small")
            .running("f-spec", 1, "small")
            .spec(back.clone())
            .running("g-back", 1, "small")
    };
    let all = vec![
        moved("c-urgent", 1, "big", spot_move.clone()),
        start("b-failover", "big", Some(1), StartReason::Failover),
        start("a-new", "big", None, StartReason::New),
        moved("e-pin", 1, "big", MoveReason::Pin),
        moved("f-spec", 1, "big", MoveReason::SpecChange),
        moved("g-back", 1, "edge", MoveReason::MoveBack),
    ];
    let bounded = |n: usize, in_flight: usize| {
        world().with(|w| {
            w.config.max_concurrent_moves = n;
            w.observed.moves_in_flight = in_flight;
        })
    };
    let mut cases = vec![case("unbounded", bounded(10, 0), all.clone())];
    let order = [
        "c-urgent",
        "b-failover",
        "a-new",
        "e-pin",
        "f-spec",
        "g-back",
    ];
    for n in 0..order.len() {
        let mut c = case("bound", bounded(n + 1, 1), all[..n].to_vec());
        for p in &order[n..] {
            c = c.waits(p, "waiting for the move bound");
        }
        cases.push(c);
    }
    check(cases);
}

#[test]
fn busy_and_invalid_processors_are_left_alone() {
    check(vec![
        case(
            "busy",
            World::new().nodes(&["n1"]).specs(&["p", "q"]).with(|w| {
                w.observed.busy.insert(pid("p"));
            }),
            vec![start("q", "n1", None, StartReason::New)],
        ),
        case(
            "busy and undesired",
            World::new().nodes(&["n1"]).running("p", 1, "n1").with(|w| {
                w.observed.busy.insert(pid("p"));
            }),
            vec![],
        ),
        case(
            "invalid: its instance keeps running",
            World::new().nodes(&["n1"]).running("p", 1, "n1").with(|w| {
                w.desired.invalid.push(InvalidEntry {
                    id: "p".into(),
                    error: "field `resources` is wrong".into(),
                })
            }),
            vec![],
        ),
    ]);
}

#[test]
fn actions_are_ordered_urgent_then_failover_then_by_id() {
    let world = World::new()
        .nodes(&["big"])
        .node({
            let mut n = node("late");
            n.interruption = spot(Some(NOW + 100_000));
            n
        })
        .node({
            let mut n = node("soon");
            n.interruption = spot(Some(NOW + 50_000));
            n
        })
        .specs(&["a", "b", "c", "d", "z"])
        .running("a", 1, "late")
        .running("z", 1, "soon")
        .instance(instance("c", 1, "gone", Phase::Running))
        .own(own("c", Some(1), None))
        .instance(instance("d", 1, "big", Phase::Frozen))
        .own(own("d", Some(1), None))
        .instance(instance("y", 1, "big", exited(0)))
        .with(|w| {
            w.observed.nodes[0].capacity = Resources::new(64000, 65536);
        });
    let plan = world.plan();
    let order: Vec<&str> = plan
        .actions
        .iter()
        .map(|a| a.processor().as_str())
        .collect();
    assert_eq!(order, ["z", "a", "c", "b", "d", "y"], "{plan:#?}");
}
