//! [`PgConfigSource`]: the desired processors and operator intents in Postgres, with change
//! nudges through `LISTEN`/`NOTIFY`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{
    ChangeNotifier, Changes, ConfigSource, DesiredState, Error, Intent, InvalidEntry, NodeId,
    ProcessorId, ProcessorSpec, RecordedIntents, Result, SpecError,
};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::oneshot;

use crate::error::{map_sqlx, sql};
use crate::store::{PgStore, Shared, TARGET, logged, prepare};

/// The wait before reconnecting a listener whose connection was lost; it doubles after each
/// failed attempt, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long the listening session may stay quiet before the task checks it is still alive.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The longest Postgres identifier, and so channel name, in bytes.
const MAX_IDENTIFIER: usize = 63;

/// A [`ConfigSource`] in Postgres: one row per processor in `processors`, operator intents in
/// `intents`, and a nudge on every change through `NOTIFY`.
///
/// A row's `id` column is its processor id and its `spec` column (`jsonb`) the other
/// [`ProcessorSpec`] fields as serde JSON, missing ones taking their defaults:
///
/// ```sql
/// INSERT INTO processors (id, spec) VALUES
///     ('counter', '{"workload": {"image": "counter:1"}, "site": "edge"}');
/// ```
///
/// A row that does not parse or validate is listed in [`DesiredState::invalid`] with an error
/// naming the row and the field; the other rows are unaffected. Pins recorded through
/// [`record_intent`](ConfigSource::record_intent) (kept in `intents`) override a `pin` written
/// into a row's spec; an unpin removes only the recorded pin.
///
/// Triggers on both tables `NOTIFY` the channel [`channel`](PgConfigSource::channel). A
/// background task `LISTEN`s there on a connection of its own, started before
/// [`new`](PgConfigSource::new) returns, so no change made after that is missed. When that
/// connection is lost, the task reconnects with backoff and then nudges every subscriber, who
/// re-lists and so sees whatever changed while nobody listened. A session quiet for 30 s is
/// checked with a query, so a connection cut without a reset is noticed too. The task stops
/// when the source is dropped.
pub struct PgConfigSource {
    pool: PgPool,
    schema: String,
    channel: String,
    application_name: String,
    notifier: Arc<ChangeNotifier>,
    /// Dropping the source drops this sender, which tells the listener task to stop.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for PgConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfigSource")
            .field("schema", &self.schema)
            .field("channel", &self.channel)
            .finish()
    }
}

/// The notification channel of `schema`, cut like the migration's trigger cuts it.
fn channel_of(schema: &str) -> String {
    let mut channel = format!("dory_config_{schema}");
    // Schema names are validated ASCII, so any byte is a character boundary.
    channel.truncate(MAX_IDENTIFIER);
    channel
}

impl PgConfigSource {
    /// A config source over `store`'s schema, sharing its connection pool. The change
    /// listener is connected and listening when this returns.
    ///
    /// Fails ([`Error::Unavailable`] when the database cannot be reached) if the listening
    /// session cannot be opened. Must be called inside a tokio runtime: the listener runs as a
    /// task on it.
    pub async fn new(store: &PgStore) -> Result<PgConfigSource> {
        let shared = store.shared().clone();
        let channel = channel_of(&shared.schema);
        let mut name = format!("dory-config {}", shared.schema);
        // Postgres keeps only the first 63 bytes of an application name.
        name.truncate(MAX_IDENTIFIER);
        let listener = Listener {
            shared: shared.clone(),
            channel: channel.clone(),
            application_name: name.clone(),
        };
        let (pool, session) = listener.connect().await?;
        let notifier = Arc::new(ChangeNotifier::new());
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(listener.run(pool, session, notifier.clone(), stopped));
        tracing::info!(target: TARGET, schema = %shared.schema, %channel, "config source listening");
        Ok(PgConfigSource {
            pool: store.pool().clone(),
            schema: shared.schema.clone(),
            channel,
            application_name: name,
            notifier,
            _stop: stop,
        })
    }

    /// The channel the triggers notify: `dory_config_<schema>`, cut to 63 bytes.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The `application_name` of the listening connection (`dory-config <schema>`, cut to 63
    /// bytes), to find it in `pg_stat_activity`.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }
}

/// The listener task's settings.
struct Listener {
    shared: Arc<Shared>,
    channel: String,
    application_name: String,
}

impl Listener {
    /// Opens a listening session: a one-connection pool of its own (sqlx's listener takes its
    /// connection from a pool), `LISTEN`ing on the channel.
    async fn connect(&self) -> Result<(PgPool, PgListener)> {
        let what = format!("listen on {}", self.channel);
        let schema = self.shared.schema.clone();
        let timeout = self.shared.statement_timeout;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.shared.connect_timeout)
            // The session lives as long as it works; the pool must never retire it.
            .max_lifetime(None)
            .idle_timeout(None)
            .after_connect(move |conn, _meta| {
                let schema = schema.clone();
                Box::pin(async move { prepare(conn, &schema, timeout).await })
            })
            .connect_with(
                self.shared
                    .options
                    .clone()
                    .application_name(&self.application_name),
            )
            .await
            .map_err(sql(&what))?;
        let mut session = match PgListener::connect_with(&pool).await {
            Ok(session) => session,
            Err(e) => {
                pool.close().await;
                return Err(map_sqlx(&e).context(&what));
            }
        };
        // sqlx would reconnect inside `try_recv` before reporting the loss; this task
        // reconnects itself (with backoff), so it learns of every loss and nudges after it.
        session.eager_reconnect(false);
        if let Err(e) = session.listen(&self.channel).await {
            drop(session);
            pool.close().await;
            return Err(map_sqlx(&e).context(&what));
        }
        Ok((pool, session))
    }

    /// Forwards notifications as nudges until `stop` fires; reconnects a lost session with
    /// backoff and nudges once it listens again.
    ///
    /// `try_recv`, not `recv`: `recv` reconnects silently, losing whatever was notified
    /// while the connection was down; `try_recv` reports the loss as `Ok(None)`.
    async fn run(
        self,
        pool: PgPool,
        session: PgListener,
        notifier: Arc<ChangeNotifier>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut current = Some((pool, session));
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (pool, mut session) = match current.take() {
                Some(live) => live,
                None => {
                    // Wait before every attempt, the first included: a session that was just
                    // cut is often cut because the server is restarting or shedding load.
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    let connected = tokio::select! {
                        _ = &mut stop => return,
                        connected = self.connect() => connected,
                    };
                    match connected {
                        Ok(live) => {
                            tracing::info!(target: TARGET, channel = %self.channel, "config listener reconnected");
                            backoff = FIRST_BACKOFF;
                            // Whatever changed while nobody listened was notified to nobody:
                            // subscribers must re-list.
                            notifier.notify();
                            live
                        }
                        Err(e) => {
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            tracing::warn!(target: TARGET, channel = %self.channel, error = %e, retry_in = ?backoff, "config listener cannot reconnect");
                            continue;
                        }
                    }
                }
            };
            loop {
                let received = tokio::select! {
                    _ = &mut stop => {
                        drop(session);
                        pool.close().await;
                        return;
                    }
                    received = session.try_recv() => received,
                    _ = tokio::time::sleep(KEEPALIVE) => {
                        // A quiet session may be half-open (a cut without a reset leaves
                        // `try_recv` waiting for ever): ask the server, with a deadline.
                        // Notifications arriving meanwhile are buffered, not lost.
                        let ping = sqlx::query("SELECT 1").execute(&mut session);
                        match tokio::time::timeout(self.shared.connect_timeout, ping).await {
                            Ok(Ok(_)) => continue,
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer to the keepalive query",
                            ))),
                        }
                    }
                };
                match received {
                    Ok(Some(_)) => notifier.notify(),
                    Ok(None) => {
                        tracing::warn!(target: TARGET, channel = %self.channel, "config listener lost its connection");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(target: TARGET, channel = %self.channel, error = %e, "config listener failed");
                        break;
                    }
                }
            }
            // The session is dead: drop it and its pool without waiting on them (closing
            // would wait for a connection that may never answer), then reconnect.
            drop(session);
            drop(pool);
        }
    }
}

/// A `processors` row turned into a spec, or the reason it cannot be one.
fn parse_row(
    id: &str,
    spec: &str,
    pin: Option<&NodeId>,
) -> std::result::Result<ProcessorSpec, String> {
    let row = format!("processors row {id:?}");
    let pid = ProcessorId::new(id).map_err(|e| format!("{row}: {}", e.reason()))?;
    let value: serde_json::Value =
        serde_json::from_str(spec).map_err(|e| format!("{row}: field `spec` is not JSON: {e}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(format!("{row}: field `spec` must be a JSON object"));
    };
    // The id column is the id; one repeated inside the spec is not consulted.
    ProcessorSpec::from_fields(&pid, fields, pin).map_err(|e| match e {
        SpecError::Field {
            name: Some(name),
            message,
        } => format!("{row}: field `{name}`: {message}"),
        SpecError::Field {
            name: None,
            message,
        } => format!("{row}: field `spec`: {message}"),
        SpecError::Invalid(why) => format!("{row}: {why}"),
    })
}

#[async_trait]
impl ConfigSource for PgConfigSource {
    async fn desired(&self) -> Result<DesiredState> {
        logged("desired", async {
            let what = "desired";
            // One snapshot for both tables, so pins and processors agree.
            let mut tx = self
                .pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(sql(what))?;
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT id, spec::text FROM processors ORDER BY id COLLATE \"C\"")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(sql(what))?;
            let intents: Vec<(String, String, Option<String>)> =
                sqlx::query_as("SELECT kind, subject, node FROM intents")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(sql(what))?;
            tx.commit().await.map_err(sql(what))?;

            let RecordedIntents { pins, cordoned } = intents.into_iter().collect();
            let mut desired = DesiredState {
                cordoned,
                ..DesiredState::default()
            };
            for (id, spec) in rows {
                match parse_row(&id, &spec, pins.get(&id)) {
                    Ok(spec) => desired.processors.push(spec),
                    Err(error) => desired.invalid.push(InvalidEntry { id, error }),
                }
            }
            Ok(desired)
        })
        .await
    }

    fn changes(&self) -> Changes {
        self.notifier.subscribe()
    }

    async fn record_intent(&self, intent: &Intent) -> Result<()> {
        let what = format!("record_intent {intent:?}");
        logged(&what, async {
            intent.check(&what)?;
            match intent {
                Intent::Pin {
                    processor,
                    node: Some(node),
                } => {
                    // Only a listed processor can be pinned; checked in the same statement.
                    let written = sqlx::query(
                        "INSERT INTO intents (kind, subject, node) \
                         SELECT 'pin', $1, $2 WHERE EXISTS (SELECT 1 FROM processors WHERE id = $1) \
                         ON CONFLICT (kind, subject) \
                         DO UPDATE SET node = excluded.node, recorded_at = now()",
                    )
                    .bind(processor.as_str())
                    .bind(node.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(sql(&what))?;
                    if written.rows_affected() == 0 {
                        return Err(Error::not_found(format!(
                            "{what}: processor {processor} is not in the processors table"
                        )));
                    }
                }
                Intent::Pin {
                    processor,
                    node: None,
                } => {
                    // A stale pin of a removed processor can still be cleared.
                    let (deleted, exists): (i64, bool) = sqlx::query_as(
                        "WITH gone AS (DELETE FROM intents WHERE kind = 'pin' AND subject = $1 RETURNING 1) \
                         SELECT (SELECT count(*) FROM gone), \
                                EXISTS (SELECT 1 FROM processors WHERE id = $1)",
                    )
                    .bind(processor.as_str())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(sql(&what))?;
                    if deleted == 0 && !exists {
                        return Err(Error::not_found(format!(
                            "{what}: processor {processor} is not in the processors table"
                        )));
                    }
                }
                Intent::Cordon { node } => {
                    sqlx::query(
                        "INSERT INTO intents (kind, subject) VALUES ('cordon', $1) \
                         ON CONFLICT (kind, subject) DO NOTHING",
                    )
                    .bind(node.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(sql(&what))?;
                }
                Intent::Uncordon { node } => {
                    sqlx::query("DELETE FROM intents WHERE kind = 'cordon' AND subject = $1")
                        .bind(node.as_str())
                        .execute(&self.pool)
                        .await
                        .map_err(sql(&what))?;
                }
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_or_name_the_field() {
        let spec = parse_row("counter", r#"{"site": "edge", "id": "ignored"}"#, None)
            .expect("a good row parses");
        assert_eq!(spec.id.as_str(), "counter");
        let pinned = parse_row("counter", "{}", Some(&NodeId::new("n1"))).expect("pinned");
        assert_eq!(pinned.pin, Some(NodeId::new("n1")));
        for (id, spec, field) in [
            ("Bad_Id", "{}", "field `id`"),
            ("counter", r#"{"fallback": "yes"}"#, "field `fallback`"),
            (
                "counter",
                r#"{"checkpoint_interval": 0}"#,
                "field `checkpoint_interval`",
            ),
            ("counter", "[]", "field `spec`"),
        ] {
            let err = parse_row(id, spec, None).expect_err(spec);
            assert!(err.contains(field), "{err}");
            assert!(err.contains(&format!("processors row {id:?}")), "{err}");
        }
    }

    #[test]
    fn channels_fit_an_identifier() {
        assert_eq!(channel_of("dory"), "dory_config_dory");
        assert_eq!(channel_of(&"s".repeat(63)).len(), MAX_IDENTIFIER);
    }
}
