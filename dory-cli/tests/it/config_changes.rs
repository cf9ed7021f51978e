//! Editing the processors in `dory.toml` while the orchestrator runs.
//!
//! What is measured: from the moment the edited file is renamed into place (wall clock) to
//! the orchestrator's `Began` event for the processor (the event's own timestamp, in the same
//! wall clock, read from the orchestrator's log). That is the orchestrator's reaction: the
//! file watcher's nudge (50 to 250 ms after the save), a round, the plan. It must be under a
//! second. The instance appearing, being replaced or ending then takes process start-up (or a
//! make-before-break move) on top, which is only bounded loosely here.

use std::time::Duration;

use crate::support::{
    Backends, Cluster, NodeSpec, all_running, assert_counted_exactly_once, counter_bin,
    counter_entry, now_ms,
};

const NODES: [NodeSpec; 2] = [
    NodeSpec {
        id: "n1",
        site: "cloud",
    },
    NodeSpec {
        id: "n2",
        site: "cloud",
    },
];

/// How long the orchestrator may take to act on an edited file.
const REACTION_MS: u64 = 1000;

/// How long an instance may take to start or a move to finish once the orchestrator acted.
const START_UP: Duration = Duration::from_secs(20);

/// Waits for the first `what` event about `processor` at or after `since`; returns how long
/// after `since` it came.
fn reaction(cluster: &Cluster, processor: &str, what: &str, since: u64) -> u64 {
    let at = cluster.wait_until(
        &format!("{processor}: {what}"),
        Duration::from_millis(REACTION_MS) + Duration::from_secs(10),
        || {
            cluster
                .event_times(processor, what)
                .into_iter()
                .find(|t| *t >= since)
        },
    );
    at - since
}

#[test]
fn processors_added_changed_and_removed_in_the_file_are_acted_on_within_a_second() {
    let Some(counter) = counter_bin() else { return };
    let entry =
        |id: &str, interval_ms: u64| counter_entry(id, "cloud", &counter, 500, interval_ms, "");
    let mut cluster = Cluster::build(
        &NODES,
        &[],
        &format!("{}{}", entry("keep", 20), entry("gone", 20)),
    );
    cluster.start_orchestrator();
    let before = cluster.wait_for("both running", Duration::from_secs(60), |s| {
        all_running(s, &["keep", "gone"])
    });
    let keep = before["keep"].epoch;

    // Added.
    let written = cluster.set_processors(&format!(
        "{}{}{}",
        entry("keep", 20),
        entry("gone", 20),
        entry("new", 20)
    ));
    let took = reaction(&cluster, "new", "begin Start", written);
    eprintln!("added: the orchestrator began its start {took} ms after the write");
    assert!(took < REACTION_MS, "added: {took} ms\n{}", cluster.logs());
    cluster.wait_for("the new processor running", START_UP, |s| {
        all_running(s, &["keep", "gone", "new"])
    });

    // Changed: its `config` is part of what runs, so it is rolled out as a planned move.
    let changed = cluster.status()["new"].clone();
    let written = cluster.set_processors(&format!(
        "{}{}{}",
        entry("keep", 20),
        entry("gone", 20),
        entry("new", 25)
    ));
    let took = reaction(&cluster, "new", "begin Move", written);
    eprintln!("changed: the orchestrator began its move {took} ms after the write");
    assert!(took < REACTION_MS, "changed: {took} ms\n{}", cluster.logs());
    let replaced = cluster.wait_for("the changed processor replaced", START_UP, |s| {
        all_running(s, &["new"]) && s["new"].epoch > changed.epoch
    });
    assert_ne!(
        replaced["new"].spec_revision, changed.spec_revision,
        "the status follows the new spec"
    );

    // Removed.
    let written = cluster.set_processors(&format!("{}{}", entry("keep", 20), entry("new", 25)));
    let took = reaction(&cluster, "gone", "begin Terminate", written);
    eprintln!("removed: the orchestrator began its termination {took} ms after the write");
    assert!(took < REACTION_MS, "removed: {took} ms\n{}", cluster.logs());
    cluster.wait_until("the removed processor gone", START_UP, || {
        let gone = !cluster.status().contains_key("gone")
            && !cluster.alive_instances().contains_key("gone");
        gone.then_some(())
    });
    // Removal gives the state up: the store no longer names an owner.
    assert_eq!(cluster.ownership("gone").and_then(|o| o.owner), None);

    // None of it touched the processor that stayed; the move lost and repeated nothing.
    let after = cluster.status();
    assert_eq!(after["keep"].epoch, keep, "keep was restarted or moved");
    assert_eq!(
        assert_counted_exactly_once("keep", &cluster.output("keep")).len(),
        1
    );
    assert_eq!(
        assert_counted_exactly_once("new", &cluster.output("new")).len(),
        2
    );
}

#[test]
fn a_bad_entry_is_that_processors_error_and_touches_nothing_else() {
    let Some(counter) = counter_bin() else { return };
    let entry = |id: &str| counter_entry(id, "cloud", &counter, 500, 20, "");
    let good = format!("{}{}", entry("one"), entry("two"));
    let mut cluster = Cluster::build(&NODES, &[], &good);
    cluster.start_orchestrator();
    let before = cluster.wait_for("both running", Duration::from_secs(60), |s| {
        all_running(s, &["one", "two"])
    });

    // A new entry with a bad field, and a running processor's entry broken.
    let broken = counter_entry("two", "cloud", &counter, 0, 20, "");
    let written = cluster.set_processors(&format!(
        "{}{broken}[processors.bad]\nsite = \"moon\"\n",
        entry("one")
    ));
    let status = cluster.wait_for("both errors in the status", Duration::from_secs(10), |s| {
        s.get("bad").is_some_and(|b| b.phase == "invalid")
            && s.get("two").is_some_and(|t| t.phase == "invalid")
    });
    let took = status["bad"].updated_at.0.saturating_sub(written);
    eprintln!("bad entry: reported {took} ms after the write");
    assert!(took < REACTION_MS, "{took} ms");
    let bad = status["bad"].last_error.clone().unwrap_or_default();
    assert!(
        bad.contains("dory.toml:") && bad.contains("site") && bad.contains("moon"),
        "{bad}"
    );
    let two = status["two"].last_error.clone().unwrap_or_default();
    assert!(two.contains("checkpoint_interval"), "{two}");
    let table = cluster.dory_ok(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bad") && l.contains("invalid") && l.contains("moon")),
        "{table}"
    );

    // Nothing else moved: `one` keeps its epoch, the broken `two` keeps running as it was.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.status()["one"].epoch, before["one"].epoch);
    let alive = cluster.alive_instances();
    assert_eq!(
        alive
            .get("two")
            .map(|v| v.iter().map(|(e, _)| *e).collect::<Vec<_>>()),
        Some(vec![before["two"].epoch.unwrap().0]),
        "{alive:?}"
    );
    assert!(!alive.contains_key("bad"), "{alive:?}");

    // Fixed, `two` is running again as the same instance.
    cluster.set_processors(&good);
    let fixed = cluster.wait_for("two valid again", Duration::from_secs(10), |s| {
        all_running(s, &["one", "two"]) && !s.contains_key("bad")
    });
    assert_eq!(fixed["two"].epoch, before["two"].epoch);
    assert_eq!(fixed["one"].epoch, before["one"].epoch);
    for id in ["one", "two"] {
        assert_eq!(
            assert_counted_exactly_once(id, &cluster.output(id)).len(),
            1
        );
    }
}

/// The same through the Postgres config source: rows of its `processors` table, nudged by
/// LISTEN/NOTIFY. Measured from just before the statement to the orchestrator's event.
#[test]
fn processors_added_changed_and_removed_in_postgres_are_acted_on_within_a_second() {
    let Some(counter) = counter_bin() else { return };
    let Some(mut cluster) = Cluster::build_on(
        Backends::PostgresRabbitmq,
        &NODES,
        &[],
        "\n[config]\nsource = \"postgres\"\n",
        |_, _| String::new(),
    ) else {
        return;
    };
    let spec = |interval_ms: u64| {
        serde_json::json!({
            "site": "cloud",
            "checkpoint_interval": 500,
            "config": { "interval_ms": interval_ms },
            "workload": { "command": [counter.display().to_string()] },
        })
        .to_string()
    };
    const UPSERT: &str = "INSERT INTO processors (id, spec) VALUES ($1, $2::jsonb) \
                          ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec, updated_at = now()";
    cluster.pg_execute(UPSERT, &["keep", &spec(20)]);
    cluster.start_orchestrator();
    let before = cluster.wait_for("keep running", Duration::from_secs(60), |s| {
        all_running(s, &["keep"])
    });

    let written = now_ms();
    cluster.pg_execute(UPSERT, &["new", &spec(20)]);
    let took = reaction(&cluster, "new", "begin Start", written);
    eprintln!("added row: the orchestrator began its start {took} ms after the statement");
    assert!(took < REACTION_MS, "added: {took} ms\n{}", cluster.logs());
    let started = cluster.wait_for("new running", START_UP, |s| {
        all_running(s, &["keep", "new"])
    });

    let written = now_ms();
    cluster.pg_execute(UPSERT, &["new", &spec(25)]);
    let took = reaction(&cluster, "new", "begin Move", written);
    eprintln!("changed row: the orchestrator began its move {took} ms after the statement");
    assert!(took < REACTION_MS, "changed: {took} ms\n{}", cluster.logs());
    cluster.wait_for("new replaced", START_UP, |s| {
        all_running(s, &["new"]) && s["new"].epoch > started["new"].epoch
    });

    // A bad row is that processor's error and touches nothing else.
    cluster.pg_execute(UPSERT, &["bad", r#"{"site": "moon"}"#]);
    let status = cluster.wait_for("the bad row reported", START_UP, |s| {
        s.get("bad").is_some_and(|b| b.last_error.is_some())
    });
    let error = status["bad"].last_error.clone().unwrap_or_default();
    assert!(error.contains("site"), "{error}");

    let written = now_ms();
    cluster.pg_execute("DELETE FROM processors WHERE id = $1", &["new"]);
    let took = reaction(&cluster, "new", "begin Terminate", written);
    eprintln!("deleted row: the orchestrator began its termination {took} ms after the statement");
    assert!(took < REACTION_MS, "removed: {took} ms\n{}", cluster.logs());
    cluster.wait_until("new gone", START_UP, || {
        (!cluster.alive_instances().contains_key("new")).then_some(())
    });
    assert_eq!(cluster.status()["keep"].epoch, before["keep"].epoch);
}
