//! Node operations: cordon, drain, spot notices, killing and reviving a virtual node.
//!
//! They are kept in files (`<state_dir>/nodes/<node>.json`, read by the placement on every
//! poll), so another process (`dory drain`, a test) can play a fault while the orchestrator
//! runs, and a restarted orchestrator still sees it. [`LocalNodes`] needs only the state
//! directory; [`LocalPlacement`](crate::LocalPlacement) has the same operations for the nodes
//! of its configuration.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use dory_core::{
    Clock, Epoch, Interruption, InterruptionReason, NodeId, ProcessorId, SystemClock, Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::error::LocalError;
use crate::registry::{
    self, EXIT_FILE, ExitRecord, ExitStatus, InstanceRecord, create_private_dir_all,
};

/// The operator state of one virtual node (`nodes/<node>.json`); a node without a file is
/// schedulable, ready and uninterrupted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
    /// No new instances belong here (the planner moves instances away).
    pub cordoned: bool,
    /// A drain or a spot notice.
    pub interruption: Option<Interruption>,
    /// The node was killed: every instance on it is dead and nothing starts there until it is
    /// revived.
    pub killed: bool,
    /// The node is cut off from the network: its instances keep running (and are fenced by
    /// the store once their leases run out), but the node is not ready, so the orchestrator
    /// counts it lost after the grace period and nothing starts there until it is healed.
    pub partitioned: bool,
    /// Since when the node has had its current readiness (kill, cut, revival or heal time).
    pub ready_since: Timestamp,
}

impl NodeState {
    /// Whether the node is ready: neither killed nor cut off.
    pub fn is_ready(&self) -> bool {
        !self.killed && !self.partitioned
    }
}

/// The node operations, for any process that knows the state directory.
#[derive(Clone)]
pub struct LocalNodes {
    state_dir: PathBuf,
    clock: std::sync::Arc<dyn Clock>,
}

impl std::fmt::Debug for LocalNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNodes")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl LocalNodes {
    /// The nodes of the local placement whose state directory is `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        LocalNodes {
            state_dir: state_dir.into(),
            clock: std::sync::Arc::new(SystemClock),
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn nodes_dir(&self) -> PathBuf {
        self.state_dir.join("nodes")
    }

    fn node_file(&self, node: &NodeId) -> Result<PathBuf, LocalError> {
        let name = node.as_str();
        let ok = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(LocalError::BadNodeName {
                node: name.to_string(),
            });
        }
        Ok(self.nodes_dir().join(format!("{name}.json")))
    }

    /// The state of `node` (the default for a node never touched).
    pub fn state(&self, node: &NodeId) -> Result<NodeState, LocalError> {
        Ok(registry::read_json(&self.node_file(node)?)?.unwrap_or_default())
    }

    /// The state of every node that has a state file, by node.
    pub fn states(&self) -> Result<BTreeMap<NodeId, Result<NodeState, LocalError>>, LocalError> {
        let dir = self.nodes_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(LocalError::io("read", dir, e)),
        };
        let mut states = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| LocalError::io("read", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(node) = name.strip_suffix(".json") else {
                continue;
            };
            if node.starts_with('.') || name.contains(".tmp.") {
                continue;
            }
            let state = registry::read_json(&entry.path()).map(Option::unwrap_or_default);
            states.insert(NodeId::new(node), state);
        }
        Ok(states)
    }

    /// Changes the state of `node` under the nodes' lock (operators and the placement may
    /// write at the same time); returns the new state.
    fn update(
        &self,
        node: &NodeId,
        change: impl FnOnce(&mut NodeState, Timestamp),
    ) -> Result<NodeState, LocalError> {
        let path = self.node_file(node)?;
        let dir = self.nodes_dir();
        create_private_dir_all(&dir)?;
        let lock_path = dir.join(".lock");
        let lock: File = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LocalError::io("open", &lock_path, e))?;
        lock.lock()
            .map_err(|e| LocalError::io("lock", &lock_path, e))?;
        let mut state: NodeState = registry::read_json(&path)?.unwrap_or_default();
        change(&mut state, self.clock.now());
        registry::write_json(&path, &state)?;
        // The lock is released when `lock` is dropped (closed).
        Ok(state)
    }

    /// Cordons `node`: no new instances there; the planner moves its instances away.
    pub fn cordon(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, _| s.cordoned = true)?;
        tracing::info!(target: "dory::local", %node, "node cordoned");
        Ok(())
    }

    /// Drains `node`: cordoned, with a drain interruption (no deadline), as `kubectl drain`.
    pub fn drain(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, _| {
            s.cordoned = true;
            s.interruption = Some(Interruption {
                reason: InterruptionReason::Drain,
                deadline: None,
            });
        })?;
        tracing::info!(target: "dory::local", %node, "node draining");
        Ok(())
    }

    /// Uncordons `node` and withdraws its drain or spot notice.
    pub fn uncordon(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, _| {
            s.cordoned = false;
            s.interruption = None;
        })?;
        tracing::info!(target: "dory::local", %node, "node uncordoned");
        Ok(())
    }

    /// Announces that `node` is reclaimed at `deadline` (a spot notice): cordoned, with a
    /// spot interruption carrying the deadline. At the deadline a running placement kills the
    /// node ([`LocalNodes::kill_node`]).
    pub fn spot_notice(&self, node: &NodeId, deadline: Timestamp) -> Result<(), LocalError> {
        self.update(node, |s, _| {
            s.cordoned = true;
            s.interruption = Some(Interruption {
                reason: InterruptionReason::SpotReclaim,
                deadline: Some(deadline),
            });
        })?;
        tracing::info!(target: "dory::local", %node, deadline = deadline.0, "spot notice");
        Ok(())
    }

    /// Kills `node`: marks it down, then SIGKILLs every instance process group on it and
    /// records each instance's fate (`Failed`, "node … was killed") in its `exit` file, since
    /// its supervisor dies too. Returns the instances killed.
    pub fn kill_node(&self, node: &NodeId) -> Result<Vec<(ProcessorId, Epoch)>, LocalError> {
        self.update(node, |s, now| {
            if !s.killed {
                s.killed = true;
                s.ready_since = now;
            }
        })?;
        let mut killed = Vec::new();
        for dir in instance_dirs(&self.state_dir)? {
            let record = match InstanceRecord::load(&dir) {
                Ok(record) => record,
                // Not this function's to judge: the placement reports unreadable records.
                Err(_) => continue,
            };
            if &record.node != node {
                continue;
            }
            if kill_instance(&dir, &record, &node_killed_reason(node), self.clock.now())? {
                killed.push((record.processor, record.epoch));
            }
        }
        tracing::warn!(target: "dory::local", %node, instances = killed.len(), "node killed");
        Ok(killed)
    }

    /// Brings a killed node back, empty, ready and schedulable, with no interruption (and
    /// no longer cut off).
    pub fn revive_node(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, now| {
            if !s.is_ready() {
                s.ready_since = now;
            }
            *s = NodeState {
                ready_since: s.ready_since,
                ..NodeState::default()
            };
        })?;
        tracing::info!(target: "dory::local", %node, "node revived");
        Ok(())
    }
}

impl LocalNodes {
    /// Marks `node` cut off from the network (the operator's or a test's word for it: this
    /// does not touch the network): not ready from now on, its instances left running. The
    /// orchestrator fails their processors over once the node has been lost for the grace
    /// period and their leases have run out.
    pub fn partition(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, now| {
            if s.is_ready() {
                s.ready_since = now;
            }
            s.partitioned = true;
        })?;
        tracing::warn!(target: "dory::local", %node, "node cut off");
        Ok(())
    }

    /// Marks `node` reachable again: ready from now on unless it is killed. Its instances
    /// that lost their processors are terminated by the orchestrator (the store has fenced
    /// them already).
    pub fn heal(&self, node: &NodeId) -> Result<(), LocalError> {
        self.update(node, |s, now| {
            s.partitioned = false;
            if s.is_ready() {
                s.ready_since = now;
            }
        })?;
        tracing::info!(target: "dory::local", %node, "node reachable again");
        Ok(())
    }
}

/// The reason an instance on a killed node is reported failed with.
pub(crate) fn node_killed_reason(node: &NodeId) -> String {
    format!("node {node} was killed")
}

/// The instance directories under `<state_dir>/instances`, sorted.
pub(crate) fn instance_dirs(state_dir: &Path) -> Result<Vec<PathBuf>, LocalError> {
    let dir = state_dir.join("instances");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LocalError::io("read", dir, e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LocalError::io("read", &dir, e))?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !entry.file_name().to_string_lossy().starts_with('.') {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// SIGKILLs an instance's process group and records `reason` as its fate, unless it had
/// already ended (its `exit` file exists). Returns whether it had not ended when looked at.
pub(crate) fn kill_instance(
    dir: &Path,
    record: &InstanceRecord,
    reason: &str,
    now: Timestamp,
) -> Result<bool, LocalError> {
    let exit = dir.join(EXIT_FILE);
    if exit.exists() {
        return Ok(false);
    }
    // A launch cut short before it recorded its supervisor may still have started one.
    let supervisor = record
        .supervisor
        .or_else(|| crate::process::find_supervisor(&record.token));
    if let Some(supervisor) = &supervisor {
        crate::process::kill_all(supervisor, &record.token).map_err(|source| {
            LocalError::Signal {
                processor: record.processor.clone(),
                epoch: record.epoch,
                signal: "SIGKILL",
                target: format!("process group {}", supervisor.pid),
                source,
            }
        })?;
    }
    // After kill(2) returns, no process of the group runs another instruction, so the
    // supervisor cannot race this write; one that recorded an exit just before keeps it.
    let fate = ExitRecord {
        status: ExitStatus::Failed {
            reason: reason.to_string(),
        },
        at: now,
    };
    let bytes = serde_json::to_vec(&fate).map_err(|e| LocalError::Corrupt {
        path: exit.clone(),
        reason: e.to_string(),
    })?;
    // Whoever records first (this call, the placement's poll, another operator command) wins;
    // the instance was alive when this call looked, so it counts as killed here.
    registry::write_if_absent(&exit, &bytes)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_node_is_not_ready_until_healed_and_keeps_its_instances() {
        let dir = std::env::temp_dir().join(format!(
            "dory-local-nodes-{}-{}",
            std::process::id(),
            SystemClock.now().0
        ));
        let nodes = LocalNodes::new(&dir);
        let node = NodeId::new("edge-1");
        assert!(nodes.state(&node).unwrap().is_ready());
        nodes.partition(&node).unwrap();
        let cut = nodes.state(&node).unwrap();
        assert!(!cut.is_ready() && !cut.killed && !cut.cordoned, "{cut:?}");
        // A second cut does not move the time the node stopped being ready.
        nodes.partition(&node).unwrap();
        assert_eq!(nodes.state(&node).unwrap().ready_since, cut.ready_since);
        nodes.heal(&node).unwrap();
        let healed = nodes.state(&node).unwrap();
        assert!(healed.is_ready(), "{healed:?}");
        assert!(healed.ready_since >= cut.ready_since);
        // Healing a killed node does not make it ready: only a revival does.
        nodes.partition(&node).unwrap();
        nodes.kill_node(&node).unwrap();
        nodes.heal(&node).unwrap();
        assert!(!nodes.state(&node).unwrap().is_ready());
        nodes.revive_node(&node).unwrap();
        assert!(nodes.state(&node).unwrap().is_ready());
        let _ = fs::remove_dir_all(&dir);
    }
}
