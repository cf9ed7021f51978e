//! Refusals and failures arrive with their meaning, naming the operation, processor, epoch
//! and address.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dory_control::{ClientSettings, HttpControl};
use dory_core::snapshot::Encoder;
use dory_core::{Epoch, Error, InstanceControl, Phase, Sequence};
use tokio::net::TcpListener;

use crate::support::{Fake, TOKEN, id, instance_of, raw_get, start};

fn invalid(error: Error) -> String {
    match error {
        Error::Invalid(message) => message,
        other => panic!("not invalid: {other}"),
    }
}

#[tokio::test]
async fn a_refused_snapshot_arrives_as_invalid_naming_what_was_wrong() {
    let fake = Fake::new("counter", 4, Phase::Standby, 0);
    let instance = start(&fake).await;
    let address = instance.endpoint.as_ref().unwrap().address.clone();
    let control = HttpControl::new();
    let encode = |processor: &str, epoch: u64| {
        Encoder::default()
            .encode_state(&id(processor), Epoch(epoch), Sequence(10), &10u64)
            .unwrap()
    };

    let mut corrupt = encode("counter", 3);
    *corrupt.last_mut().unwrap() ^= 0x40;
    let message = invalid(control.load(&instance, &corrupt).await.unwrap_err());
    assert!(
        message.starts_with(&format!(
            "load snapshot (processor counter, epoch e4, at {address}): snapshot of processor counter epoch e3: checksum mismatch"
        )),
        "{message}"
    );

    let message = invalid(control.load(&instance, b"PK\x03\x04").await.unwrap_err());
    assert!(message.contains("bad magic"), "{message}");

    let message = invalid(
        control
            .load(&instance, &encode("other", 3))
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains("snapshot is of processor other; this instance runs counter"),
        "{message}"
    );

    let message = invalid(
        control
            .load(&instance, &encode("counter", 4))
            .await
            .unwrap_err(),
    );
    assert!(message.contains("epoch e4 is not older"), "{message}");

    // The state is untouched; a good snapshot still loads.
    assert!(fake.state().loaded.is_none());
    assert_eq!(fake.state().counter, 0);
    control
        .load(&instance, &encode("counter", 3))
        .await
        .unwrap();
    assert_eq!(fake.state().counter, 10);
}

#[tokio::test]
async fn conflict_and_fenced_keep_their_meaning() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = start(&fake).await;
    let control = HttpControl::new();
    let error = control.fetch(&instance).await.unwrap_err();
    assert!(
        matches!(&error, Error::Conflict(m) if m.ends_with("instance is running; freeze it first")),
        "{error}"
    );
    assert!(error.is_retryable());

    fake.fenced.store(true, Ordering::SeqCst);
    let error = control.resume(&instance).await.unwrap_err();
    assert!(error.is_fenced(), "{error}");
    assert!(
        error
            .to_string()
            .contains("epoch e3 no longer owns counter"),
        "{error}"
    );
}

#[tokio::test]
async fn a_freeze_that_reaches_no_safe_point_fails_cleanly_and_the_processor_runs_on() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = start(&fake).await;
    let control = HttpControl::new();
    fake.stuck.store(true, Ordering::SeqCst);

    let started = Instant::now();
    let error = control
        .freeze(&instance, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited for the client's timeout"
    );
    let Error::Unavailable(message) = &error else {
        panic!("not unavailable: {error}")
    };
    assert!(
        message.contains("freeze (processor counter, epoch e3")
            && message.contains("timeout: no safe point reached within 200ms")
            && message.contains("keeps running"),
        "{message}"
    );
    // The freeze was withdrawn and the processor keeps running.
    assert_eq!(fake.withdrawn.load(Ordering::SeqCst), 1);
    let health = control.health(&instance).await.unwrap();
    assert_eq!(health.phase, Phase::Running);
    fake.step();
    assert_eq!(fake.state().counter, 2);

    // Once user code gets to a safe point again, the freeze goes through.
    fake.stuck.store(false, Ordering::SeqCst);
    let meta = control
        .freeze(&instance, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(meta.sequence, Sequence(2));
}

#[tokio::test]
async fn a_freeze_may_take_longer_than_an_ordinary_call() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    *fake.safe_point_delay.lock().unwrap() = Duration::from_millis(400);
    let instance = start(&fake).await;
    let control = HttpControl::with_settings(
        ClientSettings::default().with_timeout(Duration::from_millis(150)),
    );
    let meta = control
        .freeze(&instance, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(meta.epoch, Epoch(3));
}

#[tokio::test]
async fn the_freeze_timeout_is_bounded_by_the_server() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    let auth = format!("Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n");
    let request = format!(
        "POST /state/freeze HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: 28\r\n\r\n{{\"timeout_ms\": 999999999999}}"
    );
    let answer = crate::support::raw(address, request.as_bytes()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.body.contains("over the longest allowed"),
        "{answer:?}"
    );

    let answer = raw_get(address, "POST", "/state/freeze", &auth).await;
    assert_eq!(
        answer.status, 200,
        "an empty body takes the default: {answer:?}"
    );
    let bad = format!(
        "POST /state/freeze HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: 2\r\n\r\n[]"
    );
    let answer = crate::support::raw(address, bad.as_bytes()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("timeout_ms"), "{answer:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_client_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    // Accepts connections and keeps them open without a word.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = instance_of(&fake, Some(&address), TOKEN);
    let control = HttpControl::with_settings(
        ClientSettings::default().with_timeout(Duration::from_millis(300)),
    );
    let started = Instant::now();
    let error = control.resume(&instance).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(error.is_retryable());
    assert_eq!(
        error,
        Error::unavailable(format!(
            "resume (processor counter, epoch e3, at {address}): no answer within 300ms"
        ))
    );
    assert!(!error.to_string().contains(TOKEN));
}

#[tokio::test]
async fn an_unreachable_instance_is_unavailable() {
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = instance_of(&fake, Some(&address), TOKEN);
    let error = HttpControl::new()
        .freeze(&instance, Duration::from_secs(1))
        .await
        .unwrap_err();
    let Error::Unavailable(message) = &error else {
        panic!("not unavailable: {error}")
    };
    assert!(
        message.starts_with(&format!(
            "freeze (processor counter, epoch e3, at {address}): could not connect"
        )),
        "{message}"
    );
    assert!(!message.contains(TOKEN));
}

#[tokio::test]
async fn an_instance_without_an_endpoint_or_with_a_bad_address() {
    let fake = Fake::new("counter", 3, Phase::Starting, 1);
    let control = HttpControl::new();
    let error = control
        .health(&instance_of(&fake, None, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        Error::unavailable(
            "health (processor counter, epoch e3): the instance has no control endpoint yet"
        )
    );
    let error = control
        .resume(&instance_of(&fake, Some("not an address"), TOKEN))
        .await
        .unwrap_err();
    let message = invalid(error);
    assert!(
        message.contains("control address \"not an address\" is not host:port"),
        "{message}"
    );
}

#[tokio::test]
async fn unknown_routes_get_a_json_404() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    let answer = raw_get(address, "GET", "/nope", "").await;
    assert_eq!(answer.status, 404);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&answer.body).unwrap(),
        serde_json::json!({"error": "not_found", "message": "no route GET /nope"})
    );
}

/// A server that answers every connection with `answer`, whatever it was asked.
async fn canned(answer: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    address
}

#[tokio::test]
async fn answers_of_a_foreign_server_map_by_status() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let control = HttpControl::new();

    let address = canned(
        "HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 11\r\n\r\nbad gateway",
    )
    .await;
    let error = control
        .resume(&instance_of(&fake, Some(&address), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        Error::unavailable(format!(
            "resume (processor counter, epoch e3, at {address}): HTTP 502 Bad Gateway: bad gateway"
        ))
    );

    let address =
        canned("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nnop").await;
    let message = invalid(
        control
            .health(&instance_of(&fake, Some(&address), TOKEN))
            .await
            .unwrap_err(),
    );
    assert!(
        message.starts_with(&format!(
            "health (processor counter, epoch e3, at {address}): the answer is not the expected JSON"
        )),
        "{message}"
    );
}
