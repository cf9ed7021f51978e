//! A cluster on this machine for one test: a `dory.toml` in a temporary directory, the
//! `dory` binary as the orchestrator, the counter example as the processor.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dory_core::{NodeId, Ownership, ProcessorId, ProcessorStatus, StateStore as _};
use dory_embedded::OutputLog;

/// The `dory` binary under test.
pub(crate) fn dory_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dory")
}

/// The counter example binary (`DORY_COUNTER_BIN`; `scripts/test.sh` builds it). `None`
/// skips a test outside CI; under `CI=true` a missing binary fails it.
pub(crate) fn counter_bin() -> Option<PathBuf> {
    match std::env::var_os("DORY_COUNTER_BIN") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        other => {
            let why = match other {
                Some(p) => format!("DORY_COUNTER_BIN={} is not a file", Path::new(&p).display()),
                None => "DORY_COUNTER_BIN is not set".to_string(),
            };
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why} (build it: cargo build -p dory-example-counter)");
            }
            eprintln!("skipped: {why} (build it: cargo build -p dory-example-counter)");
            None
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch: the clock the orchestrator, the embedded
/// store and the local placement stamp their times with (one machine, one clock).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One virtual node.
pub(crate) struct NodeSpec {
    pub(crate) id: &'static str,
    pub(crate) site: &'static str,
}

/// The `[orchestrator]` settings every test cluster starts from: fast timings, all valid per
/// `Settings::validate`. A test overrides any of them with [`Cluster::build`].
const SETTINGS: [(&str, &str); 13] = [
    ("listen", "127.0.0.1:0"),
    ("state_dir", "state"),
    ("lease", "2s"),
    ("lease_margin", "500ms"),
    ("node_lost_grace", "4s"),
    ("stabilisation", "5s"),
    ("min_move_time", "3s"),
    ("resync_interval", "500ms"),
    ("stop_grace", "5s"),
    ("start_timeout", "20s"),
    ("retry_initial", "200ms"),
    ("retry_max", "2s"),
    ("poll_interval", "50ms"),
];

/// The `[processors.<id>]` table of a counter: it counts 1, 2, 3, … every `interval_ms` and
/// checkpoints every `checkpoint_ms`; `extra` is more TOML for the same table (e.g.
/// `fallback = false`), one key per line.
pub(crate) fn counter_entry(
    id: &str,
    site: &str,
    counter: &Path,
    checkpoint_ms: u64,
    interval_ms: u64,
    extra: &str,
) -> String {
    format!(
        "[processors.{id}]\nsite = \"{site}\"\ncheckpoint_interval = {checkpoint_ms}\nconfig = {{ interval_ms = {interval_ms} }}\n{extra}[processors.{id}.workload]\ncommand = [{:?}]\n",
        counter.display().to_string()
    )
}

/// A cluster of virtual nodes under one `dory.toml`.
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
    /// Everything in `dory.toml` but the processors.
    header: String,
    orchestrator: Option<Child>,
    /// How many orchestrators were started: names their log files in start order.
    starts: usize,
    nodes: Vec<&'static str>,
    /// The embedded store opened on the cluster's database, once asked for.
    store: OnceCell<(tokio::runtime::Runtime, dory_embedded::EmbeddedStore)>,
}

impl Cluster {
    /// Writes the config: fast timings, these nodes, one counter per processor id (a step
    /// every 20 ms, a checkpoint every 500 ms).
    pub(crate) fn new(nodes: &[NodeSpec], counters: &[(&str, &str)], counter: &Path) -> Cluster {
        let processors: String = counters
            .iter()
            .map(|(id, site)| counter_entry(id, site, counter, 500, 20, ""))
            .collect();
        Cluster::build(nodes, &[], &processors)
    }

    /// Writes the config: the default settings with `settings` over them, these nodes, and
    /// `processors` (`[processors.*]` tables) as they are.
    pub(crate) fn build(
        nodes: &[NodeSpec],
        settings: &[(&str, &str)],
        processors: &str,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut merged: BTreeMap<&str, &str> = SETTINGS.into_iter().collect();
        merged.extend(settings.iter().copied());
        let mut header = String::from("[orchestrator]\n");
        for (key, value) in merged {
            header.push_str(&format!("{key} = {value:?}\n"));
        }
        header.push_str("\n[placement]\nkind = \"local\"\n");
        for n in nodes {
            header.push_str(&format!(
                "[[placement.nodes]]\nid = \"{}\"\nsite = \"{}\"\n",
                n.id, n.site
            ));
        }
        let config = dir.path().join("dory.toml");
        std::fs::write(&config, format!("{header}{processors}")).expect("write config");
        Cluster {
            dir,
            config,
            header,
            orchestrator: None,
            starts: 0,
            nodes: nodes.iter().map(|n| n.id).collect(),
            store: OnceCell::new(),
        }
    }

    /// Replaces the processors in `dory.toml` as an editor saves: a new file renamed over the
    /// old one. Returns the wall-clock time of the rename, in ms.
    pub(crate) fn set_processors(&self, processors: &str) -> u64 {
        let tmp = self.dir.path().join(".dory.toml.new");
        std::fs::write(&tmp, format!("{}{processors}", self.header)).expect("write config");
        let at = now_ms();
        std::fs::rename(&tmp, &self.config).expect("replace config");
        at
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("orchestrator-{n:02}.log"))
    }

    /// Starts `dory orchestrator` (its log goes to `orchestrator-<n>.log`) and waits until it
    /// leads, failing with its log if it exits first.
    pub(crate) fn start_orchestrator(&mut self) {
        self.spawn_orchestrator();
        self.wait_leading(Duration::from_secs(30));
    }

    /// Starts `dory orchestrator` and returns at once.
    pub(crate) fn spawn_orchestrator(&mut self) {
        assert!(self.orchestrator.is_none(), "an orchestrator is running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let child = Command::new(dory_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("orchestrator")
            .env("DORY_LOG", "info,dory::events=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dory orchestrator");
        self.orchestrator = Some(child);
    }

    /// SIGKILLs the orchestrator (instances keep running: they are in sessions of their own).
    pub(crate) fn kill_orchestrator(&mut self) {
        if let Some(mut child) = self.orchestrator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log of the orchestrator started last.
    pub(crate) fn current_log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// Waits until the orchestrator started last leads (its first round follows at once);
    /// fails with its log if it exits first.
    pub(crate) fn wait_leading(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.current_log().contains("leading with term") {
                return;
            }
            let exited = self.orchestrator.as_mut().map_or(Ok(None), Child::try_wait);
            if let Ok(Some(code)) = exited {
                panic!(
                    "the orchestrator exited ({code}) before it led:\n{}",
                    self.current_log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "the orchestrator did not lead within {timeout:?}:\n{}",
                self.current_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a `dory` command against this cluster's config.
    pub(crate) fn dory(&self, args: &[&str]) -> Output {
        Command::new(dory_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run dory")
    }

    /// Runs a `dory` command that must succeed; returns its stdout.
    pub(crate) fn dory_ok(&self, args: &[&str]) -> String {
        let out = self.dory(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dory {args:?} failed: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout
    }

    /// Every processor's status, as `dory status --output json` prints it.
    pub(crate) fn status(&self) -> BTreeMap<String, ProcessorStatus> {
        let out = self.dory(&["status", "--output", "json"]);
        if !out.status.success() {
            return BTreeMap::new();
        }
        let list: Vec<ProcessorStatus> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.into_iter().map(|s| (s.processor.clone(), s)).collect()
    }

    /// Waits until `ready` holds for the status, or fails with what was seen.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&BTreeMap<String, ProcessorStatus>) -> bool,
    ) -> BTreeMap<String, ProcessorStatus> {
        let start = Instant::now();
        loop {
            let status = self.status();
            if ready(&status) {
                return status;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {status:#?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls `check` every 100 ms until it gives a value, or fails naming `what`, with the
    /// orchestrator logs.
    pub(crate) fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:#?}\n{}",
                    self.status(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The alive instances (not ended, not terminating) on every node, as `dory nodes`
    /// lists them: processor → (epoch, node), sorted.
    pub(crate) fn alive_instances(&self) -> BTreeMap<String, Vec<(u64, String)>> {
        let out = self.dory(&["nodes", "--output", "json"]);
        assert!(
            out.status.success(),
            "dory nodes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nodes json");
        let mut alive: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for row in rows.as_array().expect("a list of nodes") {
            let node = row["node"]["id"].as_str().expect("node id").to_string();
            for i in row["instances"].as_array().expect("instances") {
                let (p, e) = i
                    .as_str()
                    .and_then(|s| s.rsplit_once('@'))
                    .expect("processor@epoch");
                alive
                    .entry(p.to_string())
                    .or_default()
                    .push((e.parse().expect("epoch"), node.clone()));
            }
        }
        for list in alive.values_mut() {
            list.sort();
        }
        alive
    }

    /// When the local placement launched an instance (its registry record), in ms.
    pub(crate) fn instance_started_at(&self, processor: &str, epoch: u64) -> Option<u64> {
        let path = self
            .dir
            .path()
            .join(format!("state/instances/{processor}-{epoch}/instance.json"));
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        record["started_at"].as_u64()
    }

    fn store(&self) -> &(tokio::runtime::Runtime, dory_embedded::EmbeddedStore) {
        self.store.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let path = self.dir.path().join("state/dory.db");
            let db = runtime
                .block_on(dory_embedded::EmbeddedDb::open(&path))
                .expect("open the embedded database");
            let store = dory_embedded::EmbeddedStore::new(&db);
            (runtime, store)
        })
    }

    /// A processor's ownership row, read from the embedded store.
    pub(crate) fn ownership(&self, processor: &str) -> Option<Ownership> {
        let (runtime, store) = self.store();
        let id = ProcessorId::new(processor).expect("id");
        runtime
            .block_on(store.ownership(&id))
            .expect("read an ownership row")
    }

    /// The output of one processor.
    pub(crate) fn output(&self, processor: &str) -> OutputLog {
        dory_embedded::read_output(
            &self.dir.path().join("state/output"),
            &ProcessorId::new(processor).expect("id"),
        )
        .expect("read output")
    }

    /// Every orchestrator log, in start order.
    pub(crate) fn log_text(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The times (orchestrator clock, ms) of the events about `processor` whose text starts
    /// with `what` (e.g. `begin Start`, `moved`, `terminated`), from every orchestrator log.
    pub(crate) fn event_times(&self, processor: &str, what: &str) -> Vec<u64> {
        let needle = format!("ms] {processor}: {what}");
        self.log_text()
            .lines()
            .filter(|l| l.contains("dory::events") && l.contains(&needle))
            .filter_map(|l| {
                let end = l.find(&needle)?;
                let start = l[..end].rfind('[')? + 1;
                l[start..end].parse().ok()
            })
            .collect()
    }

    /// The `/metrics` text of the orchestrator started last (its bound address is in its
    /// first log lines).
    pub(crate) fn metrics(&self) -> String {
        let log = self.current_log();
        let addr = log
            .lines()
            .find(|l| l.contains("orchestrator starting"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no listen address in the log:\n{log}"))
            .to_string();
        let mut stream = std::net::TcpStream::connect(&addr).expect("connect to the daemon");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// The orchestrator logs, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- orchestrator-{n:02}.log (last 40 lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_orchestrator();
        let nodes = dory_local::LocalNodes::new(self.dir.path().join("state"));
        for n in &self.nodes {
            let _ = nodes.kill_node(&NodeId::new(*n));
        }
    }
}

/// Whether every listed processor runs.
pub(crate) fn all_running(status: &BTreeMap<String, ProcessorStatus>, ids: &[&str]) -> bool {
    ids.iter()
        .all(|id| status.get(*id).is_some_and(|s| s.phase == "running"))
}

/// Checks a counter's output: every sequence from 1 to the last exactly once (not even a
/// copy the deduplication rule would drop), each payload its sequence; returns the epochs
/// seen, in order.
pub(crate) fn assert_counted_exactly_once(processor: &str, log: &OutputLog) -> Vec<u64> {
    assert!(
        log.damaged.is_empty(),
        "{processor}: damaged lines {:?}",
        log.damaged
    );
    let mut epochs = Vec::new();
    for (i, m) in log.messages.iter().enumerate() {
        let expected = i as u64 + 1;
        assert_eq!(
            m.sequence.0, expected,
            "{processor}: message {i} has sequence {} (a gap or a duplicate); epochs so far {epochs:?}",
            m.sequence.0
        );
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            expected.to_string(),
            "{processor}: the count does not match the sequence"
        );
        if epochs.last() != Some(&m.epoch.0) {
            epochs.push(m.epoch.0);
        }
    }
    epochs
}

/// One epoch's stretch of a counter's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stretch {
    /// The epoch.
    pub(crate) epoch: u64,
    /// Its first sequence.
    pub(crate) first: u64,
    /// Its last sequence.
    pub(crate) last: u64,
}

/// What a counter's output shows once it passed [`assert_one_writer`].
#[derive(Debug)]
pub(crate) struct OutputSummary {
    /// Each epoch's stretch, in the order written.
    pub(crate) stretches: Vec<Stretch>,
    /// The highest sequence.
    pub(crate) last: u64,
    /// Messages written twice (by a replacement that restored an older checkpoint).
    pub(crate) copies: usize,
}

/// Checks a counter's output for the "never two writers" guarantee: the epochs never
/// interleave (once a higher epoch has published, no lower one publishes again, in the order
/// the shared file received the lines); each epoch counts up by one from where it started;
/// after the deduplication rule (by sequence, the higher epoch wins) no sequence from 1 to
/// the last is missing and each payload is its sequence.
pub(crate) fn assert_one_writer(processor: &str, log: &OutputLog) -> OutputSummary {
    assert!(
        log.damaged.is_empty(),
        "{processor}: damaged lines {:?}",
        log.damaged
    );
    let mut stretches: Vec<Stretch> = Vec::new();
    let mut by_sequence: BTreeMap<u64, u64> = BTreeMap::new();
    let mut copies = 0;
    for (i, m) in log.messages.iter().enumerate() {
        let (epoch, seq) = (m.epoch.0, m.sequence.0);
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            seq.to_string(),
            "{processor}: message {i}: the count does not match the sequence"
        );
        match stretches.last().map(|s| (s.epoch, s.last)) {
            Some((e, last)) if e == epoch => {
                assert_eq!(
                    seq,
                    last + 1,
                    "{processor}: message {i}: epoch {epoch} skipped or repeated a count; stretches {stretches:?}"
                );
                if let Some(s) = stretches.last_mut() {
                    s.last = seq;
                }
            }
            previous => {
                if let Some((e, _)) = previous {
                    assert!(
                        epoch > e,
                        "{processor}: message {i}: epoch {epoch} published after epoch {e} (two writers); stretches {stretches:?}"
                    );
                }
                stretches.push(Stretch {
                    epoch,
                    first: seq,
                    last: seq,
                });
            }
        }
        if by_sequence.insert(seq, epoch).is_some() {
            copies += 1;
        }
    }
    let last = by_sequence.keys().last().copied().unwrap_or(0);
    let missing: Vec<u64> = (1..=last)
        .filter(|s| !by_sequence.contains_key(s))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{processor}: sequences missing after the deduplication rule (first ones): {missing:?}; stretches {stretches:?}"
    );
    OutputSummary {
        stretches,
        last,
        copies,
    }
}

/// A small seeded random number generator (SplitMix64): the fault tests print their seed, and
/// `DORY_TEST_SEED=<seed>` replays one.
pub(crate) struct Rng(u64);

impl Rng {
    /// The generator for `DORY_TEST_SEED`, else a seed from the clock; prints the seed.
    pub(crate) fn from_env(test: &str) -> Rng {
        let seed = std::env::var("DORY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: seed {seed} (replay: DORY_TEST_SEED={seed})");
        Rng(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
