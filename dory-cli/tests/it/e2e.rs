//! Real orchestrators moving real counter processes, on the embedded default and on the
//! Postgres store with the RabbitMQ publisher.

use std::time::Duration;

use crate::support::{
    Backends, Cluster, NodeSpec, all_running, assert_counted_exactly_once, counter_bin,
};

const NODES: [NodeSpec; 3] = [
    NodeSpec {
        id: "cloud-1",
        site: "cloud",
    },
    NodeSpec {
        id: "cloud-2",
        site: "cloud",
    },
    NodeSpec {
        id: "edge-1",
        site: "edge",
    },
];

#[test]
fn drain_moves_every_processor_with_no_gap_and_no_duplicate() {
    drain_moves_every_processor(Backends::Embedded);
}

#[test]
fn drain_moves_every_processor_on_postgres_and_rabbitmq() {
    drain_moves_every_processor(Backends::PostgresRabbitmq);
}

fn drain_moves_every_processor(backends: Backends) {
    let Some(counter) = counter_bin() else { return };
    let ids = ["alpha", "beta", "gamma"];
    let Some(mut cluster) = Cluster::new_on(
        backends,
        &NODES,
        &[("alpha", "cloud"), ("beta", "cloud"), ("gamma", "cloud")],
        &counter,
    ) else {
        return;
    };
    cluster.start_orchestrator();
    let status = cluster.wait_for("every counter running", Duration::from_secs(60), |s| {
        all_running(s, &ids)
    });
    // Drain the node running the most of them.
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for s in status.values() {
        *per_node
            .entry(s.node.as_ref().unwrap().to_string())
            .or_default() += 1;
    }
    let (node, on_node) = per_node.into_iter().max_by_key(|(_, n)| *n).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let out = cluster.dory(&["drain", &node, "--deadline", "60s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drain failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    assert!(stdout.contains(&format!("{node} is empty")), "{stdout}");
    assert_eq!(stdout.matches(": moved to ").count(), on_node, "{stdout}");

    let after = cluster.wait_for(
        "every counter running elsewhere",
        Duration::from_secs(30),
        |s| {
            all_running(s, &ids)
                && ids
                    .iter()
                    .all(|id| s[*id].node.as_ref().is_some_and(|n| n.as_str() != node))
        },
    );
    // Let them count on the new nodes, then check every output from the first count.
    std::thread::sleep(Duration::from_millis(800));
    for id in ids {
        let moved = status[id].node.as_ref().is_some_and(|n| n.as_str() == node);
        let epochs = assert_counted_exactly_once(id, &cluster.output(id));
        if moved {
            assert_eq!(epochs.len(), 2, "{id} moved once: {epochs:?}");
            assert!(
                after[id].last_move_pause_ms.is_some(),
                "{id}: {:?}",
                after[id]
            );
        } else {
            assert_eq!(epochs.len(), 1, "{id} did not move: {epochs:?}");
        }
    }
    // The cordon is an intent in the embedded database: `dory nodes` shows it.
    let nodes = cluster.dory(&["nodes"]);
    let text = String::from_utf8_lossy(&nodes.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&node))
        .unwrap_or_default();
    assert!(line.contains("cordoned"), "{text}");
}

#[test]
fn a_restarted_orchestrator_re_adopts_every_instance() {
    a_restarted_orchestrator_re_adopts(Backends::Embedded);
}

#[test]
fn a_restarted_orchestrator_re_adopts_every_instance_on_postgres_and_rabbitmq() {
    a_restarted_orchestrator_re_adopts(Backends::PostgresRabbitmq);
}

fn a_restarted_orchestrator_re_adopts(backends: Backends) {
    let Some(counter) = counter_bin() else { return };
    let ids = ["one", "two"];
    let Some(mut cluster) = Cluster::new_on(
        backends,
        &NODES,
        &[("one", "cloud"), ("two", "edge")],
        &counter,
    ) else {
        return;
    };
    cluster.start_orchestrator();
    let before = cluster.wait_for("both running", Duration::from_secs(60), |s| {
        all_running(s, &ids)
    });
    cluster.kill_orchestrator();
    std::thread::sleep(Duration::from_secs(1));
    cluster.start_orchestrator();
    // A new leader writes status again once it has observed the instances it found.
    std::thread::sleep(Duration::from_secs(3));
    let after = cluster.wait_for("both running", Duration::from_secs(30), |s| {
        all_running(s, &ids)
    });
    for id in ids {
        assert_eq!(
            before[id].epoch, after[id].epoch,
            "{id} was restarted or moved"
        );
        assert_eq!(before[id].node, after[id].node, "{id} was moved");
        let epochs = assert_counted_exactly_once(id, &cluster.output(id));
        assert_eq!(epochs.len(), 1, "{id}: {epochs:?}");
    }
}
