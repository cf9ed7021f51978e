//! The on-disk registry: file modes and damaged records.

use dory_core::{Epoch, Error, Phase, Placement};
use dory_local::LocalPlacement;

use crate::support::{Scratch, edge, ended, pid, request, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_skipped_with_an_error_naming_the_file() {
    let scratch = Scratch::new("corrupt");
    let first = scratch.open();
    for name in ["good", "bad"] {
        first
            .launch(&request(&spec(name, "exit 0", &[]), 1, &edge()))
            .await
            .unwrap();
        ended(&first, name, 1).await;
    }
    drop(first);
    let record = scratch.state_dir().join("instances/bad-1/instance.json");
    std::fs::write(&record, b"{\"processor\": \"bad\", \"epo").unwrap();

    // Not a panic and not a refusal to open: the other instances are served.
    let second = scratch.open();
    let all = second.instances().await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.processor.as_str()).collect::<Vec<_>>(),
        ["good"]
    );
    assert_eq!(all[0].phase, Phase::Exited { code: 0 });
    let problems = second.registry_problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, record);
    assert!(
        problems[0].1.contains(&record.display().to_string()) && problems[0].1.contains("corrupt"),
        "{problems:?}"
    );
    // Its directory still holds the name: the same (processor, epoch) is not started twice.
    let err = second
        .launch(&request(&spec("bad", "exit 0", &[]), 1, &edge()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    // Reading the record directly gives the same clear error.
    let err =
        dory_local::InstanceRecord::load(&second.instance_dir(&pid("bad"), Epoch(1))).unwrap_err();
    assert!(
        err.to_string().contains("instance.json is corrupt"),
        "{err}"
    );
}

#[test]
fn a_config_that_cannot_work_is_refused() {
    let scratch = Scratch::new("config");
    let mut config = scratch.config();
    config.supervisor.clear();
    let err = LocalPlacement::open(config).unwrap_err();
    assert!(err.to_string().contains("supervisor"), "{err}");
    let mut config = scratch.config();
    let twice = config.nodes[0].clone();
    config.nodes.push(twice);
    let err = LocalPlacement::open(config).unwrap_err();
    assert!(
        err.to_string().contains("edge-1 is configured twice"),
        "{err}"
    );
    // Opening outside a runtime works; polling starts on first use.
    LocalPlacement::open(scratch.config()).unwrap();
}
