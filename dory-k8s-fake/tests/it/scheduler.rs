//! The minimal scheduler: pods pinned to a node by hostname affinity.

use std::time::Duration;

use dory_k8s_fake::FakeApiServer;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use kube::api::{Api, PostParams};

use crate::{TestResult, eventually, pod};

fn pinned(name: &str, node: &str) -> Pod {
    let mut p = pod(name);
    p.spec.as_mut().unwrap().affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "kubernetes.io/hostname".into(),
                        operator: "In".into(),
                        values: Some(vec![node.into()]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    });
    p
}

fn node_of(server: &FakeApiServer, name: &str) -> Option<String> {
    server
        .get::<Pod>(Some("default"), name)
        .ok()
        .flatten()
        .and_then(|p| p.spec)
        .and_then(|s| s.node_name)
}

fn scheduled_condition(server: &FakeApiServer, name: &str) -> Option<(String, Option<String>)> {
    let pod = server.get::<Pod>(Some("default"), name).ok().flatten()?;
    pod.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .map(|c| (c.status, c.reason))
}

#[tokio::test]
async fn pinned_pods_bind_when_their_node_can_take_them() -> TestResult {
    let server = FakeApiServer::builder().scheduler(true).start().await?;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    server.add_node("n1", &[("dory.io/site", "edge")])?;
    server.add_node("n2", &[])?;
    let nodes: Api<Node> = Api::all(server.client()?);
    assert_eq!(
        nodes.get("n1").await?.metadata.labels.unwrap()["dory.io/site"],
        "edge"
    );

    pods.create(&PostParams::default(), &pinned("p1", "n1"))
        .await?;
    server.settle().await;
    assert_eq!(node_of(&server, "p1").as_deref(), Some("n1"));
    assert_eq!(
        scheduled_condition(&server, "p1"),
        Some(("True".into(), None))
    );

    // A cordoned node refuses new pods until uncordoned.
    server.cordon_node("n2", true)?;
    pods.create(&PostParams::default(), &pinned("p2", "n2"))
        .await?;
    server.settle().await;
    assert_eq!(node_of(&server, "p2"), None);
    assert_eq!(
        scheduled_condition(&server, "p2"),
        Some(("False".into(), Some("Unschedulable".into())))
    );
    server.cordon_node("n2", false)?;
    server.settle().await;
    assert_eq!(node_of(&server, "p2").as_deref(), Some("n2"));

    // A taint the pod does not tolerate refuses it; a missing node too, until it appears.
    server.taint_node("n1", "karpenter.sh/disrupted", None, "NoSchedule")?;
    pods.create(&PostParams::default(), &pinned("p3", "n1"))
        .await?;
    pods.create(&PostParams::default(), &pinned("p4", "n3"))
        .await?;
    server.settle().await;
    assert_eq!(
        (node_of(&server, "p3"), node_of(&server, "p4")),
        (None, None)
    );
    server.untaint_node("n1", "karpenter.sh/disrupted")?;
    server.add_node("n3", &[])?;
    eventually("both to bind", || {
        node_of(&server, "p3").as_deref() == Some("n1")
            && node_of(&server, "p4").as_deref() == Some("n3")
    })
    .await;

    // Pods without a pin are left for someone else.
    pods.create(&PostParams::default(), &pod("free")).await?;
    server.settle().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(node_of(&server, "free"), None);
    assert_eq!(scheduled_condition(&server, "free"), None);
    Ok(())
}
