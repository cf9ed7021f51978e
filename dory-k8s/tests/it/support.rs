//! What the placement tests share: a fake API server with Dory's namespace and its scheduler,
//! fast settings, and stand-in instances that answer the SDK's endpoints on their own
//! loopback address, as pods answer on their own IPs.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dory_control::{InstanceEndpoint, ServerSettings, router};
use dory_core::{
    Epoch, Health, LaunchMode, LaunchRequest, NodeId, Phase, ProcessorId, ProcessorSpec, Result,
    Sequence, SnapshotMeta, Timestamp,
};
use dory_k8s::{KubeConfig, KubePlacement};
use dory_k8s_fake::{FakeApiServer, PodReport};
use tokio::task::JoinHandle;

pub(crate) const NS: &str = "dory";

/// A fake API server with the `dory` namespace and the scheduler binding pinned pods.
pub(crate) async fn server() -> FakeApiServer {
    FakeApiServer::builder()
        .namespace(NS)
        .scheduler(true)
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .expect("fake API server")
}

/// A port of its own for this test process's stand-in instances (every stand-in binds it on
/// its own 127.x address).
pub(crate) fn sdk_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().unwrap().port()
    })
}

/// A distinct loopback address per stand-in (all of 127/8 is loopback on Linux), spread by
/// process id so tests running in parallel processes do not meet.
pub(crate) fn next_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        (pid % 200) as u8 + 20,
        (n / 250) as u8,
        (n % 250) as u8 + 2,
    )
}

/// Fast settings for tests.
pub(crate) fn config() -> KubeConfig {
    let mut c = KubeConfig {
        namespace: NS.into(),
        default_image: Some("dory/test:1".into()),
        sdk_port: sdk_port(),
        ..KubeConfig::default()
    };
    c.instance.store_url = "sqlite:///nowhere/dory.db".into();
    c.health.interval = Duration::from_millis(50);
    c.writes.backoff_initial = Duration::from_millis(10);
    c.writes.backoff_max = Duration::from_millis(50);
    c
}

pub(crate) async fn placement(server: &FakeApiServer) -> KubePlacement {
    placement_with(server, config()).await
}

pub(crate) async fn placement_with(server: &FakeApiServer, config: KubeConfig) -> KubePlacement {
    // kube's own retries off: the placement's retries are what is tested.
    let client = server.client_without_retries().expect("client");
    KubePlacement::start(client, config)
        .await
        .expect("placement")
}

pub(crate) fn pid(id: &str) -> ProcessorId {
    ProcessorId::new(id).unwrap()
}

pub(crate) fn request(processor: &str, epoch: u64, node: &str, mode: LaunchMode) -> LaunchRequest {
    LaunchRequest {
        spec: ProcessorSpec::new(pid(processor)),
        epoch: Epoch(epoch),
        node: NodeId::new(node),
        mode,
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `secs` seconds.
pub(crate) async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stand-in for an instance's endpoint server: answers `/healthz` with a phase the test
/// sets, and the state routes by moving between phases.
pub(crate) struct StandIn {
    pub(crate) ip: Ipv4Addr,
    pub(crate) health_calls: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Endpoint {
    epoch: Epoch,
    processor: ProcessorId,
    phase: Arc<Mutex<Phase>>,
    health_calls: Arc<AtomicU32>,
}

#[async_trait]
impl InstanceEndpoint for Endpoint {
    fn health(&self) -> Health {
        self.health_calls.fetch_add(1, Ordering::SeqCst);
        Health {
            phase: self.phase.lock().unwrap().clone(),
            epoch: self.epoch,
            sequence: Sequence(0),
            protocol: dory_core::CONTROL_PROTOCOL,
        }
    }
    fn ready(&self) -> Result<()> {
        Ok(())
    }
    fn metrics(&self) -> String {
        String::new()
    }
    async fn freeze(&self, _timeout: Duration) -> Result<SnapshotMeta> {
        *self.phase.lock().unwrap() = Phase::Frozen;
        Ok(SnapshotMeta {
            processor: self.processor.clone(),
            epoch: self.epoch,
            sequence: Sequence(0),
            size: 0,
            created_at: Timestamp(0),
        })
    }
    async fn snapshot(&self) -> Result<Bytes> {
        Ok(Bytes::new())
    }
    async fn load(&self, _snapshot: Bytes) -> Result<()> {
        Ok(())
    }
    async fn resume(&self, _committed: Option<dory_core::Sequence>) -> Result<()> {
        *self.phase.lock().unwrap() = Phase::Running;
        Ok(())
    }
}

impl StandIn {
    /// Serves on a fresh loopback address and the tests' SDK port, with `token`.
    pub(crate) async fn start(processor: &str, epoch: u64, phase: Phase, token: &str) -> StandIn {
        let ip = next_ip();
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(ip), sdk_port()))
            .await
            .expect("bind a stand-in instance");
        let phase = Arc::new(Mutex::new(phase));
        let health_calls = Arc::new(AtomicU32::new(0));
        let endpoint = Arc::new(Endpoint {
            epoch: Epoch(epoch),
            processor: pid(processor),
            phase: Arc::clone(&phase),
            health_calls: Arc::clone(&health_calls),
        });
        let app = router(endpoint, ServerSettings::new(token));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StandIn {
            ip,
            health_calls,
            task,
        }
    }
}

/// Plays the kubelet for one pod: reads its token from its Secret, starts a stand-in in
/// `phase` and reports the pod running and ready at the stand-in's address.
pub(crate) async fn run_pod(
    server: &FakeApiServer,
    processor: &str,
    epoch: u64,
    phase: Phase,
) -> StandIn {
    let name = format!("{processor}-{epoch}");
    let token = eventually(5, "the pod's Secret exists", || async {
        server
            .get::<k8s_openapi::api::core::v1::Secret>(Some(NS), &name)
            .unwrap()
            .and_then(|s| s.data)
            .and_then(|d| d.get("token").cloned())
            .map(|t| String::from_utf8(t.0).unwrap())
    })
    .await;
    let standin = StandIn::start(processor, epoch, phase, &token).await;
    server
        .report_pod(NS, &name, &PodReport::running(&standin.ip.to_string()))
        .expect("report the pod running");
    standin
}

/// The instance of `(processor, epoch)` as the placement lists it.
pub(crate) async fn instance(
    placement: &KubePlacement,
    processor: &str,
    epoch: u64,
) -> Option<dory_core::Instance> {
    use dory_core::Placement;
    placement
        .instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.processor.as_str() == processor && i.epoch == Epoch(epoch))
}

/// Waits until the instance is listed in `phase`.
pub(crate) async fn wait_phase(
    placement: &KubePlacement,
    processor: &str,
    epoch: u64,
    phase: Phase,
) -> dory_core::Instance {
    eventually(10, &format!("{processor}-{epoch} is {phase}"), || async {
        instance(placement, processor, epoch)
            .await
            .filter(|i| i.phase == phase)
    })
    .await
}

pub(crate) fn mode_restore() -> LaunchMode {
    LaunchMode::Restore
}
