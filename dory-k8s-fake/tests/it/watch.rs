//! Watch streams, bookmarks, expiry, and kube-runtime's watcher and reflector.

use std::collections::BTreeMap;
use std::time::Duration;

use dory_k8s_fake::{FakeApiServer, Verb};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

use crate::{TestResult, bound_pod, eventually, meta, pod, server};

fn cm(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(name),
        data: Some(BTreeMap::from([("k".to_string(), value.to_string())])),
        ..ConfigMap::default()
    }
}

/// The next event that is not a bookmark.
async fn next<S>(stream: &mut S) -> WatchEvent<ConfigMap>
where
    S: futures::Stream<Item = Result<WatchEvent<ConfigMap>, kube::Error>> + Unpin,
{
    loop {
        let event = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("an event within 2 s")
            .expect("the stream goes on")
            .expect("events decode");
        if !matches!(event, WatchEvent::Bookmark(_)) {
            return event;
        }
    }
}

fn name(event: &WatchEvent<ConfigMap>) -> (&'static str, String) {
    match event {
        WatchEvent::Added(o) => ("ADDED", o.metadata.name.clone().unwrap()),
        WatchEvent::Modified(o) => ("MODIFIED", o.metadata.name.clone().unwrap()),
        WatchEvent::Deleted(o) => ("DELETED", o.metadata.name.clone().unwrap()),
        WatchEvent::Bookmark(_) => ("BOOKMARK", String::new()),
        WatchEvent::Error(e) => ("ERROR", e.reason.clone()),
    }
}

#[tokio::test]
async fn events_in_order_with_bookmarks() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    api.create(&PostParams::default(), &cm("before", "1"))
        .await?;

    let mut stream = api.watch(&WatchParams::default(), "0").await?.boxed();
    assert_eq!(
        name(&next(&mut stream).await),
        ("ADDED", "before".into()),
        "synthetic initial event"
    );

    api.create(&PostParams::default(), &cm("a", "1")).await?;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "k": "2" } })),
    )
    .await?;
    api.delete("a", &DeleteParams::default()).await?;
    let events: Vec<_> = [
        next(&mut stream).await,
        next(&mut stream).await,
        next(&mut stream).await,
    ]
    .iter()
    .map(name)
    .collect();
    assert_eq!(
        events,
        [
            ("ADDED", "a".into()),
            ("MODIFIED", "a".into()),
            ("DELETED", "a".into())
        ]
    );

    // Bookmarks carry the store's version once nothing else is pending.
    let current = server.resource_version().to_string();
    let bookmark = match tokio::time::timeout(Duration::from_secs(2), stream.next()).await? {
        Some(Ok(WatchEvent::Bookmark(b))) => b,
        other => panic!("expected a bookmark, got {other:?}"),
    };
    assert_eq!(bookmark.metadata.resource_version, current);
    assert_eq!(bookmark.types.kind, "ConfigMap");
    Ok(())
}

#[tokio::test]
async fn resuming_replays_history_and_expired_versions_get_410() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let a = api.create(&PostParams::default(), &cm("a", "1")).await?;
    let rv = a.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &cm("b", "1")).await?;
    api.delete("a", &DeleteParams::default()).await?;

    let mut stream = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await?
        .boxed();
    assert_eq!(name(&next(&mut stream).await), ("ADDED", "b".into()));
    assert_eq!(name(&next(&mut stream).await), ("DELETED", "a".into()));

    server.compact();
    let mut stream = api.watch(&WatchParams::default(), &rv).await?.boxed();
    match next(&mut stream).await {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 410, got {:?}", name(&other)),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the error"
    );
    Ok(())
}

#[tokio::test]
async fn selectors_filter_events_and_leaving_the_selection_is_deleted() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let mut stream = api
        .watch(&WatchParams::default().labels("app=web"), "0")
        .await?
        .boxed();

    let mut web = cm("web", "1");
    web.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
    api.create(&PostParams::default(), &cm("other", "1"))
        .await?;
    api.create(&PostParams::default(), &web).await?;
    assert_eq!(name(&next(&mut stream).await), ("ADDED", "web".into()));

    let relabel = Patch::Merge(json!({ "metadata": { "labels": { "app": "db" } } }));
    let moved = api.patch("web", &PatchParams::default(), &relabel).await?;
    match next(&mut stream).await {
        WatchEvent::Deleted(o) => {
            assert_eq!(
                o.metadata.labels.unwrap()["app"],
                "web",
                "the state it was selected in"
            );
            assert_eq!(o.metadata.resource_version, moved.metadata.resource_version);
        }
        other => panic!("expected DELETED, got {:?}", name(&other)),
    }
    let back = Patch::Merge(json!({ "metadata": { "labels": { "app": "web" } } }));
    api.patch("other", &PatchParams::default(), &back).await?;
    assert_eq!(name(&next(&mut stream).await), ("ADDED", "other".into()));
    Ok(())
}

#[tokio::test]
async fn timeout_and_close_end_streams() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let started = tokio::time::Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await?
        .boxed();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), stream.next())
            .await?
            .is_none()
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    let mut stream = api.watch(&WatchParams::default(), "0").await?.boxed();
    eventually("the watch to open", || server.open_watches() == 1).await;
    server.close_watches();
    let ended = async {
        while let Some(event) = stream.next().await {
            event.expect("only bookmarks before the end");
        }
    };
    tokio::time::timeout(Duration::from_secs(2), ended).await?;
    Ok(())
}

/// A reflector's store, by name, with each object's data.
fn state(store: &reflector::Store<ConfigMap>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|c| {
            (
                c.metadata.name.clone().unwrap(),
                c.data.as_ref().unwrap()["k"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn watcher_resyncs_after_410_without_losing_state() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    for n in ["a", "b", "c"] {
        api.create(&PostParams::default(), &cm(n, "1")).await?;
    }
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()));
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen_errors = errors.clone();
    let task = tokio::spawn(
        stream
            .map_err(move |e| {
                seen_errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                e
            })
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await?;
    assert_eq!(state(&reader).len(), 3);
    let lists_before = server.request_count(Verb::List, "configmaps");

    // While the watch is cut off and history is gone, the world changes.
    server.expire_watches();
    api.delete("a", &DeleteParams::default()).await?;
    api.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "k": "2" } })),
    )
    .await?;
    api.create(&PostParams::default(), &cm("d", "1")).await?;

    let want = BTreeMap::from([
        ("b".into(), "2".into()),
        ("c".into(), "1".into()),
        ("d".into(), "1".into()),
    ]);
    eventually("the reflector to converge", || state(&reader) == want).await;
    assert!(
        errors.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the watcher saw the 410"
    );
    assert!(
        server.request_count(Verb::List, "configmaps") > lists_before,
        "it listed again"
    );

    // And it keeps following changes after the resync.
    api.delete("d", &DeleteParams::default()).await?;
    eventually("the delete to arrive", || !state(&reader).contains_key("d")).await;
    task.abort();
    Ok(())
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    api.create(&PostParams::default(), &cm("a", "1")).await?;
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), events.try_next()).await?? {
            Some(watcher::Event::Init) => {}
            Some(watcher::Event::InitApply(o)) => initial.push(o.metadata.name.unwrap()),
            Some(watcher::Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["a"]);
    assert_eq!(
        server.request_count(Verb::List, "configmaps"),
        0,
        "no list, only a watch"
    );
    api.create(&PostParams::default(), &cm("b", "1")).await?;
    match tokio::time::timeout(Duration::from_secs(2), events.try_next()).await?? {
        Some(watcher::Event::Apply(o)) => assert_eq!(o.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn field_selected_pod_watch_follows_binding() -> TestResult {
    let server = FakeApiServer::builder()
        .bookmark_interval(Duration::from_millis(50))
        .start()
        .await?;
    let api: Api<Pod> = Api::all(server.client()?);
    let created: Api<Pod> = Api::default_namespaced(server.client()?);
    let mut on_n1 = watcher(api, watcher::Config::default().fields("spec.nodeName=n1"))
        .applied_objects()
        .boxed();
    created
        .create(&PostParams::default(), &pod("elsewhere"))
        .await?;
    created
        .create(&PostParams::default(), &bound_pod("here", "n1"))
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(2), on_n1.try_next()).await??;
    assert_eq!(first.and_then(|p| p.metadata.name).as_deref(), Some("here"));
    Ok(())
}

#[tokio::test]
async fn metadata_only_gets_lists_and_watches() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let mut labelled = cm("a", "1");
    labelled.metadata.labels = Some(BTreeMap::from([("l".to_string(), "1".to_string())]));
    api.create(&PostParams::default(), &labelled).await?;
    let got = api.get_metadata("a").await?;
    assert_eq!(got.metadata.labels.unwrap()["l"], "1");
    let listed = api.list_metadata(&kube::api::ListParams::default()).await?;
    assert_eq!(listed.items.len(), 1);
    let metadata: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::default_namespaced(server.client()?);
    let mut events = watcher(metadata, watcher::Config::default())
        .applied_objects()
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(2), events.try_next()).await??;
    assert_eq!(first.and_then(|m| m.metadata.name).as_deref(), Some("a"));
    Ok(())
}
