//! [`PgLeadership`]: leadership among orchestrator replicas through a Postgres advisory lock,
//! fenced by the term row.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{Error, Leadership, Result, Term};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::Mutex;

use crate::error::map_sqlx;
use crate::store::{PgStore, Shared, TARGET, dedicated};

/// How often a waiting participant tries the lock.
const DEFAULT_POLL: Duration = Duration::from_millis(100);

/// One participant in leadership over the schema of a [`PgStore`].
///
/// The lock is a session-level advisory lock (keyed by a hash of the schema name, so each
/// schema has its own leadership) held on a connection of its own, outside the pool: the lock
/// lives exactly as long as that session. Taking it is not enough to fence a deposed leader —
/// its session may die while it still has writes in flight — so every acquisition also
/// increments the `leadership` term row, and the store refuses orchestrator writes carrying
/// any other term.
///
/// The connection's `application_name` is `dory-leader <holder>`, so an operator can find
/// (and, to force a handover, terminate) the leader's session in `pg_stat_activity`.
pub struct PgLeadership {
    shared: Arc<Shared>,
    holder: String,
    key: i64,
    poll: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The session holding (or trying for) the lock.
    conn: Option<PgConnection>,
    /// The term this participant leads with, while it believes it leads.
    leading: Option<Term>,
    /// Set while a statement is on the wire: a future dropped mid-statement leaves it set, and
    /// the session, which may or may not have taken the lock, is thrown away before the next
    /// use, so an abandoned `acquire` can never hold the lock unknowingly.
    in_flight: bool,
}

impl State {
    /// Drops the session; the server releases its advisory lock when the session ends.
    fn discard(&mut self) {
        self.conn = None;
        self.leading = None;
        self.in_flight = false;
    }

    fn recover(&mut self) {
        if self.in_flight {
            self.discard();
        }
    }
}

impl PgLeadership {
    /// A participant competing for leadership over `store`'s schema; `holder` names it in the
    /// `leadership` row and in `pg_stat_activity` (e.g. host name and process id).
    pub fn new(store: &PgStore, holder: impl Into<String>) -> Self {
        let shared = store.shared().clone();
        let key = lock_key(&shared.schema);
        PgLeadership {
            shared,
            holder: holder.into(),
            key,
            poll: DEFAULT_POLL,
            state: Mutex::new(State::default()),
        }
    }

    /// The same participant polling the lock every `poll` while it waits (default 100 ms;
    /// at least 1 ms, so a waiter never spins on the database).
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// The name this participant is known by.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The `application_name` of this participant's lock session.
    pub fn application_name(&self) -> String {
        format!("dory-leader {}", self.holder)
    }

    fn not_current(&self, term: Term, why: impl std::fmt::Display) -> Error {
        Error::fenced(format!(
            "leadership term {term} of {} in schema {}: {why}",
            self.holder, self.shared.schema
        ))
    }
}

impl std::fmt::Debug for PgLeadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLeadership")
            .field("holder", &self.holder)
            .field("schema", &self.shared.schema)
            .field("key", &self.key)
            .finish()
    }
}

/// A stable 64-bit key for the advisory lock of `schema`: FNV-1a, written out so the key
/// never changes with a library version (every replica, old or new, must compute the same).
fn lock_key(schema: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"dory-leadership:".iter().chain(schema.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn acquire(&self) -> Result<Term> {
        let what = format!("leadership acquire by {}", self.holder);
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        st.recover();
        if let (Some(term), Some(conn)) = (st.leading, st.conn.as_mut()) {
            // Already leading: hand the term back if it is still current.
            st.in_flight = true;
            let current = current_term(conn).await;
            st.in_flight = false;
            match current {
                Ok(t) if t == term => return Ok(term),
                _ => st.discard(),
            }
        }
        loop {
            let conn = match st.conn.as_mut() {
                Some(conn) => conn,
                None => {
                    let conn = dedicated(&self.shared, &self.application_name())
                        .await
                        .map_err(|e| map_sqlx(&e).context(&what))?;
                    st.conn.insert(conn)
                }
            };
            st.in_flight = true;
            let got: std::result::Result<bool, _> =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(self.key)
                    .fetch_one(&mut *conn)
                    .await;
            match got {
                Err(e) => {
                    st.discard();
                    return Err(map_sqlx(&e).context(&what));
                }
                Ok(false) => st.in_flight = false,
                Ok(true) => {
                    // One statement, so one transaction: the increment waits for orchestrator
                    // writes holding the row FOR SHARE, and every write after it sees the
                    // new term.
                    let term: std::result::Result<i64, _> = sqlx::query_scalar(
                        "UPDATE leadership SET term = term + 1, holder = $1, since = now() \
                         WHERE id = 1 RETURNING term",
                    )
                    .bind(&self.holder)
                    .fetch_one(&mut *conn)
                    .await;
                    let term = term.map_err(|e| map_sqlx(&e).context(&what)).and_then(|t| {
                        u64::try_from(t)
                            .map(Term)
                            .map_err(|_| Error::invalid(format!("{what}: negative term {t}")))
                    });
                    match term {
                        Ok(term) => {
                            st.in_flight = false;
                            st.leading = Some(term);
                            tracing::info!(target: TARGET, holder = %self.holder, schema = %self.shared.schema, %term, "leadership acquired");
                            return Ok(term);
                        }
                        Err(e) => {
                            // Holding the lock without a term would block everyone: end the
                            // session, which releases it.
                            st.discard();
                            return Err(e);
                        }
                    }
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn check(&self, term: Term) -> Result<()> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        st.recover();
        if st.leading != Some(term) {
            return Err(self.not_current(term, "this participant does not lead with it"));
        }
        let Some(conn) = st.conn.as_mut() else {
            st.discard();
            return Err(self.not_current(term, "the lock session is gone"));
        };
        st.in_flight = true;
        let current = current_term(conn).await;
        st.in_flight = false;
        match current {
            Ok(t) if t == term => Ok(()),
            Ok(t) => {
                st.discard();
                Err(self.not_current(term, format!("{t} is current")))
            }
            Err(e) => {
                // Whatever failed, the lock can no longer be vouched for; a lost session has
                // lost it. Ending the session makes sure.
                st.discard();
                tracing::warn!(target: TARGET, holder = %self.holder, %term, error = %e, "leadership lost");
                Err(self.not_current(term, format!("the lock session failed: {e}")))
            }
        }
    }

    async fn resign(&self, term: Term) -> Result<()> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        st.recover();
        // Resigning a term this participant does not hold is a no-op: a late resign must
        // never depose the next leader (and cannot: the lock is per session).
        if st.leading != Some(term) {
            return Ok(());
        }
        if let Some(mut conn) = st.conn.take() {
            // Unlock first so the next leader need not wait for the session to end; if the
            // session is already gone, so is the lock.
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
        st.discard();
        tracing::info!(target: TARGET, holder = %self.holder, %term, "leadership resigned");
        Ok(())
    }
}

async fn current_term(conn: &mut PgConnection) -> std::result::Result<Term, sqlx::Error> {
    let t: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1")
        .fetch_one(conn)
        .await?;
    Ok(Term(u64::try_from(t).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::lock_key;

    #[test]
    fn lock_keys_are_stable_and_per_schema() {
        assert_eq!(lock_key("dory"), lock_key("dory"));
        assert_ne!(lock_key("dory"), lock_key("dory2"));
    }
}
