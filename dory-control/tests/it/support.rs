//! A fake instance, a server for it on a loopback port, and a raw HTTP/1 helper for requests
//! the client never sends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use dory_control::{InstanceEndpoint, ServerSettings, router};
use dory_core::snapshot::{self, Encoder};
use dory_core::{
    ControlEndpoint, Epoch, Error, Health, Instance, NodeId, Phase, ProcessorId, Result, Sequence,
    SnapshotMeta, Timestamp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const TOKEN: &str = "s3cret-t0ken-of-the-instance";

pub(crate) fn id(s: &str) -> ProcessorId {
    ProcessorId::new(s).unwrap()
}

/// A processor whose state is a counter. It behaves as the contract says, except where a test
/// makes it misbehave.
pub(crate) struct Fake {
    pub(crate) processor: ProcessorId,
    pub(crate) epoch: Epoch,
    state: Mutex<FakeState>,
    /// User code never reaches a safe point.
    pub(crate) stuck: AtomicBool,
    /// How long reaching a safe point takes.
    pub(crate) safe_point_delay: Mutex<Duration>,
    /// The instance lost ownership: resuming is fenced.
    pub(crate) fenced: AtomicBool,
    /// Freezes withdrawn because their future was dropped.
    pub(crate) withdrawn: AtomicUsize,
    /// Calls that reached the endpoint's state methods.
    pub(crate) calls: AtomicUsize,
}

pub(crate) struct FakeState {
    pub(crate) phase: Phase,
    pub(crate) counter: u64,
    pub(crate) frozen: Option<Bytes>,
    pub(crate) loaded: Option<Bytes>,
    /// The committed sequence the last resume named, if it named one.
    pub(crate) resumed_at: Option<Sequence>,
}

impl Fake {
    pub(crate) fn new(processor: &str, epoch: u64, phase: Phase, counter: u64) -> Arc<Fake> {
        Arc::new(Fake {
            processor: id(processor),
            epoch: Epoch(epoch),
            state: Mutex::new(FakeState {
                phase,
                counter,
                frozen: None,
                loaded: None,
                resumed_at: None,
            }),
            stuck: AtomicBool::new(false),
            safe_point_delay: Mutex::new(Duration::ZERO),
            fenced: AtomicBool::new(false),
            withdrawn: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// One iteration of the run loop, if it runs.
    pub(crate) fn step(&self) {
        let mut st = self.state();
        if st.phase == Phase::Running {
            st.counter += 1;
        }
    }

    fn meta(&self, st: &FakeState, size: usize) -> SnapshotMeta {
        SnapshotMeta {
            processor: self.processor.clone(),
            epoch: self.epoch,
            sequence: Sequence(st.counter),
            size: size as u64,
            created_at: Timestamp(0),
        }
    }
}

/// Withdraws a pending freeze when its future is dropped.
struct Withdraw<'a>(&'a Fake);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.0.withdrawn.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl InstanceEndpoint for Fake {
    fn health(&self) -> Health {
        let st = self.state();
        Health {
            phase: st.phase.clone(),
            epoch: self.epoch,
            sequence: Sequence(st.counter),
            protocol: dory_core::CONTROL_PROTOCOL,
        }
    }

    fn ready(&self) -> Result<()> {
        match self.state().phase {
            Phase::Starting => Err(Error::unavailable("still starting")),
            _ => Ok(()),
        }
    }

    fn metrics(&self) -> String {
        let st = self.state();
        format!(
            "# TYPE dory_epoch gauge\ndory_epoch {}\n# TYPE dory_sequence gauge\ndory_sequence {}\n",
            self.epoch.0, st.counter
        )
    }

    async fn freeze(&self, _timeout: Duration) -> Result<SnapshotMeta> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        {
            let st = self.state();
            match (&st.phase, &st.frozen) {
                (Phase::Frozen, Some(bytes)) => return Ok(self.meta(&st, bytes.len())),
                (Phase::Running, _) => {}
                (other, _) => {
                    return Err(Error::conflict(format!(
                        "instance is {other}; only a running instance can freeze"
                    )));
                }
            }
        }
        let guard = Withdraw(self);
        if self.stuck.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = *self.safe_point_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        std::mem::forget(guard);
        let mut st = self.state();
        let bytes = Encoder::default().encode_state(
            &self.processor,
            self.epoch,
            Sequence(st.counter),
            &st.counter,
        )?;
        st.phase = Phase::Frozen;
        st.frozen = Some(Bytes::from(bytes));
        let size = st.frozen.as_ref().map_or(0, Bytes::len);
        Ok(self.meta(&st, size))
    }

    async fn snapshot(&self) -> Result<Bytes> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let st = self.state();
        match (&st.phase, &st.frozen) {
            (Phase::Frozen, Some(bytes)) => Ok(bytes.clone()),
            (other, _) => Err(Error::conflict(format!(
                "instance is {other}; freeze it first"
            ))),
        }
    }

    async fn load(&self, snapshot: Bytes) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let header = snapshot::verify(&snapshot)?;
        if header.processor != self.processor {
            return Err(Error::invalid(format!(
                "snapshot is of processor {}; this instance runs {}",
                header.processor, self.processor
            )));
        }
        if header.epoch >= self.epoch {
            return Err(Error::invalid(format!(
                "snapshot taken by epoch {} is not older than this instance's epoch {}",
                header.epoch, self.epoch
            )));
        }
        let (_, counter): (_, u64) = snapshot::decode_state(&snapshot, &Default::default())?;
        let mut st = self.state();
        if st.phase != Phase::Standby {
            return Err(Error::conflict(format!(
                "instance is {}; only a standby instance loads",
                st.phase
            )));
        }
        st.counter = counter;
        st.loaded = Some(snapshot);
        Ok(())
    }

    async fn resume(&self, committed: Option<Sequence>) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Error::fenced(format!(
                "epoch {} no longer owns {}",
                self.epoch, self.processor
            )));
        }
        let mut st = self.state();
        st.phase = Phase::Running;
        st.frozen = None;
        st.resumed_at = committed;
        Ok(())
    }
}

/// Serves `fake` on a loopback port; returns its address.
pub(crate) async fn serve(fake: Arc<Fake>, settings: ServerSettings) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let app = router(fake, settings);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// Serves `fake` with the default settings and [`TOKEN`]; returns the instance record the
/// orchestrator would see.
pub(crate) async fn start(fake: &Arc<Fake>) -> Instance {
    let address = serve(fake.clone(), ServerSettings::new(TOKEN)).await;
    instance_of(fake, Some(&address), TOKEN)
}

pub(crate) fn instance_of(fake: &Fake, address: Option<&str>, token: &str) -> Instance {
    Instance {
        processor: fake.processor.clone(),
        epoch: fake.epoch,
        node: NodeId::new("n1"),
        phase: Phase::Running,
        revision: 0,
        started_at: Timestamp(0),
        endpoint: address.map(|address| ControlEndpoint {
            address: address.to_string(),
            token: token.to_string(),
        }),
    }
}

/// An answer read off the wire.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
}

/// Sends `request` as is (it should say `Connection: close`) and reads the whole answer.
pub(crate) async fn raw(address: &str, request: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// A plain request without a body.
pub(crate) async fn raw_get(address: &str, method: &str, path: &str, headers: &str) -> Raw {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    );
    raw(address, request.as_bytes()).await
}
