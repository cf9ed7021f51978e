use dory_core::testing::leadership_suite;
use dory_core::{Leadership, StateStore};
use dory_mock::MemoryLeadership;

use crate::{pid, store};

#[tokio::test(start_paused = true)]
async fn memory_leadership_keeps_the_leadership_contract() {
    let store = store();
    let (a, b) = (MemoryLeadership::new(&store), MemoryLeadership::new(&store));
    leadership_suite(&a, &b, &store).await;
    assert!(!a.leads() && !b.leads());
}

#[tokio::test(start_paused = true)]
async fn a_deposed_leader_is_fenced_by_the_store_once_another_leads() {
    let store = store();
    let (a, b) = (MemoryLeadership::new(&store), MemoryLeadership::new(&store));
    let p = pid("deposed");
    let ta = a.acquire().await.unwrap();
    assert!(a.depose());
    assert!(
        !a.depose(),
        "deposing a participant that does not lead does nothing"
    );
    assert!(a.check(ta).await.unwrap_err().is_fenced());
    // Until someone else acquires, the store cannot tell: the old term is still current.
    store.claim_epoch(&p, ta).await.unwrap();

    let tb = b.acquire().await.unwrap();
    assert!(tb > ta);
    assert!(store.claim_epoch(&p, ta).await.unwrap_err().is_fenced());
    store.claim_epoch(&p, tb).await.unwrap();

    assert_eq!(store.depose_leader(), Some(tb));
    assert_eq!(store.depose_leader(), None);
    assert!(b.check(tb).await.unwrap_err().is_fenced());
    assert!(a.acquire().await.unwrap() > tb);
}

#[tokio::test(start_paused = true)]
async fn acquiring_while_leading_keeps_the_term() {
    let store = store();
    let a = MemoryLeadership::new(&store);
    let t = a.acquire().await.unwrap();
    assert_eq!(a.acquire().await.unwrap(), t);
    assert_eq!(store.term(), t);
}
