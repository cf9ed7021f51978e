//! A cluster on this machine for one test: a `dory.toml` in a temporary directory, the
//! `dory` binary as the orchestrator, the counter example as the processor, on the embedded
//! default or on the Postgres store and the RabbitMQ publisher ([`Backends`]).

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dory_core::{
    Epoch, NodeId, OutputMessage, Ownership, ProcessorId, ProcessorStatus, Sequence,
    StateStore as _,
};
use dory_embedded::OutputLog;
use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// The `dory` binary under test.
pub(crate) fn dory_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dory")
}

/// Runs `dory` in `dir`: exit code, stdout, stderr.
pub(crate) fn dory(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(dory_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run dory");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// Where a test cluster keeps its state and sends its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backends {
    /// The embedded default: SQLite and JSON-lines files under the state directory.
    Embedded,
    /// `[store] kind = "postgres"` in a schema of the test's own (dropped after it) and
    /// `[publisher] kind = "rabbitmq"` to an exchange of the test's own, read through a queue
    /// bound before any processor starts (the counter publishes mandatory).
    PostgresRabbitmq,
}

/// The URLs a cluster on [`Backends::PostgresRabbitmq`] gives its instances.
pub(crate) struct ServiceUrls {
    /// `[store] url`: the test database with `?schema=`.
    pub(crate) store: String,
    /// `[publisher] url`: the test broker with `?exchange=`.
    pub(crate) publisher: String,
}

/// One message the test consumer took from the cluster's queue.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    /// The message, from its identity headers and body.
    pub(crate) message: OutputMessage,
    /// When the consumer took it (wall clock, ms): an upper bound of its publish time.
    pub(crate) at_ms: u64,
}

/// The test's Postgres schema and RabbitMQ exchange, and what the consumer has read.
struct External {
    schema: dory_pg::testing::TestSchema,
    urls: ServiceUrls,
    exchange: String,
    connection: lapin::Connection,
    channel: lapin::Channel,
    received: Arc<Mutex<Vec<Received>>>,
    /// Deliveries without the identity headers (never expected).
    bad: Arc<Mutex<Vec<String>>>,
    consumer: tokio::task::JoinHandle<()>,
}

impl External {
    /// A fresh schema and exchange, a queue bound to every routing key of the exchange, and a
    /// consumer task; `None` when a service is unreachable outside CI (a failure under CI).
    async fn create() -> Option<External> {
        let schema = dory_pg::testing::TestSchema::create("e2e", 2).await?;
        let (broker_url, connection, channel) = dory_amqp::testing::connect("e2e").await?;
        let exchange = format!(
            "dory-it-e2e-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare the test exchange");
        // Exclusive: the broker removes it with this connection, even after a panic.
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the output queue")
            .name()
            .to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the output queue");
        let received = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let consumer = tokio::spawn(consume(
            channel.clone(),
            queue,
            received.clone(),
            bad.clone(),
        ));
        let join = |base: &str, query: String| {
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}{query}")
        };
        let urls = ServiceUrls {
            store: join(
                &dory_pg::testing::test_database_url(),
                format!("schema={}", schema.config.schema),
            ),
            publisher: join(&broker_url, format!("exchange={exchange}")),
        };
        Some(External {
            schema,
            urls,
            exchange,
            connection,
            channel,
            received,
            bad,
            consumer,
        })
    }

    /// Stops the consumer and deletes the exchange (the queue goes with the connection); the
    /// schema is dropped with `schema`.
    async fn clean_up(self) {
        self.consumer.abort();
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
        drop(self.schema);
    }
}

/// Takes every message from `queue` as it comes, stamping each with when it was taken. Polls
/// with `basic.get` every 5 ms when the queue is empty: simple, and precise enough for the
/// timings the tests check (hundreds of ms).
async fn consume(
    channel: lapin::Channel,
    queue: String,
    received: Arc<Mutex<Vec<Received>>>,
    bad: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await;
        match got {
            Ok(Some(m)) => {
                let at_ms = now_ms();
                match output_message(&m.delivery) {
                    Some(message) => lock(&received).push(Received { message, at_ms }),
                    None => lock(&bad).push(format!("{:?}", m.delivery.properties)),
                }
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => {
                lock(&bad).push(format!("basic.get failed: {e}"));
                return;
            }
        }
    }
}

/// A delivery as the message its headers and body describe (see `dory-amqp`'s publisher).
fn output_message(delivery: &lapin::message::Delivery) -> Option<OutputMessage> {
    let headers = delivery.properties.headers().as_ref()?.inner();
    let int = |name: &str| match headers.get(name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        _ => None,
    };
    let processor = match headers.get(dory_amqp::HEADER_PROCESSOR)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => return None,
    };
    Some(OutputMessage {
        processor: ProcessorId::new(&processor).ok()?,
        epoch: Epoch(int(dory_amqp::HEADER_EPOCH)?),
        sequence: Sequence(int(dory_amqp::HEADER_SEQUENCE)?),
        routing_key: Some(delivery.routing_key.to_string()),
        payload: delivery.data.clone(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    /// Runs the store reads, the output consumer and whatever a test runs beside the cluster
    /// (e.g. TCP forwarders).
    pub(crate) runtime: tokio::runtime::Runtime,
    /// The embedded store opened on the cluster's database, once asked for.
    store: OnceCell<dory_embedded::EmbeddedStore>,
    /// The Postgres schema and RabbitMQ exchange, on [`Backends::PostgresRabbitmq`].
    external: Option<External>,
}

impl Cluster {
    /// Runs one statement on the test's Postgres schema (the `processors` table of the
    /// Postgres config source), binding `args` as text; panics without the Postgres backend.
    pub(crate) fn pg_execute(&self, statement: &str, args: &[&str]) {
        let pool = self
            .external
            .as_ref()
            .expect("pg_execute needs Backends::PostgresRabbitmq")
            .schema
            .store
            .pool()
            .clone();
        let statement = statement.to_string();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.runtime.block_on(async move {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(statement.clone()));
            for arg in args {
                query = query.bind(arg);
            }
            query
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        });
    }

    /// Writes the config on `backends`: fast timings, these nodes, one counter per processor
    /// id (a step every 20 ms, a checkpoint every 500 ms); `None` when the backends are
    /// unreachable outside CI.
    pub(crate) fn new_on(
        backends: Backends,
        nodes: &[NodeSpec],
        counters: &[(&str, &str)],
        counter: &Path,
    ) -> Option<Cluster> {
        let processors: String = counters
            .iter()
            .map(|(id, site)| counter_entry(id, site, counter, 500, 20, ""))
            .collect();
        Cluster::build_on(backends, nodes, &[], &processors, |_, _| String::new())
    }

    /// Writes the config: the default settings with `settings` over them, these nodes, and
    /// `processors` (`[processors.*]` tables) as they are.
    pub(crate) fn build(
        nodes: &[NodeSpec],
        settings: &[(&str, &str)],
        processors: &str,
    ) -> Cluster {
        Cluster::build_on(Backends::Embedded, nodes, settings, processors, |_, _| {
            String::new()
        })
        .expect("the embedded backends need no service")
    }

    /// [`Cluster::build`] on `backends`, with `node_extra(node, urls)` (more TOML keys for
    /// that `[[placement.nodes]]` table, one a line; `urls` are the global ones on
    /// [`Backends::PostgresRabbitmq`]); `None` when the backends are unreachable outside CI.
    pub(crate) fn build_on(
        backends: Backends,
        nodes: &[NodeSpec],
        settings: &[(&str, &str)],
        processors: &str,
        node_extra: impl Fn(&str, Option<&ServiceUrls>) -> String,
    ) -> Option<Cluster> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let external = match backends {
            Backends::Embedded => None,
            Backends::PostgresRabbitmq => Some(runtime.block_on(External::create())?),
        };
        let urls = external.as_ref().map(|e| &e.urls);
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
                "[[placement.nodes]]\nid = \"{}\"\nsite = \"{}\"\n{}",
                n.id,
                n.site,
                node_extra(n.id, urls)
            ));
        }
        if let Some(urls) = urls {
            header.push_str(&format!(
                "\n[store]\nkind = \"postgres\"\nurl = {:?}\n\n[publisher]\nkind = \"rabbitmq\"\nurl = {:?}\n",
                urls.store, urls.publisher
            ));
        }
        let config = dir.path().join("dory.toml");
        std::fs::write(&config, format!("{header}{processors}")).expect("write config");
        Some(Cluster {
            dir,
            config,
            header,
            orchestrator: None,
            starts: 0,
            nodes: nodes.iter().map(|n| n.id).collect(),
            runtime,
            store: OnceCell::new(),
            external,
        })
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

    fn embedded_store(&self) -> &dory_embedded::EmbeddedStore {
        self.store.get_or_init(|| {
            let path = self.dir.path().join("state/dory.db");
            let db = self
                .runtime
                .block_on(dory_embedded::EmbeddedDb::open(&path))
                .expect("open the embedded database");
            dory_embedded::EmbeddedStore::new(&db)
        })
    }

    /// A processor's ownership row, read from the cluster's store.
    pub(crate) fn ownership(&self, processor: &str) -> Option<Ownership> {
        let id = ProcessorId::new(processor).expect("id");
        let row = match &self.external {
            Some(e) => self.runtime.block_on(e.schema.store.ownership(&id)),
            None => self.runtime.block_on(self.embedded_store().ownership(&id)),
        };
        row.expect("read an ownership row")
    }

    /// The output of one processor: its file, or what the consumer has taken from the
    /// cluster's queue, in the order the broker delivered it.
    pub(crate) fn output(&self, processor: &str) -> OutputLog {
        let Some(external) = &self.external else {
            return dory_embedded::read_output(
                &self.dir.path().join("state/output"),
                &ProcessorId::new(processor).expect("id"),
            )
            .expect("read output");
        };
        let bad = lock(&external.bad).clone();
        assert!(
            bad.is_empty(),
            "deliveries that are not Dory messages: {bad:?}"
        );
        OutputLog {
            messages: self
                .received(processor)
                .into_iter()
                .map(|r| r.message)
                .collect(),
            damaged: Vec::new(),
        }
    }

    /// What the consumer has taken of `processor`'s output, with when (the RabbitMQ
    /// publisher only).
    pub(crate) fn received(&self, processor: &str) -> Vec<Received> {
        let external = self.external.as_ref().expect("a cluster on RabbitMQ");
        lock(&external.received)
            .iter()
            .filter(|r| r.message.processor.as_str() == processor)
            .cloned()
            .collect()
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
        // After every process is gone, so nothing recreates what is dropped.
        if let Some(external) = self.external.take() {
            self.runtime.block_on(external.clean_up());
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
