//! The state routes need the bearer token; nothing else does.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dory_control::HttpControl;
use dory_core::{Error, InstanceControl, Phase};

use crate::support::{Fake, TOKEN, instance_of, raw_get, start};

fn assert_unauthorized(error: &Error, why: &str) {
    let Error::Invalid(message) = error else {
        panic!("not invalid: {error}")
    };
    assert!(
        message.contains("unauthorized") && message.contains(why),
        "{message}"
    );
    assert!(!message.contains(TOKEN), "the token leaked: {message}");
}

#[tokio::test]
async fn a_wrong_token_is_refused_on_every_state_route() {
    let fake = Fake::new("counter", 3, Phase::Running, 9);
    let good = start(&fake).await;
    let address = good.endpoint.as_ref().unwrap().address.clone();
    let wrong_token = "guess-of-the-attacker";
    let wrong = instance_of(&fake, Some(&address), wrong_token);
    let control = HttpControl::new();

    let errors = [
        control
            .freeze(&wrong, Duration::from_secs(1))
            .await
            .unwrap_err(),
        control.fetch(&wrong).await.unwrap_err(),
        control.load(&wrong, b"DORYSNAP").await.unwrap_err(),
        control.resume(&wrong).await.unwrap_err(),
    ];
    for error in &errors {
        assert_unauthorized(error, "wrong bearer token");
        let message = error.to_string();
        assert!(!message.contains(wrong_token), "{message}");
        assert!(
            message.contains("processor counter") && message.contains(&address),
            "{message}"
        );
    }
    assert!(
        errors[0]
            .to_string()
            .contains("freeze (processor counter, epoch e3")
    );
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        0,
        "the endpoint was reached"
    );
    assert_eq!(fake.state().phase, Phase::Running);

    // An empty token is no token.
    let empty = instance_of(&fake, Some(&address), "");
    assert_unauthorized(&control.resume(&empty).await.unwrap_err(), "bearer token");

    // Health needs none.
    assert_eq!(control.health(&wrong).await.unwrap().phase, Phase::Running);
}

#[tokio::test]
async fn no_token_gets_401_with_a_bearer_challenge() {
    let fake = Fake::new("counter", 3, Phase::Running, 9);
    let instance = start(&fake).await;
    let address = &instance.endpoint.as_ref().unwrap().address;
    for (method, path) in [
        ("POST", "/state/freeze"),
        ("GET", "/state"),
        ("PUT", "/state"),
        ("POST", "/state/resume"),
    ] {
        let answer = raw_get(address, method, path, "").await;
        assert_eq!(answer.status, 401, "{method} {path}: {answer:?}");
        assert!(
            answer.head.contains("www-authenticate: bearer"),
            "{answer:?}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&answer.body).unwrap(),
            serde_json::json!({"error": "unauthorized", "message": "missing bearer token"})
        );
    }
    let basic = raw_get(
        address,
        "GET",
        "/state",
        "Authorization: Basic dXNlcjpwYXNz\r\n",
    )
    .await;
    assert_eq!(basic.status, 401);
    assert!(
        basic.body.contains("does not hold a bearer token"),
        "{basic:?}"
    );
    // The scheme is case-insensitive.
    let lower = format!("Authorization: bearer {TOKEN}\r\n");
    let answer = raw_get(address, "POST", "/state/freeze", &lower).await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[tokio::test]
async fn an_instance_without_a_token_closes_its_state_routes() {
    let fake = Fake::new("counter", 3, Phase::Running, 9);
    let address = crate::support::serve(fake.clone(), dory_control::ServerSettings::new("")).await;
    let instance = instance_of(&fake, Some(&address), "");
    let error = HttpControl::new().resume(&instance).await.unwrap_err();
    assert_unauthorized(&error, "no token configured");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}
