//! The file config source: the shared intent suite, errors naming file, line and field, the
//! watcher's nudges, intents from another process, and a user file Dory never writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dory_core::testing::{config_intent_suite, unique_processor};
use dory_core::{Changes, ConfigSource, Error, Intent, NodeId, SitePreference};
use dory_embedded::FileConfig;

use crate::{TestDb, test_db};

/// How fast a change must nudge a subscriber.
const PROMPT: Duration = Duration::from_secs(1);

async fn nudged(changes: &mut Changes, within: Duration, what: &str) {
    tokio::time::timeout(within, changes.changed())
        .await
        .unwrap_or_else(|_| panic!("no change nudge within {within:?} after {what}"));
}

/// Writes the processors file the way editors save: a new file renamed over the old one.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    std::fs::write(&tmp, text).expect("write the new version");
    std::fs::rename(&tmp, path).expect("rename it over the file");
}

fn file(t: &TestDb, text: &str) -> PathBuf {
    let path = t.dir.path().join("dory.toml");
    std::fs::write(&path, text).expect("write the processors file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_intent_suite_passes() {
    let t = test_db().await;
    let p = unique_processor("pinnable");
    let path = file(&t, &format!("[processors.{p}]\n"));
    let source = FileConfig::open(&path, &t.db).expect("config source");
    config_intent_suite(&source, Some(&p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_among_good_ones_touches_nothing_else() {
    let t = test_db().await;
    let text = "\
[orchestrator]
name = \"the CLI's, not ours\"

[processors.alpha]
workload = { image = \"x:1\" }

[processors.broken]
checkpoint_interval = \"often\"

[processors.omega]
workload = { image = \"x:1\" }
restart = { crash_loop_failures = 0 }

[processors.zulu]
workload = { image = \"x:1\" }
";
    let path = file(&t, text);
    let source = FileConfig::open(&path, &t.db).expect("config source");
    let desired = source
        .desired()
        .await
        .expect("bad entries never fail the list");
    let ids: Vec<&str> = desired.processors.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "zulu"], "{desired:?}");
    assert!(
        desired
            .processors
            .iter()
            .all(|s| s.workload.image.as_deref() == Some("x:1"))
    );
    let shown = path.display().to_string();
    for (id, at, field) in [
        (
            "broken",
            format!("{shown}:8:1"),
            "field `checkpoint_interval`",
        ),
        (
            "omega",
            format!("{shown}:12:13"),
            "field `restart.crash_loop_failures`",
        ),
    ] {
        let entry = desired
            .invalid
            .iter()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("{id} is not reported: {:?}", desired.invalid));
        assert!(entry.error.starts_with(&at), "{id}: {}", entry.error);
        assert!(entry.error.contains(field), "{id}: {}", entry.error);
    }
    assert_eq!(desired.invalid.len(), 2, "{:?}", desired.invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_does_not_parse_is_invalid_naming_file_and_line() {
    let t = test_db().await;
    let path = file(&t, "[processors.a]\n\n[processors.b\nsite = \"edge\"\n");
    let source = FileConfig::open(&path, &t.db).expect("a broken file still opens");
    let e = source.desired().await.expect_err("a file that is not TOML");
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(
        e.to_string().contains(&format!("{}:3:", path.display())),
        "{e}"
    );
    // Fixed, it lists again.
    save(&path, "[processors.a]\n[processors.b]\nsite = \"edge\"\n");
    let desired = source.desired().await.expect("fixed");
    assert_eq!(desired.processors.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_file_nudges_within_a_second() {
    let t = test_db().await;
    let path = file(&t, "[processors.a]\n");
    let source = FileConfig::open(&path, &t.db).expect("config source");
    let mut changes = source.changes();
    // Reading the file is no change.
    source.desired().await.expect("desired");
    assert!(
        tokio::time::timeout(Duration::from_millis(400), changes.changed())
            .await
            .is_err(),
        "reading the file must not nudge"
    );
    save(&path, "[processors.a]\nsite = \"cloud\"\n");
    nudged(&mut changes, PROMPT, "saving by rename").await;
    assert_eq!(
        source.desired().await.expect("desired").processors[0].site,
        SitePreference::Cloud
    );
    // Written in place, as `echo >>` would.
    std::fs::write(&path, "[processors.a]\nsite = \"edge\"\n").expect("write in place");
    nudged(&mut changes, PROMPT, "writing in place").await;
    assert_eq!(
        source.desired().await.expect("desired").processors[0].site,
        SitePreference::Edge
    );
    // Another file in the same directory is none of its business.
    std::fs::write(t.dir.path().join("notes.txt"), "hello").expect("write another file");
    assert!(
        tokio::time::timeout(Duration::from_millis(400), changes.changed())
            .await
            .is_err(),
        "another file must not nudge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_recorded_by_another_process_nudge_and_show() {
    let t = test_db().await;
    let path = file(&t, "[processors.a]\npin = \"from-file\"\n");
    let daemon = FileConfig::open(&path, &t.db).expect("the orchestrator's source");
    let mut changes = daemon.changes();
    // `dory move` and `dory drain`: another process, its own handle on the database.
    let cli = FileConfig::open(&path, &t.another().await).expect("the CLI's source");
    cli.record_intent(&Intent::Pin {
        processor: dory_core::ProcessorId::new("a").expect("id"),
        node: Some(NodeId::new("n2")),
    })
    .await
    .expect("pin");
    nudged(&mut changes, PROMPT, "a pin from another process").await;
    let desired = daemon.desired().await.expect("desired");
    assert_eq!(
        desired.processors[0].pin,
        Some(NodeId::new("n2")),
        "the recorded pin wins"
    );
    cli.record_intent(&Intent::Cordon {
        node: NodeId::new("n3"),
    })
    .await
    .expect("cordon");
    nudged(&mut changes, PROMPT, "a cordon from another process").await;
    assert!(
        daemon
            .desired()
            .await
            .expect("desired")
            .cordoned
            .contains(&NodeId::new("n3"))
    );
    cli.record_intent(&Intent::Pin {
        processor: dory_core::ProcessorId::new("a").expect("id"),
        node: None,
    })
    .await
    .expect("unpin");
    nudged(&mut changes, PROMPT, "an unpin from another process").await;
    assert_eq!(
        daemon.desired().await.expect("desired").processors[0].pin,
        Some(NodeId::new("from-file")),
        "an unpin removes only the recorded pin"
    );
    // The user's file is never written.
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "[processors.a]\npin = \"from-file\"\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_a_processor_not_in_the_file_is_not_found() {
    let t = test_db().await;
    let path = file(&t, "[processors.a]\n");
    let source = FileConfig::open(&path, &t.db).expect("config source");
    for node in [Some(NodeId::new("n1")), None] {
        let r = source
            .record_intent(&Intent::Pin {
                processor: unique_processor("nobody"),
                node,
            })
            .await;
        assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    }
    let r = source
        .record_intent(&Intent::Cordon {
            node: NodeId::new(""),
        })
        .await;
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_missing_file_fails_naming_it() {
    let t = test_db().await;
    let path = t.dir.path().join("missing.toml");
    let e = FileConfig::open(&path, &t.db).expect_err("missing file");
    assert!(e.to_string().contains("missing.toml"), "{e}");
    assert!(matches!(dory_core::Error::from(e), Error::NotFound(_)));
}

#[test]
fn opening_outside_a_runtime_is_a_clear_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t = rt.block_on(test_db());
    let path = file(&t, "");
    let e = FileConfig::open(&path, &t.db).expect_err("no runtime");
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}
