//! A counter processor and a harness that starts runtimes against a shared in-memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dory_control::HttpControl;
use dory_core::{
    ControlEndpoint, Epoch, Input, InstanceEnv, LaunchMode, Leadership, NodeId, Phase, ProcessorId,
    Publisher, Sequence, StateStore, SystemClock, Term, Timestamp,
};
use dory_core::{Instance, InstanceControl};
use dory_mock::{MemoryLeadership, MemoryPublisher, MemoryStore};
use dory_runtime::{Context, Exit, Processor, Runtime, Settings, StepError};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

pub(crate) const TOKEN: &str = "s3cret-token";
pub(crate) const LEASE: Duration = Duration::from_millis(600);
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// Publishes its count + 1, then counts it. `stuck` makes a step wait on `release`.
pub(crate) struct Counter {
    pub(crate) stuck: Arc<AtomicBool>,
    pub(crate) release: Arc<Notify>,
}

#[async_trait::async_trait]
impl Processor for Counter {
    type State = u64;

    async fn step(&mut self, count: &mut u64, ctx: &mut Context) -> Result<(), StepError> {
        if self.stuck.load(Ordering::SeqCst) {
            self.release.notified().await;
        }
        ctx.publish(None, (*count + 1).to_le_bytes().to_vec())
            .await?;
        *count += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(())
    }
}

pub(crate) struct World {
    pub(crate) processor: ProcessorId,
    pub(crate) store: MemoryStore,
    pub(crate) publisher: MemoryPublisher,
    pub(crate) term: Term,
    pub(crate) control: HttpControl,
    _leadership: MemoryLeadership,
}

pub(crate) struct Running {
    pub(crate) instance: Instance,
    pub(crate) stuck: Arc<AtomicBool>,
    pub(crate) release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Exit>,
}

impl Running {
    pub(crate) async fn shutdown(mut self) -> Exit {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the runtime exits within its grace period")
            .expect("the runtime task does not panic")
    }
}

impl World {
    pub(crate) async fn new(name: &str) -> World {
        let store = MemoryStore::new(Arc::new(SystemClock));
        let leadership = MemoryLeadership::new(&store);
        let term = leadership.acquire().await.unwrap();
        World {
            processor: ProcessorId::new(name).unwrap(),
            publisher: MemoryPublisher::new(),
            store,
            term,
            control: HttpControl::new(),
            _leadership: leadership,
        }
    }

    /// Claims the next epoch; `owner` also makes it the owner (a fresh start or failover).
    pub(crate) async fn claim(&self, owner: bool) -> Epoch {
        let epoch = self
            .store
            .claim_epoch(&self.processor, self.term)
            .await
            .unwrap();
        if owner {
            let current = self
                .store
                .ownership_now(&self.processor)
                .and_then(|o| o.owner);
            self.store
                .assign_owner(&self.processor, current, epoch, LEASE, self.term)
                .await
                .unwrap();
        }
        epoch
    }

    pub(crate) fn env(&self, epoch: Epoch, mode: LaunchMode) -> InstanceEnv {
        InstanceEnv {
            processor: self.processor.clone(),
            epoch,
            mode,
            token: TOKEN.into(),
            port: 0,
            store_url: "memory://".into(),
            publisher_url: None,
            input_url: None,
            lease: LEASE,
            checkpoint_interval: INTERVAL,
            config: serde_json::Value::Null,
            address_file: None,
        }
    }

    pub(crate) async fn start(&self, epoch: Epoch, mode: LaunchMode) -> Running {
        self.start_with(epoch, mode, Arc::new(self.store.clone()))
            .await
    }

    pub(crate) async fn start_with(
        &self,
        epoch: Epoch,
        mode: LaunchMode,
        store: Arc<dyn StateStore>,
    ) -> Running {
        let stuck = Arc::new(AtomicBool::new(false));
        let release = Arc::new(Notify::new());
        let counter = Counter {
            stuck: stuck.clone(),
            release: release.clone(),
        };
        let publisher: Arc<dyn Publisher> = Arc::new(self.publisher.clone());
        let settings = Settings::default()
            .with_bind_host("127.0.0.1")
            .with_grace(Duration::from_secs(5))
            .with_retry(Duration::from_millis(20));
        let runtime = Runtime::bind(
            self.env(epoch, mode),
            counter,
            store,
            publisher,
            None::<Arc<dyn Input>>,
            settings,
        )
        .await
        .unwrap();
        let address = runtime.local_addr().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run_until(async move {
            let _ = stopped.await;
        }));
        let task = tokio::spawn(async move { task.await.unwrap().unwrap() });
        Running {
            instance: instance_at(self, epoch, address),
            stuck,
            release,
            stop: Some(stop),
            task,
        }
    }

    /// The sequences published so far, in publish order.
    pub(crate) fn sequences(&self) -> Vec<u64> {
        self.publisher
            .messages_of(&self.processor)
            .iter()
            .map(|m| m.sequence.0)
            .collect()
    }

    /// Waits (bounded) until `check` holds.
    pub(crate) async fn until(&self, what: &str, mut check: impl FnMut(&World) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn phase(&self, running: &Running) -> Phase {
        self.control.health(&running.instance).await.unwrap().phase
    }

    pub(crate) fn committed(&self) -> Option<(Epoch, Sequence)> {
        self.store
            .ownership_now(&self.processor)
            .and_then(|o| o.committed)
    }
}

/// The instance record the orchestrator would hold for `epoch` of `world`'s processor at
/// `address`.
pub(crate) fn instance_at(world: &World, epoch: Epoch, address: String) -> Instance {
    Instance {
        processor: world.processor.clone(),
        epoch,
        node: NodeId::new("n1"),
        phase: Phase::Starting,
        revision: 0,
        started_at: Timestamp(0),
        endpoint: Some(ControlEndpoint {
            address,
            token: TOKEN.into(),
        }),
    }
}

/// Asserts the published output is 1, 2, 3, ... with every payload its own sequence: no gap,
/// no duplicate.
pub(crate) fn assert_contiguous(world: &World) {
    let messages = world.publisher.messages_of(&world.processor);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m.sequence.0,
            i as u64 + 1,
            "sequences: {:?}",
            world.sequences()
        );
        assert_eq!(m.payload, (i as u64 + 1).to_le_bytes().to_vec());
    }
}

impl World {
    /// Waits (bounded) until `instance` reports `phase`.
    pub(crate) async fn until_phase(&self, instance: &Instance, phase: Phase) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(health) = self.control.health(instance).await
                && health.phase == phase
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {phase}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One raw HTTP/1.0 exchange with the instance: (status, body).
pub(crate) async fn http(
    instance: &Instance,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = &instance.endpoint.as_ref().unwrap().address;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
