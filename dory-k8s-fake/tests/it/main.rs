//! Integration tests of the fake API server through a real `kube::Client`.

mod crud;
mod eviction;
mod hooks;
mod leases;
mod pods;
mod scale;
mod scheduler;
mod selectors;
mod watch;

use std::time::Duration;

use dory_k8s_fake::FakeApiServer;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::ObjectMeta;
use kube::core::Status;

/// What every test returns.
pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A server with bookmarks frequent enough for tests to see them.
pub async fn server() -> FakeApiServer {
    FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await
        .expect("the fake API server starts")
}

/// Metadata with just a name.
pub fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}

/// A pod with one container, not bound to a node.
pub fn pod(name: &str) -> Pod {
    Pod {
        metadata: meta(name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("busybox".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A pod already bound to `node`.
pub fn bound_pod(name: &str, node: &str) -> Pod {
    let mut p = pod(name);
    p.spec.as_mut().expect("pod() has a spec").node_name = Some(node.into());
    p
}

/// The `Status` of a failed call; panics on any other outcome, which fails the test.
pub fn status_of<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls `check` until it holds or two seconds pass.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
