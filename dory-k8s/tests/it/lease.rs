//! Two orchestrator replicas with `LeaseLeadership` over one Lease and one store: one leads,
//! the other takes over when the first stops renewing or resigns.

use std::sync::Arc;
use std::time::Duration;

use dory_core::{Leadership, SystemClock};
use dory_k8s::{LeaseConfig, LeaseLeadership};
use dory_mock::{MemoryLeadership, MemoryStore};
use k8s_openapi::api::coordination::v1::Lease;

use crate::support::*;

fn lease_config(holder: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: NS.into(),
        name: "dory-orchestrator".into(),
        holder: holder.into(),
        duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(300),
        renew_deadline: Duration::from_millis(1500),
        retry_every: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_stops_renewing() {
    let server = server().await;
    let store = MemoryStore::new(Arc::new(SystemClock));
    let a = LeaseLeadership::new(
        server.client_without_retries().unwrap(),
        lease_config("a"),
        MemoryLeadership::new(&store),
    )
    .unwrap();
    let b = Arc::new(
        LeaseLeadership::new(
            server.client_without_retries().unwrap(),
            lease_config("b"),
            MemoryLeadership::new(&store),
        )
        .unwrap(),
    );
    let term_a = a.acquire().await.unwrap();
    a.check(term_a).await.unwrap();
    let lease: Lease = server.get(Some(NS), "dory-orchestrator").unwrap().unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("a"));

    let waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.acquire().await })
    };
    // While `a` renews, `b` waits, however long.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "b must not lead while a renews");
    a.check(term_a).await.unwrap();

    // `a`'s process dies: its renewals stop without giving the Lease back, and the store's
    // leadership (a lock on a connection, a flock) goes with the process.
    assert!(a.inner().depose());
    drop(a);
    let started = tokio::time::Instant::now();
    let term_b = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("b takes over once the lease expires")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the lease expired"
    );
    assert!(term_b > term_a, "a new, higher fencing term");
    b.check(term_b).await.unwrap();
    let lease: Lease = server.get(Some(NS), "dory-orchestrator").unwrap().unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test]
async fn a_resigning_leader_hands_over_at_once_and_a_deposed_one_is_fenced() {
    let server = server().await;
    let store = MemoryStore::new(Arc::new(SystemClock));
    let a = LeaseLeadership::new(
        server.client_without_retries().unwrap(),
        lease_config("a"),
        MemoryLeadership::new(&store),
    )
    .unwrap();
    let b = Arc::new(
        LeaseLeadership::new(
            server.client_without_retries().unwrap(),
            lease_config("b"),
            MemoryLeadership::new(&store),
        )
        .unwrap(),
    );
    let term_a = a.acquire().await.unwrap();
    let waiting = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.acquire().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.resign(term_a).await.unwrap();
    let term_b = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("b takes over at once after a resigns")
        .unwrap()
        .unwrap();
    assert!(a.check(term_a).await.unwrap_err().is_fenced());
    b.check(term_b).await.unwrap();

    // Someone else takes the Lease from under b (a hand edit, a split brain): b's next
    // renewal finds it and b steps down; its check fails without asking the API server.
    server
        .modify::<Lease>(Some(NS), "dory-orchestrator", |l| {
            l.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
        })
        .unwrap();
    eventually(5, "b steps down", || async {
        b.check(term_b).await.err().filter(|e| e.is_fenced())
    })
    .await;
}

#[tokio::test]
async fn a_held_lease_is_renewed_with_one_request_each_time() {
    let server = server().await;
    let store = MemoryStore::new(Arc::new(SystemClock));
    let leader = LeaseLeadership::new(
        server.client_without_retries().unwrap(),
        lease_config("a"),
        MemoryLeadership::new(&store),
    )
    .unwrap();
    let term = leader.acquire().await.unwrap();
    let mark = server.mark();
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let requests: Vec<_> = server
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.resource == "leases")
        .collect();
    // Every 300 ms: five or six renewals, each a PUT against the resourceVersion this
    // replica wrote last; no read in between.
    assert!((4..=7).contains(&requests.len()), "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.verb == dory_k8s_fake::Verb::Update && r.code == 200),
        "{requests:?}"
    );
    leader.check(term).await.unwrap();
}
