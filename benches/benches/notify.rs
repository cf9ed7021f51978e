//! Change-notification latency against PostgreSQL: an `UPDATE` of a row of the `processors`
//! table until `PgConfigSource`'s change nudge reaches a subscriber, beside a plain sqlx
//! `PgListener` on a raw `pg_notify` channel doing the same round trip, in the same run.
//!
//! `cargo bench -p dory-benches --bench notify` makes 500 updates on each side (after 20
//! unmeasured ones), alternating sides update by update with the order swapped every time, so
//! load from concurrent builds falls on both alike. It prints per measure the p50, p99 and
//! maximum latency of each side and the ratio `raw / Dory` of the p50s and of the p99s
//! (Dory's speed as a share of raw's; 1.0 means Dory adds nothing).
//!
//! - Dory: `UPDATE processors SET spec = $2::jsonb WHERE id = $1` on the store's pool; the
//!   row trigger stamps `updated_at`, the statement trigger `NOTIFY`s the schema's channel,
//!   `PgConfigSource`'s listener task turns the notification into a nudge, and the bench's
//!   `Changes::changed` returns. Then, as the orchestrator does on a nudge, `desired` re-lists
//!   (both tables in one `REPEATABLE READ` transaction, every row parsed and validated) and
//!   the bench checks the new spec is in it.
//! - Raw: `WITH changed AS (UPDATE raw_processors SET spec = $2::jsonb, updated_at = now()
//!   WHERE id = $1 RETURNING 1) SELECT pg_notify($3, 'raw_processors') FROM changed` on the
//!   same pool, received by a `PgListener` of its own (`recv` on the bench's task, no hop
//!   through another task); the re-list is one autocommit `SELECT id, spec::text` of every
//!   row, unparsed, in which the bench finds the new spec.
//!
//! Each side has a table of 100 rows and updates one of them at a time, in turn. Three
//! latencies are taken from the moment the update is sent: the update's own answer, the
//! nudge (notification) arriving, and the re-list done. A nudge left over from an earlier
//! update would make the next one look instant, so each update first drains any pending
//! nudge and counts it; the count is printed and should be zero.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); the bench works in a schema of its own and drops
//! it at the end. When the database cannot be reached it prints a skip line and exits 0.
//! Without `--bench` (as under `cargo test --benches`) it makes a few updates as a smoke test.

use std::time::{Duration, Instant};

use dory_benches::{BenchSchema, BoxError, ms, percentiles};
use dory_core::{Changes, ConfigSource};
use dory_pg::{PgConfigSource, PgStore};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgListener;

type Result<T> = std::result::Result<T, BoxError>;

/// Rows in each side's table; every re-list reads them all.
const ROWS: usize = 100;
/// How long one update may take to be noticed before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(10);
/// The longest Postgres identifier, and so channel name, in bytes.
const MAX_IDENTIFIER: usize = 63;

/// Updates per side, measured and unmeasured.
struct Plan {
    updates: usize,
    warmup: usize,
}

fn plan(full: bool) -> Plan {
    if full {
        Plan {
            updates: 500,
            warmup: 20,
        }
    } else {
        Plan {
            updates: 5,
            warmup: 2,
        }
    }
}

fn main() {
    dory_benches::run_server_bench("notify", run);
}

async fn run(full: bool) -> Result<()> {
    let Some(db) = BenchSchema::open("notify", Duration::from_secs(30)).await? else {
        return Ok(());
    };
    let result = measure(&db.store, &db.url, full).await;
    db.close(result).await
}

/// The row updated by the `n`th update, and the spec it gets (its version names `n`).
fn change(n: usize) -> (String, String, String) {
    let version = format!("v{n}");
    let spec = format!(r#"{{"workload": {{"image": "bench:1", "version": "{version}"}}}}"#);
    (row_id(n % ROWS), spec, version)
}

fn row_id(i: usize) -> String {
    format!("bench-{i:03}")
}

/// The latencies of one update, from the moment it was sent.
#[derive(Clone, Copy)]
struct Sample {
    /// The update statement's answer.
    updated: Duration,
    /// The nudge (Dory) or notification (raw) arriving.
    nudged: Duration,
    /// The re-list that shows the change, done.
    listed: Duration,
}

/// Every sample of one side, and the nudges found pending before an update.
#[derive(Default)]
struct Side {
    samples: Vec<Sample>,
    stray: usize,
}

/// What the bench drives: the source and its subscription, the raw listener and its channel.
struct Rig<'a> {
    store: &'a PgStore,
    source: PgConfigSource,
    changes: Changes,
    listener: PgListener,
    channel: String,
}

async fn measure(store: &PgStore, url: &str, full: bool) -> Result<()> {
    let plan = plan(full);
    sqlx::query(
        "CREATE TABLE raw_processors (id text PRIMARY KEY, spec jsonb NOT NULL, \
         updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(store.pool())
    .await?;
    let (_, first_spec, _) = change(0);
    for table in ["processors", "raw_processors"] {
        let fill = format!(
            "INSERT INTO {table} (id, spec) \
             SELECT 'bench-' || lpad(i::text, 3, '0'), $1::jsonb FROM generate_series(0, $2 - 1) i"
        );
        sqlx::query(AssertSqlSafe(fill))
            .bind(&first_spec)
            .bind(ROWS as i32)
            .execute(store.pool())
            .await?;
    }
    // Listening starts after the rows are in: their inserts nudge nobody.
    let source = PgConfigSource::new(store).await?;
    let changes = source.changes();
    let mut channel = format!("{}_raw", store.schema());
    channel.truncate(MAX_IDENTIFIER);
    let mut listener = PgListener::connect(url).await?;
    listener.listen(&channel).await?;
    let mut rig = Rig {
        store,
        source,
        changes,
        listener,
        channel,
    };

    let (mut dory, mut raw) = (Side::default(), Side::default());
    let total = plan.warmup + plan.updates;
    // Update numbers start at 1: the rows were filled with change 0's spec.
    for n in 1..=total {
        let keep = n > plan.warmup;
        for side in [n % 2, 1 - n % 2] {
            if side == 0 {
                let sample = dory_update(&mut rig, n, &mut dory.stray).await?;
                if keep {
                    dory.samples.push(sample);
                }
            } else {
                let sample = raw_update(&mut rig, n, &mut raw.stray).await?;
                if keep {
                    raw.samples.push(sample);
                }
            }
        }
    }
    report(&plan, &dory, &raw);
    drop(rig.source);
    Ok(())
}

/// One update of `processors` through to the nudge and the re-list that shows it.
async fn dory_update(rig: &mut Rig<'_>, n: usize, stray: &mut usize) -> Result<Sample> {
    // A pending nudge (none is expected) would end the wait below at once.
    while tokio::time::timeout(Duration::ZERO, rig.changes.changed())
        .await
        .is_ok()
    {
        *stray += 1;
    }
    let (id, spec, version) = change(n);
    let (store, source, changes) = (rig.store, &rig.source, &mut rig.changes);
    let started = Instant::now();
    let update = async {
        sqlx::query("UPDATE processors SET spec = $2::jsonb WHERE id = $1")
            .bind(&id)
            .bind(&spec)
            .execute(store.pool())
            .await?;
        Ok::<_, BoxError>(started.elapsed())
    };
    let seen = async {
        changes.changed().await;
        let nudged = started.elapsed();
        let desired = source.desired().await?;
        let listed = started.elapsed();
        let found = desired
            .processors
            .iter()
            .find(|p| p.id.as_str() == id)
            .and_then(|p| p.workload.version.as_deref());
        if found != Some(version.as_str()) {
            return Err(
                format!("after the nudge, {id} has version {found:?}, not {version}").into(),
            );
        }
        Ok::<_, BoxError>((nudged, listed))
    };
    let (updated, seen) = tokio::join!(update, tokio::time::timeout(PATIENCE, seen));
    let (nudged, listed) =
        seen.map_err(|_| format!("no nudge within {PATIENCE:?} of update {n}"))??;
    Ok(Sample {
        updated: updated?,
        nudged,
        listed,
    })
}

/// The same round trip by hand: update and `pg_notify` in one statement, `PgListener::recv`,
/// then a `SELECT` of every row.
async fn raw_update(rig: &mut Rig<'_>, n: usize, stray: &mut usize) -> Result<Sample> {
    while rig.listener.next_buffered().is_some() {
        *stray += 1;
    }
    let (id, spec, version) = change(n);
    let (pool, channel, listener) = (rig.store.pool(), rig.channel.as_str(), &mut rig.listener);
    let started = Instant::now();
    let update = async {
        sqlx::query(
            "WITH changed AS (UPDATE raw_processors SET spec = $2::jsonb, updated_at = now() \
                              WHERE id = $1 RETURNING 1) \
             SELECT pg_notify($3, 'raw_processors') FROM changed",
        )
        .bind(&id)
        .bind(&spec)
        .bind(channel)
        .execute(pool)
        .await?;
        Ok::<_, BoxError>(started.elapsed())
    };
    let seen = async {
        listener.recv().await?;
        let nudged = started.elapsed();
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, spec::text FROM raw_processors ORDER BY id COLLATE \"C\"")
                .fetch_all(pool)
                .await?;
        let listed = started.elapsed();
        let found = rows.iter().find(|(row, _)| *row == id);
        if !found.is_some_and(|(_, s)| s.contains(&format!("\"{version}\""))) {
            return Err(
                format!("after the notification, {id} reads {found:?}, not {version}").into(),
            );
        }
        Ok::<_, BoxError>((nudged, listed))
    };
    let (updated, seen) = tokio::join!(update, tokio::time::timeout(PATIENCE, seen));
    let (nudged, listed) =
        seen.map_err(|_| format!("no notification within {PATIENCE:?} of update {n}"))??;
    Ok(Sample {
        updated: updated?,
        nudged,
        listed,
    })
}

fn report(plan: &Plan, dory: &Side, raw: &Side) {
    type Pick = fn(&Sample) -> Duration;
    let measures: [(&str, Pick); 3] = [
        ("update answered", |s| s.updated),
        ("nudge received", |s| s.nudged),
        ("re-listed", |s| s.listed),
    ];
    for (name, pick) in measures {
        let (d50, d99, dmax) = percentiles(dory.samples.iter().map(pick).collect());
        let (r50, r99, rmax) = percentiles(raw.samples.iter().map(pick).collect());
        println!(
            "notify {name}: dory p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
             raw sqlx p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; \
             ratio p50 {:.3}, p99 {:.3} ({} updates per side, {ROWS} rows)",
            ms(d50),
            ms(d99),
            ms(dmax),
            ms(r50),
            ms(r99),
            ms(rmax),
            r50.as_secs_f64() / d50.as_secs_f64(),
            r99.as_secs_f64() / d99.as_secs_f64(),
            plan.updates,
        );
    }
    println!(
        "notify stray nudges found before an update: dory {}, raw {}",
        dory.stray, raw.stray
    );
}
