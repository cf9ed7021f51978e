//! Fault injection, request counting and latency.

use std::time::{Duration, Instant};

use dory_k8s_fake::{Fault, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams, WatchParams};

use crate::{TestResult, eventually, pod, server, status_of};

#[tokio::test]
async fn injected_faults_fail_the_next_matching_requests() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client_without_retries()?);
    server.fail_next(Verb::Create, "pods", 500, 2);
    server.inject(
        Fault::new(409)
            .verb(Verb::Get)
            .resource("pods")
            .message("raced"),
    );

    for _ in 0..2 {
        let failed = status_of(pods.create(&PostParams::default(), &pod("p")).await);
        assert_eq!(
            (failed.code, failed.reason.as_str()),
            (500, "InternalError")
        );
    }
    pods.create(&PostParams::default(), &pod("p")).await?;
    let raced = status_of(pods.get("p").await);
    assert_eq!((raced.code, raced.message.as_str()), (409, "raced"));
    pods.get("p").await?;

    server.inject(Fault::new(429).times(5));
    assert_eq!(
        status_of(pods.get("p").await).code,
        429,
        "no verb or resource: any request"
    );
    server.clear_faults();
    pods.get("p").await?;
    Ok(())
}

#[tokio::test]
async fn the_default_client_retries_429_503_and_504_by_itself() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    server.fail_next(Verb::Create, "pods", 503, 1);
    pods.create(&PostParams::default(), &pod("p")).await?;
    assert_eq!(
        server.request_count(Verb::Create, "pods"),
        2,
        "the failure, then the retry"
    );
    let codes: Vec<u16> = server.requests().iter().map(|r| r.code).collect();
    assert_eq!(codes, [503, 201]);
    Ok(())
}

#[tokio::test]
async fn counting_requests_in_a_window() -> TestResult {
    let server = server().await;
    let client = server.client()?;
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let _watch = pods.watch(&WatchParams::default(), "0").await?.boxed();
    eventually("the watch to open", || server.open_watches() == 1).await;

    let mark = server.mark();
    assert!(server.non_watch_requests_since(mark).is_empty());
    let _watch2 = nodes.watch(&WatchParams::default(), "0").await?.boxed();
    nodes.get_opt("n1").await?;
    let since = server.requests_since(mark);
    assert_eq!(since.len(), 2);
    let others = server.non_watch_requests_since(mark);
    assert_eq!(others.len(), 1);
    assert_eq!(
        (others[0].verb, others[0].resource.as_str(), others[0].code),
        (Verb::Get, "nodes", 404)
    );
    assert_eq!(server.request_count(Verb::Watch, "pods"), 1);
    assert_eq!(server.request_count(Verb::Watch, "nodes"), 1);
    server.clear_requests();
    assert!(server.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn latency_delays_every_request() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client()?);
    server.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    assert!(pods.get_opt("p").await?.is_none());
    assert!(started.elapsed() >= Duration::from_millis(150));
    server.set_latency(Duration::ZERO);
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_serving() -> TestResult {
    let server = server().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client_without_retries()?);
    let mut watch = pods.watch(&WatchParams::default(), "0").await?.boxed();
    eventually("the watch to open", || server.open_watches() == 1).await;
    let url = server.url();
    server.shutdown().await;
    let ended = async {
        while let Some(event) = watch.next().await {
            if event.is_err() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), ended).await?;
    let address = url.trim_start_matches("http://").to_string();
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "nothing listens any more"
    );
    Ok(())
}
