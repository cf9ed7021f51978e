//! `dory snapshots`: export a running processor's state and import it into another one.

use std::time::Duration;

use crate::support::{Cluster, NodeSpec, all_running, counter_bin, counter_entry};

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
