//! The eviction subresource under PodDisruptionBudgets.

use dory_k8s_fake::{FakeApiServer, PodReport};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, EvictParams, PostParams};
use std::collections::BTreeMap;

use crate::{TestResult, bound_pod, meta, server, status_of};

fn labelled(name: &str) -> Pod {
    let mut p = bound_pod(name, "n1");
    p.metadata.labels = Some(BTreeMap::from([("app".into(), "dory".into())]));
    p
}

fn budget(always_allow_unhealthy: bool) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta("dory"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(0)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "dory".into())])),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: always_allow_unhealthy.then(|| "AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

async fn setup(
    always_allow_unhealthy: bool,
) -> Result<(FakeApiServer, Api<Pod>), Box<dyn std::error::Error + Send + Sync>> {
    let server = server().await;
    // A 429 must come back as it is: kube's default client would retry it for minutes.
    let client = server.client_without_retries()?;
    let pdbs: Api<PodDisruptionBudget> = Api::default_namespaced(client.clone());
    pdbs.create(&PostParams::default(), &budget(always_allow_unhealthy))
        .await?;
    let pods: Api<Pod> = Api::default_namespaced(client);
    pods.create(&PostParams::default(), &labelled("p")).await?;
    Ok((server, pods))
}

#[tokio::test]
async fn a_budget_blocks_evicting_a_ready_pod() -> TestResult {
    let (server, pods) = setup(true).await?;
    server.report_pod("default", "p", &PodReport::running("10.0.0.1"))?;
    let refused = status_of(pods.evict("p", &EvictParams::default()).await);
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (429, "TooManyRequests")
    );
    assert_eq!(
        refused.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let causes = refused.details.unwrap().causes;
    assert_eq!(causes[0].reason, "DisruptionBudget");
    assert_eq!(
        causes[0].message,
        "The disruption budget dory needs 1 healthy pods and has 1 currently"
    );
    let p = pods.get("p").await?;
    assert!(
        p.metadata.deletion_timestamp.is_none(),
        "the pod is untouched"
    );
    Ok(())
}

#[tokio::test]
async fn unready_pods_go_under_always_allow_only() -> TestResult {
    let (server, pods) = setup(true).await?;
    server.report_pod("default", "p", &PodReport::running("10.0.0.1").not_ready())?;
    let ok = pods.evict("p", &EvictParams::default()).await?;
    assert_eq!(ok.code, 201);
    assert!(
        pods.get("p").await?.metadata.deletion_timestamp.is_some(),
        "evicted = deleted gracefully"
    );

    // The default policy (IfHealthyBudget) keeps an unready pod when the budget is not met.
    let (server, pods) = setup(false).await?;
    server.report_pod("default", "p", &PodReport::running("10.0.0.1").not_ready())?;
    assert_eq!(
        status_of(pods.evict("p", &EvictParams::default()).await).code,
        429
    );
    Ok(())
}

#[tokio::test]
async fn pending_pods_and_pods_without_a_budget_are_evicted() -> TestResult {
    let (server, pods) = setup(false).await?;
    // A pending pod is not protected by any budget.
    pods.evict("p", &EvictParams::default()).await?;
    assert!(pods.get("p").await?.metadata.deletion_timestamp.is_some());

    let mut free = bound_pod("free", "n1");
    free.metadata.labels = Some(BTreeMap::from([("app".into(), "other".into())]));
    pods.create(&PostParams::default(), &free).await?;
    server.report_pod("default", "free", &PodReport::running("10.0.0.2"))?;
    pods.evict("free", &EvictParams::default()).await?;
    assert!(
        pods.get("free")
            .await?
            .metadata
            .deletion_timestamp
            .is_some()
    );

    assert_eq!(
        status_of(pods.evict("absent", &EvictParams::default()).await).code,
        404
    );
    Ok(())
}

#[tokio::test]
async fn two_budgets_over_one_pod_are_an_internal_error() -> TestResult {
    let (server, pods) = setup(false).await?;
    server.report_pod("default", "p", &PodReport::running("10.0.0.1"))?;
    let mut second = budget(false);
    second.metadata.name = Some("second".into());
    let pdbs: Api<PodDisruptionBudget> = Api::default_namespaced(server.client()?);
    pdbs.create(&PostParams::default(), &second).await?;
    assert_eq!(
        status_of(pods.evict("p", &EvictParams::default()).await).code,
        500
    );
    Ok(())
}
