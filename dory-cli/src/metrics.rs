//! The orchestrator daemon's `/metrics` (Prometheus text format), fed by the orchestrator's
//! events and views.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use dory_core::orchestrator::{Event, EventKind, View};
use dory_core::planner::StartReason;

/// Upper bounds of the move pause histogram, in seconds.
const PAUSE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Upper bounds of the failover checkpoint age histogram, in seconds.
const CHECKPOINT_AGE_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A Prometheus histogram's counts.
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: [f64; N],
    buckets: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        for (bucket, bound) in self.buckets.iter_mut().zip(self.bounds) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        for (bound, count) in self.bounds.iter().zip(self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {:.6}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Counters and the latest view's gauges.
#[derive(Debug)]
pub(crate) struct Metrics {
    moves: u64,
    rollbacks: u64,
    rollforwards: u64,
    starts: BTreeMap<&'static str, u64>,
    marked_failed: u64,
    operation_failures: u64,
    pause: Histogram<{ PAUSE_BUCKETS.len() }>,
    /// How old the restored checkpoint was when the node was lost: what a failover lost.
    checkpoint_age: Histogram<{ CHECKPOINT_AGE_BUCKETS.len() }>,
    /// Failovers that found no committed checkpoint and started from the initial state.
    failovers_without_checkpoint: u64,
    phases: BTreeMap<String, u64>,
    leading: bool,
    term: u64,
    reconcile: Duration,
    rounds: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            moves: 0,
            rollbacks: 0,
            rollforwards: 0,
            starts: BTreeMap::new(),
            marked_failed: 0,
            operation_failures: 0,
            pause: Histogram::new(PAUSE_BUCKETS),
            checkpoint_age: Histogram::new(CHECKPOINT_AGE_BUCKETS),
            failovers_without_checkpoint: 0,
            phases: BTreeMap::new(),
            leading: false,
            term: 0,
            reconcile: Duration::ZERO,
            rounds: 0,
        }
    }
}

impl Metrics {
    /// Counts one event.
    pub(crate) fn event(&mut self, event: &Event) {
        match &event.kind {
            EventKind::Moved { pause_ms, .. } => {
                self.moves += 1;
                self.pause.observe(*pause_ms as f64 / 1000.0);
            }
            EventKind::Started {
                reason, failover, ..
            } => {
                if let Some(report) = failover {
                    match report.checkpoint_age_ms {
                        Some(ms) => self.checkpoint_age.observe(ms as f64 / 1000.0),
                        None => self.failovers_without_checkpoint += 1,
                    }
                }
                let reason = match reason {
                    StartReason::New => "new",
                    StartReason::Restart => "restart",
                    StartReason::Failover => "failover",
                };
                *self.starts.entry(reason).or_default() += 1;
            }
            EventKind::RolledBack { .. } => self.rollbacks += 1,
            EventKind::RolledForward { .. } => self.rollforwards += 1,
            EventKind::MarkedFailed { .. } => self.marked_failed += 1,
            EventKind::Failed { .. } => self.operation_failures += 1,
            EventKind::Leading { term } => {
                self.leading = true;
                self.term = term.0;
            }
            EventKind::Deposed { .. } => self.leading = false,
            EventKind::Began { .. } | EventKind::Terminated { .. } => {}
        }
    }

    /// Takes the gauges of a round's view.
    pub(crate) fn view(&mut self, view: &View) {
        self.phases.clear();
        for status in view.status.values() {
            *self.phases.entry(status.phase.clone()).or_default() += 1;
        }
        self.reconcile = view.reconcile;
        self.rounds += 1;
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "dory_processors",
            "gauge",
            "Processors by phase, as of the latest round.",
        );
        for (phase, count) in &self.phases {
            let _ = writeln!(out, "dory_processors{{phase=\"{phase}\"}} {count}");
        }
        let simple: [(&str, &str, &str, String); 14] = [
            (
                "dory_leader",
                "gauge",
                "1 while this orchestrator leads.",
                u8::from(self.leading).to_string(),
            ),
            (
                "dory_term",
                "gauge",
                "The leadership term this orchestrator holds or last held.",
                self.term.to_string(),
            ),
            (
                "dory_moves_total",
                "counter",
                "Make-before-break moves committed.",
                self.moves.to_string(),
            ),
            (
                "dory_move_rollbacks_total",
                "counter",
                "Moves rolled back before their commit.",
                self.rollbacks.to_string(),
            ),
            (
                "dory_move_rollforwards_total",
                "counter",
                "Half-done moves rolled forward after a commit.",
                self.rollforwards.to_string(),
            ),
            (
                "dory_failovers_total",
                "counter",
                "Processors restored elsewhere from their latest checkpoint after losing their node.",
                self.started("failover"),
            ),
            (
                "dory_failovers_without_checkpoint_total",
                "counter",
                "Failovers that found no committed checkpoint and restarted from the initial state.",
                self.failovers_without_checkpoint.to_string(),
            ),
            (
                "dory_restarts_total",
                "counter",
                "Instances started again after they ended.",
                self.started("restart"),
            ),
            (
                "dory_starts_total",
                "counter",
                "Instances started for processors that had none.",
                self.started("new"),
            ),
            (
                "dory_marked_failed_total",
                "counter",
                "Processors stopped by the crash-loop breaker.",
                self.marked_failed.to_string(),
            ),
            (
                "dory_operation_failures_total",
                "counter",
                "Operations that failed and are retried with backoff.",
                self.operation_failures.to_string(),
            ),
            (
                "dory_reconcile_seconds",
                "gauge",
                "How long the latest round took (observe, plan, act, report).",
                format!("{:.6}", self.reconcile.as_secs_f64()),
            ),
            (
                "dory_reconcile_rounds_total",
                "counter",
                "Rounds run.",
                self.rounds.to_string(),
            ),
            (
                "dory_up",
                "gauge",
                "1: the daemon answers.",
                "1".to_string(),
            ),
        ];
        for (name, kind, help, value) in simple {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        self.pause.render(
            &mut out,
            "dory_move_pause_seconds",
            "The pause a processor saw in a move, freeze to resume.",
        );
        self.checkpoint_age.render(
            &mut out,
            "dory_failover_checkpoint_age_seconds",
            "How old the checkpoint a failover restored was when the node was lost: the work the failover lost.",
        );
        out
    }

    fn started(&self, reason: &str) -> String {
        self.starts.get(reason).copied().unwrap_or(0).to_string()
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use dory_core::{Epoch, FailoverReport, NodeId, ProcessorId, Sequence, Timestamp};

    use super::*;

    #[test]
    fn moves_fill_the_pause_histogram() {
        let mut m = Metrics::default();
        m.event(&Event {
            at: Timestamp(1),
            processor: Some(ProcessorId::new("p").unwrap()),
            kind: EventKind::Moved {
                from: Epoch(1),
                to: Epoch(2),
                node: NodeId::new("n"),
                pause_ms: 20,
            },
        });
        m.event(&Event {
            at: Timestamp(2),
            processor: Some(ProcessorId::new("p").unwrap()),
            kind: EventKind::Started {
                epoch: Epoch(3),
                node: NodeId::new("n"),
                reason: StartReason::Failover,
                failover: Some(FailoverReport {
                    epoch: Epoch(3),
                    restored_sequence: Some(Sequence(40)),
                    checkpoint_age_ms: Some(300),
                    ..FailoverReport::default()
                }),
            },
        });
        let text = m.render();
        assert!(text.contains("dory_moves_total 1\n"), "{text}");
        assert!(text.contains("dory_failovers_total 1\n"), "{text}");
        assert!(
            text.contains("dory_move_pause_seconds_bucket{le=\"0.01\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("dory_move_pause_seconds_bucket{le=\"0.025\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("dory_move_pause_seconds_count 1\n"), "{text}");
        assert!(
            text.contains("dory_failover_checkpoint_age_seconds_bucket{le=\"0.25\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("dory_failover_checkpoint_age_seconds_bucket{le=\"0.5\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("dory_failover_checkpoint_age_seconds_sum 0.300000\n"),
            "{text}"
        );
    }
}
