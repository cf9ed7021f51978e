//! A scratch state directory with a placement over it, instance specs made of `sh` scripts,
//! and a health responder that plays an instance's `GET /healthz`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dory_core::{
    Epoch, Health, Instance, LaunchMode, LaunchRequest, NodeId, Phase, Placement, ProcessorId,
    ProcessorSpec, Resources, Sequence, Site,
};
use dory_local::{InstanceSettings, LocalConfig, LocalNode, LocalNodes, LocalPlacement};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A state directory for one test; on drop every instance left on its nodes is killed and
/// the directory removed.
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
    nodes: Vec<NodeId>,
}

impl Scratch {
    pub(crate) fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dory-local-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch {
            dir,
            nodes: vec![NodeId::new("edge-1"), NodeId::new("cloud-1")],
        }
    }

    pub(crate) fn config(&self) -> LocalConfig {
        LocalConfig {
            state_dir: self.dir.join("state"),
            nodes: vec![
                LocalNode {
                    id: NodeId::new("edge-1"),
                    site: Site::Edge,
                    capacity: Resources::new(2000, 1024),
                    exec_prefix: vec![],
                    store_url: None,
                    publisher_url: None,
                    reach_host: None,
                },
                LocalNode {
                    id: NodeId::new("cloud-1"),
                    site: Site::Cloud,
                    capacity: Resources::new(8000, 8192),
                    // A harmless prefix, to show that it is put in front of the command.
                    exec_prefix: vec!["env".into(), "DORY_TEST_PREFIX=cloud".into()],
                    store_url: None,
                    publisher_url: None,
                    reach_host: None,
                },
            ],
            supervisor: vec![env!("CARGO_BIN_EXE_dory-supervise").into()],
            instance: InstanceSettings {
                store_url: "sqlite:///nowhere.db".into(),
                publisher_url: Some("file:///nowhere".into()),
                input_url: None,
                lease: Duration::from_millis(1500),
            },
        }
    }

    pub(crate) fn open(&self) -> LocalPlacement {
        LocalPlacement::open(self.config()).unwrap()
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let nodes = LocalNodes::new(self.state_dir());
        for node in &self.nodes {
            let _ = nodes.kill_node(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn pid(name: &str) -> ProcessorId {
    ProcessorId::new(name).unwrap()
}

pub(crate) fn edge() -> NodeId {
    NodeId::new("edge-1")
}

pub(crate) fn cloud() -> NodeId {
    NodeId::new("cloud-1")
}

/// A spec that runs `script` with `sh -c`, with extra environment `env`.
pub(crate) fn spec(name: &str, script: &str, env: &[(&str, &str)]) -> ProcessorSpec {
    let mut spec = ProcessorSpec::new(pid(name));
    spec.workload.command = vec!["sh".into(), "-c".into(), script.into()];
    spec.workload.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spec
}

pub(crate) fn request(spec: &ProcessorSpec, epoch: u64, node: &NodeId) -> LaunchRequest {
    LaunchRequest {
        spec: spec.clone(),
        epoch: Epoch(epoch),
        node: node.clone(),
        mode: LaunchMode::Standby,
    }
}

/// Writes `$ADDR` to the address file the way the runtime does (temporary file, rename).
pub(crate) const REPORT_ADDRESS: &str = r#"printf %s "$ADDR" > "$DORY_ADDRESS_FILE.tmp" && mv "$DORY_ADDRESS_FILE.tmp" "$DORY_ADDRESS_FILE""#;

/// The instance as the placement reports it now.
pub(crate) async fn instance(
    placement: &LocalPlacement,
    processor: &str,
    epoch: u64,
) -> Option<Instance> {
    placement
        .instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.processor.as_str() == processor && i.epoch == Epoch(epoch))
}

/// Waits (bounded) until the instance satisfies `check`; returns it.
pub(crate) async fn until(
    placement: &LocalPlacement,
    processor: &str,
    epoch: u64,
    what: &str,
    check: impl Fn(&Instance) -> bool,
) -> Instance {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let current = instance(placement, processor, epoch).await;
        if let Some(i) = &current
            && check(i)
        {
            return i.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {processor} {epoch} {what}; last seen: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the instance has ended; returns its phase.
pub(crate) async fn ended(placement: &LocalPlacement, processor: &str, epoch: u64) -> Phase {
    until(placement, processor, epoch, "it has ended", |i| {
        i.phase.is_gone()
    })
    .await
    .phase
}

/// Waits (bounded) until `path` exists; returns its content.
pub(crate) async fn file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The supervisor pid of an instance, from its registry record.
pub(crate) fn supervisor_pid(placement: &LocalPlacement, processor: &str, epoch: u64) -> u32 {
    let dir = placement.instance_dir(&pid(processor), Epoch(epoch));
    dory_local::InstanceRecord::load(&dir)
        .unwrap()
        .supervisor
        .expect("the supervisor is recorded")
        .pid
}

/// Whether a process runs (exists and is not a zombie).
pub(crate) fn running(pid: u32) -> bool {
    dory_local::ProcStat::read(pid)
        .unwrap()
        .is_some_and(|s| s.state != 'Z')
}

/// Whether `pid` is gone within 5 s: a SIGKILL takes effect when the process next runs, which
/// on a loaded machine may be a little after the kill returned.
pub(crate) async fn gone(pid: u32) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while running(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

/// Plays an instance's `GET /healthz` on a loopback port: it answers every request with the
/// phase set here and `epoch`.
pub(crate) struct Responder {
    pub(crate) address: String,
    phase: Arc<Mutex<Phase>>,
}

impl Responder {
    pub(crate) async fn start(epoch: u64, phase: Phase) -> Responder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let phase = Arc::new(Mutex::new(phase));
        let shared = phase.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let health = Health {
                    phase: shared.lock().unwrap().clone(),
                    epoch: Epoch(epoch),
                    sequence: Sequence(0),
                    protocol: dory_core::CONTROL_PROTOCOL,
                };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = serde_json::to_string(&health).unwrap();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Responder { address, phase }
    }

    pub(crate) fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap() = phase;
    }
}
