//! The operator commands. They work directly against the backends `dory.toml` names, so they
//! answer whether or not an orchestrator is running; what needs the orchestrator to act
//! (drain, move) is recorded as an intent in the desired state, and the command follows the
//! orchestrator's progress through the placement and the status it writes.
//!
//! On Kubernetes the nodes are the cluster's: a drain cordons the node itself (as
//! `kubectl cordon`, the signal the orchestrator acts on), an uncordon lifts it, and progress
//! is followed through the nodes and Dory's pods, read only ([`crate::cluster`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use dory_core::{
    Epoch, Instance, Intent, Node, NodeId, Placement as _, ProcessorId, ProcessorStatus, Sequence,
    Timestamp,
};

use crate::backends;
use crate::cluster::ClusterView;
use crate::config::{ConfigError, ConfigKind, Loaded};
use crate::duration::format_duration;
use crate::table;

/// How a listing is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// A failed operation (exit code 1), as opposed to a usage error or an unreachable backend.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct OperationFailed(pub(crate) String);

fn now() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// How long ago, to the unit that matters: `42s`, `17m`, `5h`, `3d`.
fn age(at: Option<Timestamp>) -> String {
    at.map_or_else(
        || "-".into(),
        |t| {
            let s = now().since(t).as_secs();
            match s {
                0..60 => format!("{s}s"),
                60..3600 => format!("{}m", s / 60),
                3600..86_400 => format!("{}h", s / 3600),
                _ => format!("{}d", s / 86_400),
            }
        },
    )
}

fn dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `dory status`.
pub(crate) async fn status(loaded: &Loaded, output: Output) -> Result<()> {
    let store = backends::store(loaded).await?;
    let statuses = store.status.read().await.context("read status")?;
    if output == Output::Json {
        return json(&statuses);
    }
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.processor.clone(),
                s.phase.clone(),
                dash(s.node.as_ref()),
                dash(s.site),
                dash(s.epoch),
                dash(s.last_checkpoint),
                age(s.last_checkpoint_at),
                s.last_move_pause_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                s.last_failover
                    .as_ref()
                    .map_or_else(|| "-".into(), failover_cell),
                s.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "PROCESSOR",
                "PHASE",
                "NODE",
                "SITE",
                "EPOCH",
                "CHECKPOINT",
                "CHECKPOINT AGE",
                "LAST MOVE PAUSE",
                "LAST FAILOVER",
                "LAST ERROR",
            ],
            &rows
        )
    );
    if statuses.is_empty() {
        println!("(no status yet: is an orchestrator running with this config?)");
    }
    Ok(())
}

/// The last failover in `dory status`: when, the checkpoint restored and how old it was when
/// the node was lost (what the failover lost).
fn failover_cell(report: &dory_core::FailoverReport) -> String {
    let when = format!("{} ago", age(Some(report.at)));
    match (report.restored_sequence, report.checkpoint_age_ms) {
        (Some(seq), Some(ms)) => format!("{when}: restored {seq}, checkpoint {ms} ms old"),
        (Some(seq), None) => format!("{when}: restored {seq}"),
        (None, _) => format!("{when}: no checkpoint"),
    }
}

/// Where the commands see nodes and instances: the local placement's registry, or the
/// cluster's nodes and Dory's pods.
enum View {
    Local(dory_local::LocalPlacement),
    /// Boxed: it carries the placement's whole configuration.
    Cluster(Box<ClusterView>),
}

impl View {
    async fn open(loaded: &Loaded, supervisor: Vec<String>) -> Result<View> {
        Ok(match loaded.kube() {
            None => View::Local(backends::placement(loaded, supervisor)?),
            Some(k) => View::Cluster(Box::new(ClusterView::new(
                backends::kube_client().await?,
                &k.kube,
            ))),
        })
    }

    async fn nodes(&self) -> Result<Vec<Node>> {
        match self {
            View::Local(p) => Ok(p.nodes().await?),
            View::Cluster(c) => c.nodes().await,
        }
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        match self {
            View::Local(p) => Ok(p.instances().await?),
            View::Cluster(c) => c.instances().await,
        }
    }

    async fn has_node(&self, node: &NodeId) -> Result<()> {
        if self.nodes().await?.iter().any(|n| &n.id == node) {
            Ok(())
        } else {
            bail!(OperationFailed(format!(
                "there is no node {node} (see `dory nodes`)"
            )))
        }
    }
}

/// One node in `dory nodes`.
#[derive(serde::Serialize)]
struct NodeRow {
    node: dory_core::Node,
    cordoned: bool,
    instances: Vec<String>,
}

/// `dory nodes`.
pub(crate) async fn nodes(loaded: &Loaded, output: Output, supervisor: Vec<String>) -> Result<()> {
    let view = View::open(loaded, supervisor).await?;
    // A local cordon is an intent in the desired state; a Kubernetes one is the node's own
    // `spec.unschedulable`, in the node itself.
    let cordoned = match &view {
        View::Local(_) => {
            let store = backends::store(loaded).await?;
            let source = backends::config_source(loaded, &store).await?;
            source
                .desired()
                .await
                .map(|d| d.cordoned)
                .unwrap_or_default()
        }
        View::Cluster(_) => Default::default(),
    };
    let nodes = view.nodes().await?;
    let instances = view.instances().await?;
    let rows: Vec<NodeRow> = nodes
        .into_iter()
        .map(|node| NodeRow {
            cordoned: cordoned.contains(&node.id),
            instances: instances
                .iter()
                .filter(|i| i.node == node.id && i.phase.is_alive())
                .map(|i| format!("{}@{}", i.processor, i.epoch.0))
                .collect(),
            node,
        })
        .collect();
    if output == Output::Json {
        return json(&rows);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let n = &r.node;
            vec![
                n.id.to_string(),
                n.site.to_string(),
                if n.ready { "ready" } else { "not ready" }.into(),
                if r.cordoned || !n.schedulable {
                    "cordoned"
                } else {
                    "schedulable"
                }
                .into(),
                format!("{}m / {} MiB", n.capacity.cpu_millis, n.capacity.memory_mib),
                n.interruption.as_ref().map_or_else(
                    || "-".into(),
                    |i| match i.deadline {
                        Some(d) => format!(
                            "{:?} in {}",
                            i.reason,
                            format_duration(Duration::from_secs(d.since(now()).as_secs()))
                        ),
                        None => format!("{:?}", i.reason),
                    },
                ),
                if r.instances.is_empty() {
                    "-".into()
                } else {
                    r.instances.join(" ")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "NODE",
                "SITE",
                "READY",
                "SCHEDULING",
                "CAPACITY",
                "INTERRUPTION",
                "INSTANCES"
            ],
            &cells
        )
    );
    Ok(())
}

/// The owning (highest alive) instance of each processor on `node`.
fn on_node(instances: &[Instance], node: &NodeId) -> BTreeMap<ProcessorId, Epoch> {
    let mut out = BTreeMap::new();
    for i in instances {
        if &i.node == node && i.phase.is_alive() {
            out.insert(i.processor.clone(), i.epoch);
        }
    }
    out
}

/// `dory drain NODE`: cordons the node and follows each processor's move until the node is
/// empty or the deadline passes.
pub(crate) async fn drain(
    loaded: &Loaded,
    node: &NodeId,
    deadline: Duration,
    wait: bool,
    supervisor: Vec<String>,
) -> Result<()> {
    if let Some(k) = loaded.kube()
        && !k.kube.signals.cordon_is_drain
    {
        // The cordon would only keep new pods off the node: nothing would move.
        bail!(OperationFailed(format!(
            "{} sets `placement.signals.cordon_is_drain = false`: the orchestrator does not move processors off a cordoned node, so a drain would only wait; cordon with kubectl, or taint the node with one of `placement.signals.taints`",
            loaded.path.display()
        )));
    }
    let view = View::open(loaded, supervisor).await?;
    view.has_node(node).await?;
    let store = backends::store(loaded).await?;
    match &view {
        View::Local(_) => {
            let source = backends::config_source(loaded, &store).await?;
            source
                .record_intent(&Intent::Cordon { node: node.clone() })
                .await
                .context("record the cordon")?;
        }
        View::Cluster(cluster) => cluster.cordon(node, true).await?,
    }
    let start = on_node(&view.instances().await?, node);
    println!(
        "cordoned {node}; {} processor(s) to move: {}",
        start.len(),
        start
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut announced: BTreeSet<(ProcessorId, Epoch)> = BTreeSet::new();
    let mut done: BTreeSet<ProcessorId> = BTreeSet::new();
    loop {
        let instances = view.instances().await?;
        let left = on_node(&instances, node);
        let statuses: BTreeMap<String, ProcessorStatus> = store
            .status
            .read()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.processor.clone(), s))
            .collect();
        for processor in start.keys() {
            for i in instances
                .iter()
                .filter(|i| &i.processor == processor && &i.node != node && i.phase.is_alive())
            {
                if announced.insert((processor.clone(), i.epoch)) && !done.contains(processor) {
                    println!(
                        "  {processor}: replacement {} starting on {} ({})",
                        i.epoch, i.node, i.phase
                    );
                }
            }
            if !left.contains_key(processor) && done.insert(processor.clone()) {
                let s = statuses.get(processor.as_str());
                println!(
                    "  {processor}: moved to {} as {}, pause {} [{}/{} done]",
                    dash(s.and_then(|s| s.node.as_ref())),
                    dash(s.and_then(|s| s.epoch)),
                    s.and_then(|s| s.last_move_pause_ms)
                        .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
                    done.len(),
                    start.len()
                );
            }
        }
        if left.is_empty() {
            println!(
                "{node} is empty ({} moved in {:.1}s)",
                done.len(),
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() >= deadline {
            bail!(OperationFailed(format!(
                "the deadline ({}) passed with {} processor(s) still on {node}: {}",
                format_duration(deadline),
                left.len(),
                left.keys()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `dory uncordon NODE`.
pub(crate) async fn uncordon(loaded: &Loaded, node: &NodeId) -> Result<()> {
    if let Some(k) = loaded.kube() {
        ClusterView::new(backends::kube_client().await?, &k.kube)
            .cordon(node, false)
            .await?;
        println!("uncordoned {node}");
        return Ok(());
    }
    let store = backends::store(loaded).await?;
    let source = backends::config_source(loaded, &store).await?;
    source
        .record_intent(&Intent::Uncordon { node: node.clone() })
        .await
        .context("record the uncordon")?;
    println!("uncordoned {node}");
    Ok(())
}

/// `dory move PROCESSOR --to NODE`: pins the processor and follows the move.
pub(crate) async fn pin(
    loaded: &Loaded,
    processor: &ProcessorId,
    to: Option<&NodeId>,
    deadline: Duration,
    wait: bool,
    supervisor: Vec<String>,
) -> Result<()> {
    if loaded.kube().is_some() && loaded.config.config.source == ConfigKind::File {
        // The file source keeps intents in the embedded database beside the orchestrator:
        // in its pod, not on this machine.
        bail!(OperationFailed(
            "a pin is an intent in the desired state, which with `config.source = \"file\"` lives in each orchestrator pod's own embedded database, out of this command's reach: use `config.source = \"postgres\"` with the kubernetes placement"
                .into()
        ));
    }
    let view = View::open(loaded, supervisor).await?;
    if let Some(to) = to {
        view.has_node(to).await?;
    }
    let store = backends::store(loaded).await?;
    let source = backends::config_source(loaded, &store).await?;
    source
        .record_intent(&Intent::Pin {
            processor: processor.clone(),
            node: to.cloned(),
        })
        .await
        .context("record the pin")?;
    let Some(to) = to else {
        println!("unpinned {processor}");
        return Ok(());
    };
    println!("pinned {processor} to {to}");
    if !wait {
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let instances = view.instances().await?;
        let alive: Vec<&Instance> = instances
            .iter()
            .filter(|i| &i.processor == processor && i.phase.is_alive())
            .collect();
        if alive.len() == 1 && &alive[0].node == to {
            let status = store.status.read().await.unwrap_or_default();
            let pause = status
                .iter()
                .find(|s| s.processor == processor.as_str())
                .and_then(|s| s.last_move_pause_ms);
            println!(
                "{processor} runs on {to} as {} (last move pause {})",
                alive[0].epoch,
                pause.map_or_else(|| "-".into(), |ms| format!("{ms} ms"))
            );
            return Ok(());
        }
        if started.elapsed() >= deadline {
            bail!(OperationFailed(format!(
                "the deadline ({}) passed before {processor} ran on {to}; the pin stays and the orchestrator keeps trying",
                format_duration(deadline)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One row of `dory snapshots`.
#[derive(serde::Serialize)]
struct SnapshotRow {
    epoch: u64,
    sequence: u64,
    size: u64,
    created_at: u64,
    committed: bool,
}

/// `dory snapshots PROCESSOR list`.
pub(crate) async fn snapshots_list(
    loaded: &Loaded,
    processor: &ProcessorId,
    output: Output,
) -> Result<()> {
    let store = backends::store(loaded).await?;
    let history = store.store.history(processor).await?;
    let committed = store
        .store
        .ownership(processor)
        .await?
        .and_then(|o| o.committed);
    let rows: Vec<SnapshotRow> = history
        .iter()
        .map(|m| SnapshotRow {
            epoch: m.epoch.0,
            sequence: m.sequence.0,
            size: m.size,
            created_at: m.created_at.0,
            committed: committed == Some((m.epoch, m.sequence)),
        })
        .collect();
    if output == Output::Json {
        return json(&rows);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.epoch.to_string(),
                r.sequence.to_string(),
                r.size.to_string(),
                age(Some(Timestamp(r.created_at))),
                if r.committed { "latest" } else { "" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["EPOCH", "SEQUENCE", "BYTES", "AGE", ""], &cells)
    );
    Ok(())
}

async fn one_snapshot(
    store: &backends::Store,
    processor: &ProcessorId,
    at: Option<(Epoch, Sequence)>,
) -> Result<dory_core::StoredSnapshot> {
    let found = match at {
        Some((e, s)) => store.store.get(processor, e, s).await?,
        None => store.store.latest(processor).await?,
    };
    found.ok_or_else(|| {
        OperationFailed(match at {
            Some((e, s)) => format!("{processor} has no snapshot at {e}, sequence {s}"),
            None => format!("{processor} has no snapshot"),
        })
        .into()
    })
}

/// The stored base of a delta: filed under the epoch its header names (a checkpoint is filed
/// under the epoch that took it), else any stored snapshot at its sequence with its exact
/// checksum (a base that was itself committed by a move is filed under the new owner's epoch).
async fn delta_base_snapshot(
    store: &backends::Store,
    processor: &ProcessorId,
    base: &dory_core::snapshot::DeltaBase,
) -> Result<Option<dory_core::StoredSnapshot>> {
    let is_it = |s: &dory_core::StoredSnapshot| {
        dory_core::snapshot::verify(&s.bytes).is_ok_and(|h| h.checksum == base.checksum)
    };
    if let Some(s) = store
        .store
        .get(processor, base.epoch, base.sequence)
        .await?
        && is_it(&s)
    {
        return Ok(Some(s));
    }
    for meta in store.store.history(processor).await? {
        if meta.sequence == base.sequence
            && meta.epoch != base.epoch
            && let Some(s) = store
                .store
                .get(processor, meta.epoch, meta.sequence)
                .await?
            && is_it(&s)
        {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// `dory snapshots PROCESSOR inspect`: the header, and for a delta the base it applies to.
pub(crate) async fn snapshots_inspect(
    loaded: &Loaded,
    processor: &ProcessorId,
    at: Option<(Epoch, Sequence)>,
    output: Output,
) -> Result<()> {
    let store = backends::store(loaded).await?;
    let snapshot = one_snapshot(&store, processor, at).await?;
    let header = dory_core::snapshot::verify(&snapshot.bytes)?;
    let mut fields = serde_json::json!({
        "processor": header.processor.as_str(),
        "filed_under_epoch": snapshot.meta.epoch.0,
        "taken_by_epoch": header.epoch.0,
        "sequence": header.sequence.0,
        "format_version": header.format_version,
        "kind": format!("{:?}", header.kind),
        "codec": format!("{:?}", header.codec),
        "raw_bytes": header.raw_len,
        "compressed_bytes": header.compressed_len,
        "checksum": format!("{:016x}", header.checksum),
        "created_at_ms": snapshot.meta.created_at.0,
    });
    if let Some(base) = dory_core::snapshot::delta_base(&snapshot.bytes)? {
        let stored = delta_base_snapshot(&store, processor, &base)
            .await?
            .is_some();
        if let serde_json::Value::Object(map) = &mut fields {
            map.insert("base_epoch".into(), base.epoch.0.into());
            map.insert("base_sequence".into(), base.sequence.0.into());
            map.insert(
                "base_checksum".into(),
                format!("{:016x}", base.checksum).into(),
            );
            map.insert("base_stored".into(), stored.into());
        }
    }
    if output == Output::Json {
        return json(&fields);
    }
    if let serde_json::Value::Object(map) = fields {
        for (k, v) in map {
            println!(
                "{k:<18} {}",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            );
        }
    }
    Ok(())
}

/// `dory snapshots PROCESSOR export --to FILE`: always a full snapshot, so the file stands on
/// its own (a delta is put together with its stored base first).
pub(crate) async fn snapshots_export(
    loaded: &Loaded,
    processor: &ProcessorId,
    at: Option<(Epoch, Sequence)>,
    file: &Path,
) -> Result<()> {
    let store = backends::store(loaded).await?;
    let snapshot = one_snapshot(&store, processor, at).await?;
    let (epoch, sequence) = (snapshot.meta.epoch, snapshot.meta.sequence);
    let (bytes, resolved) = match dory_core::snapshot::delta_base(&snapshot.bytes)? {
        None => (snapshot.bytes, None),
        Some(base) => {
            let Some(stored) = delta_base_snapshot(&store, processor, &base).await? else {
                bail!(OperationFailed(format!(
                    "{processor} at {epoch}, sequence {sequence} is a delta whose base ({}, sequence {}) is not stored: it cannot be exported as a full snapshot",
                    base.epoch, base.sequence
                )));
            };
            let full = dory_core::snapshot::resolve_delta(
                snapshot.bytes,
                Some(&stored.bytes),
                &dory_core::snapshot::Limits::default(),
            )
            .with_context(|| {
                format!(
                    "put {processor}'s delta at {epoch}, sequence {sequence} together with its base ({}, sequence {})",
                    base.epoch, base.sequence
                )
            })?;
            (full, Some(base))
        }
    };
    dory_core::snapshot::verify(&bytes)?;
    std::fs::write(file, &bytes).with_context(|| format!("write {}", file.display()))?;
    let how = resolved.map_or_else(String::new, |b| {
        format!(
            ", a delta put together with its base ({}, sequence {})",
            b.epoch, b.sequence
        )
    });
    println!(
        "wrote {processor} at {epoch}, sequence {sequence} ({} bytes{how}) to {}",
        bytes.len(),
        file.display()
    );
    Ok(())
}

/// `dory validate CONFIG`: the file, then every processor in it.
pub(crate) async fn validate(path: &Path) -> Result<()> {
    let loaded = Loaded::read(path)?;
    let placement = match loaded.kube() {
        None => format!("{} node(s)", loaded.node_sections().len()),
        Some(k) => format!(
            "kubernetes placement in namespace {}, lease {}/{}",
            k.kube.namespace, k.lease.namespace, k.lease.name
        ),
    };
    if loaded.config.config.source == ConfigKind::Postgres {
        println!(
            "{}: {placement}, valid; processors come from the postgres config source (not checked here)",
            loaded.path.display()
        );
        return Ok(());
    }
    let processors = loaded.processors_file();
    let text = std::fs::read_to_string(&processors)
        .with_context(|| format!("read {}", processors.display()))?;
    let desired = dory_embedded::parse_processors(&processors, &text).map_err(|e| ConfigError {
        path: processors.clone(),
        message: e.to_string(),
    })?;
    println!(
        "{}: {placement}, {} processor(s) valid",
        loaded.path.display(),
        desired.processors.len()
    );
    for entry in &desired.invalid {
        println!("  invalid: {}", entry.error);
    }
    if desired.invalid.is_empty() {
        Ok(())
    } else {
        bail!(OperationFailed(format!(
            "{} invalid processor(s)",
            desired.invalid.len()
        )))
    }
}

/// `dory output PROCESSOR`: the file publisher's output, after the deduplication rule
/// (by sequence; the higher epoch wins), with gaps reported.
pub(crate) fn output(
    loaded: &Loaded,
    processor: &ProcessorId,
    check: bool,
    tail: usize,
    format: Output,
) -> Result<()> {
    let log = dory_embedded::read_output(&loaded.output_dir(), processor)
        .with_context(|| format!("read the output of {processor}"))?;
    let mut by_sequence: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    let mut copies = 0usize;
    for m in &log.messages {
        let payload = String::from_utf8_lossy(&m.payload).into_owned();
        match by_sequence.get(&m.sequence.0) {
            Some((epoch, _)) if *epoch >= m.epoch.0 => copies += 1,
            Some(_) => {
                copies += 1;
                by_sequence.insert(m.sequence.0, (m.epoch.0, payload));
            }
            None => {
                by_sequence.insert(m.sequence.0, (m.epoch.0, payload));
            }
        }
    }
    let skip = by_sequence.len().saturating_sub(tail);
    let first = by_sequence.keys().next().copied().unwrap_or(0);
    let last = by_sequence.keys().last().copied().unwrap_or(0);
    let gaps: Vec<u64> = if by_sequence.is_empty() {
        Vec::new()
    } else {
        (1..=last)
            .filter(|s| !by_sequence.contains_key(s))
            .collect()
    };
    if format == Output::Json {
        let messages: Vec<_> = by_sequence
            .iter()
            .skip(skip)
            .map(|(seq, (epoch, payload))| {
                serde_json::json!({"sequence": seq, "epoch": epoch, "payload": payload})
            })
            .collect();
        json(&serde_json::json!({
            "processor": processor.as_str(),
            "messages": messages,
            "count": by_sequence.len(),
            "copies_dropped": copies,
            "gaps": gaps,
            "damaged_lines": log.damaged.iter().map(|d| d.line).collect::<Vec<_>>(),
        }))?;
    }
    let table = format == Output::Table;
    for (seq, (epoch, payload)) in by_sequence.iter().skip(skip).filter(|_| table) {
        println!("{seq:>8}  epoch {epoch:<4} {payload}");
    }
    for damaged in log.damaged.iter().filter(|_| table) {
        println!(
            "  line {} skipped{}: {}",
            damaged.line,
            if damaged.torn {
                " (torn by a crash)"
            } else {
                ""
            },
            damaged.reason
        );
    }
    let epochs: BTreeSet<u64> = by_sequence.values().map(|(e, _)| *e).collect();
    if table {
        println!(
            "{processor}: {} message(s), sequences {first}..={last}, epochs {epochs:?}, {copies} copy(ies) dropped by the rule, {} gap(s)",
            by_sequence.len(),
            gaps.len()
        );
    }
    if check && !gaps.is_empty() {
        bail!(OperationFailed(format!(
            "{processor}: {} sequence(s) missing, first {}",
            gaps.len(),
            gaps[0]
        )));
    }
    Ok(())
}

/// `dory snapshots PROCESSOR import --from FILE`: makes a snapshot file (from `export`, maybe
/// of another processor or another installation) the processor's committed state, so its next
/// start restores it.
///
/// Offline by design: it takes the leadership term (so it fails at once while an orchestrator
/// leads, instead of racing it) and refuses while an instance holds the processor's lease. It
/// claims a new epoch, makes it the owner, stores the snapshot re-stamped for this processor
/// and that epoch (above the committed sequence), then releases ownership: every earlier
/// epoch stays fenced, and the next orchestrator starts the processor from the import.
pub(crate) async fn snapshots_import(
    loaded: &Loaded,
    processor: &ProcessorId,
    file: &Path,
) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    // A delta holds only what changed since its base, which lives in the store it came from.
    if let Ok(Some(base)) = dory_core::snapshot::delta_base(&bytes) {
        bail!(OperationFailed(format!(
            "{} is a delta snapshot (the changes since its base at {}, sequence {}), not a whole state: import a full snapshot (`dory snapshots PROCESSOR export` writes one, putting a delta together with its base)",
            file.display(),
            base.epoch,
            base.sequence
        )));
    }
    let limits = dory_core::snapshot::Limits::default();
    let (header, body) = dory_core::snapshot::decode_body(&bytes, &limits)
        .with_context(|| format!("{} is not a usable Dory snapshot", file.display()))?;
    let store = backends::store(loaded).await?;
    let term = match tokio::time::timeout(Duration::from_secs(3), store.leadership.acquire()).await
    {
        Ok(term) => term.context("take the leadership term")?,
        Err(_) => bail!(OperationFailed(
            "an orchestrator leads: stop it first (an import replaces a processor's state while nothing runs it)"
                .into()
        )),
    };
    let imported = import_under(&store, processor, term, &header, &body).await;
    if let Err(e) = store.leadership.resign(term).await {
        tracing::warn!(target: "dory::cli", "cannot give the leadership term back: {e}");
    }
    let (epoch, sequence) = imported?;
    println!(
        "imported {} ({} state bytes, {:?}, taken by {} of {} at sequence {}) as {processor} {epoch}, sequence {sequence}; its next start restores it",
        file.display(),
        header.raw_len,
        header.codec,
        header.epoch,
        header.processor,
        header.sequence,
    );
    Ok(())
}

async fn import_under(
    store: &backends::Store,
    processor: &ProcessorId,
    term: dory_core::Term,
    header: &dory_core::snapshot::SnapshotHeader,
    body: &[u8],
) -> Result<(Epoch, Sequence)> {
    let row = store.store.ownership(processor).await?;
    let owner = row.as_ref().and_then(|o| o.owner);
    if let (Some(owner), Some(expires)) = (owner, row.as_ref().and_then(|o| o.lease_expires))
        && expires > now()
    {
        bail!(OperationFailed(format!(
            "{processor} is owned by {owner}, whose lease runs for another {}: its instance is alive; stop it first (remove the processor from the config, or wait for the lease after its node is gone)",
            format_duration(expires.since(now()))
        )));
    }
    let committed = row.as_ref().and_then(|o| o.committed).map(|(_, s)| s);
    let sequence = match committed {
        Some(c) if c >= header.sequence => Sequence(c.0 + 1),
        _ => header.sequence,
    };
    let epoch = store.store.claim_epoch(processor, term).await?;
    // Ownership for the import's own write only; released right after.
    let lease = Duration::from_secs(10);
    store
        .store
        .assign_owner(processor, owner, epoch, lease, term)
        .await?;
    let encoded = dory_core::snapshot::Encoder::default().encode_body(
        processor,
        epoch,
        sequence,
        header.codec,
        body,
    )?;
    let snapshot = dory_core::StoredSnapshot::from_encoded(encoded, now())?;
    store.store.put_checkpoint(&snapshot, lease).await?;
    store.store.release(processor, epoch, term).await?;
    Ok((epoch, sequence))
}
