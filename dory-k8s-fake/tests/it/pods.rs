//! Pod semantics: graceful deletion, garbage collection, the status subresource.

use std::collections::BTreeMap;
use std::time::Duration;

use dory_k8s_fake::{FakeApiServer, PodReport, PodTermination};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::{TestResult, bound_pod, eventually, meta, pod, server, status_of};

fn owned_secret(name: &str, owners: &[&Pod]) -> Secret {
    let refs = owners
        .iter()
        .map(|p| OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: p.name_any(),
            uid: p.uid().expect("created pods have a uid"),
            ..OwnerReference::default()
        })
        .collect();
    let mut m = meta(name);
    m.owner_references = Some(refs);
    Secret {
        metadata: m,
        string_data: None,
        data: Some(BTreeMap::new()),
        ..Secret::default()
    }
}

#[tokio::test]
async fn a_bound_pod_waits_for_the_kubelet() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    let created = pods
        .create(&PostParams::default(), &bound_pod("p", "n1"))
        .await?;
    let spec = created.spec.as_ref().unwrap();
    assert_eq!(spec.termination_grace_period_seconds, Some(30), "defaulted");
    assert_eq!(
        created.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let mut events = pods
        .watch(
            &WatchParams::default().disable_bookmarks(),
            &created.resource_version().unwrap(),
        )
        .await?
        .boxed();

    let answer = pods
        .delete("p", &DeleteParams::default().grace_period(20))
        .await?;
    let terminating = answer.left().expect("a pod delete answers with the pod");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(20));
    assert!(
        pods.get_opt("p").await?.is_some(),
        "still there until the kubelet confirms"
    );
    match events.next().await.unwrap()? {
        WatchEvent::Modified(p) => assert!(p.metadata.deletion_timestamp.is_some()),
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // A longer grace period does not extend it; a shorter one shortens it.
    let again = pods
        .delete("p", &DeleteParams::default().grace_period(60))
        .await?;
    assert_eq!(
        again.left().unwrap().metadata.deletion_grace_period_seconds,
        Some(20)
    );

    assert!(server.confirm_pod_deletion("default", "p")?);
    assert!(pods.get_opt("p").await?.is_none());
    match events.next().await.unwrap()? {
        WatchEvent::Deleted(p) => assert_eq!(p.name_any(), "p"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn unbound_pods_and_kubelet_less_servers_delete_at_once() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    pods.create(&PostParams::default(), &pod("unbound")).await?;
    let gone = pods.delete("unbound", &DeleteParams::default()).await?;
    assert!(
        gone.left().is_some(),
        "pods answer with the object even when gone"
    );
    assert!(pods.get_opt("unbound").await?.is_none());

    // Grace 0 through the API is the kubelet's confirmation.
    pods.create(&PostParams::default(), &bound_pod("forced", "n1"))
        .await?;
    pods.delete("forced", &DeleteParams::default().grace_period(0))
        .await?;
    assert!(pods.get_opt("forced").await?.is_none());

    let bare = FakeApiServer::builder()
        .pod_termination(PodTermination::Immediate)
        .start()
        .await?;
    let pods: Api<Pod> = Api::default_namespaced(bare.client()?);
    pods.create(&PostParams::default(), &bound_pod("p", "n1"))
        .await?;
    pods.delete("p", &DeleteParams::default()).await?;
    assert!(pods.get_opt("p").await?.is_none());

    let timed = FakeApiServer::builder()
        .pod_termination(PodTermination::AfterGracePeriod)
        .start()
        .await?;
    let pods: Api<Pod> = Api::default_namespaced(timed.client()?);
    pods.create(&PostParams::default(), &bound_pod("p", "n1"))
        .await?;
    pods.delete("p", &DeleteParams::default().grace_period(1))
        .await?;
    assert!(pods.get_opt("p").await?.is_some());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        pods.get_opt("p").await?.is_none(),
        "gone once the grace period ran out"
    );
    Ok(())
}

#[tokio::test]
async fn delete_preconditions() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    let p = pods.create(&PostParams::default(), &pod("p")).await?;
    let wrong_uid = DeleteParams::default().preconditions(kube::api::Preconditions {
        uid: Some("00000000-0000-4000-8000-000000000000".into()),
        resource_version: None,
    });
    let refused = status_of(pods.delete("p", &wrong_uid).await);
    assert_eq!(refused.code, 409);
    assert!(
        refused
            .message
            .starts_with("Precondition failed: UID in precondition"),
        "{}",
        refused.message
    );
    let stale = DeleteParams::default().preconditions(kube::api::Preconditions {
        uid: p.uid(),
        resource_version: Some("1".into()),
    });
    assert_eq!(status_of(pods.delete("p", &stale).await).code, 409);
    let right = DeleteParams::default().preconditions(kube::api::Preconditions {
        uid: p.uid(),
        resource_version: p.resource_version(),
    });
    pods.delete("p", &right).await?;
    Ok(())
}

#[tokio::test]
async fn owned_secrets_go_with_their_pod() -> TestResult {
    let server = server().await;
    let client = server.client()?;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let a = pods
        .create(&PostParams::default(), &bound_pod("a", "n1"))
        .await?;
    let b = pods
        .create(&PostParams::default(), &bound_pod("b", "n1"))
        .await?;
    secrets
        .create(&PostParams::default(), &owned_secret("only-a", &[&a]))
        .await?;
    secrets
        .create(&PostParams::default(), &owned_secret("a-and-b", &[&a, &b]))
        .await?;

    // A graceful delete is not a removal: dependents stay while the pod terminates.
    pods.delete("a", &DeleteParams::default()).await?;
    server.settle().await;
    assert!(secrets.get_opt("only-a").await?.is_some());

    assert!(server.confirm_pod_deletion("default", "a")?);
    eventually("the secret to be collected", || {
        server
            .get::<Secret>(Some("default"), "only-a")
            .is_ok_and(|s| s.is_none())
    })
    .await;
    server.settle().await;
    let shared = secrets.get("a-and-b").await?;
    let owners: Vec<_> = shared
        .owner_references()
        .iter()
        .map(|o| o.name.clone())
        .collect();
    assert_eq!(
        owners,
        ["b"],
        "a dependent with another owner only loses the reference"
    );

    // An owner reference that dangles from the start is collected too.
    let mut ghost = bound_pod("ghost", "n1");
    ghost.metadata.uid = Some("0badc0de-0000-4000-8000-000000000000".into());
    secrets
        .create(&PostParams::default(), &owned_secret("orphaned", &[&ghost]))
        .await?;
    server.settle().await;
    assert!(secrets.get_opt("orphaned").await?.is_none());

    // Orphan propagation keeps the dependent.
    pods.delete("b", &DeleteParams::orphan().grace_period(0))
        .await?;
    server.settle().await;
    let kept = secrets.get("a-and-b").await?;
    assert!(kept.owner_references().is_empty());
    Ok(())
}

#[tokio::test]
async fn status_is_a_separate_subresource() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    let created = pods
        .create(&PostParams::default(), &bound_pod("p", "n1"))
        .await?;

    // A main write cannot set status...
    let mut sneaky = created.clone();
    sneaky.status = Some(PodStatus {
        phase: Some("Running".into()),
        ..PodStatus::default()
    });
    sneaky.metadata.labels = Some(BTreeMap::from([("l".into(), "1".into())]));
    let stored = pods.replace("p", &PostParams::default(), &sneaky).await?;
    assert_eq!(
        stored.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(stored.labels()["l"], "1");

    // ...and a status write cannot change anything else.
    let patch = Patch::Merge(json!({
        "metadata": { "labels": { "l": "2" } },
        "spec": { "nodeName": "elsewhere" },
        "status": { "phase": "Running", "podIP": "10.0.0.1" }
    }));
    let stored = pods
        .patch_status("p", &PatchParams::default(), &patch)
        .await?;
    assert_eq!(
        stored.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(
        stored.spec.as_ref().unwrap().node_name.as_deref(),
        Some("n1")
    );
    assert_eq!(stored.labels()["l"], "1");
    assert_eq!(
        stored.metadata.generation,
        Some(1),
        "status writes leave the generation"
    );

    // A spec change bumps the generation.
    let spec = Patch::Merge(json!({ "spec": { "activeDeadlineSeconds": 5 } }));
    assert_eq!(
        pods.patch("p", &PatchParams::default(), &spec)
            .await?
            .metadata
            .generation,
        Some(2)
    );

    // The kubelet helper writes status directly; watchers and clients see it.
    server.report_pod("default", "p", &PodReport::running("10.0.0.9"))?;
    let status = pods.get_status("p").await?.status.unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.9"));
    let ready = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    Ok(())
}
