//! The pause a Rust processor sees when it moves: from its last step on the old instance to
//! its first step on the new one, through freeze → fetch → load → commit → resume over real
//! loopback HTTP (`dory-runtime` serving `dory-control`'s router, `HttpControl` calling it),
//! for a state of 1 KiB, 1 MiB and 64 MiB of random (incompressible) bytes.
//!
//! The floor, measured in the same run on the same bytes: encode and compress the state
//! (`Encoder::encode_state`), send it in one loopback HTTP request (`PUT /state` through the
//! same client and router), and decode it on the other side (`decode_state`): what any
//! hand-over of this state must do at the least. The ratio printed is floor / pause (1.0: the
//! move costs nothing beyond the floor; the goal is at least 0.5, the pause within 2× of it).
//!
//! The replacement is started in standby before the freeze, as the orchestrator does (make
//! before break), so its start-up is not part of the pause. The store is the in-memory one,
//! so the commit costs what the protocol costs, not a database's fsync; the snapshot store
//! bench measures that part.
//!
//! `cargo bench -p dory-benches --bench pause`. Without `--bench` (as under
//! `cargo test --benches`) it makes a few small moves as a smoke test.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dory_benches::{BoxError, ms, percentiles, random_bytes};
use dory_control::{HttpControl, InstanceEndpoint, ServerSettings, router};
use dory_core::snapshot::{Encoder, Limits, decode_state};
use dory_core::{
    ControlEndpoint, Epoch, Health, Input, Instance, InstanceControl, InstanceEnv, LaunchMode,
    Leadership, NodeId, Phase, ProcessorId, Publisher, Sequence, SnapshotMeta, StateStore,
    StoredSnapshot, SystemClock, Term, Timestamp,
};
use dory_mock::{MemoryLeadership, MemoryPublisher, MemoryStore};
use dory_runtime::{Context, Exit, Processor, Runtime, Settings, StepError};
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

type Result<T> = std::result::Result<T, BoxError>;

const TOKEN: &str = "pause-bench-token";
/// Long enough that neither a lease nor a periodic checkpoint lands inside a measurement.
const LONG: Duration = Duration::from_secs(3600);

/// The state: bytes serialized as one byte string, not element by element.
#[derive(Default)]
struct Blob(Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Blob, D::Error> {
        struct BlobVisitor;
        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(
                self,
                v: Vec<u8>,
            ) -> std::result::Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(BlobVisitor)
    }
}

/// When each epoch stepped first and last.
#[derive(Default)]
struct Timeline {
    first: HashMap<Epoch, Instant>,
    last: HashMap<Epoch, Instant>,
}

/// Touches one byte of its state per step and records when it stepped.
struct Toucher {
    epoch: Epoch,
    size: usize,
    timeline: Arc<Mutex<Timeline>>,
}

#[async_trait]
impl Processor for Toucher {
    type State = Blob;

    async fn step(
        &mut self,
        state: &mut Blob,
        _ctx: &mut Context,
    ) -> std::result::Result<(), StepError> {
        let now = Instant::now();
        {
            let mut t = self.timeline.lock().unwrap_or_else(PoisonError::into_inner);
            t.first.entry(self.epoch).or_insert(now);
            t.last.insert(self.epoch, now);
        }
        if state.0.is_empty() {
            state.0 = random_bytes(self.size);
        }
        let i = (now.elapsed().subsec_nanos() as usize) % state.0.len();
        state.0[i] ^= 1;
        tokio::task::yield_now().await;
        Ok(())
    }
}

/// One running instance and how to stop it.
struct Running {
    instance: Instance,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::result::Result<Exit, dory_runtime::RuntimeError>>,
}

struct World {
    processor: ProcessorId,
    store: MemoryStore,
    term: Term,
    control: HttpControl,
    timeline: Arc<Mutex<Timeline>>,
    size: usize,
    _leadership: MemoryLeadership,
}

impl World {
    async fn new(size: usize) -> Result<World> {
        let store = MemoryStore::new(Arc::new(SystemClock));
        let leadership = MemoryLeadership::new(&store);
        let term = leadership.acquire().await?;
        Ok(World {
            processor: ProcessorId::new(format!("pause-{size}"))?,
            store,
            term,
            control: HttpControl::new(),
            timeline: Arc::default(),
            size,
            _leadership: leadership,
        })
    }

    async fn start(&self, epoch: Epoch, mode: LaunchMode) -> Result<Running> {
        let env = InstanceEnv {
            processor: self.processor.clone(),
            epoch,
            mode,
            token: TOKEN.into(),
            port: 0,
            store_url: "memory://".into(),
            publisher_url: None,
            lease: LONG,
            checkpoint_interval: LONG,
            config: serde_json::Value::Null,
        };
        let store: Arc<dyn StateStore> = Arc::new(self.store.clone());
        let publisher: Arc<dyn Publisher> = Arc::new(MemoryPublisher::new());
        let processor = Toucher {
            epoch,
            size: self.size,
            timeline: Arc::clone(&self.timeline),
        };
        let runtime = Runtime::bind(
            env,
            processor,
            store,
            publisher,
            None::<Arc<dyn Input>>,
            Settings::default().with_bind_host("127.0.0.1"),
        )
        .await?;
        let address = runtime.local_addr().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Running {
            instance: instance(&self.processor, epoch, address),
            stop,
            task,
        })
    }

    async fn claim(&self, owner: bool) -> Result<Epoch> {
        let epoch = self.store.claim_epoch(&self.processor, self.term).await?;
        if owner {
            self.store
                .assign_owner(&self.processor, None, epoch, LONG, self.term)
                .await?;
        }
        Ok(epoch)
    }

    /// Waits until `epoch` has stepped, or `phase` is reached.
    async fn until<F: Fn(&World) -> bool>(&self, what: &str, done: F) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            if Instant::now() > deadline {
                return Err(format!("not within 60s: {what}").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn stepped(&self, epoch: Epoch) -> bool {
        self.timeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first
            .contains_key(&epoch)
    }

    /// One move of the running `old` to a new instance; the pause and the snapshot's size.
    async fn move_once(&self, old: Running) -> Result<(Running, Duration, usize)> {
        let new_epoch = self.claim(false).await?;
        let new = self.start(new_epoch, LaunchMode::Standby).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .control
            .health(&new.instance)
            .await
            .map(|h| h.phase)
            .ok()
            != Some(Phase::Standby)
        {
            if Instant::now() > deadline {
                return Err("the replacement never stood by".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        self.control
            .freeze(&old.instance, Duration::from_secs(30))
            .await?;
        let bytes = self.control.fetch(&old.instance).await?;
        self.control.load(&new.instance, &bytes).await?;
        let mut snapshot = StoredSnapshot::from_encoded(bytes.clone(), Timestamp(0))?;
        snapshot.meta.epoch = new_epoch;
        self.store
            .commit_move(old.instance.epoch, &snapshot, LONG, self.term)
            .await?;
        self.control.resume(&new.instance).await?;
        self.until("the new instance steps", |w| w.stepped(new_epoch))
            .await?;

        let pause = {
            let t = self.timeline.lock().unwrap_or_else(PoisonError::into_inner);
            t.first[&new_epoch].duration_since(t.last[&old.instance.epoch])
        };
        let _ = old.stop.send(());
        match old.task.await? {
            Ok(Exit::NotOwner) => {}
            other => return Err(format!("the old instance ended with {other:?}").into()),
        }
        Ok((new, pause, bytes.len()))
    }
}

fn instance(processor: &ProcessorId, epoch: Epoch, address: String) -> Instance {
    Instance {
        processor: processor.clone(),
        epoch,
        node: NodeId::new("bench"),
        phase: Phase::Running,
        revision: 0,
        started_at: Timestamp(0),
        endpoint: Some(ControlEndpoint {
            address,
            token: TOKEN.into(),
        }),
    }
}

/// The floor's receiving side: `PUT /state` decodes the snapshot and nothing else.
struct Floor;

#[async_trait]
impl InstanceEndpoint for Floor {
    fn health(&self) -> Health {
        Health {
            phase: Phase::Standby,
            epoch: Epoch(1),
            sequence: Sequence(0),
        }
    }
    fn ready(&self) -> dory_core::Result<()> {
        Ok(())
    }
    fn metrics(&self) -> String {
        String::new()
    }
    async fn freeze(&self, _: Duration) -> dory_core::Result<SnapshotMeta> {
        Err(dory_core::Error::conflict("the floor does not freeze"))
    }
    async fn snapshot(&self) -> dory_core::Result<Bytes> {
        Err(dory_core::Error::conflict("the floor holds no snapshot"))
    }
    async fn load(&self, snapshot: Bytes) -> dory_core::Result<()> {
        let (_, state) = decode_state::<Blob>(&snapshot, &Limits::default())?;
        std::hint::black_box(state);
        Ok(())
    }
    async fn resume(&self) -> dory_core::Result<()> {
        Ok(())
    }
}

/// Encode + one loopback transfer + decode of a `size`-byte state, `n` times.
async fn floor(size: usize, n: usize) -> Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let app = router(Arc::new(Floor), ServerSettings::new(TOKEN));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let control = HttpControl::new();
    let target = instance(&ProcessorId::new("floor")?, Epoch(2), address);
    let state = Blob(random_bytes(size));
    let processor = ProcessorId::new("floor")?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let bytes = Encoder::default().encode_state(
            &processor,
            Epoch(1),
            Sequence(i as u64 + 1),
            &state,
        )?;
        control.load(&target, &bytes).await?;
        times.push(started.elapsed());
    }
    server.abort();
    Ok(times)
}

async fn bench(full: bool) -> Result<()> {
    let plans: &[(&str, usize, usize)] = if full {
        &[
            ("1 KiB", 1 << 10, 60),
            ("1 MiB", 1 << 20, 40),
            ("64 MiB", 64 << 20, 8),
        ]
    } else {
        &[("1 KiB", 1 << 10, 3), ("1 MiB", 1 << 20, 2)]
    };
    println!(
        "| state | moves | pause p50 ms | p99 ms | floor p50 ms | p99 ms | floor/pause p50 | p99 | snapshot bytes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &(label, size, moves) in plans {
        let world = World::new(size).await?;
        let first = world.claim(true).await?;
        let mut running = world.start(first, LaunchMode::Restore).await?;
        world
            .until("the first instance steps", |w| w.stepped(first))
            .await?;
        let mut pauses = Vec::with_capacity(moves);
        let mut floors = Vec::with_capacity(moves);
        let mut snapshot_len = 0;
        for _ in 0..moves {
            // Interleaved, so load from other work on the machine falls on both alike.
            floors.extend(floor(size, 1).await?);
            let (next, pause, len) = world.move_once(running).await?;
            running = next;
            pauses.push(pause);
            snapshot_len = len;
        }
        let _ = running.stop.send(());
        let _ = running.task.await;
        let (p50, p99, _) = percentiles(pauses);
        let (f50, f99, _) = percentiles(floors);
        println!(
            "| {label} | {moves} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {snapshot_len} |",
            ms(p50),
            ms(p99),
            ms(f50),
            ms(f99),
            f50.as_secs_f64() / p50.as_secs_f64(),
            f99.as_secs_f64() / p99.as_secs_f64(),
        );
    }
    Ok(())
}

fn main() {
    dory_benches::run_server_bench("pause", bench);
}
