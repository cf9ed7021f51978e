//! The domain model: processors, nodes, instances, epochs, ownership and observed status.
//!
//! Everything here is plain data. Backends translate their own types (Kubernetes pods, rows,
//! OS processes) into these, so the planner never sees a backend type.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A point in time, in milliseconds since the Unix epoch.
///
/// Dory passes time around as a value (see [`crate::Clock`]) so the planner stays pure and the
/// simulator can run on simulated time.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp as milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// This timestamp moved forward by `d` (saturating).
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }

    /// This timestamp moved back by `d` (saturating at zero).
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }

    /// The time from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A processor's name: a DNS-1123 label (it becomes a Kubernetes label value and part of pod
/// and process names).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProcessorId(String);

/// The longest processor id: a DNS-1123 label is at most 63 characters, and pod names append
/// `-<epoch>`, so ids are kept short enough to leave room for a 20-digit epoch.
pub const MAX_PROCESSOR_ID_LEN: usize = 42;

impl ProcessorId {
    /// Validates `id` as a DNS-1123 label of at most [`MAX_PROCESSOR_ID_LEN`] characters.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let problem = if id.is_empty() {
            Some("must not be empty".to_string())
        } else if id.len() > MAX_PROCESSOR_ID_LEN {
            Some(format!(
                "is {} characters long; at most {MAX_PROCESSOR_ID_LEN} are allowed",
                id.len()
            ))
        } else if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            Some(format!(
                "contains {c:?}; only lowercase letters, digits and '-' are allowed"
            ))
        } else if id.starts_with('-') || id.ends_with('-') {
            Some("must start and end with a letter or digit".to_string())
        } else {
            None
        };
        match problem {
            Some(why) => Err(Error::invalid(format!(
                "processor id {id:?}: field `id` {why} (a DNS-1123 label)"
            ))),
            None => Ok(ProcessorId(id)),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProcessorId {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        ProcessorId::new(value)
    }
}

impl From<ProcessorId> for String {
    fn from(id: ProcessorId) -> String {
        id.0
    }
}

impl fmt::Display for ProcessorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProcessorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A node's name (a Kubernetes node name or a local virtual node).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    /// Wraps a node name.
    pub fn new(id: impl Into<String>) -> Self {
        NodeId(id.into())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// An incarnation of a processor. Epochs are allocated by the state store (compare-and-swap on
/// the ownership row), never inferred, so two instances can never share one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A processor's output and checkpoint counter. It is part of the processor's state, so it
/// continues across moves and failovers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Sequence(pub u64);

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The orchestrator leader's fencing term: every leader gets a higher one, and every write the
/// orchestrator makes to the store is conditional on its term still being current.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Term(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Where a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Site {
    /// A node at the edge, close to the data.
    Edge,
    /// A node in the cloud.
    Cloud,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Site::Edge => "edge",
            Site::Cloud => "cloud",
        })
    }
}

/// Which site a processor prefers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SitePreference {
    /// Only (or, with fallback, preferably) at the edge.
    Edge,
    /// Only (or, with fallback, preferably) in the cloud.
    Cloud,
    /// Anywhere.
    #[default]
    Any,
}

impl SitePreference {
    /// Whether `site` is the preferred site (every site is, for [`SitePreference::Any`]).
    pub fn prefers(self, site: Site) -> bool {
        match self {
            SitePreference::Any => true,
            SitePreference::Edge => site == Site::Edge,
            SitePreference::Cloud => site == Site::Cloud,
        }
    }
}

/// Compute resources, requested by a processor or offered by a node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Resources {
    /// A resource amount.
    pub const fn new(cpu_millis: u64, memory_mib: u64) -> Self {
        Resources {
            cpu_millis,
            memory_mib,
        }
    }

    /// Whether `other` fits inside `self`.
    pub fn fits(&self, other: &Resources) -> bool {
        other.cpu_millis <= self.cpu_millis && other.memory_mib <= self.memory_mib
    }

    /// `self + other`.
    pub fn plus(&self, other: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis.saturating_add(other.cpu_millis),
            self.memory_mib.saturating_add(other.memory_mib),
        )
    }

    /// `self - other`, saturating at zero.
    pub fn minus(&self, other: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis.saturating_sub(other.cpu_millis),
            self.memory_mib.saturating_sub(other.memory_mib),
        )
    }
}

/// When a processor that exited is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Never restart: an exit, clean or not, leaves the processor stopped.
    Never,
    /// Restart after a failure (non-zero exit, crash, lost node), not after a clean exit.
    #[default]
    OnFailure,
    /// Restart after every exit.
    Always,
}

/// A processor's restart policy: when to restart, how fast, and when to give up.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartPolicy {
    /// When to restart.
    pub mode: RestartMode,
    /// The first restart's delay; each further one doubles it.
    #[serde(with = "duration_ms")]
    pub backoff_initial: Duration,
    /// The longest delay between restarts.
    #[serde(with = "duration_ms")]
    pub backoff_max: Duration,
    /// The crash-loop breaker: this many failures inside `crash_loop_window` mark the
    /// processor failed instead of restarting it again.
    pub crash_loop_failures: u32,
    /// The crash-loop breaker's window.
    #[serde(with = "duration_ms")]
    pub crash_loop_window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            crash_loop_failures: 5,
            crash_loop_window: Duration::from_secs(300),
        }
    }
}

/// What an instance runs: a container image on Kubernetes, a command on the local backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    /// The container image (Kubernetes).
    pub image: Option<String>,
    /// The image or code version, used to detect spec changes.
    pub version: Option<String>,
    /// The command and its arguments (local backend; overrides the image's entrypoint).
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
}

/// The desired specification of one processor: a row of the config DB or an entry of the TOML
/// config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessorSpec {
    /// The processor's id.
    pub id: ProcessorId,
    /// What to run.
    #[serde(default)]
    pub workload: Workload,
    /// The preferred site.
    #[serde(default)]
    pub site: SitePreference,
    /// Whether the processor may run outside its preferred site when no node there can take
    /// it (it moves back once the preferred site has been healthy for the stabilisation
    /// period).
    #[serde(default = "default_true")]
    pub fallback: bool,
    /// Resources requested.
    #[serde(default)]
    pub resources: Resources,
    /// The restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How often the instance checkpoints its state.
    #[serde(default = "default_checkpoint_interval", with = "duration_ms")]
    pub checkpoint_interval: Duration,
    /// Operator intent from `dory move`: run on this node.
    #[serde(default)]
    pub pin: Option<NodeId>,
    /// Free-form processor configuration handed to the instance.
    #[serde(default)]
    pub config: serde_json::Value,
}

fn default_true() -> bool {
    true
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(10)
}

impl ProcessorSpec {
    /// A spec with defaults for everything but the id.
    pub fn new(id: ProcessorId) -> Self {
        ProcessorSpec {
            id,
            workload: Workload::default(),
            site: SitePreference::Any,
            fallback: true,
            resources: Resources::default(),
            restart: RestartPolicy::default(),
            checkpoint_interval: default_checkpoint_interval(),
            pin: None,
            config: serde_json::Value::Null,
        }
    }

    /// Builds the spec of `id` from an entry's fields as JSON values (a config row's `spec`,
    /// a config file's table), then applies a recorded `pin` (it overrides the entry's own)
    /// and [`validate`](ProcessorSpec::validate)s it. Every config source reads entries this
    /// way, so they all accept the same entries and blame the same fields.
    ///
    /// The entry's key is the id: an `id` among the fields is not consulted. Every field but
    /// the id has a default, so when the fields do not parse, each is parsed on its own to find
    /// the one to blame, because serde's message rarely names a top-level field.
    pub fn from_fields(
        id: &ProcessorId,
        mut fields: serde_json::Map<String, serde_json::Value>,
        pin: Option<&NodeId>,
    ) -> std::result::Result<ProcessorSpec, SpecError> {
        fields.remove("id");
        let with_id = |mut fields: serde_json::Map<String, serde_json::Value>| {
            fields.insert("id".into(), serde_json::Value::String(id.to_string()));
            serde_json::from_value::<ProcessorSpec>(serde_json::Value::Object(fields))
        };
        let mut parsed = match with_id(fields.clone()) {
            Ok(parsed) => parsed,
            Err(e) => {
                let culprit = fields.iter().find_map(|(name, v)| {
                    let alone = serde_json::Map::from_iter([(name.clone(), v.clone())]);
                    with_id(alone).err().map(|e| (name.clone(), e))
                });
                return Err(match culprit {
                    Some((name, e)) => SpecError::Field {
                        name: Some(name),
                        message: e.to_string(),
                    },
                    None => SpecError::Field {
                        name: None,
                        message: e.to_string(),
                    },
                });
            }
        };
        parsed.id = id.clone();
        if let Some(pin) = pin {
            parsed.pin = Some(pin.clone());
        }
        parsed
            .validate()
            .map_err(|e| SpecError::Invalid(e.reason()))?;
        Ok(parsed)
    }

    /// Checks the fields that serde cannot; errors name the processor and the field.
    pub fn validate(&self) -> Result<()> {
        let id = &self.id;
        if self.checkpoint_interval.is_zero() {
            return Err(Error::invalid(format!(
                "processor {id}: field `checkpoint_interval` must be greater than zero"
            )));
        }
        let r = &self.restart;
        if r.backoff_initial.is_zero() || r.backoff_max < r.backoff_initial {
            return Err(Error::invalid(format!(
                "processor {id}: field `restart.backoff_max` must be at least `restart.backoff_initial`, which must be greater than zero"
            )));
        }
        if r.crash_loop_failures == 0 {
            return Err(Error::invalid(format!(
                "processor {id}: field `restart.crash_loop_failures` must be at least 1"
            )));
        }
        if let Some(pin) = &self.pin
            && pin.as_str().is_empty()
        {
            return Err(Error::invalid(format!(
                "processor {id}: field `pin` must name a node"
            )));
        }
        Ok(())
    }

    /// A stable hash of everything that requires a new instance when it changes (what runs,
    /// its resources and configuration). A change is rolled out as a planned move.
    ///
    /// The hash is over a fixed, length-prefixed encoding of those fields (not `std::hash`,
    /// whose output may change between compiler releases), because revisions are stored with
    /// instances (pod labels, registry files) and must compare equal across orchestrator
    /// upgrades.
    pub fn revision(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        let w = &self.workload;
        field(w.image.as_deref().unwrap_or("").as_bytes());
        field(w.version.as_deref().unwrap_or("").as_bytes());
        field(&(w.command.len() as u64).to_le_bytes());
        for arg in &w.command {
            field(arg.as_bytes());
        }
        field(&(w.env.len() as u64).to_le_bytes());
        for (k, v) in &w.env {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(&self.resources.cpu_millis.to_le_bytes());
        field(&self.resources.memory_mib.to_le_bytes());
        if !self.config.is_null() {
            field(self.config.to_string().as_bytes());
        }
        h.digest()
    }
}

/// The desired state: every processor that should run, plus the operator intents that are not
/// per-processor (cordoned nodes from `dory drain` on backends without cordons of their own).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Processors that should run, in any order.
    pub processors: Vec<ProcessorSpec>,
    /// Entries that failed to parse or validate: they mark only that processor with an error.
    pub invalid: Vec<InvalidEntry>,
    /// Nodes the operator cordoned through Dory.
    pub cordoned: BTreeSet<NodeId>,
}

/// Why an entry's fields do not make a [`ProcessorSpec`]
/// ([`ProcessorSpec::from_fields`]); the config source puts the entry's place in front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    /// A field does not parse as its type.
    Field {
        /// The top-level field to blame, `None` when no single field is.
        name: Option<String>,
        /// serde's message.
        message: String,
    },
    /// The spec parsed but [`ProcessorSpec::validate`] refused it: the reason, naming the
    /// field path in backticks (``field `restart.crash_loop_failures` ``).
    Invalid(String),
}

/// A config entry that did not parse or validate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidEntry {
    /// The entry's id as written (it may not be a valid [`ProcessorId`]).
    pub id: String,
    /// What is wrong, naming the field.
    pub error: String,
}

/// Why a node is going away.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptionReason {
    /// The node was cordoned or is being drained (by an operator or a tool).
    Drain,
    /// A spot or preemptible instance reclamation notice.
    SpotReclaim,
    /// A planned disruption announced by an autoscaler (Karpenter and the like).
    Disruption,
    /// Scheduled maintenance.
    Maintenance,
    /// Another signal, named by the backend.
    Other(String),
}

impl fmt::Display for InterruptionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterruptionReason::Drain => f.write_str("drain"),
            InterruptionReason::SpotReclaim => f.write_str("spot-reclaim"),
            InterruptionReason::Disruption => f.write_str("disruption"),
            InterruptionReason::Maintenance => f.write_str("maintenance"),
            InterruptionReason::Other(s) => f.write_str(s),
        }
    }
}

/// A signal that a node is going away, with an optional deadline after which it is gone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Interruption {
    /// Why.
    pub reason: InterruptionReason,
    /// When the node is gone; `None` means no deadline (a plain drain).
    pub deadline: Option<Timestamp>,
}

/// A node instances can run on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name.
    pub id: NodeId,
    /// Where it runs.
    pub site: Site,
    /// Whether new instances may be placed there (false when cordoned).
    pub schedulable: bool,
    /// Whether the node is reachable and healthy.
    pub ready: bool,
    /// Since when `ready` has had its current value.
    pub ready_since: Timestamp,
    /// What it offers.
    pub capacity: Resources,
    /// Set when the node is going away.
    pub interruption: Option<Interruption>,
}

impl Node {
    /// A ready, schedulable node with no interruption.
    pub fn new(id: impl Into<String>, site: Site, capacity: Resources) -> Self {
        Node {
            id: NodeId::new(id),
            site,
            schedulable: true,
            ready: true,
            ready_since: Timestamp(0),
            capacity,
            interruption: None,
        }
    }
}

/// Where an instance is in its life.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "phase")]
pub enum Phase {
    /// Launched, not yet healthy.
    Starting,
    /// Healthy, waiting for a snapshot and a resume (the replacement of a move).
    Standby,
    /// Running its loop and publishing.
    Running,
    /// Stopped at a safe point, holding an exact snapshot.
    Frozen,
    /// Asked to stop.
    Terminating,
    /// Exited with a code.
    Exited {
        /// The exit code (0 is a clean exit).
        code: i32,
    },
    /// Failed: crashed, killed, or lost with its node.
    Failed {
        /// What happened.
        reason: String,
    },
}

impl Phase {
    /// Whether the instance has ended (exited or failed).
    pub fn is_gone(&self) -> bool {
        matches!(self, Phase::Exited { .. } | Phase::Failed { .. })
    }

    /// Whether the instance is alive (not ended, not being terminated).
    pub fn is_alive(&self) -> bool {
        !self.is_gone() && *self != Phase::Terminating
    }

    /// A short name for the phase.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Standby => "standby",
            Phase::Running => "running",
            Phase::Frozen => "frozen",
            Phase::Terminating => "terminating",
            Phase::Exited { .. } => "exited",
            Phase::Failed { .. } => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Exited { code } => write!(f, "exited({code})"),
            Phase::Failed { reason } => write!(f, "failed({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// How a launched instance gets its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMode {
    /// Load the latest committed snapshot from the state store (or start fresh) and run.
    Restore,
    /// Become healthy and wait for a snapshot (`PUT /state`) and a resume.
    Standby,
}

impl fmt::Display for LaunchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchMode::Restore => "restore",
            LaunchMode::Standby => "standby",
        })
    }
}

/// How the orchestrator reaches an instance's control endpoints.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ControlEndpoint {
    /// `host:port` of the instance's endpoint server.
    pub address: String,
    /// The instance's bearer token for the state routes.
    pub token: String,
}

impl fmt::Debug for ControlEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlEndpoint")
            .field("address", &self.address)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One running (or ended) incarnation of a processor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The processor it runs.
    pub processor: ProcessorId,
    /// Its epoch.
    pub epoch: Epoch,
    /// The node it runs on.
    pub node: NodeId,
    /// Where it is in its life.
    pub phase: Phase,
    /// The spec revision it was launched with ([`ProcessorSpec::revision`]).
    pub revision: u64,
    /// When it was launched.
    pub started_at: Timestamp,
    /// How to reach it, once it has an address.
    pub endpoint: Option<ControlEndpoint>,
}

/// A request to start an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchRequest {
    /// The processor's spec.
    pub spec: ProcessorSpec,
    /// The epoch claimed for the instance.
    pub epoch: Epoch,
    /// The node to run on.
    pub node: NodeId,
    /// How the instance gets its state.
    pub mode: LaunchMode,
}

/// Metadata of a snapshot: everything but the state itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The processor whose state it is.
    pub processor: ProcessorId,
    /// The epoch that wrote it.
    pub epoch: Epoch,
    /// The processor's sequence at the moment of the snapshot.
    pub sequence: Sequence,
    /// Length of the encoded snapshot (header and compressed body).
    pub size: u64,
    /// When it was stored.
    pub created_at: Timestamp,
}

/// An encoded snapshot with its metadata. `bytes` is the full encoded form (header and body,
/// see [`crate::snapshot`]), so it can be stored and sent as is and verified on read.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The metadata.
    pub meta: SnapshotMeta,
    /// The encoded snapshot.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for StoredSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSnapshot")
            .field("meta", &self.meta)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The ownership row of one processor in the state store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The processor.
    pub processor: ProcessorId,
    /// The epoch that owns the processor's state, if any.
    pub owner: Option<Epoch>,
    /// The highest epoch ever claimed.
    pub highest_epoch: Epoch,
    /// When the owner's lease runs out, in the store's clock.
    pub lease_expires: Option<Timestamp>,
    /// The latest committed checkpoint (epoch and sequence), if any.
    pub committed: Option<(Epoch, Sequence)>,
    /// When the latest checkpoint was committed, in the store's clock.
    pub committed_at: Option<Timestamp>,
}

/// What a processor looks like from outside: written through [`crate::StatusSink`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessorStatus {
    /// The processor's id as written in the config.
    pub processor: String,
    /// The phase of its owning (or only) instance, or `pending`, `failed`, `invalid`.
    pub phase: String,
    /// The node it runs on.
    pub node: Option<NodeId>,
    /// The site of that node.
    pub site: Option<Site>,
    /// The owning epoch.
    pub epoch: Option<Epoch>,
    /// The latest committed checkpoint's sequence.
    pub last_checkpoint: Option<Sequence>,
    /// When the latest checkpoint was committed.
    pub last_checkpoint_at: Option<Timestamp>,
    /// When the last move finished.
    pub last_move_at: Option<Timestamp>,
    /// The pause the processor saw in its last move, in milliseconds.
    pub last_move_pause_ms: Option<u64>,
    /// Restarts counted by the restart policy (reset once it runs stably).
    pub restarts: u32,
    /// Failure times inside the crash-loop window, for the breaker.
    pub recent_failures: Vec<Timestamp>,
    /// The last error, naming what was wrong.
    pub last_error: Option<String>,
    /// The spec revision the status was computed for ([`ProcessorSpec::revision`]).
    pub spec_revision: Option<u64>,
    /// When this status was written.
    pub updated_at: Timestamp,
    /// The last failover: what it restored and what may have been lost. Defaulted so that
    /// status rows written before the field existed still parse.
    #[serde(default)]
    pub last_failover: Option<FailoverReport>,
}

impl ProcessorStatus {
    /// A status a store kept whole as JSON (`body`) under the key `processor`. The key is
    /// authoritative, should someone have edited the body; a body that does not parse is
    /// [`Error::Invalid`] naming `what` and the processor.
    pub fn from_stored_body(processor: String, body: &str, what: &str) -> Result<Self> {
        let mut status: ProcessorStatus = serde_json::from_str(body).map_err(|e| {
            Error::invalid(format!(
                "{what}: column `body` of the status of {processor:?}: {e}"
            ))
        })?;
        status.processor = processor;
        Ok(status)
    }
}

/// What a failover cost a processor: the checkpoint its replacement restored and how old that
/// checkpoint was when the node was lost. The work done after the checkpoint is lost (for a
/// processor that publishes, the replacement publishes it again under its higher epoch), so
/// the age bounds the loss: at most one checkpoint interval when the owner checkpointed on
/// time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverReport {
    /// When the replacement was started.
    pub at: Timestamp,
    /// The replacement's epoch.
    pub epoch: Epoch,
    /// The owner that was lost, if there was one.
    pub lost_epoch: Option<Epoch>,
    /// The node it was lost with, when the orchestrator saw its instance.
    pub lost_node: Option<NodeId>,
    /// When that node stopped being ready, when known.
    pub lost_at: Option<Timestamp>,
    /// The sequence of the committed checkpoint the replacement restores (`None`: there was
    /// none, so it starts from its initial state).
    pub restored_sequence: Option<Sequence>,
    /// When that checkpoint was committed, in the store's clock.
    pub checkpoint_at: Option<Timestamp>,
    /// How old the checkpoint was when the node was lost (when that is unknown: when the
    /// replacement was started), in milliseconds.
    pub checkpoint_age_ms: Option<u64>,
}

impl FailoverReport {
    /// The report of a failover to `epoch` at `at`, from the ownership `row` as the store
    /// holds it once the replacement owns the processor (so its committed checkpoint is
    /// exactly the one the replacement restores), the lost owner and, when known, its node
    /// and when that node was lost.
    pub fn new(
        at: Timestamp,
        epoch: Epoch,
        lost_epoch: Option<Epoch>,
        lost: Option<(NodeId, Option<Timestamp>)>,
        row: Option<&Ownership>,
    ) -> FailoverReport {
        let (lost_node, lost_at) = match lost {
            Some((node, at)) => (Some(node), at),
            None => (None, None),
        };
        let checkpoint_at = row.and_then(|r| r.committed_at);
        FailoverReport {
            at,
            epoch,
            lost_epoch,
            lost_node,
            lost_at,
            restored_sequence: row.and_then(|r| r.committed).map(|(_, s)| s),
            checkpoint_at,
            checkpoint_age_ms: checkpoint_at
                .map(|c| lost_at.unwrap_or(at).since(c).as_millis() as u64),
        }
    }
}

impl fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let when = if self.lost_at.is_some() {
            "when the node was lost"
        } else {
            "at the failover"
        };
        match (self.restored_sequence, self.checkpoint_age_ms) {
            (Some(seq), Some(age)) => write!(f, "restored checkpoint {seq}, {age} ms old {when}"),
            (Some(seq), None) => write!(f, "restored checkpoint {seq}"),
            (None, _) => f.write_str("no checkpoint: started from the initial state"),
        }
    }
}

/// Serde helper: a [`Duration`] as integer milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    /// Deserializes from milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_ids_are_dns_labels() {
        for ok in ["a", "counter-1", "x9", &"a".repeat(MAX_PROCESSOR_ID_LEN)] {
            assert!(ProcessorId::new(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Counter", "'C'"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            ("a_b", "'_'"),
            ("a.b", "'.'"),
            (&"a".repeat(MAX_PROCESSOR_ID_LEN + 1), "characters long"),
        ] {
            let err = ProcessorId::new(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.contains("field `id`"), "{err}");
        }
    }

    #[test]
    fn spec_validation_names_processor_and_field() {
        let mut spec = ProcessorSpec::new(ProcessorId::new("p").unwrap());
        spec.checkpoint_interval = Duration::ZERO;
        let err = spec.validate().unwrap_err().to_string();
        assert!(
            err.contains("processor p") && err.contains("checkpoint_interval"),
            "{err}"
        );
        let mut spec = ProcessorSpec::new(ProcessorId::new("p").unwrap());
        spec.restart.crash_loop_failures = 0;
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("crash_loop_failures"), "{err}");
    }

    #[test]
    fn spec_deserializes_with_defaults_and_rejects_bad_ids() {
        let spec: ProcessorSpec = serde_json::from_str(r#"{"id":"counter"}"#).unwrap();
        assert_eq!(spec.site, SitePreference::Any);
        assert!(spec.fallback);
        let err = serde_json::from_str::<ProcessorSpec>(r#"{"id":"Bad_Id"}"#).unwrap_err();
        assert!(err.to_string().contains("field `id`"), "{err}");
    }

    #[test]
    fn a_status_written_before_failover_reports_still_parses() {
        let old = r#"{"processor":"p","phase":"running","node":"n1","site":"edge","epoch":3,
            "last_checkpoint":9,"last_checkpoint_at":5,"last_move_at":null,
            "last_move_pause_ms":null,"restarts":0,"recent_failures":[],"last_error":null,
            "spec_revision":1,"updated_at":7}"#;
        let status: ProcessorStatus = serde_json::from_str(old).unwrap();
        assert_eq!(status.last_failover, None);
        assert_eq!(status.epoch, Some(Epoch(3)));
    }

    #[test]
    fn a_failover_report_measures_the_checkpoint_age_at_the_loss() {
        let row = Ownership {
            processor: ProcessorId::new("p").unwrap(),
            owner: Some(Epoch(4)),
            highest_epoch: Epoch(4),
            lease_expires: None,
            committed: Some((Epoch(3), Sequence(120))),
            committed_at: Some(Timestamp(10_000)),
        };
        let lost = Some((NodeId::new("edge-1"), Some(Timestamp(10_400))));
        let r = FailoverReport::new(
            Timestamp(15_000),
            Epoch(4),
            Some(Epoch(3)),
            lost,
            Some(&row),
        );
        assert_eq!(r.restored_sequence, Some(Sequence(120)));
        assert_eq!(r.checkpoint_age_ms, Some(400));
        assert_eq!(
            r.to_string(),
            "restored checkpoint #120, 400 ms old when the node was lost"
        );
        // The node's loss time unknown: the age is measured at the failover.
        let r = FailoverReport::new(
            Timestamp(15_000),
            Epoch(4),
            Some(Epoch(3)),
            None,
            Some(&row),
        );
        assert_eq!(r.checkpoint_age_ms, Some(5_000));
        let r = FailoverReport::new(Timestamp(15_000), Epoch(4), None, None, None);
        assert_eq!(r.restored_sequence, None);
        assert_eq!(r.checkpoint_age_ms, None);
    }

    #[test]
    fn revision_changes_with_workload_not_with_pin() {
        let a = ProcessorSpec::new(ProcessorId::new("p").unwrap());
        let mut b = a.clone();
        b.pin = Some(NodeId::new("n1"));
        assert_eq!(a.revision(), b.revision());
        b.workload.version = Some("2".into());
        assert_ne!(a.revision(), b.revision());
    }
}
