//! Node operations, played from another process's point of view (`LocalNodes` on the state
//! directory) while a placement runs.

use std::time::Duration;

use dory_core::{Clock, Error, InterruptionReason, NodeId, Phase, Placement, SystemClock};
use dory_local::LocalNodes;

use crate::support::{Scratch, cloud, edge, ended, file, request, running, spec};

async fn node(placement: &dory_local::LocalPlacement, id: &NodeId) -> dory_core::Node {
    placement
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| &n.id == id)
        .unwrap()
}

/// Waits (bounded) until the node satisfies `check`.
async fn node_until(
    placement: &dory_local::LocalPlacement,
    id: &NodeId,
    what: &str,
    check: impl Fn(&dory_core::Node) -> bool,
) -> dory_core::Node {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = node(placement, id).await;
        if check(&n) {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {id} {what}: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_kills_every_instance_on_it_and_reports_them_failed() {
    let scratch = Scratch::new("kill-node");
    let placement = scratch.open();
    let mut programs = Vec::new();
    for (name, node) in [("a", edge()), ("b", edge()), ("c", cloud())] {
        let pidfile = scratch.dir.join(format!("{name}.pid"));
        let s = spec(
            name,
            // A child of its own, to show the whole group dies.
            "sleep 30 & echo $$ $! > \"$PIDFILE\"; wait",
            &[("PIDFILE", &pidfile.display().to_string())],
        );
        placement.launch(&request(&s, 1, &node)).await.unwrap();
        let pids: Vec<u32> = file(&pidfile)
            .await
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        programs.push((name, pids));
    }
    let mut changes = placement.changes();

    // Another process (`dory` or a test) kills the node.
    let killed = LocalNodes::new(scratch.state_dir())
        .kill_node(&edge())
        .unwrap();
    let mut names: Vec<_> = killed.iter().map(|(p, _)| p.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    // SIGKILL is delivered when the process next runs: on a loaded machine that may be a
    // little after `kill_node` returns, so wait (bounded) for the killed ones to be gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for (name, pids) in &programs {
        let expect_alive = *name == "c";
        for pid in pids {
            while running(*pid) != expect_alive && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(running(*pid), expect_alive, "{name}: pid {pid}");
        }
    }
    tokio::time::timeout(Duration::from_secs(2), changes.changed())
        .await
        .expect("the kill nudges");
    for name in ["a", "b"] {
        match ended(&placement, name, 1).await {
            Phase::Failed { reason } => {
                assert!(reason.contains("node edge-1 was killed"), "{reason}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    let down = node_until(&placement, &edge(), "not ready", |n| !n.ready).await;
    assert!(!down.ready);
    assert!(node(&placement, &cloud()).await.ready);
    assert_eq!(
        crate::support::instance(&placement, "c", 1)
            .await
            .unwrap()
            .phase,
        Phase::Starting
    );
    // Nothing starts on a dead node.
    let err = placement
        .launch(&request(&spec("d", "exec sleep 30", &[]), 1, &edge()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(_)) && err.to_string().contains("edge-1"),
        "{err}"
    );

    placement.revive_node(&edge()).unwrap();
    let up = node(&placement, &edge()).await;
    assert!(up.ready && up.schedulable && up.interruption.is_none());
    assert!(up.ready_since >= down.ready_since);
    placement
        .launch(&request(&spec("d", "exec sleep 30", &[]), 1, &edge()))
        .await
        .unwrap();
    // The revived node is empty: the killed instances stay failed.
    assert!(matches!(
        crate::support::instance(&placement, "a", 1)
            .await
            .unwrap()
            .phase,
        Phase::Failed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_is_an_interruption_with_its_deadline_and_kills_the_node_then() {
    let scratch = Scratch::new("spot");
    let placement = scratch.open();
    placement
        .launch(&request(&spec("spot", "exec sleep 30", &[]), 1, &edge()))
        .await
        .unwrap();
    let deadline = SystemClock.now().plus(Duration::from_millis(800));
    LocalNodes::new(scratch.state_dir())
        .spot_notice(&edge(), deadline)
        .unwrap();
    let noticed = node_until(&placement, &edge(), "interrupted", |n| {
        n.interruption.is_some()
    })
    .await;
    let interruption = noticed.interruption.unwrap();
    assert_eq!(interruption.reason, InterruptionReason::SpotReclaim);
    assert_eq!(interruption.deadline, Some(deadline));
    assert!(!noticed.schedulable);
    assert!(noticed.ready, "still up until the deadline");
    assert_eq!(
        crate::support::instance(&placement, "spot", 1)
            .await
            .unwrap()
            .phase,
        Phase::Starting
    );

    match ended(&placement, "spot", 1).await {
        Phase::Failed { reason } => assert!(reason.contains("edge-1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(SystemClock.now() >= deadline);
    assert!(!node(&placement, &edge()).await.ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_drain_and_uncordon_show_in_the_nodes() {
    let scratch = Scratch::new("cordon");
    let placement = scratch.open();
    let fresh = placement.nodes().await.unwrap();
    assert_eq!(
        fresh.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        ["cloud-1", "edge-1"],
        "sorted by id"
    );
    assert!(
        fresh
            .iter()
            .all(|n| n.schedulable && n.ready && n.interruption.is_none())
    );
    let edge_node = node(&placement, &edge()).await;
    assert_eq!(edge_node.site, dory_core::Site::Edge);
    assert_eq!(edge_node.capacity, dory_core::Resources::new(2000, 1024));

    let mut changes = placement.changes();
    let other_process = LocalNodes::new(scratch.state_dir());
    other_process.cordon(&edge()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), changes.changed())
        .await
        .expect("a cordon from another process nudges");
    let cordoned = node_until(&placement, &edge(), "cordoned", |n| !n.schedulable).await;
    assert!(cordoned.interruption.is_none() && cordoned.ready);

    placement.drain(&edge()).unwrap();
    let draining = node(&placement, &edge()).await;
    assert_eq!(
        draining.interruption.map(|i| (i.reason, i.deadline)),
        Some((InterruptionReason::Drain, None))
    );
    placement.uncordon(&edge()).unwrap();
    let back = node(&placement, &edge()).await;
    assert!(back.schedulable && back.interruption.is_none());

    let err = placement.cordon(&NodeId::new("nowhere")).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
    let err = other_process.cordon(&NodeId::new("../escape")).unwrap_err();
    assert!(err.to_string().contains("escape"), "{err}");
}
