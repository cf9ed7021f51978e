//! Snapshot put and get against PostgreSQL: Dory's `PgStore::put_checkpoint` and `latest`
//! beside a plain sqlx `INSERT` of the same bytes into a `bytea` table and a `SELECT` of them,
//! in the same run, at 1 KiB, 1 MiB and 64 MiB.
//!
//! `cargo bench -p dory-benches --bench store` runs interleaved rounds (the order alternating)
//! and keeps each side's best round, because load from concurrent builds only ever adds time.
//! It prints per size and operation the time per call, the throughput and the ratio
//! `raw time / Dory time` (Dory's throughput as a share of raw's; the goal is at least 0.9),
//! then the peak memory of one 64 MiB put + get on each side, relative to the snapshot size.
//!
//! - Dory: a processor owned by epoch 1 (leadership term from `PgLeadership`, then
//!   `claim_epoch` and `assign_owner`); each put is a new sequence, encoded beforehand with
//!   `Encoder::encode_body` over random (incompressible) bytes, so the snapshot is the size
//!   named; each get is `latest`, which reads and verifies the committed snapshot.
//! - Raw: `INSERT INTO raw_snapshots (id, body) VALUES ($1, $2)` of the same bytes and
//!   `SELECT body FROM raw_snapshots WHERE id = $1`, on the store's own pool (same
//!   connections, same schema), with the body stored `EXTERNAL` like Dory's.
//!
//! Old snapshots and raw rows are deleted between rounds, outside the timing. Peak memory is
//! the growth of `VmHWM` over the resident size before the call, after resetting the high-water
//! mark (`/proc/self/clear_refs`), with the encoded snapshot already in memory.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the bench works in a schema of its own and drops
//! it at the end. When the database cannot be reached it prints a skip line and exits 0.
//! Without `--bench` (as under `cargo test --benches`) it runs one tiny round as a smoke test.

use std::time::{Duration, Instant};

use dory_benches::{BenchSchema, BoxError, random_bytes};
use dory_core::snapshot::{Codec, Encoder};
use dory_core::{Epoch, Leadership, ProcessorId, Sequence, StateStore, StoredSnapshot, Timestamp};
use dory_pg::{PgLeadership, PgStore};

type Result<T> = std::result::Result<T, BoxError>;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Long enough that the lease never runs out during the bench.
const LEASE: Duration = Duration::from_secs(3600);

/// One measured size: calls per round and rounds.
struct Plan {
    label: &'static str,
    size: usize,
    calls: usize,
    rounds: usize,
}

fn plans(full: bool) -> Vec<Plan> {
    if full {
        vec![
            Plan {
                label: "1 KiB",
                size: KIB,
                calls: 200,
                rounds: 9,
            },
            Plan {
                label: "1 MiB",
                size: MIB,
                calls: 10,
                rounds: 7,
            },
            Plan {
                label: "64 MiB",
                size: 64 * MIB,
                calls: 1,
                rounds: 5,
            },
        ]
    } else {
        vec![Plan {
            label: "1 KiB",
            size: KIB,
            calls: 5,
            rounds: 1,
        }]
    }
}

fn main() {
    dory_benches::run_server_bench("store", run);
}

async fn run(full: bool) -> Result<()> {
    let Some(db) = BenchSchema::open("store", Duration::from_secs(120)).await? else {
        return Ok(());
    };
    let result = measure(&db.store, full).await;
    db.close(result).await
}

/// The processor Dory writes, its owning epoch and the next sequence.
struct Writer {
    processor: ProcessorId,
    epoch: Epoch,
    sequence: u64,
    next_raw_id: i64,
}

impl Writer {
    /// The next checkpoint of `body`, encoded (outside any timing).
    fn snapshot(&mut self, body: &[u8]) -> Result<StoredSnapshot> {
        self.sequence += 1;
        let bytes = Encoder::default().encode_body(
            &self.processor,
            self.epoch,
            Sequence(self.sequence),
            Codec::Raw,
            body,
        )?;
        Ok(StoredSnapshot::from_encoded(bytes, Timestamp(0))?)
    }
}

/// Best time per round of each of the four measured operations.
#[derive(Clone, Copy)]
struct Best {
    dory_put: Duration,
    dory_get: Duration,
    raw_put: Duration,
    raw_get: Duration,
}

async fn measure(store: &PgStore, full: bool) -> Result<()> {
    let leadership = PgLeadership::new(store, "dory-bench");
    let term = leadership.acquire().await?;
    let processor = ProcessorId::new("bench-store")?;
    let epoch = store.claim_epoch(&processor, term).await?;
    store
        .assign_owner(&processor, None, epoch, LEASE, term)
        .await?;
    leadership.resign(term).await?;
    sqlx::query("CREATE TABLE raw_snapshots (id bigint PRIMARY KEY, body bytea NOT NULL)")
        .execute(store.pool())
        .await?;
    sqlx::query("ALTER TABLE raw_snapshots ALTER COLUMN body SET STORAGE EXTERNAL")
        .execute(store.pool())
        .await?;
    let mut writer = Writer {
        processor,
        epoch,
        sequence: 0,
        next_raw_id: 0,
    };

    for plan in plans(full) {
        let body = random_bytes(plan.size);
        let mut best = Best {
            dory_put: Duration::MAX,
            dory_get: Duration::MAX,
            raw_put: Duration::MAX,
            raw_get: Duration::MAX,
        };
        let mut encoded_len = 0;
        for round in 0..plan.rounds {
            for side in [round % 2, 1 - round % 2] {
                // Encoded before the clock starts; the raw side stores the same bytes.
                let snapshots = (0..plan.calls)
                    .map(|_| writer.snapshot(&body))
                    .collect::<Result<Vec<_>>>()?;
                encoded_len = snapshots[0].bytes.len();
                if side == 0 {
                    let (put, get) = dory_round(store, &writer.processor, &snapshots).await?;
                    best.dory_put = best.dory_put.min(put);
                    best.dory_get = best.dory_get.min(get);
                    store.prune(&writer.processor, 1).await?;
                } else {
                    let first = writer.next_raw_id;
                    writer.next_raw_id += plan.calls as i64;
                    let (put, get) = raw_round(store, first, &snapshots).await?;
                    best.raw_put = best.raw_put.min(put);
                    best.raw_get = best.raw_get.min(get);
                    sqlx::query("DELETE FROM raw_snapshots")
                        .execute(store.pool())
                        .await?;
                }
            }
        }
        let per_call = |d: Duration| d / plan.calls as u32;
        let mib_s =
            |d: Duration| (encoded_len * plan.calls) as f64 / (1u64 << 20) as f64 / d.as_secs_f64();
        for (op, dory, raw) in [
            ("put", best.dory_put, best.raw_put),
            ("get", best.dory_get, best.raw_get),
        ] {
            println!(
                "store {} {op}: dory {:.3} ms ({:.1} MiB/s), raw sqlx {:.3} ms ({:.1} MiB/s), \
                 ratio {:.3} ({} B snapshots, {} calls per round, best of {} rounds)",
                plan.label,
                per_call(dory).as_secs_f64() * 1e3,
                mib_s(dory),
                per_call(raw).as_secs_f64() * 1e3,
                mib_s(raw),
                raw.as_secs_f64() / dory.as_secs_f64(),
                encoded_len,
                plan.calls,
                plan.rounds,
            );
        }
    }
    if full {
        memory(store, &mut writer).await?;
    }
    Ok(())
}

/// `calls` puts through `put_checkpoint`, then as many `latest` reads; the time of each half.
async fn dory_round(
    store: &PgStore,
    processor: &ProcessorId,
    snapshots: &[StoredSnapshot],
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    for snapshot in snapshots {
        store.put_checkpoint(snapshot, LEASE).await?;
    }
    let put = started.elapsed();
    let expected = snapshots.last().map_or(0, |s| s.bytes.len());
    let started = Instant::now();
    for _ in snapshots {
        let got = store
            .latest(processor)
            .await?
            .ok_or("latest found no snapshot")?;
        if got.bytes.len() != expected {
            return Err("latest returned another size".into());
        }
    }
    Ok((put, started.elapsed()))
}

/// The same bytes by hand: one `INSERT` per snapshot, then one `SELECT` per snapshot.
async fn raw_round(
    store: &PgStore,
    first_id: i64,
    snapshots: &[StoredSnapshot],
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    for (i, snapshot) in snapshots.iter().enumerate() {
        raw_put(store, first_id + i as i64, &snapshot.bytes).await?;
    }
    let put = started.elapsed();
    let started = Instant::now();
    for (i, snapshot) in snapshots.iter().enumerate() {
        let got = raw_get(store, first_id + i as i64).await?;
        if got.len() != snapshot.bytes.len() {
            return Err("raw select returned another size".into());
        }
    }
    Ok((put, started.elapsed()))
}

async fn raw_put(store: &PgStore, id: i64, bytes: &[u8]) -> Result<()> {
    sqlx::query("INSERT INTO raw_snapshots (id, body) VALUES ($1, $2)")
        .bind(id)
        .bind(bytes)
        .execute(store.pool())
        .await?;
    Ok(())
}

async fn raw_get(store: &PgStore, id: i64) -> Result<Vec<u8>> {
    Ok(
        sqlx::query_scalar("SELECT body FROM raw_snapshots WHERE id = $1")
            .bind(id)
            .fetch_one(store.pool())
            .await?,
    )
}

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`), if the system has it.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak resident size to the current one; false where the kernel does not allow it.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak memory of one 64 MiB put + get on each side, over the resident size just before.
async fn memory(store: &PgStore, writer: &mut Writer) -> Result<()> {
    let body = random_bytes(64 * MIB);
    for side in ["dory", "raw"] {
        let snapshot = writer.snapshot(&body)?;
        let size = snapshot.bytes.len() as f64;
        let reset = reset_peak();
        let (Some(before), Some(hwm_before)) =
            (proc_status_bytes("VmRSS:"), proc_status_bytes("VmHWM:"))
        else {
            println!("store 64 MiB memory: /proc/self/status not readable, not measured");
            return Ok(());
        };
        if side == "dory" {
            store.put_checkpoint(&snapshot, LEASE).await?;
            let got = store.latest(&writer.processor).await?;
            drop(got);
            store.prune(&writer.processor, 1).await?;
        } else {
            let id = writer.next_raw_id;
            writer.next_raw_id += 1;
            raw_put(store, id, &snapshot.bytes).await?;
            drop(raw_get(store, id).await?);
            sqlx::query("DELETE FROM raw_snapshots")
                .execute(store.pool())
                .await?;
        }
        let hwm = proc_status_bytes("VmHWM:").unwrap_or(0);
        let after = proc_status_bytes("VmRSS:").unwrap_or(0);
        let peak = hwm.saturating_sub(before) as f64;
        println!(
            "store 64 MiB memory {side}: peak +{:.1} MiB over {:.1} MiB resident ({:.2}x the \
             {:.1} MiB snapshot); resident after {:.1} MiB{}",
            peak / MIB as f64,
            before as f64 / MIB as f64,
            peak / size,
            size / MIB as f64,
            after as f64 / MIB as f64,
            if reset {
                String::new()
            } else {
                format!(
                    " (peak not reset: high-water mark was {:.1} MiB before)",
                    hwm_before as f64 / MIB as f64
                )
            },
        );
    }
    Ok(())
}
