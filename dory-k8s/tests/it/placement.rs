//! `KubePlacement` through a real `kube::Client` against the fake API server: launches,
//! conflicts, termination, adoption by a restarted orchestrator, the PodDisruptionBudget,
//! retries, watch expiry and the quiet steady state.

use std::time::Duration;

use dory_core::{Epoch, InstanceControl, LaunchMode, Phase, Placement};
use dory_k8s_fake::{Fault, Verb};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::support::*;

#[tokio::test]
async fn a_launch_creates_a_pinned_pod_and_the_secret_it_owns() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    let launched = placement
        .launch(&request("counter", 1, "node-a", LaunchMode::Standby))
        .await
        .unwrap();
    assert_eq!(launched.phase, Phase::Starting);
    assert_eq!(launched.endpoint, None);

    let pod: Pod = server.get(Some(NS), "counter-1").unwrap().expect("the pod");
    let secret: Secret = server
        .get(Some(NS), "counter-1")
        .unwrap()
        .expect("the secret");
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        owner.uid,
        pod.metadata.uid.clone().unwrap(),
        "the pod owns its Secret"
    );
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let pod_json = serde_json::to_string(&pod).unwrap();
    assert!(
        !pod_json.contains(&token),
        "no token in the pod spec: {pod_json}"
    );
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["dory.io/processor-id"], "counter");
    assert_eq!(labels["dory.io/epoch"], "1");
    let spec = pod.spec.as_ref().unwrap();
    // Bound by the scheduler through the required hostname affinity, not by Dory.
    eventually(5, "the scheduler binds the pod", || async {
        server
            .get::<Pod>(Some(NS), "counter-1")
            .unwrap()
            .and_then(|p| p.spec.and_then(|s| s.node_name))
            .filter(|n| n == "node-a")
    })
    .await;
    let pin = &spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("a required node affinity")
        .node_selector_terms[0]
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(pin.key, "kubernetes.io/hostname");

    // The kubelet runs it: the standby phase comes from its own /healthz.
    let standin = run_pod(&server, "counter", 1, Phase::Standby).await;
    let instance = wait_phase(&placement, "counter", 1, Phase::Standby).await;
    let endpoint = instance.endpoint.expect("an endpoint");
    assert_eq!(endpoint.address, format!("{}:{}", standin.ip, sdk_port()));
    assert_eq!(endpoint.token, token);

    // Resumed through the placement's control: seen as running, then no more checks.
    let control = placement.control();
    control
        .resume(&instance_of(&placement, "counter", 1).await)
        .await
        .unwrap();
    wait_phase(&placement, "counter", 1, Phase::Running).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = standin
        .health_calls
        .load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        standin
            .health_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        calls,
        "a settled running instance is not polled"
    );
}

async fn instance_of(p: &dory_k8s::KubePlacement, id: &str, epoch: u64) -> dory_core::Instance {
    instance(p, id, epoch)
        .await
        .expect("the instance is listed")
}

#[tokio::test]
async fn a_duplicate_launch_is_a_conflict_and_starts_nothing() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    let r = request("dup", 4, "node-a", LaunchMode::Restore);
    placement.launch(&r).await.unwrap();
    let err = placement.launch(&r).await.unwrap_err();
    assert!(matches!(err, dory_core::Error::Conflict(_)), "{err}");
    assert_eq!(server.list::<Pod>(Some(NS)).unwrap().len(), 1);
}

#[tokio::test]
async fn terminate_deletes_gracefully_and_is_idempotent() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    placement
        .launch(&request("t", 1, "node-a", mode_restore()))
        .await
        .unwrap();
    let _standin = run_pod(&server, "t", 1, Phase::Running).await;
    wait_phase(&placement, "t", 1, Phase::Running).await;
    placement
        .terminate(&pid("t"), Epoch(1), Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(
        instance_of(&placement, "t", 1).await.phase,
        Phase::Terminating
    );
    let pod: Pod = server
        .get(Some(NS), "t-1")
        .unwrap()
        .expect("still there until the kubelet confirms");
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert_eq!(
        pod.metadata.deletion_grace_period_seconds,
        Some(2),
        "grace rounded up"
    );
    // Again: no error, nothing new.
    placement
        .terminate(&pid("t"), Epoch(1), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(server.confirm_pod_deletion(NS, "t-1").unwrap());
    eventually(5, "the instance is gone", || async {
        instance(&placement, "t", 1).await.is_none().then_some(())
    })
    .await;
    server.settle().await;
    assert!(
        server.get::<Secret>(Some(NS), "t-1").unwrap().is_none(),
        "the Secret went with its pod"
    );
    placement
        .terminate(&pid("t"), Epoch(1), Duration::from_secs(2))
        .await
        .expect("terminating a gone instance is fine");
}

#[tokio::test]
async fn an_exited_pod_is_reported_with_its_code_until_forgotten() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    placement
        .launch(&request("x", 2, "node-a", mode_restore()))
        .await
        .unwrap();
    let _standin = run_pod(&server, "x", 2, Phase::Running).await;
    wait_phase(&placement, "x", 2, Phase::Running).await;
    let err = placement.forget(&pid("x"), Epoch(2)).await.unwrap_err();
    assert!(matches!(err, dory_core::Error::Conflict(_)), "{err}");
    server
        .modify::<Pod>(Some(NS), "x-2", |pod| {
            let status = pod.status.get_or_insert_with(Default::default);
            status.phase = Some("Failed".into());
            status.container_statuses = Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
                name: "processor".into(),
                state: Some(k8s_openapi::api::core::v1::ContainerState {
                    terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                        exit_code: 101,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        })
        .unwrap();
    wait_phase(&placement, "x", 2, Phase::Exited { code: 101 }).await;
    placement.forget(&pid("x"), Epoch(2)).await.unwrap();
    assert!(instance(&placement, "x", 2).await.is_none());
    eventually(5, "the ended pod is deleted", || async {
        server
            .get::<Pod>(Some(NS), "x-2")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_orchestrator_adopts_every_instance_with_its_token_and_phase() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let first = placement(&server).await;
    first
        .launch(&request("a", 1, "node-a", mode_restore()))
        .await
        .unwrap();
    first
        .launch(&request("b", 3, "node-a", LaunchMode::Standby))
        .await
        .unwrap();
    let _a = run_pod(&server, "a", 1, Phase::Running).await;
    let _b = run_pod(&server, "b", 3, Phase::Standby).await;
    let before = wait_phase(&first, "b", 3, Phase::Standby).await;
    drop(first);

    let second = placement(&server).await;
    let instances = second.instances().await.unwrap();
    let phases: Vec<_> = instances
        .iter()
        .map(|i| (i.processor.to_string(), i.epoch.0))
        .collect();
    assert_eq!(phases, [("a".to_string(), 1), ("b".to_string(), 3)]);
    let a = wait_phase(&second, "a", 1, Phase::Running).await;
    let b = wait_phase(&second, "b", 3, Phase::Standby).await;
    assert_eq!(
        b.endpoint, before.endpoint,
        "the token is read back from the Secret"
    );
    assert!(a.endpoint.is_some());
}

#[tokio::test]
async fn one_pod_disruption_budget_is_created_once_and_kept() {
    let server = server().await;
    let _first = placement(&server).await;
    let _second = placement(&server).await;
    let budgets = server.list::<PodDisruptionBudget>(Some(NS)).unwrap();
    assert_eq!(budgets.len(), 1);
    let spec = budgets[0].spec.clone().unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    assert_eq!(
        server.request_count(Verb::Create, "poddisruptionbudgets"),
        2
    );
    // Deleted by hand: put back.
    server
        .delete::<PodDisruptionBudget>(Some(NS), "dory-processors")
        .unwrap();
    eventually(10, "the budget is re-created", || async {
        server
            .get::<PodDisruptionBudget>(Some(NS), "dory-processors")
            .unwrap()
            .map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn the_budget_holds_off_an_eviction_while_dory_has_not_moved_the_pod() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    placement
        .launch(&request("e", 1, "node-a", mode_restore()))
        .await
        .unwrap();
    let _standin = run_pod(&server, "e", 1, Phase::Running).await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(server.client_without_retries().unwrap(), NS);
    let err = pods
        .evict("e-1", &kube::api::EvictParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 429),
        "a drain's eviction waits: {err}"
    );
}

#[tokio::test]
async fn transient_write_failures_are_retried_with_backoff() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    server.fail_next(Verb::Create, "pods", 500, 2);
    server.inject(
        Fault::new(429)
            .verb(Verb::Create)
            .resource("secrets")
            .times(1)
            .retry_after(0),
    );
    placement
        .launch(&request("r", 1, "node-a", mode_restore()))
        .await
        .expect("retried through a 500, a 500 and a 429");
    assert_eq!(server.list::<Pod>(Some(NS)).unwrap().len(), 1);
    assert!(server.get::<Secret>(Some(NS), "r-1").unwrap().is_some());
    // More failures than attempts: a retryable error, and the pod is not left behind
    // without its Secret.
    server.fail_next(Verb::Create, "pods", 503, 10);
    let err = placement
        .launch(&request("r", 2, "node-a", mode_restore()))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    server.clear_faults();
}

#[tokio::test]
async fn an_expired_watch_resyncs_without_duplicate_actions() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    placement
        .launch(&request("w", 1, "node-a", mode_restore()))
        .await
        .unwrap();
    let _standin = run_pod(&server, "w", 1, Phase::Running).await;
    wait_phase(&placement, "w", 1, Phase::Running).await;
    let creates = server.request_count(Verb::Create, "pods");
    let lists = server.request_count(Verb::List, "pods");
    server.expire_watches();
    // A change made while the watch is being re-established is still seen.
    server.cordon_node("node-a", true).unwrap();
    eventually(10, "the pod watch lists again after 410", || async {
        (server.request_count(Verb::List, "pods") > lists).then_some(())
    })
    .await;
    eventually(10, "the cordon is seen", || async {
        placement
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .find(|n| !n.schedulable)
            .map(|_| ())
    })
    .await;
    let instances = placement.instances().await.unwrap();
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].phase, Phase::Running);
    assert_eq!(
        server.request_count(Verb::Create, "pods"),
        creates,
        "nothing launched again"
    );
}

#[tokio::test]
async fn a_steady_state_makes_no_requests_beyond_watches() {
    let server = server().await;
    server.add_node("node-a", &[]).unwrap();
    let placement = placement(&server).await;
    let mut standins = Vec::new();
    for i in 1..=5 {
        let id = format!("s{i}");
        placement
            .launch(&request(&id, 1, "node-a", mode_restore()))
            .await
            .unwrap();
        standins.push(run_pod(&server, &id, 1, Phase::Running).await);
    }
    for i in 1..=5 {
        wait_phase(&placement, &format!("s{i}"), 1, Phase::Running).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mark = server.mark();
    for _ in 0..20 {
        placement.instances().await.unwrap();
        placement.nodes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = server.non_watch_requests_since(mark);
    assert!(requests.is_empty(), "{requests:?}");
}
