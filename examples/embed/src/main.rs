//! A custom control plane that embeds the Dory orchestrator.
//!
//! The control plane owns its notion of what should run (here: one processor per tenant,
//! computed in-process) and supplies it through its own [`ConfigSource`]. The orchestrator
//! runs inside the caller's tokio runtime beside the caller's own tasks, against the in-memory
//! backends of `dory-mock` (a real deployment passes Postgres, Kubernetes, ... instead). The
//! example adds a tenant, drains the node one processor runs on, watches the move through the
//! orchestrator's events, checks the output continued without a gap, and shuts down cleanly.
//!
//! Run it with `cargo run -p dory-example-embed`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::orchestrator::{EventKind, Orchestrator, Settings};
use dory_core::planner::PlannerConfig;
use dory_core::{
    ChangeNotifier, Changes, Clock, ConfigSource, DesiredState, Error, Intent, Node, Phase,
    ProcessorId, ProcessorSpec, Resources, Result, Site, SitePreference, SystemClock,
};
use dory_mock::sim::{InstanceTiming, SimCluster};
use dory_mock::{MemoryLeadership, MemoryPublisher, MemoryStatus, MemoryStore};

/// The control plane's own source of desired processors: one per tenant.
struct TenantConfig {
    tenants: Mutex<Vec<(String, SitePreference)>>,
    changes: ChangeNotifier,
}

impl TenantConfig {
    fn add_tenant(&self, name: &str, site: SitePreference) {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), site));
        self.changes.notify();
    }
}

#[async_trait]
impl ConfigSource for TenantConfig {
    async fn desired(&self) -> Result<DesiredState> {
        let tenants = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut desired = DesiredState::default();
        for (name, site) in tenants {
            let mut spec = ProcessorSpec::new(ProcessorId::new(format!("tenant-{name}"))?);
            spec.site = site;
            spec.resources = Resources::new(250, 128);
            spec.checkpoint_interval = Duration::from_millis(500);
            desired.processors.push(spec);
        }
        Ok(desired)
    }

    fn changes(&self) -> Changes {
        self.changes.subscribe()
    }

    async fn record_intent(&self, intent: &Intent) -> Result<()> {
        Err(Error::invalid(format!(
            "this control plane takes no operator intents ({intent:?})"
        )))
    }
}

fn settings() -> Settings {
    let lease = Duration::from_secs(2);
    Settings {
        planner: PlannerConfig {
            lease,
            lease_margin: Duration::from_millis(500),
            node_lost_grace: Duration::from_secs(5),
            stabilisation: Duration::from_secs(5),
            max_concurrent_moves: 4,
            min_move_time: Duration::from_secs(1),
        },
        resync_interval: Duration::from_millis(500),
        freeze_timeout: Duration::from_secs(1),
        call_timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(5),
        stop_grace: Duration::from_secs(1),
        poll_interval: Duration::from_millis(20),
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(2),
        ..Settings::default()
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = MemoryStore::new(clock.clone());
    let capacity = Resources::new(4000, 4096);
    let mut nodes = vec![
        Node::new("cloud-a", Site::Cloud, capacity),
        Node::new("cloud-b", Site::Cloud, capacity),
        Node::new("edge-a", Site::Edge, capacity),
    ];
    for node in &mut nodes {
        node.ready_since = clock.now();
    }
    let cluster = Arc::new(SimCluster::standalone(
        nodes,
        clock.clone(),
        store.clone(),
        Arc::new(MemoryPublisher::new()),
        InstanceTiming {
            start_delay: Duration::from_millis(100),
            stop_delay: Duration::from_millis(50),
            control_latency: Duration::from_millis(1),
            lease: settings().planner.lease,
        },
    ));
    let tenants = Arc::new(TenantConfig {
        tenants: Mutex::new(vec![
            ("acme".into(), SitePreference::Cloud),
            ("globex".into(), SitePreference::Any),
            ("initech".into(), SitePreference::Edge),
        ]),
        changes: ChangeNotifier::new(),
    });

    let orchestrator = Orchestrator::builder(
        tenants.clone(),
        cluster.clone(),
        cluster.clone(),
        Arc::new(store.clone()),
        Arc::new(MemoryLeadership::new(&store)),
    )
    .status_sink(Arc::new(MemoryStatus::new()))
    .clock(clock.clone())
    .settings(settings())
    .build();
    let handle = orchestrator.handle();

    // The caller's own tasks run beside the orchestrator: one drives the simulated
    // instances, one prints what the orchestrator does.
    let ticker = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            loop {
                cluster.tick().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut events = handle.events();
    let moved = Arc::new(Mutex::new(Vec::new()));
    let printer = {
        let moved = moved.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if !matches!(event.kind, EventKind::Began { .. }) {
                    println!("event: {event}");
                }
                if let EventKind::Moved { pause_ms, .. } = event.kind {
                    moved
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(pause_ms);
                }
            }
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        orchestrator
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });

    let running_count = || {
        cluster
            .instance_records()
            .iter()
            .filter(|i| i.phase == Phase::Running)
            .count()
    };
    wait_until("three tenants run", || running_count() == 3).await?;
    println!("control plane: three tenants running");

    tenants.add_tenant("umbrella", SitePreference::Cloud);
    wait_until("the new tenant runs", || running_count() == 4).await?;
    println!("control plane: tenant umbrella added and running");

    let acme = ProcessorId::new("tenant-acme")?;
    let node = cluster
        .instance_records()
        .into_iter()
        .find(|i| i.processor == acme && i.phase == Phase::Running)
        .map(|i| i.node)
        .ok_or_else(|| anyhow::anyhow!("tenant-acme is not running"))?;
    println!("control plane: draining {node}");
    cluster.drain(&node);
    wait_until("tenant-acme has moved off the drained node", || {
        cluster
            .instance_records()
            .iter()
            .any(|i| i.processor == acme && i.phase == Phase::Running && i.node != node)
            && !moved.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    })
    .await?;
    wait_until("every tenant runs again", || running_count() == 4).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let view = handle.view();
    println!("control plane: status after the drain:");
    for status in view.status.values() {
        println!(
            "  {:<16} {:<8} node={:<8} epoch={:<4} last move pause={} ms",
            status.processor,
            status.phase,
            status.node.as_ref().map_or("-", |n| n.as_str()),
            status.epoch.map_or("-".into(), |e| e.to_string()),
            status
                .last_move_pause_ms
                .map_or("-".into(), |p| p.to_string()),
        );
    }
    let violations = cluster.violations();
    if !violations.is_empty() {
        anyhow::bail!("output continuity violated: {violations:#?}");
    }
    println!(
        "control plane: output checked: no step lost or repeated across the move ({} publishes)",
        cluster.publishes()
    );

    let _ = stop.send(());
    running.await??;
    ticker.abort();
    printer.abort();
    println!("control plane: orchestrator stopped cleanly");
    Ok(())
}
