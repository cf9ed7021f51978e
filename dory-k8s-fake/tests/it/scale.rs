//! Cost at the benchmark's scale: many pods, a watcher's paged list, steady state.

use std::time::{Duration, Instant};

use dory_k8s_fake::{FakeApiServer, PodReport, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::{reflector, watcher};

use crate::{TestResult, bound_pod, eventually};

const PODS: usize = 10_000;
const NODES: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pods_list_and_watch_cheaply() -> TestResult {
    let server = FakeApiServer::builder().start().await?;
    let t = Instant::now();
    for n in 0..NODES {
        server.add_node(&format!("n{n}"), &[])?;
    }
    for i in 0..PODS {
        let mut p = bound_pod(&format!("p{i}"), &format!("n{}", i % NODES));
        p.metadata.namespace = Some("default".into());
        server.put(&p)?;
    }
    eprintln!("store: {:?}", t.elapsed());

    let t = Instant::now();
    let api: Api<Pod> = Api::all(server.client()?);
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(
        reflector(writer, watcher(api.clone(), watcher::Config::default())).for_each(|_| async {}),
    );
    reader.wait_until_ready().await?;
    assert_eq!(reader.len(), PODS);
    eprintln!("paged list of {PODS}: {:?}", t.elapsed());
    assert_eq!(
        server.request_count(Verb::List, "pods"),
        (PODS / 500) as u64
    );

    let t = Instant::now();
    let created: Api<Pod> = Api::default_namespaced(server.client()?);
    for i in 0..200 {
        created
            .create(&PostParams::default(), &bound_pod(&format!("new{i}"), "n1"))
            .await?;
        server.report_pod(
            "default",
            &format!("new{i}"),
            &PodReport::running("10.0.0.1"),
        )?;
    }
    eventually("the watcher to see them", || reader.len() == PODS + 200).await;
    eprintln!("200 creates + status through the watch: {:?}", t.elapsed());

    let mark = server.mark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.non_watch_requests_since(mark).is_empty(),
        "a steady watcher makes no requests"
    );
    task.abort();
    Ok(())
}
