//! Every call round-trips through the real router and client.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dory_control::HttpControl;
use dory_core::snapshot;
use dory_core::{Epoch, InstanceControl, Phase, Sequence};

use crate::support::{Fake, raw_get, start};

#[tokio::test]
async fn a_move_round_trips_every_call() {
    let old = Fake::new("counter", 3, Phase::Running, 41);
    let new = Fake::new("counter", 4, Phase::Standby, 0);
    let (old_instance, new_instance) = (start(&old).await, start(&new).await);
    let control = HttpControl::new();

    let health = control.health(&old_instance).await.unwrap();
    assert_eq!(
        (health.phase, health.epoch, health.sequence),
        (Phase::Running, Epoch(3), Sequence(41))
    );
    assert_eq!(
        control.health(&new_instance).await.unwrap().phase,
        Phase::Standby
    );

    let meta = control
        .freeze(&old_instance, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (meta.processor.as_str(), meta.epoch, meta.sequence),
        ("counter", Epoch(3), Sequence(41))
    );
    // Idempotent: a second freeze answers the same snapshot.
    let again = control
        .freeze(&old_instance, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again, meta);
    old.step();
    assert_eq!(old.state().counter, 41, "a frozen instance does not run");

    let bytes = control.fetch(&old_instance).await.unwrap();
    assert_eq!(bytes.len() as u64, meta.size);
    let header = snapshot::verify(&bytes).unwrap();
    assert_eq!((header.epoch, header.sequence), (Epoch(3), Sequence(41)));
    assert_eq!(control.fetch(&old_instance).await.unwrap(), bytes);

    control.load(&new_instance, &bytes).await.unwrap();
    // Load only, and idempotent.
    control.load(&new_instance, &bytes).await.unwrap();
    assert_eq!(new.state().phase, Phase::Standby);
    assert_eq!(new.state().counter, 41);
    assert_eq!(new.state().loaded.as_deref(), Some(&bytes[..]));

    control.resume(&new_instance).await.unwrap();
    assert_eq!(new.state().resumed_at, None);
    control
        .resume_committed(&new_instance, Sequence(41))
        .await
        .unwrap();
    assert_eq!(new.state().resumed_at, Some(Sequence(41)));
    new.step();
    let health = control.health(&new_instance).await.unwrap();
    assert_eq!(
        (health.phase, health.epoch, health.sequence),
        (Phase::Running, Epoch(4), Sequence(42))
    );
}

#[tokio::test]
async fn probes_and_metrics_need_no_token() {
    let fake = Fake::new("counter", 1, Phase::Running, 7);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;

    let health = raw_get(address, "GET", "/healthz", "").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert!(health.head.contains("content-type: application/json"));
    let value: serde_json::Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"phase": {"phase": "running"}, "epoch": 1, "sequence": 7, "protocol": 1})
    );

    let ready = raw_get(address, "GET", "/readyz", "").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (200, r#"{"ready":true}"#)
    );

    let metrics = raw_get(address, "GET", "/metrics", "").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .head
            .contains("content-type: text/plain; version=0.0.4")
    );
    assert!(metrics.body.contains("dory_sequence 7"), "{}", metrics.body);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_starting_instance_is_not_ready() {
    let fake = Fake::new("counter", 1, Phase::Starting, 0);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    let ready = raw_get(address, "GET", "/readyz", "").await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready.body).unwrap(),
        serde_json::json!({"error": "unavailable", "message": "still starting"})
    );
}

#[tokio::test]
async fn a_freeze_without_a_body_takes_the_default_timeout() {
    let fake = Fake::new("counter", 2, Phase::Running, 5);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    let auth = format!("Authorization: Bearer {}\r\n", crate::support::TOKEN);
    let answer = raw_get(address, "POST", "/state/freeze", &auth).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let meta: dory_core::SnapshotMeta = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(meta.sequence, Sequence(5));
}

#[test]
fn the_client_is_a_shareable_instance_control() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<HttpControl>();
    send_sync::<dory_control::ServerSettings>();
    let _: Arc<dyn InstanceControl> = Arc::new(HttpControl::new());
    fn send<T: Send>(_: T) {}
    let fake = Fake::new("counter", 1, Phase::Running, 0);
    let instance = crate::support::instance_of(&fake, Some("127.0.0.1:1"), "t");
    let control = HttpControl::new();
    send(control.freeze(&instance, Duration::from_secs(1)));
    send(control.load(&instance, b""));
}
