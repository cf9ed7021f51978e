//! Opening one fresh file from several processes at once, as a starting `dory orchestrator`
//! and the `dory status` commands polled beside it do: the opens race to switch the file to WAL (which
//! SQLite answers with SQLITE_BUSY at once, without waiting, to all but one), to migrate it,
//! and to close the last connection. No open may fail with SQLITE_BUSY ("database is
//! locked") before the busy timeout.
//!
//! The other processes are this test binary run again: with [`OPENER_ENV`] set,
//! `open_race::opener_process` opens the file the way `dory` does (twice in a row, as the
//! CLI's store and config source each open it) instead of returning at once.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dory_core::StateStore;
use dory_core::testing::unique_processor;
use dory_embedded::{EmbeddedDb, EmbeddedStore};

/// The database file a child opener opens; unset in an ordinary test run.
const OPENER_ENV: &str = "DORY_IT_OPEN_RACE_DB";
/// When (Unix milliseconds) the child opens, so every process opens at the same moment.
const OPENER_AT_ENV: &str = "DORY_IT_OPEN_RACE_AT";
/// Processes opening each fresh file at once (besides this one).
const PROCESSES: usize = 5;
/// Opens at once within each of those processes.
const OPENS_PER_PROCESS: usize = 3;
/// Fresh files raced over. When every connection asked for WAL and nothing retried, 1 to 12
/// opens failed in each of 5 runs out of 5 (on two cores); with the fix none in 8.
const ROUNDS: usize = 16;

fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit")
}

/// Sleeps until `at` (Unix milliseconds).
fn wait_until(at: u64) {
    let now = unix_ms();
    if at > now {
        std::thread::sleep(Duration::from_millis(at - now));
    }
}

/// Opens the file as `dory` does and reads through the store; a no-op unless run as a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opener_process() {
    let Ok(path) = std::env::var(OPENER_ENV) else {
        return;
    };
    let at: u64 = std::env::var(OPENER_AT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    wait_until(at);
    // Several opens at once in this process too, then again: more chances to meet another
    // process's first open, its migration, or its last connection closing.
    for _ in 0..2 {
        let opens: Vec<_> = (0..OPENS_PER_PROCESS)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { EmbeddedDb::open(&path).await })
            })
            .collect();
        for open in opens {
            let db = open
                .await
                .expect("open task")
                .unwrap_or_else(|e| panic!("OPEN FAILED: {e}"));
            EmbeddedStore::new(&db)
                .ownership(&unique_processor("race"))
                .await
                .unwrap_or_else(|e| panic!("READ FAILED: {e}"));
        }
    }
}

fn spawn_opener(path: &Path, at: u64) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["open_race::opener_process", "--exact", "--nocapture"])
        .env(OPENER_ENV, path)
        .env(OPENER_AT_ENV, at.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start an opener process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_opening_a_fresh_file_at_once_all_succeed() {
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("fresh.db");
        // Far enough ahead that every child has started and is waiting.
        let at = unix_ms() + 300;
        let children: Vec<Child> = (0..PROCESSES).map(|_| spawn_opener(&path, at)).collect();
        wait_until(at);
        if let Err(e) = EmbeddedDb::open(&path).await {
            failures.push(format!("round {round}, this process: {e}"));
        }
        for child in children {
            let out = child.wait_with_output().expect("wait for an opener");
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let why = stderr
                    .lines()
                    .find(|l| l.contains("FAILED:"))
                    .unwrap_or("(no message)")
                    .to_owned();
                failures.push(format!("round {round}, a child: {why}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} opens failed: {failures:#?}",
        failures.len()
    );
}
