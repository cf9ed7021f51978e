//! Size limits: the server's on `PUT /state`, the client's on `GET /state` answers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dory_control::{ClientSettings, HttpControl, ServerSettings};
use dory_core::{Error, InstanceControl, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Fake, TOKEN, instance_of, raw, serve, start};

const LIMIT: usize = 64 << 10;

async fn standby_with_limit() -> (std::sync::Arc<Fake>, dory_core::Instance) {
    let fake = Fake::new("counter", 4, Phase::Standby, 0);
    let address = serve(
        fake.clone(),
        ServerSettings::new(TOKEN).with_body_limit(LIMIT),
    )
    .await;
    let instance = instance_of(&fake, Some(&address), TOKEN);
    (fake, instance)
}

fn assert_too_large(error: &Error) {
    let Error::Invalid(message) = error else {
        panic!("not invalid: {error}")
    };
    assert!(
        message.contains("too_large") && message.contains(&format!("limit of {LIMIT} bytes")),
        "{message}"
    );
}

#[tokio::test]
async fn a_snapshot_over_the_limit_gets_413() {
    let (fake, instance) = standby_with_limit().await;
    let control = HttpControl::new();
    // Just over, and far over (the server answers before the body is sent).
    for size in [LIMIT + 1, 128 * LIMIT] {
        let error = control.load(&instance, &vec![7u8; size]).await.unwrap_err();
        assert_too_large(&error);
        assert!(
            error
                .to_string()
                .contains(&format!("snapshot of {size} bytes")),
            "{error}"
        );
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    assert!(fake.state().loaded.is_none());
    // At the limit the endpoint gets it (and refuses it for what it is).
    let error = control
        .load(&instance, &vec![7u8; LIMIT])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("bad magic"), "{error}");
}

#[tokio::test]
async fn a_chunked_body_is_cut_at_the_limit() {
    let (fake, instance) = standby_with_limit().await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    // No Content-Length: the limit is found while reading.
    let chunk = vec![b'x'; 16 << 10];
    let mut request = format!(
        "PUT /state HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(address, &request).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&answer.body).unwrap()["error"],
        "too_large"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_freeze_request_over_its_limit_gets_413() {
    let fake = Fake::new("counter", 4, Phase::Running, 0);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    let request = format!(
        "POST /state/freeze HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    let answer = raw(address, request.as_bytes()).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_client_refuses_a_snapshot_over_its_limit() {
    let fake = Fake::new("counter", 3, Phase::Running, 1);
    let instance = start(&fake).await;
    let control = HttpControl::new();
    let meta = control
        .freeze(&instance, Duration::from_secs(5))
        .await
        .unwrap();
    let small = HttpControl::with_settings(
        ClientSettings::default().with_max_snapshot_bytes(meta.size as usize - 1),
    );
    let error = small.fetch(&instance).await.unwrap_err();
    let Error::Invalid(message) = &error else {
        panic!("not invalid: {error}")
    };
    assert!(
        message.contains(&format!(
            "answer of {} bytes is over the client's limit",
            meta.size
        )),
        "{message}"
    );
    // Exactly at the limit is fine.
    let exact = HttpControl::with_settings(
        ClientSettings::default().with_max_snapshot_bytes(meta.size as usize),
    );
    assert_eq!(
        exact.fetch(&instance).await.unwrap().len() as u64,
        meta.size
    );
}

#[tokio::test]
async fn the_client_stops_reading_an_endless_answer_at_its_limit() {
    // A server that answers with no length and never stops sending.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = socket.read(&mut buf).await;
        let _ = socket
            .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .await;
        let chunk = vec![0u8; 64 << 10];
        while socket.write_all(&chunk).await.is_ok() {}
    });
    let fake = Fake::new("counter", 3, Phase::Frozen, 1);
    let instance = instance_of(&fake, Some(&address), TOKEN);
    let control =
        HttpControl::with_settings(ClientSettings::default().with_max_snapshot_bytes(1 << 20));
    let started = Instant::now();
    let error = control.fetch(&instance).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("over the client's limit of 1048576 bytes"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
