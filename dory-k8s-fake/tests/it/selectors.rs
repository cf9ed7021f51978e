//! Label and field selectors on lists.

use std::collections::BTreeMap;

use dory_k8s_fake::PodReport;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};

use crate::{TestResult, bound_pod, pod, server, status_of};

fn with_labels(mut p: Pod, labels: &[(&str, &str)]) -> Pod {
    p.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    p
}

async fn names(api: &Api<Pod>, lp: &ListParams) -> Vec<String> {
    api.list(lp)
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect()
}

#[tokio::test]
async fn label_and_field_selectors() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client_without_retries()?);
    for p in [
        with_labels(
            bound_pod("a", "n1"),
            &[("dory.io/processor-id", "x"), ("tier", "edge")],
        ),
        with_labels(bound_pod("b", "n2"), &[("dory.io/processor-id", "y")]),
        with_labels(pod("c"), &[("other", "z")]),
    ] {
        pods.create(&PostParams::default(), &p).await?;
    }
    server.report_pod("default", "a", &PodReport::running("10.0.0.1"))?;

    let cases = [
        ("dory.io/processor-id", vec!["a", "b"]),
        ("!dory.io/processor-id", vec!["c"]),
        ("dory.io/processor-id=x", vec!["a"]),
        ("dory.io/processor-id==y", vec!["b"]),
        ("dory.io/processor-id!=x", vec!["b", "c"]),
        ("dory.io/processor-id in (x, y)", vec!["a", "b"]),
        ("dory.io/processor-id notin (x)", vec!["b", "c"]),
        ("dory.io/processor-id,tier=edge", vec!["a"]),
    ];
    for (selector, want) in cases {
        assert_eq!(
            names(&pods, &ListParams::default().labels(selector)).await,
            want,
            "{selector}"
        );
    }
    let fields = [
        ("spec.nodeName=n1", vec!["a"]),
        ("spec.nodeName=", vec!["c"]),
        ("spec.nodeName!=n1", vec!["b", "c"]),
        ("status.phase=Running", vec!["a"]),
        ("status.phase=Pending", vec!["b", "c"]),
        ("metadata.name=b", vec!["b"]),
        (
            "metadata.namespace=default,metadata.name!=a",
            vec!["b", "c"],
        ),
    ];
    for (selector, want) in fields {
        assert_eq!(
            names(&pods, &ListParams::default().fields(selector)).await,
            want,
            "{selector}"
        );
    }
    let unsupported = status_of(
        pods.list(&ListParams::default().fields("spec.image=x"))
            .await,
    );
    assert_eq!(
        (unsupported.code, unsupported.message.as_str()),
        (400, "field label not supported: spec.image")
    );
    let malformed = status_of(pods.list(&ListParams::default().labels("a in (b")).await);
    assert_eq!(malformed.code, 400);

    server.add_node("n1", &[])?;
    server.add_node("n2", &[])?;
    server.cordon_node("n2", true)?;
    let nodes: Api<Node> = Api::all(server.client()?);
    let cordoned = nodes
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await?;
    assert_eq!(cordoned.items.len(), 1);
    Ok(())
}
