//! The Kubernetes placement's configuration, with defaults for everything but the instance
//! store URL, so the `dory` CLI can read it from `dory.toml`'s `[placement]` table
//! (`placement = "kubernetes"`).
//!
//! Durations are written as integer milliseconds or as `<integer><unit>` parts (`"90s"`,
//! `"1m30s"`, `"250ms"`), the form the rest of `dory.toml` uses.

use std::time::Duration;

use dory_core::{InterruptionReason, Site};
use serde::{Deserialize, Serialize};

/// Everything the Kubernetes placement needs to know besides the API client.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeConfig {
    /// The namespace processor pods, their Secrets and the PodDisruptionBudget live in.
    /// Default `dory`.
    pub namespace: String,
    /// The image of a processor whose spec names none (`workload.image`). Default `None`: a
    /// spec without an image is refused at launch.
    pub default_image: Option<String>,
    /// The container's `imagePullPolicy` (`Always`, `IfNotPresent`, `Never`); `None` leaves
    /// Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// The service account processor pods run as; `None` is the namespace's default.
    pub service_account: Option<String>,
    /// The port the SDK's endpoint server listens on in every pod (`DORY_PORT`). Default 8080.
    pub sdk_port: u16,
    /// The node label whose value (`edge` or `cloud`) is the node's site. Default
    /// `dory.io/site`.
    pub site_label: String,
    /// The site of a node without that label (or with another value). Default `cloud`.
    pub default_site: Site,
    /// Taint keys of edge nodes every processor pod tolerates (any value, any effect). The
    /// pod is pinned to the node the planner chose, so a toleration never widens where it
    /// runs; it only lets it run on an edge node the planner picked. Default none.
    pub edge_taints: Vec<String>,
    /// `tolerationSeconds` of the `node.kubernetes.io/not-ready` and
    /// `node.kubernetes.io/unreachable` tolerations. Kubernetes' own default (300 s) would
    /// evict a processor from a node that is briefly lost before Dory decides on a failover;
    /// this must exceed the orchestrator's `node_lost_grace`. Default 1 h.
    #[serde(with = "duration")]
    pub node_lost_toleration: Duration,
    /// `terminationGracePeriodSeconds`: how long a pod has to save its state after SIGTERM
    /// before the kubelet kills it, when deleted by something other than Dory (Dory gives its
    /// own grace on delete). Default 60 s.
    #[serde(with = "duration")]
    pub termination_grace: Duration,
    /// The name of the one PodDisruptionBudget over every Dory pod in the namespace. Default
    /// `dory-processors`.
    pub pdb_name: String,
    /// Node signals and the interruptions they mean.
    pub signals: SignalConfig,
    /// Rate limit and retries of API writes.
    pub writes: WriteLimits,
    /// Health checks of instances whose phase is not settled.
    pub health: HealthChecks,
    /// What goes into every instance's environment.
    pub instance: InstanceSettings,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            namespace: "dory".into(),
            default_image: None,
            image_pull_policy: None,
            service_account: None,
            sdk_port: dory_core::env::DEFAULT_PORT,
            site_label: "dory.io/site".into(),
            default_site: Site::Cloud,
            edge_taints: Vec::new(),
            node_lost_toleration: Duration::from_secs(3600),
            termination_grace: Duration::from_secs(60),
            pdb_name: "dory-processors".into(),
            signals: SignalConfig::default(),
            writes: WriteLimits::default(),
            health: HealthChecks::default(),
            instance: InstanceSettings::default(),
        }
    }
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("namespace", &self.namespace)
            .field("default_image", &self.default_image)
            .field("sdk_port", &self.sdk_port)
            .field("site_label", &self.site_label)
            .field("pdb_name", &self.pdb_name)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The parts of every instance's `DORY_*` environment that do not come from its launch
/// request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceSettings {
    /// `DORY_STORE_URL`: the state store as reached from inside the cluster.
    pub store_url: String,
    /// `DORY_PUBLISHER_URL`, if output goes anywhere.
    pub publisher_url: Option<String>,
    /// `DORY_INPUT_URL`, if processors consume input.
    pub input_url: Option<String>,
    /// `DORY_LEASE_MS`: the ownership lease period. Default 10 s.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Extra variables set on every instance (below the processor's own and the contract's).
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for InstanceSettings {
    fn default() -> Self {
        InstanceSettings {
            store_url: String::new(),
            publisher_url: None,
            input_url: None,
            lease: Duration::from_secs(10),
            env: Default::default(),
        }
    }
}

/// URLs shown without their passwords: configs end up in logs.
impl std::fmt::Debug for InstanceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = dory_core::env::redact_url;
        f.debug_struct("InstanceSettings")
            .field("store_url", &redact(&self.store_url))
            .field("publisher_url", &self.publisher_url.as_deref().map(redact))
            .field("input_url", &self.input_url.as_deref().map(redact))
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Which node signals mean an interruption, and what deadline each implies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalConfig {
    /// Whether a cordon (`spec.unschedulable`) is a [`InterruptionReason::Drain`]. Default
    /// true.
    pub cordon_is_drain: bool,
    /// Taint keys that announce an interruption. When a node carries several, the one with
    /// the earliest deadline wins, then the first in this list.
    pub taints: Vec<TaintSignal>,
}

/// One taint key that announces an interruption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintSignal {
    /// The taint key.
    pub key: String,
    /// Why the node is going away.
    pub reason: InterruptionReason,
    /// How long after the taint was added (its `timeAdded`, else when Dory first saw it) the
    /// node is gone; `None`: no deadline.
    #[serde(default, with = "opt_duration")]
    pub deadline: Option<Duration>,
}

impl TaintSignal {
    fn new(key: &str, reason: InterruptionReason, deadline: Option<Duration>) -> Self {
        TaintSignal {
            key: key.into(),
            reason,
            deadline,
        }
    }
}

/// `node.kubernetes.io/unschedulable`: set by the node controller on a cordoned node.
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
/// `node.kubernetes.io/not-ready`: the node's Ready condition is False.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// `node.kubernetes.io/unreachable`: the node's Ready condition is Unknown.
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";

impl Default for SignalConfig {
    fn default() -> Self {
        use InterruptionReason::*;
        SignalConfig {
            cordon_is_drain: true,
            taints: vec![
                // Kubernetes' own: the node controller taints a cordoned node.
                TaintSignal::new(TAINT_UNSCHEDULABLE, Drain, None),
                // The AWS Node Termination Handler's taints with `taintNode` enabled (its
                // README, "TAINT_NODE": `aws-node-termination-handler/spot-itn`,
                // `/scheduled-maintenance`, `/asg-lifecycle-termination`,
                // `/rebalance-recommendation`). A spot interruption notice comes two minutes
                // before EC2 reclaims the instance.
                TaintSignal::new(
                    "aws-node-termination-handler/spot-itn",
                    SpotReclaim,
                    Some(Duration::from_secs(120)),
                ),
                // GKE taints a preemptible or spot node it is about to reclaim; it gives
                // about 30 s of graceful node shutdown.
                TaintSignal::new(
                    "cloud.google.com/impending-node-termination",
                    SpotReclaim,
                    Some(Duration::from_secs(30)),
                ),
                // Karpenter v1 (`karpenter.sh/disrupted:NoSchedule`, `DisruptedTaintKey` in
                // `pkg/apis/v1/taints.go`) and its v1beta1 releases
                // (`karpenter.sh/disruption=disrupting:NoSchedule`): the node is being
                // consolidated, expired or drifted; Karpenter waits for the drain.
                TaintSignal::new("karpenter.sh/disrupted", Disruption, None),
                TaintSignal::new("karpenter.sh/disruption", Disruption, None),
                // The ASG terminates the instance once its lifecycle hook completes or times
                // out; NTH drains before completing it.
                TaintSignal::new(
                    "aws-node-termination-handler/asg-lifecycle-termination",
                    Disruption,
                    None,
                ),
                TaintSignal::new(
                    "aws-node-termination-handler/scheduled-maintenance",
                    Maintenance,
                    None,
                ),
                // A rebalance recommendation says the spot instance is at elevated risk of
                // interruption: move early, without a deadline.
                TaintSignal::new(
                    "aws-node-termination-handler/rebalance-recommendation",
                    Maintenance,
                    None,
                ),
            ],
        }
    }
}

/// How fast the placement writes to the API server, and how it retries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteLimits {
    /// Sustained writes per second (a token bucket). Default 20, client-go's default QPS
    /// doubled: a move is about four writes.
    pub per_second: f64,
    /// Writes allowed in a burst above the rate. Default 40.
    pub burst: u32,
    /// Attempts of one write on `429`, `5xx` and transport errors before its error is
    /// returned (as retryable). Default 5.
    pub attempts: u32,
    /// The first retry's delay; each further one doubles it, plus hashed jitter. Default 200 ms.
    #[serde(with = "duration")]
    pub backoff_initial: Duration,
    /// The longest delay between retries. Default 5 s.
    #[serde(with = "duration")]
    pub backoff_max: Duration,
}

impl Default for WriteLimits {
    fn default() -> Self {
        WriteLimits {
            per_second: 20.0,
            burst: 40,
            attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Health checks (`GET /healthz`) of instances whose phase the pod does not tell: starting,
/// standby and frozen ones, and every adopted one once. A running instance is not checked:
/// its pod's readiness and the control calls made through [`crate::KubeControl`] are what
/// change it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthChecks {
    /// How often unsettled instances are checked. Default 250 ms.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// How long one check may take. Default 1 s.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Checks in flight at once. Default 64.
    pub concurrency: usize,
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks {
            interval: Duration::from_millis(250),
            timeout: Duration::from_secs(1),
            concurrency: 64,
        }
    }
}

/// Durations as integer milliseconds or `<integer><unit>` parts (`ms`, `s`, `m`, `h`).
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(text) => parse(&text).map_err(serde::de::Error::custom),
        }
    }

    /// Parses `"1m30s"`, `"250ms"`, `"2h"`.
    pub(crate) fn parse(text: &str) -> Result<Duration, String> {
        let bad = || format!("{text:?} is not a duration such as \"90s\", \"1m30s\" or \"250ms\"");
        let mut total = Duration::ZERO;
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match &rest[..unit] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(part);
            rest = &rest[unit..];
        }
        Ok(total)
    }
}

/// [`duration`] for an optional field.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::duration")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_every_field_but_the_store() {
        let config: KubeConfig = serde_json::from_value(serde_json::json!({
            "namespace": "prod",
            "instance": {"store_url": "postgres://db/dory", "lease": "15s"},
            "termination_grace": "2m",
            "signals": {"taints": [{"key": "example.com/going", "reason": "maintenance", "deadline": "1m30s"}]}
        }))
        .unwrap();
        assert_eq!(config.namespace, "prod");
        assert_eq!(config.sdk_port, 8080);
        assert_eq!(config.site_label, "dory.io/site");
        assert_eq!(config.instance.lease, Duration::from_secs(15));
        assert_eq!(config.termination_grace, Duration::from_secs(120));
        assert_eq!(
            config.signals.taints[0].deadline,
            Some(Duration::from_secs(90))
        );
        assert!(config.signals.cordon_is_drain);
        let err =
            serde_json::from_value::<KubeConfig>(serde_json::json!({"namespac": "x"})).unwrap_err();
        assert!(err.to_string().contains("namespac"), "{err}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert!(duration::parse("").is_err());
        assert!(duration::parse("5 s").is_err());
        assert!(duration::parse("s").is_err());
        assert!(duration::parse("10d").is_err());
    }

    #[test]
    fn debug_hides_passwords() {
        let mut config = KubeConfig::default();
        config.instance.store_url = "postgres://dory:hunter2@db/dory".into();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
