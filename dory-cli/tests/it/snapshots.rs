//! `dory snapshots`: export a running processor's state and import it into another one; a
//! delta snapshot inspected with its base, exported whole, and refused by import.

use std::time::Duration;

use dory_core::snapshot::{self, Base, CHUNK_SIZE, Codec, Encoder, SnapshotKind};
use dory_core::{
    Leadership as _, ProcessorId, Sequence, StateStore as _, StoredSnapshot, Timestamp,
};
use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStore};

use crate::support::{Cluster, NodeSpec, all_running, counter_bin, counter_entry, dory, now_ms};

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        id: "cloud-1",
        site: "cloud",
    },
    NodeSpec {
        id: "cloud-2",
        site: "cloud",
    },
];

#[test]
fn an_exported_state_imported_into_another_processor_continues_there() {
    let Some(counter) = counter_bin() else { return };
    let source = counter_entry("source", "cloud", &counter, 300, 20, "");
    let mut cluster = Cluster::build(&NODES, &[], &source);
    cluster.start_orchestrator();
    cluster.wait_for("a committed checkpoint", Duration::from_secs(60), |s| {
        all_running(s, &["source"]) && s["source"].last_checkpoint.is_some_and(|c| c.0 >= 10)
    });
    let file = cluster.dir.path().join("source.snap");
    let file = file.to_str().unwrap();
    cluster.dory_ok(&["snapshots", "source", "export", "--to", file]);
    let inspected: serde_json::Value = serde_json::from_str(&cluster.dory_ok(&[
        "snapshots",
        "source",
        "inspect",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(inspected["processor"], "source", "{inspected}");

    // While an orchestrator leads, an import is refused (it would race the orchestrator).
    let refused = cluster.dory(&["snapshots", "copy", "import", "--from", file]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("an orchestrator leads"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // A file that is not a snapshot is refused, naming it.
    let config = cluster.config.to_str().unwrap().to_string();
    cluster.kill_orchestrator();
    let bad = cluster.dory(&["snapshots", "copy", "import", "--from", &config]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a usable Dory snapshot"));

    let exported = std::fs::read(file).unwrap();
    let header = dory_core::snapshot::verify(&exported).unwrap();
    let out = cluster.dory_ok(&["snapshots", "copy", "import", "--from", file]);
    assert!(out.contains("as copy"), "{out}");

    // The copy's first start restores the imported state: it counts on from there.
    let copy = counter_entry("copy", "cloud", &counter, 300, 20, "");
    cluster.set_processors(&format!("{source}{copy}"));
    cluster.start_orchestrator();
    cluster.wait_for("the copy running", Duration::from_secs(60), |s| {
        all_running(s, &["source", "copy"])
    });
    cluster.wait_until("the copy's output", Duration::from_secs(20), || {
        (!cluster.output("copy").messages.is_empty()).then_some(())
    });
    let first = &cluster.output("copy").messages[0];
    assert_eq!(first.sequence.0, header.sequence.0 + 1, "{first:?}");
    assert_eq!(
        String::from_utf8_lossy(&first.payload),
        (header.sequence.0 + 1).to_string()
    );
}

#[test]
fn a_delta_is_inspected_with_its_base_exported_whole_and_refused_by_import() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dory.toml"),
        "[orchestrator]\nstate_dir = \"state\"\n[placement]\nkind = \"local\"\n[[placement.nodes]]\nid = \"n1\"\nsite = \"cloud\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let p = ProcessorId::new("delta").unwrap();
    let base_body = vec![7u8; 3 * CHUNK_SIZE];
    let mut frozen = base_body.clone();
    frozen[CHUNK_SIZE + 1] = 8;

    // A full checkpoint at sequence 5, then a move committing only what changed since, as a
    // pre-copy move does (the store suite's `a_delta_is_committed_beside_its_base`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (delta, e1, e2) = runtime.block_on(async {
        let db = EmbeddedDb::open(dir.path().join("state/dory.db"))
            .await
            .unwrap();
        let store = EmbeddedStore::new(&db);
        let leadership = EmbeddedLeadership::new(&db, "test");
        let term = leadership.acquire().await.unwrap();
        let lease = Duration::from_secs(1);
        let e1 = store.claim_epoch(&p, term).await.unwrap();
        store.assign_owner(&p, None, e1, lease, term).await.unwrap();
        let base_bytes = Encoder::default()
            .encode_body(&p, e1, Sequence(5), Codec::Raw, &base_body)
            .unwrap();
        let base = StoredSnapshot::from_encoded(base_bytes.clone(), Timestamp(now_ms())).unwrap();
        store.put_checkpoint(&base, lease).await.unwrap();
        let kept = Base::of_encoded(&base_bytes, base_body.clone()).unwrap();
        let delta = Encoder::default()
            .encode_delta(&p, e1, Sequence(6), &kept, &frozen)
            .unwrap();
        let e2 = store.claim_epoch(&p, term).await.unwrap();
        let mut moved = StoredSnapshot::from_encoded(delta.clone(), Timestamp(now_ms())).unwrap();
        moved.meta.epoch = e2;
        store.commit_move(e1, &moved, lease, term).await.unwrap();
        leadership.resign(term).await.unwrap();
        (delta, e1, e2)
    });
    drop(runtime);

    // inspect: the latest is the delta, naming its base.
    let (code, out, err) = dory(&["snapshots", "delta", "inspect", "-o", "json"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    let fields: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fields["kind"], "Delta", "{fields}");
    assert_eq!(fields["sequence"], 6, "{fields}");
    assert_eq!(fields["filed_under_epoch"], e2.0, "{fields}");
    assert_eq!(fields["base_epoch"], e1.0, "{fields}");
    assert_eq!(fields["base_sequence"], 5, "{fields}");
    assert_eq!(fields["base_stored"], true, "{fields}");
    // The base itself is a full snapshot and names none.
    let (code, out, err) = dory(
        &[
            "snapshots",
            "delta",
            "inspect",
            "--epoch",
            &e1.0.to_string(),
            "--sequence",
            "5",
            "-o",
            "json",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let fields: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fields["kind"], "Full", "{fields}");
    assert!(fields.get("base_epoch").is_none(), "{fields}");

    // export: a full snapshot of the frozen state, at the delta's sequence.
    let (code, out, err) = dory(
        &["snapshots", "delta", "export", "--to", "full.snap"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("put together with its base"), "{out}");
    let exported = std::fs::read(dir.path().join("full.snap")).unwrap();
    let (header, body) = snapshot::decode_body(&exported, &Default::default()).unwrap();
    assert_eq!(
        (header.kind, header.sequence, header.epoch),
        (SnapshotKind::Full, Sequence(6), e1)
    );
    assert!(body == frozen, "the exported state is not the frozen one");

    // import: the delta file is refused, naming its base; the exported full one is taken.
    std::fs::write(dir.path().join("delta.snap"), &delta).unwrap();
    let (code, out, err) = dory(
        &["snapshots", "copy", "import", "--from", "delta.snap"],
        dir.path(),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("delta.snap is a delta snapshot") && err.contains("sequence #5"),
        "{err}"
    );
    let (code, out, err) = dory(
        &["snapshots", "copy", "import", "--from", "full.snap"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("as copy"), "{out}");
}
