//! What the orchestrator reports about each processor.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{
    DesiredState, FailoverReport, Instance, NodeId, ProcessorId, ProcessorStatus, Timestamp,
};
use crate::planner::{Observed, Plan, RestartHistory};

/// A deterministic jitter in `[0, max)` from a hash of (processor, attempt): spreads retries
/// without a random number generator, so simulations replay exactly.
pub(super) fn jitter(processor: &ProcessorId, attempt: u32, max: Duration) -> Duration {
    let max_ms = max.as_millis() as u64;
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let mut key = processor.as_str().as_bytes().to_vec();
    key.extend_from_slice(&attempt.to_le_bytes());
    Duration::from_millis(xxhash_rust::xxh3::xxh3_64(&key) % max_ms)
}

/// The last move and the last failover of each processor, as the status reports them (a new
/// leader reads them back from the status its predecessor wrote).
#[derive(Debug, Default)]
pub(super) struct Last {
    /// When the last move finished and the pause it cost.
    pub(super) moves: BTreeMap<ProcessorId, (Timestamp, u64)>,
    /// The last failover.
    pub(super) failovers: BTreeMap<ProcessorId, FailoverReport>,
}

/// Whether two statuses differ in anything but the time they were written.
pub(super) fn same(a: &ProcessorStatus, b: &ProcessorStatus) -> bool {
    // Destructured so that a field added to the status cannot be forgotten here.
    let ProcessorStatus {
        processor,
        phase,
        node,
        site,
        epoch,
        last_checkpoint,
        last_checkpoint_at,
        last_move_at,
        last_move_pause_ms,
        restarts,
        recent_failures,
        last_error,
        spec_revision,
        updated_at: _,
        last_failover,
    } = a;
    *processor == b.processor
        && *phase == b.phase
        && *node == b.node
        && *site == b.site
        && *epoch == b.epoch
        && *last_checkpoint == b.last_checkpoint
        && *last_checkpoint_at == b.last_checkpoint_at
        && *last_move_at == b.last_move_at
        && *last_move_pause_ms == b.last_move_pause_ms
        && *restarts == b.restarts
        && *recent_failures == b.recent_failures
        && *last_error == b.last_error
        && *spec_revision == b.spec_revision
        && *last_failover == b.last_failover
}

/// Builds the status of every desired, invalid or still-present processor.
pub(super) fn build(
    desired: &DesiredState,
    observed: &Observed,
    plan: &Plan,
    history: &BTreeMap<ProcessorId, RestartHistory>,
    last: &Last,
    retry: &BTreeMap<ProcessorId, (u32, Timestamp, String)>,
    now: Timestamp,
) -> BTreeMap<String, ProcessorStatus> {
    let mut out = BTreeMap::new();
    let owners: BTreeMap<&ProcessorId, &crate::model::Ownership> = observed
        .ownership
        .iter()
        .map(|o| (&o.processor, o))
        .collect();
    let sites: BTreeMap<&NodeId, crate::model::Site> =
        observed.nodes.iter().map(|n| (&n.id, n.site)).collect();
    let mut by_processor: BTreeMap<&ProcessorId, Vec<&Instance>> = BTreeMap::new();
    for i in &observed.instances {
        by_processor.entry(&i.processor).or_default().push(i);
    }
    for spec in &desired.processors {
        let id = &spec.id;
        let row = owners.get(id);
        let owner_epoch = row.and_then(|r| r.owner);
        let instances = by_processor.get(id).map(Vec::as_slice).unwrap_or_default();
        let current = instances
            .iter()
            .find(|i| Some(i.epoch) == owner_epoch)
            .or_else(|| instances.last());
        let h = history.get(id).cloned().unwrap_or_default();
        let phase = if h.failed.is_some() {
            "failed".to_string()
        } else {
            current.map_or("pending".to_string(), |i| i.phase.name().to_string())
        };
        let last_error = h
            .failed
            .clone()
            .or_else(|| retry.get(id).map(|(_, _, e)| e.clone()))
            .or_else(|| plan.waiting.get(id).cloned());
        let (last_move_at, last_move_pause_ms) = match last.moves.get(id) {
            Some((at, pause)) => (Some(*at), Some(*pause)),
            None => (None, None),
        };
        out.insert(
            id.to_string(),
            ProcessorStatus {
                processor: id.to_string(),
                phase,
                node: current.map(|i| i.node.clone()),
                site: current.and_then(|i| sites.get(&i.node).copied()),
                epoch: owner_epoch,
                last_checkpoint: row.and_then(|r| r.committed).map(|(_, s)| s),
                last_checkpoint_at: row.and_then(|r| r.committed_at),
                last_move_at,
                last_move_pause_ms,
                restarts: h.restarts,
                recent_failures: h.recent_failures,
                last_error,
                spec_revision: Some(spec.revision()),
                updated_at: now,
                last_failover: last.failovers.get(id).cloned(),
            },
        );
    }
    for bad in &desired.invalid {
        out.insert(
            bad.id.clone(),
            ProcessorStatus {
                processor: bad.id.clone(),
                phase: "invalid".into(),
                last_error: Some(bad.error.clone()),
                updated_at: now,
                ..Default::default()
            },
        );
    }
    // Processors being removed keep a status until their last instance is gone.
    for (id, instances) in by_processor {
        if out.contains_key(id.as_str()) {
            continue;
        }
        if let Some(i) = instances.last() {
            out.insert(
                id.to_string(),
                ProcessorStatus {
                    processor: id.to_string(),
                    phase: "removing".into(),
                    node: Some(i.node.clone()),
                    epoch: Some(i.epoch),
                    updated_at: now,
                    ..Default::default()
                },
            );
        }
    }
    out
}
