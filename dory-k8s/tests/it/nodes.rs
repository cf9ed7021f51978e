//! Nodes and their signals as the placement reports them, through the node watch.

use std::time::Duration;

use dory_core::{InterruptionReason, Phase, Placement, Site, Timestamp};
use dory_k8s::KubePlacement;

use crate::support::*;

async fn node(placement: &KubePlacement, name: &str) -> dory_core::Node {
    placement
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.id.as_str() == name)
        .expect("the node is listed")
}

async fn wait_node(
    placement: &KubePlacement,
    name: &str,
    what: &str,
    done: impl Fn(&dory_core::Node) -> bool,
) -> dory_core::Node {
    eventually(10, what, || async {
        let n = node(placement, name).await;
        done(&n).then_some(n)
    })
    .await
}

#[tokio::test]
async fn nodes_carry_site_readiness_and_their_interruptions() {
    let server = server().await;
    server
        .add_node("edge-1", &[("dory.io/site", "edge")])
        .unwrap();
    server.add_node("cloud-1", &[]).unwrap();
    let placement = placement(&server).await;
    let nodes = placement.nodes().await.unwrap();
    let names: Vec<_> = nodes.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(names, ["cloud-1", "edge-1"], "sorted by name");
    assert_eq!(nodes[1].site, Site::Edge);
    assert_eq!(nodes[0].site, Site::Cloud);
    assert!(
        nodes
            .iter()
            .all(|n| n.ready && n.schedulable && n.interruption.is_none())
    );

    // kubectl cordon / drain.
    server.cordon_node("edge-1", true).unwrap();
    let n = wait_node(&placement, "edge-1", "the cordon is seen", |n| {
        !n.schedulable
    })
    .await;
    assert_eq!(
        n.interruption.map(|i| (i.reason, i.deadline)),
        Some((InterruptionReason::Drain, None))
    );
    server.cordon_node("edge-1", false).unwrap();
    wait_node(&placement, "edge-1", "the uncordon is seen", |n| {
        n.schedulable && n.interruption.is_none()
    })
    .await;

    // An AWS spot interruption notice: two minutes from when it was first seen (NTH's taint
    // is NoSchedule, which carries no timeAdded).
    let before = dory_core::SystemClock.now_ms();
    server
        .taint_node(
            "cloud-1",
            "aws-node-termination-handler/spot-itn",
            Some("1700000000"),
            "NoSchedule",
        )
        .unwrap();
    let n = wait_node(&placement, "cloud-1", "the spot notice is seen", |n| {
        n.interruption.is_some()
    })
    .await;
    let i = n.interruption.unwrap();
    assert_eq!(i.reason, InterruptionReason::SpotReclaim);
    let deadline = i.deadline.expect("a deadline");
    assert!(
        deadline >= Timestamp(before + 120_000) && deadline <= Timestamp(before + 125_000),
        "{deadline} vs seen at {before}"
    );
    // Looked at again later, the deadline does not slide.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.set_node_ready("edge-1", "True").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        node(&placement, "cloud-1")
            .await
            .interruption
            .unwrap()
            .deadline,
        Some(deadline)
    );

    // Karpenter's disruption taint.
    server
        .taint_node("edge-1", "karpenter.sh/disrupted", None, "NoSchedule")
        .unwrap();
    let n = wait_node(&placement, "edge-1", "karpenter's taint is seen", |n| {
        n.interruption.is_some()
    })
    .await;
    assert_eq!(
        n.interruption.unwrap().reason,
        InterruptionReason::Disruption
    );

    // Not ready, then unreachable: the node is not ready; the planner's grace does the rest.
    server.set_node_ready("edge-1", "False").unwrap();
    let n = wait_node(&placement, "edge-1", "not ready is seen", |n| !n.ready).await;
    assert!(n.ready_since.0 > 0);
    server.set_node_ready("edge-1", "Unknown").unwrap();
    server.set_node_ready("edge-1", "True").unwrap();
    wait_node(&placement, "edge-1", "ready again", |n| n.ready).await;
}

#[tokio::test]
async fn an_instance_whose_node_object_is_gone_is_failed() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    placement
        .launch(&request("lost", 1, "node-a", mode_restore()))
        .await
        .unwrap();
    let _standin = run_pod(&server, "lost", 1, Phase::Running).await;
    wait_phase(&placement, "lost", 1, Phase::Running).await;
    server
        .delete::<k8s_openapi::api::core::v1::Node>(None, "node-a")
        .unwrap();
    let i = eventually(10, "the instance is failed", || async {
        instance(&placement, "lost", 1)
            .await
            .filter(|i| i.phase.is_gone())
    })
    .await;
    assert!(
        matches!(i.phase, Phase::Failed { ref reason } if reason.contains("node-a")),
        "{:?}",
        i.phase
    );
}

trait NowMs {
    fn now_ms(&self) -> u64;
}

impl NowMs for dory_core::SystemClock {
    fn now_ms(&self) -> u64 {
        use dory_core::Clock;
        self.now().0
    }
}
