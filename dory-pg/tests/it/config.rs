//! The config source: the shared intent suite, change nudges, malformed rows, and a listener
//! whose connection is killed.

use std::time::Duration;

use dory_core::testing::{PATIENCE, config_intent_suite, unique_processor};
use dory_core::{Changes, ConfigSource, Error, Intent, NodeId, ProcessorId, SitePreference};
use dory_pg::{PgConfigSource, PgStore};

use crate::test_db;

/// How fast a change must nudge a subscriber.
const PROMPT: Duration = Duration::from_secs(1);

async fn put_row(store: &PgStore, id: &str, spec: &str) {
    sqlx::query(
        "INSERT INTO processors (id, spec) VALUES ($1, $2::jsonb) \
         ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
    )
    .bind(id)
    .bind(spec)
    .execute(store.pool())
    .await
    .unwrap_or_else(|e| panic!("writing processors row {id:?}: {e}"));
}

async fn nudged(changes: &mut Changes, within: Duration, what: &str) {
    tokio::time::timeout(within, changes.changed())
        .await
        .unwrap_or_else(|_| panic!("no change nudge within {within:?} after {what}"));
}

/// The backend pids of the source's listening connection.
async fn listener_pids(store: &PgStore, source: &PgConfigSource) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(source.application_name())
        .fetch_all(store.pool())
        .await
        .expect("reading pg_stat_activity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_intent_suite_passes() {
    let Some(db) = test_db("intents").await else {
        return;
    };
    let p = unique_processor("pinnable");
    put_row(&db.store, p.as_str(), "{}").await;
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    config_intent_suite(&source, Some(&p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_an_unknown_processor_is_not_found() {
    let Some(db) = test_db("pin_unknown").await else {
        return;
    };
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    for node in [Some(NodeId::new("n1")), None] {
        let r = source
            .record_intent(&Intent::Pin {
                processor: unique_processor("nobody"),
                node,
            })
            .await;
        assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    }
    let desired = source.desired().await.expect("desired");
    assert!(desired.processors.is_empty(), "{desired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_change_nudges_within_a_second() {
    let Some(db) = test_db("nudge").await else {
        return;
    };
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    let p = unique_processor("nudged");
    let mut changes = source.changes();
    put_row(&db.store, p.as_str(), "{}").await;
    nudged(&mut changes, PROMPT, "inserting a row").await;
    put_row(&db.store, p.as_str(), r#"{"site": "cloud"}"#).await;
    nudged(&mut changes, PROMPT, "updating a row").await;
    let desired = source.desired().await.expect("desired");
    assert_eq!(desired.processors.len(), 1, "{desired:?}");
    assert_eq!(desired.processors[0].site, SitePreference::Cloud);
    sqlx::query("DELETE FROM processors")
        .execute(db.store.pool())
        .await
        .expect("delete");
    nudged(&mut changes, PROMPT, "deleting a row").await;
    assert!(
        source
            .desired()
            .await
            .expect("desired")
            .processors
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_reported_naming_the_field() {
    let Some(db) = test_db("malformed").await else {
        return;
    };
    let good = [unique_processor("good"), unique_processor("good")];
    for p in &good {
        put_row(&db.store, p.as_str(), r#"{"workload": {"image": "x:1"}}"#).await;
    }
    let bad = [
        ("Not_A_Label", "{}", "field `id`"),
        ("bad-type", r#"{"fallback": "yes"}"#, "field `fallback`"),
        (
            "bad-nested",
            r#"{"resources": {"cpu_millis": -1, "memory_mib": 1}}"#,
            "field `resources`",
        ),
        (
            "bad-interval",
            r#"{"checkpoint_interval": 0}"#,
            "field `checkpoint_interval`",
        ),
        (
            "bad-restart",
            r#"{"restart": {"crash_loop_failures": 0}}"#,
            "field `restart.crash_loop_failures`",
        ),
        ("bad-spec", "[1, 2]", "field `spec`"),
    ];
    for (id, spec, _) in &bad {
        put_row(&db.store, id, spec).await;
    }
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    let desired = source
        .desired()
        .await
        .expect("bad rows never fail the list");
    let mut listed: Vec<ProcessorId> = desired.processors.iter().map(|s| s.id.clone()).collect();
    listed.sort();
    let mut want = good.to_vec();
    want.sort();
    assert_eq!(listed, want, "the good rows are listed: {desired:?}");
    assert!(
        desired
            .processors
            .iter()
            .all(|s| s.workload.image.as_deref() == Some("x:1"))
    );
    assert_eq!(desired.invalid.len(), bad.len(), "{:?}", desired.invalid);
    for (id, _, field) in &bad {
        let entry = desired
            .invalid
            .iter()
            .find(|e| e.id == *id)
            .unwrap_or_else(|| panic!("{id} is not reported: {:?}", desired.invalid));
        assert!(entry.error.contains(field), "{id}: {}", entry.error);
        assert!(entry.error.contains(id), "{id}: {}", entry.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_reconnects_and_nudges() {
    let Some(db) = test_db("listener").await else {
        return;
    };
    let store = &db.store;
    let p = unique_processor("killed");
    put_row(store, p.as_str(), "{}").await;
    let source = PgConfigSource::new(store).await.expect("config source");
    let before = listener_pids(store, &source).await;
    assert_eq!(before.len(), 1, "one listening session: {before:?}");
    let mut changes = source.changes();

    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .fetch_one(store.pool())
        .await
        .expect("terminating the listener");
    assert!(killed, "the listener's session was terminated");
    // Changed while the listener is down (or reconnecting): its notification reaches nobody.
    put_row(store, p.as_str(), r#"{"site": "edge"}"#).await;

    nudged(&mut changes, PATIENCE, "the listener was killed").await;
    let desired = source.desired().await.expect("desired");
    let spec = desired
        .processors
        .iter()
        .find(|s| s.id == p)
        .expect("the processor is listed");
    assert_eq!(spec.site, SitePreference::Edge, "the change made meanwhile");

    // A new session listens, and changes nudge again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = listener_pids(store, &source).await;
        if now.len() == 1 && now != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new listener session: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put_row(store, p.as_str(), r#"{"site": "cloud"}"#).await;
    nudged(&mut changes, PROMPT, "a change after the reconnect").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_source_stops_its_listener() {
    let Some(db) = test_db("stop").await else {
        return;
    };
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    assert_eq!(listener_pids(&db.store, &source).await.len(), 1);
    let name = source.application_name().to_string();
    drop(source);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(&name)
                .fetch_one(db.store.pool())
                .await
                .expect("reading pg_stat_activity");
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener session outlived its source"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pin_overrides_the_specs_own() {
    let Some(db) = test_db("pin_wins").await else {
        return;
    };
    let p = unique_processor("pinned");
    put_row(&db.store, p.as_str(), r#"{"pin": "from-spec"}"#).await;
    let source = PgConfigSource::new(&db.store).await.expect("config source");
    let pin_of = |d: &dory_core::DesiredState| {
        d.processors
            .iter()
            .find(|s| s.id == p)
            .and_then(|s| s.pin.clone())
    };
    let desired = source.desired().await.expect("desired");
    assert_eq!(pin_of(&desired), Some(NodeId::new("from-spec")));
    source
        .record_intent(&Intent::Pin {
            processor: p.clone(),
            node: Some(NodeId::new("from-intent")),
        })
        .await
        .expect("pin");
    let desired = source.desired().await.expect("desired");
    assert_eq!(pin_of(&desired), Some(NodeId::new("from-intent")));
    source
        .record_intent(&Intent::Pin {
            processor: p.clone(),
            node: None,
        })
        .await
        .expect("unpin");
    let desired = source.desired().await.expect("desired");
    assert_eq!(
        pin_of(&desired),
        Some(NodeId::new("from-spec")),
        "an unpin removes only the recorded pin"
    );
}
