//! Faults against real processes: the orchestrator killed in the middle of moves, a virtual
//! node killed under its processors, an edge site lost and regained, a processor that
//! crashes at once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{
    Backends, Cluster, NodeSpec, Rng, all_running, assert_counted_exactly_once, assert_one_writer,
    counter_bin, counter_entry, now_ms,
};

/// How many times the orchestrator is killed in the middle of a move.
const ROUNDS: usize = 20;

/// The counter's step and checkpoint intervals in these tests, in ms.
const STEP_MS: u64 = 20;
const CHECKPOINT_MS: u64 = 400;

/// Steps a failover may replay beyond one checkpoint interval's worth: the step that was
/// under way when the checkpoint was cut and the one under way at the kill.
const LOSS_MARGIN_STEPS: u64 = 3;

const CLOUD: [NodeSpec; 3] = [
    NodeSpec {
        id: "n1",
        site: "cloud",
    },
    NodeSpec {
        id: "n2",
        site: "cloud",
    },
    NodeSpec {
        id: "n3",
        site: "cloud",
    },
];

/// Short leases, so that the waits a crash leaves behind (a lease to run out) stay short.
const FAST: [(&str, &str); 4] = [
    ("lease", "1s"),
    ("lease_margin", "250ms"),
    ("node_lost_grace", "2s"),
    ("stabilisation", "3s"),
];

/// The committed (epoch, sequence) of a processor, from the store.
fn committed(cluster: &Cluster, processor: &str) -> Option<(u64, u64)> {
    cluster
        .ownership(processor)
        .and_then(|o| o.committed)
        .map(|(e, s)| (e.0, s.0))
}

/// Settled: every processor runs as exactly one alive instance, whose epoch owns the
/// processor in the store and is what the status shows, with no operation waiting.
fn settled(cluster: &Cluster, ids: &[&str]) -> Option<BTreeMap<String, (u64, String)>> {
    let status = cluster.status();
    if !all_running(&status, ids) {
        return None;
    }
    let alive = cluster.alive_instances();
    let mut out = BTreeMap::new();
    for id in ids {
        let [(epoch, node)] = alive.get(*id)?.as_slice() else {
            return None;
        };
        let owner = cluster.ownership(id)?.owner?.0;
        let s = &status[*id];
        if owner != *epoch
            || s.epoch.map(|e| e.0) != Some(owner)
            || s.node.as_ref().map(|n| n.as_str()) != Some(node.as_str())
        {
            return None;
        }
        out.insert(id.to_string(), (*epoch, node.clone()));
    }
    Some(out)
}

#[test]
fn an_orchestrator_killed_at_random_points_of_moves_leaves_one_writer() {
    let Some(counter) = counter_bin() else { return };
    let mut rng = Rng::from_env("orchestrator kills");
    let ids = ["a", "b", "c"];
    let processors: String = ids
        .iter()
        .map(|id| counter_entry(id, "any", &counter, CHECKPOINT_MS, STEP_MS, ""))
        .collect();
    let mut cluster = Cluster::build(&CLOUD, &FAST, &processors);
    cluster.start_orchestrator();
    let start = cluster.wait_for("every counter running", Duration::from_secs(60), |s| {
        all_running(s, &ids)
    });
    let mut pinned: BTreeMap<&str, String> = ids
        .iter()
        .map(|id| (*id, start[*id].node.as_ref().unwrap().to_string()))
        .collect();
    let mut seen: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut trail = Vec::new();
    for round in 0..ROUNDS {
        let processor = ids[rng.below(ids.len() as u64) as usize];
        let others: Vec<&str> = CLOUD
            .iter()
            .map(|n| n.id)
            .filter(|n| *n != pinned[processor])
            .collect();
        let to = others[rng.below(others.len() as u64) as usize];
        cluster.dory_ok(&["move", processor, "--to", to, "--no-wait"]);
        pinned.insert(processor, to.to_string());
        let sleep = rng.below(401);
        std::thread::sleep(Duration::from_millis(sleep));
        cluster.kill_orchestrator();
        trail.push(format!(
            "round {round}: {processor} -> {to}, killed after {sleep} ms"
        ));
        // Committed state only grows, whatever the kills cut short.
        for id in ids {
            let Some(now) = committed(&cluster, id) else {
                continue;
            };
            if let Some(before) = seen.get(id) {
                assert!(
                    now.0 >= before.0 && now.1 >= before.1,
                    "{id}: committed state went back from {before:?} to {now:?}\n{}\n{}",
                    trail.join("\n"),
                    cluster.logs()
                );
            }
            seen.insert(id, now);
        }
        // Once the new leader leads (its first round follows at once), the next kill lands in
        // what it does next: the move triggered then, or the roll back or forward of one this
        // kill cut short.
        cluster.start_orchestrator();
    }
    eprintln!("{}", trail.join("\n"));

    let placed = cluster.wait_until(
        "every counter to settle on its pin after the kills",
        Duration::from_secs(60),
        || settled(&cluster, &ids).filter(|p| ids.iter().all(|id| p[*id].1 == pinned[id])),
    );
    // What the kills cut short, for the record (timing decides it, so it is not asserted).
    let log = cluster.log_text();
    eprintln!(
        "after {} orchestrators: {} moves committed, {} rolled back, {} rolled forward, {} resumed",
        ROUNDS + 1,
        log.matches(": moved e").count(),
        log.matches("move rolled back").count(),
        log.matches("move rolled forward").count(),
        log.matches("begin Resume").count(),
    );
    // Let every counter count on, then check every output from the first count.
    let target: BTreeMap<&str, u64> = ids
        .iter()
        .map(|id| (*id, cluster.output(id).messages.len() as u64 + 20))
        .collect();
    cluster.wait_until("every counter to count on", Duration::from_secs(30), || {
        ids.iter()
            .all(|id| cluster.output(id).messages.len() as u64 >= target[id])
            .then_some(())
    });
    for id in ids {
        let summary = assert_one_writer(id, &cluster.output(id));
        assert!(summary.last >= target[id], "{id}: {summary:?}");
        // No node was lost, so every hand-over was a committed move or a roll back: not even
        // a copy for the deduplication rule to drop.
        assert_eq!(
            summary.copies,
            0,
            "{id}: {:?}\n{}",
            summary.stretches,
            cluster.logs()
        );
        let epochs = assert_counted_exactly_once(id, &cluster.output(id));
        assert_eq!(
            epochs.last().copied(),
            Some(placed[id].0),
            "{id}: the owner is the last writer"
        );
        let (epoch, seq) = committed(&cluster, id).expect("a committed checkpoint");
        assert!(
            epoch <= placed[id].0 && seq >= seen.get(id).map_or(0, |s| s.1),
            "{id}: committed ({epoch}, {seq}) after {:?}",
            seen.get(id)
        );
    }
}

#[test]
fn a_killed_node_fails_over_after_the_lease_and_reports_the_loss() {
    a_killed_node_fails_over(Backends::Embedded);
}

#[test]
fn a_killed_node_fails_over_on_postgres_and_rabbitmq() {
    a_killed_node_fails_over(Backends::PostgresRabbitmq);
}

fn a_killed_node_fails_over(backends: Backends) {
    let Some(counter) = counter_bin() else { return };
    let ids = ["left", "right"];
    let processors: String = ids
        .iter()
        .map(|id| counter_entry(id, "cloud", &counter, CHECKPOINT_MS, STEP_MS, ""))
        .collect();
    let Some(mut cluster) = Cluster::build_on(backends, &CLOUD[..2], &FAST, &processors, |_, _| {
        String::new()
    }) else {
        return;
    };
    cluster.start_orchestrator();
    let before = cluster.wait_for("both running", Duration::from_secs(60), |s| {
        all_running(s, &ids)
    });
    // Let them checkpoint a few times.
    std::thread::sleep(Duration::from_millis(2 * CHECKPOINT_MS));
    let node = before[ids[0]].node.as_ref().unwrap().to_string();
    let lost: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| before[*id].node.as_ref().unwrap().as_str() == node)
        .collect();
    let kept: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !lost.contains(id))
        .collect();

    let killed_at = now_ms();
    cluster.dory_ok(&["node", "kill", &node]);
    // The lease each lost owner holds at the kill: nothing may replace it before it runs out.
    let leases: BTreeMap<&str, u64> = lost
        .iter()
        .map(|id| {
            let row = cluster.ownership(id).expect("ownership row");
            (*id, row.lease_expires.expect("a leased owner").0)
        })
        .collect();

    let after = cluster.wait_for(
        "the lost processors running elsewhere",
        Duration::from_secs(30),
        |s| {
            all_running(s, &ids)
                && lost.iter().all(|id| {
                    s[*id].node.as_ref().is_some_and(|n| n.as_str() != node)
                        && s[*id].last_failover.is_some()
                })
        },
    );
    // Let the replacements count on past what was lost.
    std::thread::sleep(Duration::from_millis(CHECKPOINT_MS));
    let lease_ms = 1000;
    let margin_ms = 250;
    for id in &lost {
        let old = before[*id].epoch.unwrap().0;
        let new = after[*id].epoch.unwrap().0;
        assert!(new > old, "{id}: {old} -> {new}");
        let started = cluster
            .instance_started_at(id, new)
            .expect("the replacement's record");
        assert!(
            started >= killed_at + lease_ms && started >= leases[id] + margin_ms,
            "{id}: replacement {new} started at {started}, the node was killed at {killed_at} and the lease ran to {}",
            leases[id]
        );

        let summary = assert_one_writer(id, &cluster.output(id));
        let [a, b] = summary.stretches.as_slice() else {
            panic!("{id}: one failover: {:?}", summary.stretches);
        };
        assert_eq!((a.epoch, b.epoch), (old, new), "{id}");
        let restored = b.first - 1;
        let replayed = a.last - restored;
        let bound = CHECKPOINT_MS / STEP_MS + LOSS_MARGIN_STEPS;
        assert!(
            replayed <= bound,
            "{id}: the failover replayed {replayed} counts (restored {restored}, the lost owner reached {}); at most {bound} allowed",
            a.last
        );
        assert_eq!(summary.copies as u64, replayed, "{id}");

        // The loss is reported in the status...
        let report = after[*id].last_failover.clone().unwrap();
        assert_eq!(report.epoch.0, new, "{id}: {report:?}");
        assert_eq!(
            report.lost_epoch.map(|e| e.0),
            Some(old),
            "{id}: {report:?}"
        );
        assert_eq!(
            report.lost_node.as_ref().map(|n| n.as_str()),
            Some(node.as_str())
        );
        assert_eq!(
            report.restored_sequence.map(|s| s.0),
            Some(restored),
            "{id}: {report:?}"
        );
        let lost_at = report.lost_at.expect("when the node was lost").0;
        assert!(
            (killed_at..=killed_at + 1000).contains(&lost_at),
            "{id}: lost at {lost_at}, killed at {killed_at}"
        );
        let age = report.checkpoint_age_ms.expect("a checkpoint age");
        assert!(
            age <= CHECKPOINT_MS + 1000,
            "{id}: the restored checkpoint was {age} ms old at the loss: {report:?}"
        );
        assert!(report.at.0 >= started.saturating_sub(1000), "{report:?}");
    }
    for id in &kept {
        assert_eq!(
            after[*id].epoch, before[*id].epoch,
            "{id} was not on {node}"
        );
        assert_eq!(
            assert_counted_exactly_once(id, &cluster.output(id)).len(),
            1
        );
    }
    // ... in `dory status`, and in the daemon's metrics.
    let table = cluster.dory_ok(&["status"]);
    assert!(table.contains("LAST FAILOVER"), "{table}");
    for id in &lost {
        let line = table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default();
        assert!(
            line.contains("restored #") && line.contains("ms old"),
            "{table}"
        );
    }
    let metrics = cluster.metrics();
    assert!(metrics.contains("dory_leader 1\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("dory_failovers_total {}\n", lost.len())),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "dory_failover_checkpoint_age_seconds_count {}\n",
            lost.len()
        )),
        "{metrics}"
    );
}

#[test]
fn an_edge_outage_fails_over_to_the_cloud_and_moves_back_once_stable() {
    let Some(counter) = counter_bin() else { return };
    let nodes = [
        NodeSpec {
            id: "edge-1",
            site: "edge",
        },
        NodeSpec {
            id: "cloud-1",
            site: "cloud",
        },
    ];
    let id = "sensor";
    let processors = counter_entry(id, "edge", &counter, CHECKPOINT_MS, STEP_MS, "");
    // Bounced 1 s into a 4 s stabilisation period: slack for a slow machine either way.
    let stabilisation_ms = 4000;
    let mut settings = FAST.to_vec();
    settings.push(("stabilisation", "4s"));
    let mut cluster = Cluster::build(&nodes, &settings, &processors);
    cluster.start_orchestrator();
    let on_edge = cluster.wait_for("running on the edge", Duration::from_secs(60), |s| {
        all_running(s, &[id]) && s[id].node.as_ref().is_some_and(|n| n.as_str() == "edge-1")
    });
    let e1 = on_edge[id].epoch.unwrap().0;
    std::thread::sleep(Duration::from_millis(CHECKPOINT_MS));

    // The edge goes: a failover to the cloud once the lease has run out.
    let killed_at = now_ms();
    cluster.dory_ok(&["node", "kill", "edge-1"]);
    let on_cloud = cluster.wait_for("failed over to the cloud", Duration::from_secs(30), |s| {
        all_running(s, &[id]) && s[id].node.as_ref().is_some_and(|n| n.as_str() == "cloud-1")
    });
    let e2 = on_cloud[id].epoch.unwrap().0;
    assert!(e2 > e1);
    let started = cluster.instance_started_at(id, e2).unwrap();
    assert!(
        started >= killed_at + 1000,
        "started {started}, killed {killed_at}"
    );
    assert!(
        on_cloud[id].last_failover.is_some(),
        "{:?}\n{}",
        on_cloud[id],
        cluster.logs()
    );

    // It comes back, then bounces before the stabilisation period is over: the processor
    // stays in the cloud throughout.
    cluster.dory_ok(&["node", "revive", "edge-1"]);
    std::thread::sleep(Duration::from_millis(stabilisation_ms / 4));
    let still = cluster.status();
    assert_eq!(still[id].epoch.map(|e| e.0), Some(e2), "{:?}", still[id]);
    cluster.dory_ok(&["node", "kill", "edge-1"]);
    std::thread::sleep(Duration::from_millis(300));
    let revived_at = now_ms();
    cluster.dory_ok(&["node", "revive", "edge-1"]);
    let back = cluster.wait_for("moved back to the edge", Duration::from_secs(30), |s| {
        // The move is over once the cloud instance is gone too (its status says when).
        all_running(s, &[id])
            && s[id].node.as_ref().is_some_and(|n| n.as_str() == "edge-1")
            && s[id].epoch.is_some_and(|e| e.0 > e2)
            && s[id].last_move_at.is_some()
    });
    let e3 = back[id].epoch.unwrap().0;
    let moved_at = back[id].last_move_at.expect("a planned move back").0;
    assert!(
        moved_at >= revived_at + stabilisation_ms,
        "moved back at {moved_at}, {} ms after the last revival (stabilisation {stabilisation_ms} ms)",
        moved_at.saturating_sub(revived_at)
    );
    assert_eq!(e3, e2 + 1, "one move back, nothing in between");
    std::thread::sleep(Duration::from_millis(CHECKPOINT_MS));
    let summary = assert_one_writer(id, &cluster.output(id));
    let epochs: Vec<u64> = summary.stretches.iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, [e1, e2, e3], "{:?}", summary.stretches);
    // The move back was planned: it picked up exactly where the cloud instance stopped.
    let (cloud, edge) = (&summary.stretches[1], &summary.stretches[2]);
    assert_eq!(edge.first, cloud.last + 1, "{:?}", summary.stretches);
    // Every copy is the failover's replay, none is the move's.
    assert_eq!(
        summary.copies as u64,
        summary.stretches[0].last - (cloud.first - 1)
    );
    let status = cluster.status();
    assert_eq!(status[id].epoch.map(|e| e.0), Some(e3), "no move since");
    let moves = cluster.event_times(id, "moved");
    assert_eq!(moves.len(), 1, "one planned move: {moves:?}");
}

#[test]
fn a_crash_loop_marks_the_processor_failed_with_the_reason() {
    let Some(counter) = counter_bin() else { return };
    let processors = format!(
        "{}[processors.broken]\nsite = \"cloud\"\n[processors.broken.workload]\ncommand = [\"/bin/sh\", \"-c\", \"exit 3\"]\n[processors.broken.restart]\nbackoff_initial = 100\ncrash_loop_failures = 3\ncrash_loop_window = 60000\n",
        counter_entry("healthy", "cloud", &counter, CHECKPOINT_MS, STEP_MS, "")
    );
    let mut cluster = Cluster::build(&CLOUD[..1], &FAST, &processors);
    cluster.start_orchestrator();
    let status = cluster.wait_for("the breaker to trip", Duration::from_secs(60), |s| {
        s.get("broken").is_some_and(|b| b.phase == "failed") && all_running(s, &["healthy"])
    });
    let broken = &status["broken"];
    let error = broken.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("crash loop") && error.contains("3 failures") && error.contains("exited(3)"),
        "{broken:?}"
    );
    // Three starts (the first and two restarts), then no more.
    let starts = cluster.event_times("broken", "started e");
    assert_eq!(starts.len(), 3, "{broken:?}\n{}", cluster.logs());
    assert_eq!(broken.restarts, 2, "{broken:?}");
    let highest = cluster.ownership("broken").unwrap().highest_epoch.0;
    let table = cluster.dory_ok(&["status"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("broken"))
        .unwrap_or_default();
    assert!(
        line.contains("failed") && line.contains("crash loop"),
        "{table}"
    );
    // Stopped for good: through a few restart delays (lease, margin, backoff), no new epoch.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cluster.event_times("broken", "started e").len(), 3);
    assert_eq!(
        cluster.ownership("broken").unwrap().highest_epoch.0,
        highest
    );
    assert_eq!(cluster.status()["broken"].phase, "failed");
    assert_eq!(
        cluster.status()["healthy"].epoch,
        status["healthy"].epoch,
        "the healthy processor was not touched"
    );
}
