//! `dory.toml`: which backend does what, the virtual nodes, the orchestrator's tunables, and
//! (for the file config source) the processors themselves.
//!
//! Every table refuses keys it does not know and every value is checked, with errors that
//! name the file, the line and the key. Relative paths are relative to the file's directory.
//!
//! `[placement]` is read in two steps: its `kind` first, then the rest as that placement's
//! keys (`[[placement.nodes]]` for `local`; `dory_k8s::KubeConfig`'s keys and a
//! `[placement.lease]` table for `kubernetes`), from the same spanned parse of the file, so
//! an error in either still names its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dory_core::orchestrator::Settings;
use dory_core::planner::PlannerConfig;
use dory_core::{NodeId, Resources, Site};
use dory_k8s::{KubeConfig, LeaseConfig};
use dory_local::LocalNode;
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::duration::parse_duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DoryConfig {
    /// The orchestrator daemon.
    #[serde(default)]
    pub(crate) orchestrator: OrchestratorSection,
    /// Where instances run: read apart from the rest (its keys depend on its `kind`), so
    /// skipped here and filled in by [`Loaded::parse`].
    #[serde(skip)]
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
    /// This replica's name in the store's leadership (and in `pg_stat_activity`):
    /// `orchestrator` when not given, or on Kubernetes the pod's name, as the Lease's holder.
    pub(crate) name: Option<String>,
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
    /// Whether a move loads the replacement while it commits (same revision only); `false`
    /// loads before the commit, so a failed load always rolls back.
    pub(crate) load_while_committing: Option<bool>,
}

impl Default for OrchestratorSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9180))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".dory")
}

/// `[placement]`: its `kind` picks the backend; the other keys are that backend's.
#[derive(Debug)]
pub(crate) enum PlacementSection {
    /// `kind = "local"`: OS processes on the virtual nodes of this machine.
    Local(LocalSection),
    /// `kind = "kubernetes"`: a pod per instance in a cluster (`dory-k8s`).
    Kubernetes(Box<KubeSection>),
}

impl Default for PlacementSection {
    fn default() -> Self {
        PlacementSection::Local(LocalSection { nodes: Vec::new() })
    }
}

impl PlacementSection {
    /// Which placement backend.
    pub(crate) fn kind(&self) -> PlacementKind {
        match self {
            PlacementSection::Local(_) => PlacementKind::Local,
            PlacementSection::Kubernetes(_) => PlacementKind::Kubernetes,
        }
    }
}

/// The keys of `[placement]` besides `kind` for `kind = "local"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocalSection {
    /// The virtual nodes.
    #[serde(default)]
    pub(crate) nodes: Vec<NodeSection>,
}

/// The keys of `[placement]` besides `kind` for `kind = "kubernetes"`.
#[derive(Debug)]
pub(crate) struct KubeSection {
    /// `dory_k8s::KubeConfig` from every key but `kind` and `lease`, with the instances' store
    /// URL, publisher URL and lease filled in from `[store]`, `[publisher]` and
    /// `[orchestrator]` (the URLs only where `[placement.instance]` does not name them).
    pub(crate) kube: KubeConfig,
    /// `[placement.lease]`: the `coordination.k8s.io/v1` Lease the orchestrator replicas
    /// elect a leader with; in the placement's namespace unless it names one.
    pub(crate) lease: LeaseConfig,
    /// Whether `[placement.instance]` gave `store_url` (the store as pods reach it, when
    /// that differs from how the orchestrator does).
    store_url_given: bool,
    /// Whether `[placement.instance]` gave `publisher_url`.
    publisher_url_given: bool,
}

/// The placement backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PlacementKind {
    /// OS processes on named virtual nodes of this machine (`dory-local`).
    Local,
    /// A pod per instance in a Kubernetes cluster (`dory-k8s`).
    Kubernetes,
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
        let toml_error = |e: toml::de::Error| error(toml_message(e, text));
        let mut root = DeTable::parse(text).map_err(toml_error)?;
        let placement = root.get_mut().remove("placement");
        let mut config =
            DoryConfig::deserialize(toml::de::Deserializer::from(root)).map_err(toml_error)?;
        config.placement = placement_section(placement, text).map_err(error)?;
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
        if let PlacementSection::Kubernetes(k) = &mut config.placement {
            // What every pod is given: the store and broker the orchestrator is configured
            // with (check() made sure they are reachable over the network), and the lease
            // the planner times failovers by.
            if !k.store_url_given {
                k.kube.instance.store_url = config.store.url.clone().unwrap_or_default();
            }
            if !k.publisher_url_given {
                k.kube.instance.publisher_url = config.publisher.url.clone();
            }
            k.kube.instance.lease = settings.planner.lease;
            check_kube(k, &settings).map_err(error)?;
        }
        Ok(Loaded {
            path: path.to_path_buf(),
            config,
            settings,
        })
    }

    /// This replica's name in the store's leadership: `orchestrator.name`, else on
    /// Kubernetes the name the Lease is held as (`placement.lease.holder`, else `POD_NAME`, as
    /// the Deployment sets it), else `orchestrator`.
    pub(crate) fn replica_name(&self) -> String {
        if let Some(name) = &self.config.orchestrator.name {
            return name.clone();
        }
        match self.kube() {
            Some(k) if !k.lease.holder.is_empty() => k.lease.holder.clone(),
            Some(_) => std::env::var("POD_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "orchestrator".into()),
            None => "orchestrator".into(),
        }
    }

    /// The Kubernetes placement's settings, if that is the placement.
    pub(crate) fn kube(&self) -> Option<&KubeSection> {
        match &self.config.placement {
            PlacementSection::Kubernetes(k) => Some(k),
            PlacementSection::Local(_) => None,
        }
    }

    /// The local placement's node tables (none on Kubernetes, whose nodes are the cluster's).
    pub(crate) fn node_sections(&self) -> &[NodeSection] {
        match &self.config.placement {
            PlacementSection::Local(l) => &l.nodes,
            PlacementSection::Kubernetes(_) => &[],
        }
    }

    /// The local placement's virtual nodes.
    pub(crate) fn nodes(&self) -> Vec<LocalNode> {
        self.node_sections()
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

/// A toml error with the file's text, so it shows line, column and the line itself.
fn toml_message(mut e: toml::de::Error, text: &str) -> String {
    e.set_input(Some(text));
    e.to_string().trim_end().to_string()
}

/// `line N, column M` of a byte offset into `text`.
fn line_of(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

/// `[placement]`: `kind` first, then the rest as that placement's keys.
fn placement_section(
    placement: Option<Spanned<DeValue<'_>>>,
    text: &str,
) -> Result<PlacementSection, String> {
    let Some(placement) = placement else {
        return Err(
            "missing field `placement`: a `[placement]` table with `kind = \"local\"` or `kind = \"kubernetes\"`"
                .into(),
        );
    };
    let span = placement.span();
    let DeValue::Table(mut table) = placement.into_inner() else {
        return Err(format!(
            "{}: `placement` is a table (`[placement]`)",
            line_of(text, span.start)
        ));
    };
    let Some(kind) = table.remove("kind") else {
        return Err(format!(
            "{}: `placement.kind` is missing: `\"local\"` or `\"kubernetes\"`",
            line_of(text, span.start)
        ));
    };
    let toml_error = |e: toml::de::Error| toml_message(e, text);
    let kind = PlacementKind::deserialize(ValueDeserializer::from(kind)).map_err(toml_error)?;
    match kind {
        PlacementKind::Local => {
            let rest = ValueDeserializer::from(Spanned::new(span, DeValue::Table(table)));
            Ok(PlacementSection::Local(
                LocalSection::deserialize(rest).map_err(toml_error)?,
            ))
        }
        PlacementKind::Kubernetes => {
            let lease = table.remove("lease");
            let instance = match table.get("instance").map(Spanned::get_ref) {
                Some(DeValue::Table(t)) => Some(t),
                _ => None,
            };
            let given = |key: &str| instance.and_then(|t| t.get(key)).map(Spanned::span);
            if let Some(at) = given("lease") {
                return Err(format!(
                    "{}: `placement.instance.lease`: the instances' lease is `orchestrator.lease` (the orchestrator times failovers by it); set it there",
                    line_of(text, at.start)
                ));
            }
            let (store_url_given, publisher_url_given) = (
                given("store_url").is_some(),
                given("publisher_url").is_some(),
            );
            let rest = ValueDeserializer::from(Spanned::new(span, DeValue::Table(table)));
            let kube = KubeConfig::deserialize(rest).map_err(toml_error)?;
            let lease = match lease {
                None => LeaseConfig {
                    namespace: kube.namespace.clone(),
                    ..LeaseConfig::default()
                },
                Some(value) => {
                    let own_namespace = matches!(
                        value.get_ref(),
                        DeValue::Table(t) if t.contains_key("namespace")
                    );
                    let mut lease = LeaseConfig::deserialize(ValueDeserializer::from(value))
                        .map_err(toml_error)?;
                    if !own_namespace {
                        lease.namespace = kube.namespace.clone();
                    }
                    lease
                }
            };
            Ok(PlacementSection::Kubernetes(Box::new(KubeSection {
                kube,
                lease,
                store_url_given,
                publisher_url_given,
            })))
        }
    }
}

/// What the Kubernetes placement and its Lease would refuse at start, found by `dory validate`
/// already.
fn check_kube(k: &KubeSection, settings: &Settings) -> Result<(), String> {
    if k.kube.namespace.is_empty() {
        return Err("`placement.namespace` is empty".into());
    }
    if k.kube.instance.store_url.is_empty() {
        return Err("`placement.instance.store_url` is empty: pods need their state store".into());
    }
    if k.kube.node_lost_toleration <= settings.planner.node_lost_grace {
        return Err(format!(
            "`placement.node_lost_toleration` ({}) must exceed `orchestrator.node_lost_grace` ({}): Kubernetes would evict a processor from a lost node before Dory fails it over",
            crate::duration::format_duration(k.kube.node_lost_toleration),
            crate::duration::format_duration(settings.planner.node_lost_grace)
        ));
    }
    let l = &k.lease;
    if l.name.is_empty() || l.namespace.is_empty() {
        return Err("`placement.lease`: `name` and `namespace` must not be empty".into());
    }
    if l.duration.as_secs() == 0 || l.renew_every.is_zero() || l.retry_every.is_zero() {
        return Err(
            "`placement.lease`: `duration` (at least 1s), `renew_every` and `retry_every` must be set"
                .into(),
        );
    }
    if !(l.renew_every < l.renew_deadline && l.renew_deadline < l.duration) {
        return Err(
            "`placement.lease`: `renew_every` < `renew_deadline` < `duration` is required (the leader steps down before another replica may take over)"
                .into(),
        );
    }
    Ok(())
}

/// Checks what serde cannot: values that depend on each other.
fn check(config: &DoryConfig) -> Result<(), String> {
    let nodes: &[NodeSection] = match &config.placement {
        PlacementSection::Local(l) => &l.nodes,
        PlacementSection::Kubernetes(_) => &[],
    };
    if config.placement.kind() == PlacementKind::Local && nodes.is_empty() {
        return Err(
            "`placement.nodes`: the local placement needs at least one `[[placement.nodes]]`"
                .into(),
        );
    }
    if config.placement.kind() == PlacementKind::Kubernetes {
        // Pods run on other machines: a SQLite file or an output directory here is out of
        // their reach.
        if config.store.kind != StoreKind::Postgres {
            return Err(
                "`store.kind`: the kubernetes placement needs a store its pods reach over the network: `postgres`"
                    .into(),
            );
        }
        if config.publisher.kind != PublisherKind::Rabbitmq {
            return Err(
                "`publisher.kind`: the kubernetes placement needs a publisher its pods reach over the network: `rabbitmq` (the file publisher writes on this machine)"
                    .into(),
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in nodes.iter().enumerate() {
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
        load_while_committing: o.load_while_committing.unwrap_or(d.load_while_committing),
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
        assert_eq!(loaded.replica_name(), "orchestrator");
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
    fn a_move_loads_while_it_commits_unless_told_not_to() {
        assert!(parse(MINIMAL).unwrap().settings.load_while_committing);
        let text = format!("[orchestrator]\nload_while_committing = false\n{MINIMAL}");
        assert!(!parse(&text).unwrap().settings.load_while_committing);
        let err = parse(&format!(
            "[orchestrator]\nload_while_committing = 1\n{MINIMAL}"
        ))
        .unwrap_err();
        assert!(err.contains("load_while_committing"), "{err}");
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

        let err = parse("[orchestrator]\n[placement]\nsite = \"edge\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("placement.kind"),
            "{err}"
        );
        let err = parse("[orchestrator]\n").unwrap_err();
        assert!(err.contains("`placement`"), "{err}");
    }

    /// A kubernetes placement on the backends its pods can reach; `extra` goes at the end of
    /// `[placement]`, line 3 on.
    fn kube(extra: &str) -> String {
        format!(
            "[placement]\nkind = \"kubernetes\"\n{extra}\n[store]\nkind = \"postgres\"\nurl = \"postgres://dory@db:5432/dory?schema=dory\"\n[publisher]\nkind = \"rabbitmq\"\nurl = \"amqp://dory@mq:5672/%2f?exchange=dory\"\n"
        )
    }

    #[test]
    fn a_kubernetes_placement_gives_its_pods_the_store_publisher_and_lease() {
        let text = format!(
            "[orchestrator]\nlease = \"5s\"\nnode_lost_grace = \"30s\"\n{}",
            kube(
                "namespace = \"prod\"\ndefault_image = \"example/counter:1\"\n[placement.signals]\ncordon_is_drain = false\n"
            )
        );
        let loaded = parse(&text).unwrap();
        let k = loaded.kube().expect("kubernetes");
        assert_eq!(k.kube.namespace, "prod");
        assert_eq!(k.kube.default_image.as_deref(), Some("example/counter:1"));
        assert!(!k.kube.signals.cordon_is_drain);
        assert_eq!(
            k.kube.instance.store_url,
            "postgres://dory@db:5432/dory?schema=dory"
        );
        assert_eq!(
            k.kube.instance.publisher_url.as_deref(),
            Some("amqp://dory@mq:5672/%2f?exchange=dory")
        );
        assert_eq!(k.kube.instance.lease, Duration::from_secs(5));
        // The Lease: defaults, in the placement's namespace, held as POD_NAME.
        assert_eq!(k.lease.name, "dory-orchestrator");
        assert_eq!(k.lease.namespace, "prod");
        assert_eq!(k.lease.holder, "");
        assert!(loaded.nodes().is_empty());

        let text = kube(
            "[placement.lease]\nname = \"other\"\nnamespace = \"ops\"\nholder = \"me\"\nduration = \"20s\"\n[placement.instance]\nstore_url = \"postgres://dory@db.internal/dory\"\n",
        );
        let loaded = parse(&text).unwrap();
        let k = loaded.kube().unwrap();
        assert_eq!(
            (
                k.lease.name.as_str(),
                k.lease.namespace.as_str(),
                k.lease.holder.as_str()
            ),
            ("other", "ops", "me")
        );
        assert_eq!(k.lease.duration, Duration::from_secs(20));
        assert_eq!(
            k.kube.instance.store_url,
            "postgres://dory@db.internal/dory"
        );
        assert_eq!(
            k.kube.instance.publisher_url.as_deref(),
            Some("amqp://dory@mq:5672/%2f?exchange=dory")
        );
        // The store's leadership is held under the Lease holder's name too.
        assert_eq!(loaded.replica_name(), "me");
    }

    #[test]
    fn kubernetes_errors_name_line_and_key() {
        // Line 3 is the first line of `extra`.
        let err = parse(&kube("namespac = \"x\"\n")).unwrap_err();
        assert!(err.contains("line 3") && err.contains("namespac"), "{err}");
        let err = parse(&kube("sdk_port = \"eighty\"\n")).unwrap_err();
        assert!(err.contains("line 3") && err.contains("eighty"), "{err}");
        let err = parse(&kube("[placement.lease]\nrenew_evry = \"1s\"\n")).unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("renew_evry"),
            "{err}"
        );
        let err = parse(&kube("[placement.lease]\nduration = \"soon\"\n")).unwrap_err();
        assert!(err.contains("line 4") && err.contains("soon"), "{err}");
        let err = parse(&kube("[placement.lease]\nrenew_every = \"12s\"\n")).unwrap_err();
        assert!(err.contains("renew_deadline"), "{err}");
        let err = parse(&kube("[placement.instance]\nlease = \"3s\"\n")).unwrap_err();
        assert!(
            err.contains("line 4") && err.contains("orchestrator.lease"),
            "{err}"
        );
        // Nodes are the cluster's own.
        let err = parse(&kube(
            "[[placement.nodes]]\nid = \"n1\"\nsite = \"cloud\"\n",
        ))
        .unwrap_err();
        assert!(err.contains("line 3") && err.contains("nodes"), "{err}");
        let err = parse(&kube("node_lost_toleration = \"10s\"\n")).unwrap_err();
        assert!(err.contains("node_lost_grace"), "{err}");
        // Pods cannot reach this machine's files.
        let err = parse("[placement]\nkind = \"kubernetes\"\n").unwrap_err();
        assert!(err.contains("store.kind"), "{err}");
        let text = kube("").replace("kind = \"rabbitmq\"", "kind = \"file\"");
        let text = text.replace("url = \"amqp://dory@mq:5672/%2f?exchange=dory\"\n", "");
        let err = parse(&text).unwrap_err();
        assert!(err.contains("publisher.kind"), "{err}");
    }
}
