//! Create, read, replace, patch and delete, and their failures.

use std::collections::BTreeMap;

use dory_k8s_fake::{FakeApiServer, ResourceId, Verb};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{TestResult, meta, pod, server, status_of};

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(name),
        data: Some(BTreeMap::from([("k".to_string(), value.to_string())])),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn create_get_replace_delete() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);

    let created = api
        .create(&PostParams::default(), &config_map("c", "1"))
        .await?;
    let m = &created.metadata;
    assert_eq!(m.namespace.as_deref(), Some("default"));
    assert!(m.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(m.creation_timestamp.is_some());
    assert_eq!(m.generation, Some(1));
    let rv1: u64 = m.resource_version.as_deref().unwrap().parse()?;

    let got = api.get("c").await?;
    assert_eq!(got, created);

    let mut changed = got.clone();
    changed.data = Some(BTreeMap::from([("k".to_string(), "2".to_string())]));
    let replaced = api.replace("c", &PostParams::default(), &changed).await?;
    let rv2: u64 = replaced
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()?;
    assert!(rv2 > rv1, "{rv2} > {rv1}");
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    assert_eq!(replaced.data.unwrap()["k"], "2");

    let deleted = api.delete("c", &DeleteParams::default()).await?;
    let status = deleted
        .right()
        .expect("a config map delete answers with a Status");
    assert_eq!(
        status.status,
        Some(kube::core::response::StatusSummary::Success)
    );
    assert_eq!(status.details.unwrap().name, "c");

    let missing = status_of(api.get("c").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "configmaps \"c\" not found");
    let missing = status_of(api.delete("c", &DeleteParams::default()).await);
    assert_eq!(missing.code, 404);
    Ok(())
}

#[tokio::test]
async fn create_twice_is_already_exists() -> TestResult {
    let server = server().await;
    let api: Api<Secret> = Api::default_namespaced(server.client()?);
    let secret = Secret {
        metadata: meta("s"),
        ..Secret::default()
    };
    let created = api.create(&PostParams::default(), &secret).await?;
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    let again = status_of(api.create(&PostParams::default(), &secret).await);
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(again.message, "secrets \"s\" already exists");
    Ok(())
}

#[tokio::test]
async fn stale_replace_is_conflict_and_missing_version_is_unconditional() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let first = api
        .create(&PostParams::default(), &config_map("c", "1"))
        .await?;
    let mut second = first.clone();
    second.data = Some(BTreeMap::from([("k".to_string(), "2".to_string())]));
    api.replace("c", &PostParams::default(), &second).await?;

    // `first` still carries the version before that write.
    let stale = status_of(api.replace("c", &PostParams::default(), &first).await);
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    assert!(
        stale.message.contains("the object has been modified"),
        "{}",
        stale.message
    );

    let mut blind = config_map("c", "3");
    blind.metadata.resource_version = None;
    let stored = api.replace("c", &PostParams::default(), &blind).await?;
    assert_eq!(stored.data.unwrap()["k"], "3");

    let absent = status_of(
        api.replace("nope", &PostParams::default(), &config_map("nope", "1"))
            .await,
    );
    assert_eq!(absent.code, 404);
    Ok(())
}

#[tokio::test]
async fn a_write_that_changes_nothing_keeps_the_version() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let created = api
        .create(&PostParams::default(), &config_map("c", "1"))
        .await?;
    let same = api.replace("c", &PostParams::default(), &created).await?;
    assert_eq!(
        same.metadata.resource_version,
        created.metadata.resource_version
    );
    let patch = Patch::Merge(json!({ "data": { "k": "1" } }));
    let patched = api.patch("c", &PatchParams::default(), &patch).await?;
    assert_eq!(
        patched.metadata.resource_version,
        created.metadata.resource_version
    );
    Ok(())
}

#[tokio::test]
async fn generate_name_and_namespaces() -> TestResult {
    let server = FakeApiServer::builder().namespace("dory").start().await?;
    let client = server.client()?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "dory");
    let mut cm = config_map("", "1");
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("gen-".into());
    let a = api.create(&PostParams::default(), &cm).await?;
    let b = api.create(&PostParams::default(), &cm).await?;
    let (a, b) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(a.starts_with("gen-") && a.len() == 9, "{a}");
    assert_ne!(a, b);

    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "missing");
    let refused = status_of(
        elsewhere
            .create(&PostParams::default(), &config_map("c", "1"))
            .await,
    );
    assert_eq!(refused.code, 404);
    assert_eq!(refused.message, "namespaces \"missing\" not found");

    let bad = status_of(
        api.create(&PostParams::default(), &config_map("Not_Valid", "1"))
            .await,
    );
    assert_eq!((bad.code, bad.reason.as_str()), (422, "Invalid"));

    // Deleting a namespace empties it, then removes it; a terminating pod holds it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "dory");
    pods.create(&PostParams::default(), &crate::bound_pod("p", "n1"))
        .await?;
    let namespaces: Api<Namespace> = Api::all(client);
    let terminating = namespaces.delete("dory", &DeleteParams::default()).await?;
    let ns = terminating
        .left()
        .expect("a namespace delete answers with the namespace");
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    crate::eventually("the pod to terminate", || {
        server
            .get::<Pod>(Some("dory"), "p")
            .ok()
            .flatten()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    let late = status_of(
        api.create(&PostParams::default(), &config_map("late", "1"))
            .await,
    );
    assert_eq!((late.code, late.reason.as_str()), (403, "Forbidden"));
    assert!(namespaces.get_opt("dory").await?.is_some());
    assert!(server.confirm_pod_deletion("dory", "p")?);
    server.settle().await;
    assert!(namespaces.get_opt("dory").await?.is_none());
    assert!(server.list::<ConfigMap>(Some("dory"))?.is_empty());
    Ok(())
}

#[tokio::test]
async fn patches() -> TestResult {
    let server = server().await;
    let api: Api<Pod> = Api::default_namespaced(server.client()?);
    api.create(&PostParams::default(), &pod("p")).await?;

    let merge = Patch::Merge(json!({ "metadata": { "labels": { "a": "1", "b": "2" } } }));
    let p = api.patch("p", &PatchParams::default(), &merge).await?;
    assert_eq!(p.metadata.labels.as_ref().unwrap().len(), 2);

    let remove = Patch::Merge(json!({ "metadata": { "labels": { "b": null } } }));
    let p = api.patch("p", &PatchParams::default(), &remove).await?;
    assert_eq!(
        p.metadata
            .labels
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["a"]
    );

    let strategic =
        Patch::Strategic(json!({ "spec": { "containers": [{ "name": "side", "image": "x" }] } }));
    let p = api.patch("p", &PatchParams::default(), &strategic).await?;
    let names: Vec<_> = p
        .spec
        .unwrap()
        .containers
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        ["main", "side"],
        "strategic merge keeps containers by name"
    );

    // kube's `Patch::Json` needs its `jsonpatch` feature: send the operations by hand.
    let ops = json!([{ "op": "add", "path": "/metadata/annotations", "value": { "x": "y" } }]);
    let req = http::Request::patch("/api/v1/namespaces/default/pods/p")
        .header("content-type", "application/json-patch+json")
        .body(serde_json::to_vec(&ops)?)?;
    let patched: Pod = server.client()?.request(req).await?;
    assert_eq!(patched.metadata.annotations.unwrap()["x"], "y");

    let stale =
        Patch::Merge(json!({ "metadata": { "resourceVersion": "1", "labels": { "c": "3" } } }));
    let refused = status_of(api.patch("p", &PatchParams::default(), &stale).await);
    assert_eq!(refused.code, 409);

    let missing = status_of(api.patch("nope", &PatchParams::default(), &merge).await);
    assert_eq!(missing.code, 404);

    // Server-side apply creates what is missing (merging otherwise).
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let apply = Patch::Apply(
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "applied" }, "data": { "k": "v" } }),
    );
    let applied = cms
        .patch("applied", &PatchParams::apply("test"), &apply)
        .await?;
    assert_eq!(applied.data.unwrap()["k"], "v");
    Ok(())
}

#[tokio::test]
async fn lists_across_namespaces_with_pages() -> TestResult {
    let server = FakeApiServer::builder().namespace("other").start().await?;
    let client = server.client()?;
    for (ns, name) in [
        ("default", "a"),
        ("default", "b"),
        ("other", "c"),
        ("other", "d"),
        ("other", "e"),
    ] {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        api.create(&PostParams::default(), &pod(name)).await?;
    }
    let all: Api<Pod> = Api::all(client.clone());
    let list = all.list(&ListParams::default()).await?;
    let names: Vec<_> = list
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );

    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = all.list(&lp).await?;
        pages.push(page.items.len());
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, [2, 2, 1]);

    // `resourceVersion=0` comes from the watch cache, which ignores the limit (kube drops
    // `0` when it sends a limit, so ask by hand).
    let req = http::Request::get("/api/v1/pods?resourceVersion=0&limit=2").body(Vec::new())?;
    let cached: kube::core::ObjectList<Pod> = client.request(req).await?;
    assert_eq!(cached.items.len(), 5);
    assert!(cached.metadata.continue_.is_none());

    let in_other: Api<Pod> = Api::namespaced(client, "other");
    assert_eq!(in_other.list(&ListParams::default()).await?.items.len(), 3);
    assert_eq!(server.request_count(Verb::List, "pods"), 6);
    Ok(())
}

#[tokio::test]
async fn unknown_paths_and_methods() -> TestResult {
    let server = server().await;
    let client = server.client_without_retries()?;
    let req = http::Request::get("/apis/example.com/v1/widgets").body(Vec::new())?;
    let status = status_of(client.request::<serde_json::Value>(req).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    let req = http::Request::put("/api/v1/namespaces/default/pods").body(b"{}".to_vec())?;
    let status = status_of(client.request::<serde_json::Value>(req).await);
    assert_eq!(status.code, 405);
    let req = http::Request::patch("/api/v1/namespaces/default/pods/p")
        .header("content-type", "text/plain")
        .body(b"{}".to_vec())?;
    assert_eq!(
        status_of(client.request::<serde_json::Value>(req).await).code,
        415
    );
    let req = http::Request::post("/api/v1/namespaces/default/pods").body(b"not json".to_vec())?;
    assert_eq!(
        status_of(client.request::<serde_json::Value>(req).await).code,
        400
    );
    // Direct store access sees the same objects.
    assert!(
        server
            .get_value(&ResourceId::pods(), Some("default"), "p")
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn finalizers_hold_a_delete_until_cleared() -> TestResult {
    let server = server().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let mut held = config_map("held", "1");
    held.metadata.finalizers = Some(vec!["dory.io/test".into()]);
    let created = api.create(&PostParams::default(), &held).await?;
    let mut events = api
        .watch(
            &kube::api::WatchParams::default().disable_bookmarks(),
            created.metadata.resource_version.as_deref().unwrap(),
        )
        .await?
        .boxed();

    let pending = api.delete("held", &DeleteParams::default()).await?;
    let obj = pending.left().expect("a held object answers with itself");
    assert!(obj.metadata.deletion_timestamp.is_some());
    assert!(api.get_opt("held").await?.is_some());

    let clear = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    api.patch("held", &PatchParams::default(), &clear).await?;
    assert!(api.get_opt("held").await?.is_none());

    let kinds: Vec<&str> = [events.next().await, events.next().await]
        .into_iter()
        .map(|e| match e {
            Some(Ok(kube::api::WatchEvent::Modified(_))) => "MODIFIED",
            Some(Ok(kube::api::WatchEvent::Deleted(o))) => {
                assert!(o.metadata.finalizers.unwrap_or_default().is_empty());
                "DELETED"
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"]);
    Ok(())
}
