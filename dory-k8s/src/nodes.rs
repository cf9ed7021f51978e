//! Kubernetes nodes as the core model's [`Node`]s: site, capacity, readiness and the
//! interruption their cordon and taints announce. Pure functions, so every signal is tested
//! without an API server.

use std::collections::BTreeMap;

use dory_core::{Interruption, InterruptionReason, Node, NodeId, Resources, Site, Timestamp};
use k8s_openapi::api::core::v1::Node as KubeNode;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::config::{KubeConfig, SignalConfig, TAINT_NOT_READY, TAINT_UNREACHABLE};

/// A Kubernetes time as a [`Timestamp`] (times before 1970 are clamped to 0).
pub(crate) fn timestamp(t: &Time) -> Timestamp {
    Timestamp(t.0.as_millisecond().max(0) as u64)
}

/// The interruption `node`'s cordon and taints announce, if any, with `now` as the moment a
/// taint without a `timeAdded` was first seen.
///
/// Several signals at once: the one with the earliest deadline wins (a spot reclaim under a
/// cordon is still a spot reclaim), then a cordon, then the first in
/// [`SignalConfig::taints`].
pub fn interruption(
    node: &KubeNode,
    signals: &SignalConfig,
    now: Timestamp,
) -> Option<Interruption> {
    interruption_seen(node, signals, |_| now)
}

/// [`interruption`], with `first_seen(taint key)` the moment the placement first saw a taint
/// that carries no `timeAdded`, so its deadline does not slide with every look.
pub fn interruption_seen(
    node: &KubeNode,
    signals: &SignalConfig,
    first_seen: impl Fn(&str) -> Timestamp,
) -> Option<Interruption> {
    let spec = node.spec.as_ref();
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    let mut best: Option<(Option<Timestamp>, usize, InterruptionReason)> = None;
    let mut consider = |deadline: Option<Timestamp>, rank: usize, reason: InterruptionReason| {
        // `None` sorts before `Some`, so compare with "has no deadline" first.
        let key = |d: &Option<Timestamp>, r: usize| (d.is_none(), *d, r);
        if best
            .as_ref()
            .is_none_or(|(d, r, _)| key(&deadline, rank) < key(d, *r))
        {
            best = Some((deadline, rank, reason));
        }
    };
    if signals.cordon_is_drain && spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        consider(None, 0, InterruptionReason::Drain);
    }
    for (i, signal) in signals.taints.iter().enumerate() {
        let Some(taint) = taints.iter().find(|t| t.key == signal.key) else {
            continue;
        };
        let deadline = signal.deadline.map(|d| {
            let since = taint
                .time_added
                .as_ref()
                .map(timestamp)
                .unwrap_or_else(|| first_seen(&signal.key));
            since.plus(d)
        });
        consider(deadline, i + 1, signal.reason.clone());
    }
    best.map(|(deadline, _, reason)| Interruption { reason, deadline })
}

/// A Kubernetes node as the planner sees it (site from the site label, readiness from the
/// Ready condition and the lifecycle taints, allocatable capacity, the interruption its cordon
/// and taints signal, a taint without `timeAdded` counted from `now`); `None` for a node
/// without a name. What [`KubePlacement`](crate::KubePlacement) reports, for a reader that has
/// only the node object (an operator's command).
pub fn node_model(node: &KubeNode, config: &KubeConfig, now: Timestamp) -> Option<Node> {
    to_model(node, config, |_| now)
}

/// The node as the planner sees it; `None` (with a warning) for a node without a name.
pub(crate) fn to_model(
    node: &KubeNode,
    config: &KubeConfig,
    first_seen: impl Fn(&str) -> Timestamp,
) -> Option<Node> {
    let Some(name) = node.metadata.name.clone() else {
        tracing::warn!(target: "dory::k8s", "a node without a name is skipped");
        return None;
    };
    let site = match node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&config.site_label))
        .map(String::as_str)
    {
        Some("edge") => Site::Edge,
        Some("cloud") => Site::Cloud,
        _ => config.default_site,
    };
    let status = node.status.as_ref();
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    // The node lifecycle controller taints a node whose Ready condition is False or Unknown;
    // either sign is enough.
    let lost_taint = taints
        .iter()
        .any(|t| t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE);
    let ready = ready_condition.is_some_and(|c| c.status == "True") && !lost_taint;
    let ready_since = ready_condition
        .and_then(|c| c.last_transition_time.as_ref())
        .map(timestamp)
        .unwrap_or_default();
    let allocatable = status.and_then(|s| s.allocatable.as_ref());
    let capacity = Resources::new(
        quantity_of(&name, allocatable, "cpu", cpu_millis),
        quantity_of(&name, allocatable, "memory", memory_mib),
    );
    Some(Node {
        id: NodeId::new(name),
        site,
        schedulable: !node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        ready,
        ready_since,
        capacity,
        interruption: interruption_seen(node, &config.signals, first_seen),
    })
}

fn quantity_of(
    node: &str,
    allocatable: Option<&BTreeMap<String, Quantity>>,
    resource: &str,
    parse: fn(&str) -> Option<u64>,
) -> u64 {
    let Some(q) = allocatable.and_then(|a| a.get(resource)) else {
        return 0;
    };
    parse(&q.0).unwrap_or_else(|| {
        tracing::warn!(target: "dory::k8s", node, resource, quantity = %q.0, "unreadable allocatable quantity: counted as none");
        0
    })
}

/// A quantity (`"3800m"`, `"16Gi"`, `"1e3"`) as a plain number; `None` for a suffix Kubernetes does not define.
fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        // Decimal exponent: `1e3`, `1E3`.
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value)
}

/// CPU in thousandths of a core (`"4"` → 4000, `"3800m"` → 3800).
pub(crate) fn cpu_millis(q: &str) -> Option<u64> {
    parse_quantity(q).map(|cores| (cores * 1000.0).round() as u64)
}

/// Memory in MiB, rounded down (`"16Gi"` → 16384).
pub(crate) fn memory_mib(q: &str) -> Option<u64> {
    parse_quantity(q).map(|bytes| (bytes / (1024.0 * 1024.0)).floor() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::jiff;

    use super::*;

    fn time(ms: u64) -> Time {
        Time(jiff::Timestamp::from_millisecond(ms as i64).unwrap())
    }

    fn node(unschedulable: bool, taints: &[(&str, Option<u64>)]) -> KubeNode {
        KubeNode {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                taints: Some(
                    taints
                        .iter()
                        .map(|(key, added)| Taint {
                            key: key.to_string(),
                            effect: "NoSchedule".into(),
                            time_added: added.map(time),
                            value: None,
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    const NOW: Timestamp = Timestamp(1_000_000);

    fn signal(unschedulable: bool, taints: &[(&str, Option<u64>)]) -> Option<Interruption> {
        interruption(&node(unschedulable, taints), &SignalConfig::default(), NOW)
    }

    fn expect(reason: InterruptionReason, deadline: Option<Timestamp>) -> Option<Interruption> {
        Some(Interruption { reason, deadline })
    }

    #[test]
    fn a_plain_node_has_no_interruption() {
        assert_eq!(signal(false, &[]), None);
        assert_eq!(signal(false, &[("example.com/other", None)]), None);
    }

    #[test]
    fn a_cordon_and_the_unschedulable_taint_are_a_drain() {
        use InterruptionReason::Drain;
        assert_eq!(signal(true, &[]), expect(Drain, None));
        assert_eq!(
            signal(false, &[("node.kubernetes.io/unschedulable", None)]),
            expect(Drain, None)
        );
        let off = SignalConfig {
            cordon_is_drain: false,
            ..SignalConfig::default()
        };
        assert_eq!(interruption(&node(true, &[]), &off, NOW), None);
    }

    #[test]
    fn karpenter_taints_are_a_disruption() {
        use InterruptionReason::Disruption;
        for key in ["karpenter.sh/disrupted", "karpenter.sh/disruption"] {
            assert_eq!(
                signal(false, &[(key, None)]),
                expect(Disruption, None),
                "{key}"
            );
        }
    }

    #[test]
    fn aws_spot_notice_has_a_two_minute_deadline_from_the_taint() {
        use InterruptionReason::SpotReclaim;
        let key = "aws-node-termination-handler/spot-itn";
        assert_eq!(
            signal(false, &[(key, Some(500_000))]),
            expect(SpotReclaim, Some(Timestamp(620_000)))
        );
        // No timeAdded: two minutes from first sight.
        assert_eq!(
            signal(false, &[(key, None)]),
            expect(SpotReclaim, Some(NOW.plus(Duration::from_secs(120))))
        );
    }

    #[test]
    fn other_aws_taints_are_maintenance_or_disruption() {
        use InterruptionReason::*;
        for (key, reason) in [
            (
                "aws-node-termination-handler/rebalance-recommendation",
                Maintenance,
            ),
            (
                "aws-node-termination-handler/scheduled-maintenance",
                Maintenance,
            ),
            (
                "aws-node-termination-handler/asg-lifecycle-termination",
                Disruption,
            ),
        ] {
            assert_eq!(signal(false, &[(key, None)]), expect(reason, None), "{key}");
        }
    }

    #[test]
    fn gke_impending_termination_has_thirty_seconds() {
        assert_eq!(
            signal(
                false,
                &[("cloud.google.com/impending-node-termination", Some(900_000))]
            ),
            expect(InterruptionReason::SpotReclaim, Some(Timestamp(930_000)))
        );
    }

    #[test]
    fn the_earliest_deadline_wins_then_the_cordon() {
        use InterruptionReason::*;
        // A cordon plus a spot notice: the deadline rules.
        assert_eq!(
            signal(
                true,
                &[
                    ("karpenter.sh/disrupted", None),
                    ("aws-node-termination-handler/spot-itn", Some(0))
                ]
            ),
            expect(SpotReclaim, Some(Timestamp(120_000)))
        );
        assert_eq!(
            signal(true, &[("karpenter.sh/disrupted", None)]),
            expect(Drain, None)
        );
        assert_eq!(
            signal(
                false,
                &[
                    ("aws-node-termination-handler/spot-itn", Some(0)),
                    ("cloud.google.com/impending-node-termination", Some(0))
                ]
            ),
            expect(SpotReclaim, Some(Timestamp(30_000)))
        );
    }

    #[test]
    fn configured_taints_with_other_reasons() {
        let signals = SignalConfig {
            cordon_is_drain: true,
            taints: vec![crate::config::TaintSignal {
                key: "example.com/decommission".into(),
                reason: InterruptionReason::Other("decommission".into()),
                deadline: Some(Duration::from_secs(600)),
            }],
        };
        let n = node(false, &[("example.com/decommission", Some(0))]);
        assert_eq!(
            interruption(&n, &signals, NOW),
            expect(
                InterruptionReason::Other("decommission".into()),
                Some(Timestamp(600_000))
            )
        );
    }

    #[test]
    fn nodes_map_site_capacity_and_readiness() {
        let config = KubeConfig::default();
        let mut n = node(false, &[]);
        n.metadata.labels = Some([("dory.io/site".to_string(), "edge".to_string())].into());
        n.status = Some(NodeStatus {
            allocatable: Some(
                [
                    ("cpu".to_string(), Quantity("3800m".into())),
                    ("memory".to_string(), Quantity("16318384Ki".into())),
                ]
                .into(),
            ),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(time(42_000)),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let m = to_model(&n, &config, |_| NOW).unwrap();
        assert_eq!(m.site, Site::Edge);
        assert_eq!(m.capacity, Resources::new(3800, 15935));
        assert!(m.ready && m.schedulable);
        assert_eq!(m.ready_since, Timestamp(42_000));
        // Unreachable: the controller's taint says so even before the condition changes.
        n.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: TAINT_UNREACHABLE.into(),
            effect: "NoExecute".into(),
            ..Default::default()
        }]);
        assert!(!to_model(&n, &config, |_| NOW).unwrap().ready);
        // A node that tells nothing: cloud, not ready, no capacity, no crash.
        let bare = KubeNode {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("bare".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let m = to_model(&bare, &config, |_| NOW).unwrap();
        assert_eq!(
            (m.site, m.ready, m.capacity),
            (Site::Cloud, false, Resources::default())
        );
        assert!(to_model(&KubeNode::default(), &config, |_| NOW).is_none());
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(cpu_millis("4"), Some(4000));
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(cpu_millis("2e3"), Some(2_000_000));
        assert_eq!(memory_mib("1Gi"), Some(1024));
        assert_eq!(memory_mib("1G"), Some(953));
        assert_eq!(memory_mib("512Mi"), Some(512));
        assert_eq!(cpu_millis("lots"), None);
        assert_eq!(memory_mib("5Qi"), None);
    }
}
