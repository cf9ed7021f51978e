//! `dory.toml`: which backend does what, the virtual nodes, the orchestrator's tunables, and
//! (for the file config source) the processors themselves.
//!
//! Every table refuses keys it does not know and every value is checked, with errors that
//! name the file, the line and the key. Relative paths are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dory_core::orchestrator::Settings;
use dory_core::planner::PlannerConfig;
use dory_core::{NodeId, Resources, Site};
use dory_local::LocalNode;
use serde::{Deserialize, Deserializer};

use crate::duration::parse_duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DoryConfig {
    /// The orchestrator daemon.
    #[serde(default)]
    pub(crate) orchestrator: OrchestratorSection,
    /// Where instances run.
    pub(crate) placement: PlacementSection,
    /// Where the desired processors come from.
    #[serde(default)]
    pub(crate) config: ConfigSection,
    /// Where ownership, snapshots and status live.
    #[serde(default)]
    pub(crate) store: StoreSection,
    /// Where processors publish.
    #[serde(default)]
    pub(crate) publisher: PublisherSection,
    /// The processors, read by the file config source (validated there, per processor).
    #[serde(default)]
    pub(crate) processors: toml::Table,
}

/// `[orchestrator]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrchestratorSection {
    /// This replica's name (leadership, logs).
    #[serde(default = "default_name")]
    pub(crate) name: String,
    /// Where `/healthz` and `/metrics` are served.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Where the local placement keeps its registry and the embedded backends their files.
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// The ownership lease of every instance.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) lease: Option<Duration>,
    /// Extra wait after a lease ran out before a failover.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) lease_margin: Option<Duration>,
    /// How long a node may be not ready before its processors fail over.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) node_lost_grace: Option<Duration>,
    /// How long a preferred site must be healthy before processors move back.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) stabilisation: Option<Duration>,
    /// The most moves and starts in flight at once.
    pub(crate) max_concurrent_moves: Option<usize>,
    /// How long a move takes at most; a shorter deadline degrades to an evacuation.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) min_move_time: Option<Duration>,
    /// How often the orchestrator plans without a nudge.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) resync_interval: Option<Duration>,
    /// How long a freeze may take.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) freeze_timeout: Option<Duration>,
    /// How long one backend call may take.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) call_timeout: Option<Duration>,
    /// How long an instance may take to start.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) start_timeout: Option<Duration>,
    /// How long a stopping instance gets to save and exit.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) stop_grace: Option<Duration>,
    /// How often to poll an instance that is changing phase.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) poll_interval: Option<Duration>,
    /// The first retry delay of a failed operation.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) retry_initial: Option<Duration>,
    /// The longest retry delay.
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) retry_max: Option<Duration>,
}

impl Default for OrchestratorSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

fn default_name() -> String {
    "orchestrator".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9180))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".dory")
}

/// `[placement]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlacementSection {
    /// Which placement backend.
    pub(crate) kind: PlacementKind,
    /// The virtual nodes (local placement).
    #[serde(default)]
    pub(crate) nodes: Vec<NodeSection>,
}

/// The placement backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PlacementKind {
    /// OS processes on named virtual nodes of this machine (`dory-local`).
    Local,
}

/// `[[placement.nodes]]`: one virtual node of the local placement.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeSection {
    /// The node's name.
    pub(crate) id: String,
    /// `edge` or `cloud`.
    pub(crate) site: Site,
    /// CPU the node offers, in millicores.
    #[serde(default = "default_cpu")]
    pub(crate) cpu_millis: u64,
    /// Memory the node offers, in MiB.
    #[serde(default = "default_memory")]
    pub(crate) memory_mib: u64,
    /// A command prefix every instance on the node runs under (e.g. `ip netns exec edge`).
    #[serde(default)]
    pub(crate) exec_prefix: Vec<String>,
    /// The store URL this node's instances get instead of the global one: the same store
    /// reached another way (e.g. from a network namespace through the host's end of a veth
    /// pair). Its `?schema=` must name the same schema.
    pub(crate) store_url: Option<String>,
    /// The publisher URL this node's instances get instead of the global one.
    pub(crate) publisher_url: Option<String>,
    /// The host the orchestrator reaches this node's instances at (they bind every
    /// interface); loopback when not given.
    pub(crate) reach_host: Option<std::net::IpAddr>,
}

fn default_cpu() -> u64 {
    4000
}

fn default_memory() -> u64 {
    4096
}

/// `[config]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigSection {
    /// Which config source.
    #[serde(default)]
    pub(crate) source: ConfigKind,
    /// The TOML file of processors (`file`); this file when not given.
    pub(crate) path: Option<PathBuf>,
    /// The database (`postgres`); the store's URL when not given.
    pub(crate) url: Option<String>,
}

/// The config sources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ConfigKind {
    /// A TOML file's `[processors.*]` tables, re-read on change.
    #[default]
    File,
    /// The `processors` table of a Postgres database, with LISTEN/NOTIFY.
    Postgres,
}

/// `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreSection {
    /// Which state store.
    #[serde(default)]
    pub(crate) kind: StoreKind,
    /// The SQLite file (`embedded`); `<state_dir>/dory.db` when not given.
    pub(crate) path: Option<PathBuf>,
    /// The database URL (`postgres`), with an optional `?schema=`.
    pub(crate) url: Option<String>,
}

/// The state stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoreKind {
    /// SQLite in WAL mode, shared by the orchestrator and every instance on the machine.
    #[default]
    Embedded,
    /// PostgreSQL.
    Postgres,
}

/// `[publisher]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublisherSection {
    /// Which publisher the instances use.
    #[serde(default)]
    pub(crate) kind: PublisherKind,
    /// The output directory (`file`); `<state_dir>/output` when not given.
    pub(crate) dir: Option<PathBuf>,
    /// The broker URL (`rabbitmq`), with optional `?exchange=` and `&routing_key=`.
    pub(crate) url: Option<String>,
}

/// The publishers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PublisherKind {
    /// Durable JSON-lines files, one per processor.
    #[default]
    File,
    /// RabbitMQ with publisher confirms.
    Rabbitmq,
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub(crate) struct ConfigError {
    /// The file.
    pub(crate) path: PathBuf,
    /// What is wrong, with line and key where the parser knows them.
    pub(crate) message: String,
}

/// A loaded, checked `dory.toml` with every path made absolute.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The file it came from (absolute).
    pub(crate) path: PathBuf,
    /// Its contents.
    pub(crate) config: DoryConfig,
    /// The orchestrator's settings: the defaults with the file's values over them.
    pub(crate) settings: Settings,
}

impl Loaded {
    /// Reads and checks `path`.
    pub(crate) fn read(path: &Path) -> Result<Loaded, ConfigError> {
        let error = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let path = std::path::absolute(path).map_err(|e| error(e.to_string()))?;
        Loaded::parse(&path, &text)
    }

    /// Checks the text of a file at `path` (absolute).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
        let error = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let mut config: DoryConfig =
            toml::from_str(text).map_err(|e| error(e.to_string().trim_end().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let o = &mut config.orchestrator;
        o.state_dir = base.join(&o.state_dir);
        if let Some(p) = &mut config.config.path {
            *p = base.join(&*p);
        }
        if let Some(p) = &mut config.store.path {
            *p = base.join(&*p);
        }
        if let Some(p) = &mut config.publisher.dir {
            *p = base.join(&*p);
        }
        check(&config).map_err(error)?;
        let settings = settings(&config.orchestrator);
        settings.validate().map_err(|e| error(strip_kind(&e)))?;
        Ok(Loaded {
            path: path.to_path_buf(),
            config,
            settings,
        })
    }

    /// The local placement's virtual nodes.
    pub(crate) fn nodes(&self) -> Vec<LocalNode> {
        self.config
            .placement
            .nodes
            .iter()
            .map(|n| LocalNode {
                id: NodeId::new(&n.id),
                site: n.site,
                capacity: Resources::new(n.cpu_millis, n.memory_mib),
                exec_prefix: n.exec_prefix.clone(),
                store_url: n.store_url.clone(),
                publisher_url: n.publisher_url.clone(),
                reach_host: n.reach_host,
            })
            .collect()
    }

    /// The SQLite file of the embedded backends.
    pub(crate) fn db_path(&self) -> PathBuf {
        self.config
            .store
            .path
            .clone()
            .unwrap_or_else(|| self.config.orchestrator.state_dir.join("dory.db"))
    }

    /// The file publisher's directory.
    pub(crate) fn output_dir(&self) -> PathBuf {
        self.config
            .publisher
            .dir
            .clone()
            .unwrap_or_else(|| self.config.orchestrator.state_dir.join("output"))
    }

    /// The TOML file of processors for the file config source.
    pub(crate) fn processors_file(&self) -> PathBuf {
        self.config
            .config
            .path
            .clone()
            .unwrap_or_else(|| self.path.clone())
    }

    /// The store URL every instance gets (`DORY_STORE_URL`).
    pub(crate) fn store_url(&self) -> String {
        match self.config.store.kind {
            StoreKind::Embedded => format!("sqlite://{}", self.db_path().display()),
            StoreKind::Postgres => self.config.store.url.clone().unwrap_or_default(),
        }
    }

    /// The publisher URL every instance gets (`DORY_PUBLISHER_URL`).
    pub(crate) fn publisher_url(&self) -> String {
        match self.config.publisher.kind {
            PublisherKind::File => format!("file://{}", self.output_dir().display()),
            PublisherKind::Rabbitmq => self.config.publisher.url.clone().unwrap_or_default(),
        }
    }
}

fn strip_kind(e: &dory_core::Error) -> String {
    match e {
        dory_core::Error::Invalid(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Checks what serde cannot: values that depend on each other.
fn check(config: &DoryConfig) -> Result<(), String> {
    let p = &config.placement;
    if p.kind == PlacementKind::Local && p.nodes.is_empty() {
        return Err(
            "`placement.nodes`: the local placement needs at least one `[[placement.nodes]]`"
                .into(),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in p.nodes.iter().enumerate() {
        let valid = !n.id.is_empty()
            && n.id.len() <= 63
            && n.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(format!(
                "`placement.nodes[{i}].id` {:?}: a node name is 1 to 63 lowercase letters, digits and '-'",
                n.id
            ));
        }
        if !seen.insert(&n.id) {
            return Err(format!(
                "`placement.nodes[{i}].id`: node {:?} is named twice",
                n.id
            ));
        }
        if n.exec_prefix.iter().any(String::is_empty) {
            return Err(format!(
                "`placement.nodes[{i}].exec_prefix`: an empty argument"
            ));
        }
        if n.store_url.as_deref() == Some("") || n.publisher_url.as_deref() == Some("") {
            return Err(format!(
                "`placement.nodes[{i}]`: an empty `store_url` or `publisher_url` (leave it out to use the global one)"
            ));
        }
    }
    if config.store.kind == StoreKind::Postgres && config.store.url.is_none() {
        return Err("`store.url`: the postgres store needs a URL".into());
    }
    if config.store.kind == StoreKind::Embedded && config.store.url.is_some() {
        return Err("`store.url`: the embedded store takes a `path`, not a URL".into());
    }
    if config.publisher.kind == PublisherKind::Rabbitmq && config.publisher.url.is_none() {
        return Err("`publisher.url`: the rabbitmq publisher needs a URL".into());
    }
    if config.publisher.kind == PublisherKind::File && config.publisher.url.is_some() {
        return Err("`publisher.url`: the file publisher takes a `dir`, not a URL".into());
    }
    if config.config.source == ConfigKind::Postgres
        && config.config.url.is_none()
        && config.store.kind != StoreKind::Postgres
    {
        return Err(
            "`config.url`: the postgres config source needs a URL (or a postgres store)".into(),
        );
    }
    if config.config.source == ConfigKind::Postgres && !config.processors.is_empty() {
        return Err(
            "`processors`: processors come from Postgres (`config.source = \"postgres\"`); remove the `[processors.*]` tables or use the file source"
                .into(),
        );
    }
    Ok(())
}

/// The defaults with the file's values over them.
fn settings(o: &OrchestratorSection) -> Settings {
    let d = Settings::default();
    let p = PlannerConfig::default();
    Settings {
        planner: PlannerConfig {
            lease: o.lease.unwrap_or(p.lease),
            lease_margin: o.lease_margin.unwrap_or(p.lease_margin),
            node_lost_grace: o.node_lost_grace.unwrap_or(p.node_lost_grace),
            stabilisation: o.stabilisation.unwrap_or(p.stabilisation),
            max_concurrent_moves: o.max_concurrent_moves.unwrap_or(p.max_concurrent_moves),
            min_move_time: o.min_move_time.unwrap_or(p.min_move_time),
        },
        resync_interval: o.resync_interval.unwrap_or(d.resync_interval),
        freeze_timeout: o.freeze_timeout.unwrap_or(d.freeze_timeout),
        call_timeout: o.call_timeout.unwrap_or(d.call_timeout),
        start_timeout: o.start_timeout.unwrap_or(d.start_timeout),
        stop_grace: o.stop_grace.unwrap_or(d.stop_grace),
        poll_interval: o.poll_interval.unwrap_or(d.poll_interval),
        retry_initial: o.retry_initial.unwrap_or(d.retry_initial),
        retry_max: o.retry_max.unwrap_or(d.retry_max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[placement]
kind = "local"
[[placement.nodes]]
id = "cloud-1"
site = "cloud"
"#;

    fn parse(text: &str) -> Result<Loaded, String> {
        Loaded::parse(Path::new("/srv/dory/dory.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_everything_but_the_nodes() {
        let loaded = parse(MINIMAL).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        assert_eq!(loaded.db_path(), Path::new("/srv/dory/.dory/dory.db"));
        assert_eq!(loaded.store_url(), "sqlite:///srv/dory/.dory/dory.db");
        assert_eq!(loaded.publisher_url(), "file:///srv/dory/.dory/output");
        assert_eq!(loaded.processors_file(), Path::new("/srv/dory/dory.toml"));
        assert_eq!(loaded.nodes().len(), 1);
        let node = &loaded.nodes()[0];
        assert_eq!(
            (&node.store_url, &node.publisher_url, node.reach_host),
            (&None, &None, None)
        );
    }

    #[test]
    fn a_node_overrides_the_backend_urls_and_where_its_instances_are_reached() {
        let text = format!(
            "{MINIMAL}[[placement.nodes]]\nid = \"edge-1\"\nsite = \"edge\"\nexec_prefix = [\"ip\", \"netns\", \"exec\", \"edge\"]\nstore_url = \"postgres://postgres@10.200.1.1:5432/test?schema=s\"\npublisher_url = \"amqp://guest:guest@10.200.1.1:5672/%2f\"\nreach_host = \"10.200.1.2\"\n"
        );
        let loaded = parse(&text).unwrap();
        let nodes = loaded.nodes();
        let edge = &nodes[1];
        assert_eq!(
            edge.store_url.as_deref(),
            Some("postgres://postgres@10.200.1.1:5432/test?schema=s")
        );
        assert_eq!(
            edge.publisher_url.as_deref(),
            Some("amqp://guest:guest@10.200.1.1:5672/%2f")
        );
        assert_eq!(edge.reach_host, Some([10, 200, 1, 2].into()));
        // The other node keeps the global settings.
        assert_eq!((&nodes[0].store_url, nodes[0].reach_host), (&None, None));

        let err = parse(&format!("{MINIMAL}reach_host = \"edge\"\n")).unwrap_err();
        assert!(err.contains("reach_host"), "{err}");
        let err = parse(&format!("{MINIMAL}store_url = \"\"\n")).unwrap_err();
        assert!(err.contains("placement.nodes[0]"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let text = format!(
            "[orchestrator]\nlease = \"3s\"\nlease_margin = \"500ms\"\nnode_lost_grace = \"1m\"\n{MINIMAL}"
        );
        let s = parse(&text).unwrap().settings;
        assert_eq!(s.planner.lease, Duration::from_secs(3));
        assert_eq!(s.planner.lease_margin, Duration::from_millis(500));
        assert_eq!(s.planner.node_lost_grace, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse(&format!("{MINIMAL}cpu = 3\ncolour = \"red\"\n")).unwrap_err();
        assert!(err.starts_with("/srv/dory/dory.toml: "), "{err}");
        assert!(err.contains("line 8") && err.contains("colour"), "{err}");

        let err = parse(&format!("[orchestrator]\nlease = \"soon\"\n{MINIMAL}")).unwrap_err();
        assert!(err.contains("line 2") && err.contains("soon"), "{err}");

        let err = parse("[placement]\nkind = \"cloudy\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("cloudy"), "{err}");

        let err = parse("[placement]\nkind = \"local\"\n").unwrap_err();
        assert!(err.contains("placement.nodes"), "{err}");

        let err = parse(&format!(
            "{MINIMAL}[[placement.nodes]]\nid = \"cloud-1\"\nsite = \"edge\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("named twice"), "{err}");

        let err = parse(&format!("[orchestrator]\nlease = \"30s\"\n{MINIMAL}")).unwrap_err();
        assert!(err.contains("node_lost_grace"), "{err}");

        let err = parse(&format!("[store]\nkind = \"postgres\"\n{MINIMAL}")).unwrap_err();
        assert!(err.contains("store.url"), "{err}");
    }
}
