//! Lease writes as leader election makes them.

use dory_k8s_fake::Verb;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, PostParams};

use crate::{TestResult, meta, server, status_of};

#[tokio::test]
async fn racing_renewals_one_wins_the_other_conflicts() -> TestResult {
    let server = server().await;
    let one: Api<Lease> = Api::default_namespaced(server.client()?);
    let two: Api<Lease> = Api::default_namespaced(server.client()?);
    let lease = Lease {
        metadata: meta("dory-leader"),
        spec: Some(LeaseSpec {
            holder_identity: Some("one".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    one.create(&PostParams::default(), &lease).await?;
    let seen_by_one = one.get("dory-leader").await?;
    let seen_by_two = two.get("dory-leader").await?;
    assert_eq!(
        seen_by_one.metadata.resource_version,
        seen_by_two.metadata.resource_version
    );

    let mut take = seen_by_two.clone();
    take.spec.as_mut().unwrap().holder_identity = Some("two".into());
    let mut renew = seen_by_one.clone();
    renew.spec.as_mut().unwrap().lease_transitions = Some(0);

    let pp = PostParams::default();
    let (a, b) = tokio::join!(
        one.replace("dory-leader", &pp, &renew),
        two.replace("dory-leader", &pp, &take),
    );
    let (winner, loser) = match (a, b) {
        (Ok(w), Err(e)) | (Err(e), Ok(w)) => (w, status_of::<Lease>(Err(e))),
        (a, b) => panic!("exactly one write wins: {a:?} / {b:?}"),
    };
    assert_eq!((loser.code, loser.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        loser.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"dory-leader\": the object \
         has been modified; please apply your changes to the latest version and try again"
    );
    assert_eq!(one.get("dory-leader").await?, winner);
    assert_eq!(server.request_count(Verb::Update, "leases"), 2);
    Ok(())
}
