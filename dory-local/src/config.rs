//! The local placement's configuration: where its registry lives, the virtual nodes, how
//! instances are started and what their environment holds.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use dory_core::{NodeId, Resources, Site};
use serde::Deserialize;

/// The local placement's configuration (the `dory` CLI reads it from `dory.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LocalConfig {
    /// Where the instance registry (`instances/`) and the node states (`nodes/`) live. It is
    /// what a restarted orchestrator finds its instances in, so it must outlive the
    /// orchestrator.
    pub state_dir: PathBuf,
    /// The virtual nodes.
    pub nodes: Vec<LocalNode>,
    /// The command prefix that starts the supervisor (see [`crate::supervise`]), e.g. the
    /// path of the `dory-supervise` binary, or `["/usr/bin/dory", "supervise"]`. The
    /// placement appends `--dir <instance dir> -- <exec_prefix…> <command…>`.
    pub supervisor: Vec<String>,
    /// What goes into every instance's environment.
    pub instance: InstanceSettings,
}

/// One named virtual node.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct LocalNode {
    /// The node's name.
    pub id: NodeId,
    /// Where the node runs.
    pub site: Site,
    /// What the node offers (the planner's fit check; nothing enforces it on the processes).
    pub capacity: Resources,
    /// Put in front of every instance command on this node, e.g.
    /// `["ip", "netns", "exec", "edge-1"]` to run the node's instances in their own network
    /// namespace. Empty by default.
    #[serde(default)]
    pub exec_prefix: Vec<String>,
    /// `DORY_STORE_URL` for this node's instances instead of [`InstanceSettings::store_url`]:
    /// the same store reached another way, e.g. from a network namespace through an address
    /// of the host. `None` by default.
    #[serde(default)]
    pub store_url: Option<String>,
    /// `DORY_PUBLISHER_URL` for this node's instances instead of
    /// [`InstanceSettings::publisher_url`]. `None` by default.
    #[serde(default)]
    pub publisher_url: Option<String>,
    /// The host the placement reaches this node's instances at when they bound every
    /// interface (they write `0.0.0.0:p`): e.g. the namespace's end of a veth pair. `None`
    /// (the default) is loopback, right for instances in the host's network.
    #[serde(default)]
    pub reach_host: Option<IpAddr>,
}

/// URLs shown without their passwords, as [`InstanceSettings`] does.
impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = dory_core::env::redact_url;
        f.debug_struct("LocalNode")
            .field("id", &self.id)
            .field("site", &self.site)
            .field("capacity", &self.capacity)
            .field("exec_prefix", &self.exec_prefix)
            .field("store_url", &self.store_url.as_deref().map(redact))
            .field("publisher_url", &self.publisher_url.as_deref().map(redact))
            .field("reach_host", &self.reach_host)
            .finish()
    }
}

/// The parts of every instance's `DORY_*` environment that do not come from its
/// [`LaunchRequest`](dory_core::LaunchRequest).
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceSettings {
    /// `DORY_STORE_URL`.
    pub store_url: String,
    /// `DORY_PUBLISHER_URL`, if output goes anywhere.
    #[serde(default)]
    pub publisher_url: Option<String>,
    /// `DORY_INPUT_URL`, if processors consume input.
    #[serde(default)]
    pub input_url: Option<String>,
    /// `DORY_LEASE_MS`: the ownership lease period. In config files an integer number of
    /// milliseconds (as `dory-core`'s serialised durations) or a human duration such as
    /// `"10s"`, `"1m30s"`, `"250ms"`. Default 10 s (the planner's default lease).
    #[serde(default = "default_lease", deserialize_with = "duration::deserialize")]
    pub lease: Duration,
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
            .finish()
    }
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// Durations in config files: milliseconds as an integer, or `<integer><unit>` parts with
/// units `ms`, `s`, `m`, `h` (the form the `dory` CLI reads).
mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("milliseconds as an integer, or a duration such as \"10s\" or \"250ms\"")
        }

        fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(ms))
        }

        fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Duration, E> {
            u64::try_from(ms)
                .map(Duration::from_millis)
                .map_err(|_| E::custom(format!("{ms} is not a duration: it is negative")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse(text).ok_or_else(|| {
                E::custom(format!(
                    "{text:?} is not a duration (examples: \"250ms\", \"10s\", \"2m\", \"1h\")"
                ))
            })
        }
    }

    pub(super) fn parse(text: &str) -> Option<Duration> {
        let mut rest = text.trim();
        if rest.is_empty() {
            return None;
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            let value: u32 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(1),
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                _ => return None,
            };
            rest = &rest[unit_len..];
            total = total.checked_add(unit.checked_mul(value)?)?;
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_reads_milliseconds_or_human_durations() {
        let settings = |lease: &str| {
            serde_json::from_str::<InstanceSettings>(&format!(
                r#"{{"store_url": "sqlite:///x.db"{lease}}}"#
            ))
        };
        assert_eq!(settings("").unwrap().lease, Duration::from_secs(10));
        assert_eq!(
            settings(r#", "lease": 1500"#).unwrap().lease,
            Duration::from_millis(1500)
        );
        assert_eq!(
            settings(r#", "lease": "1m30s""#).unwrap().lease,
            Duration::from_secs(90)
        );
        let err = settings(r#", "lease": "soon""#).unwrap_err().to_string();
        assert!(err.contains("\"soon\" is not a duration"), "{err}");
        assert_eq!(duration::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration::parse("10"), None);
    }

    #[test]
    fn debug_hides_passwords() {
        let settings = InstanceSettings {
            store_url: "postgres://dory:s3cret@db/dory".into(),
            publisher_url: Some("amqp://u:hunter2@mq/%2f".into()),
            input_url: None,
            lease: Duration::from_secs(1),
        };
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn nodes_default_to_no_exec_prefix() {
        let node: LocalNode = serde_json::from_str(
            r#"{"id": "edge-1", "site": "edge", "capacity": {"cpu_millis": 2000, "memory_mib": 1024}}"#,
        )
        .unwrap();
        assert_eq!(node.id, NodeId::new("edge-1"));
        assert_eq!(node.site, Site::Edge);
        assert!(node.exec_prefix.is_empty());
        assert_eq!(
            (node.store_url, node.publisher_url, node.reach_host),
            (None, None, None)
        );
    }

    #[test]
    fn a_node_overrides_the_urls_and_the_host_its_instances_are_reached_at() {
        let node: LocalNode = serde_json::from_str(
            r#"{"id": "edge-1", "site": "edge", "capacity": {"cpu_millis": 2000, "memory_mib": 1024},
                "store_url": "postgres://dory:s3cret@10.200.1.1/dory",
                "publisher_url": "amqp://10.200.1.1/%2f", "reach_host": "10.200.1.2"}"#,
        )
        .unwrap();
        assert_eq!(node.reach_host, Some(IpAddr::from([10, 200, 1, 2])));
        assert_eq!(node.publisher_url.as_deref(), Some("amqp://10.200.1.1/%2f"));
        let shown = format!("{node:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("10.200.1.2"),
            "{shown}"
        );
    }
}
