//! [`EmbeddedLeadership`]: leadership among orchestrators on one machine through an exclusive
//! lock on a file beside the database, fenced by the term row.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{Error, Leadership, Result, Term};
use tokio::sync::Mutex;

use crate::db::{EmbeddedDb, TARGET, now_ms};
use crate::error::{map_io, sql};

/// How often a waiting participant tries the lock.
const DEFAULT_POLL: Duration = Duration::from_millis(100);

/// One participant in leadership over an [`EmbeddedDb`].
///
/// The lock is an exclusive `flock` on [`EmbeddedDb::leader_lock_path`]
/// (`<database>-leader.lock`), taken on a file handle of this participant's own and held for
/// as long as it leads: the kernel releases it when the handle is closed, so a leader process
/// that dies (or is killed) frees it at once. Taking it is not enough to fence a deposed
/// leader — the lock file may be deleted and recreated by hand, or a late write may still be
/// in flight — so every acquisition also increments the `leadership` term row, and the store
/// refuses orchestrator writes carrying any other term.
///
/// `flock` locks belong to the open file, not the process: two participants in one process
/// exclude each other like two processes do.
pub struct EmbeddedLeadership {
    db: EmbeddedDb,
    lock_path: PathBuf,
    holder: String,
    poll: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The locked file handle, while this participant leads; dropping it unlocks.
    lock: Option<File>,
    /// The term this participant leads with.
    leading: Option<Term>,
}

impl State {
    fn discard(&mut self) {
        self.lock = None;
        self.leading = None;
    }
}

impl std::fmt::Debug for EmbeddedLeadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLeadership")
            .field("holder", &self.holder)
            .field("lock_path", &self.lock_path)
            .finish()
    }
}

impl EmbeddedLeadership {
    /// A participant competing for leadership over `db`; `holder` names it in the
    /// `leadership` row (e.g. host name and process id).
    pub fn new(db: &EmbeddedDb, holder: impl Into<String>) -> Self {
        EmbeddedLeadership {
            db: db.clone(),
            lock_path: db.leader_lock_path(),
            holder: holder.into(),
            poll: DEFAULT_POLL,
            state: Mutex::new(State::default()),
        }
    }

    /// The same participant polling the lock every `poll` while it waits (default 100 ms; at
    /// least 1 ms).
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// The name this participant is known by.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn not_current(&self, term: Term, why: impl std::fmt::Display) -> Error {
        Error::fenced(format!(
            "leadership term {term} of {} on {}: {why}",
            self.holder,
            self.db.path().display()
        ))
    }

    /// Tries the lock once: the locked handle, or `None` while another participant holds it.
    fn try_lock(&self, what: &str) -> Result<Option<File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| {
                map_io(&e).context(format!("{what}: open {}", self.lock_path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => {
                Err(map_io(&e).context(format!("{what}: lock {}", self.lock_path.display())))
            }
        }
    }

    /// Increments the term row (a write transaction: it waits for orchestrator writes
    /// deciding under the old term, and every write after it sees the new one).
    async fn next_term(&self, what: &str) -> Result<Term> {
        let mut tx = self.db.begin_write(what).await?;
        let term: i64 = sqlx::query_scalar(
            "UPDATE leadership SET term = term + 1, holder = ?1, since = ?2 \
             WHERE id = 1 RETURNING term",
        )
        .bind(&self.holder)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(sql(what))?;
        tx.commit().await.map_err(sql(what))?;
        u64::try_from(term)
            .map(Term)
            .map_err(|_| Error::invalid(format!("{what}: negative term {term}")))
    }

    async fn current_term(&self, what: &str) -> Result<Term> {
        let t: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1")
            .fetch_one(self.db.pool())
            .await
            .map_err(sql(what))?;
        Ok(Term(u64::try_from(t).unwrap_or(0)))
    }
}

#[async_trait]
impl Leadership for EmbeddedLeadership {
    async fn acquire(&self) -> Result<Term> {
        let what = format!("leadership acquire by {}", self.holder);
        let mut st = self.state.lock().await;
        if let Some(term) = st.leading {
            // Already leading: hand the term back if it is still current.
            match self.current_term(&what).await {
                Ok(t) if t == term => return Ok(term),
                _ => st.discard(),
            }
        }
        loop {
            if let Some(file) = self.try_lock(&what)? {
                // Held in a local until the term is in: if this future is dropped meanwhile,
                // the handle is closed and the lock released, so an abandoned acquire never
                // holds the lock unknowingly.
                let term = self.next_term(&what).await?;
                st.lock = Some(file);
                st.leading = Some(term);
                tracing::info!(target: TARGET, holder = %self.holder, path = %self.lock_path.display(), %term, "leadership acquired");
                return Ok(term);
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn check(&self, term: Term) -> Result<()> {
        let mut st = self.state.lock().await;
        if st.leading != Some(term) || st.lock.is_none() {
            return Err(self.not_current(term, "this participant does not lead with it"));
        }
        match self.current_term("leadership check").await {
            Ok(t) if t == term => Ok(()),
            Ok(t) => {
                st.discard();
                tracing::warn!(target: TARGET, holder = %self.holder, %term, current = %t, "leadership lost");
                Err(self.not_current(term, format!("{t} is current")))
            }
            Err(e) => {
                // The term cannot be vouched for; giving the lock up lets a participant that
                // can reach the database lead.
                st.discard();
                tracing::warn!(target: TARGET, holder = %self.holder, %term, error = %e, "leadership lost");
                Err(self.not_current(term, format!("the term cannot be read: {e}")))
            }
        }
    }

    async fn resign(&self, term: Term) -> Result<()> {
        let mut st = self.state.lock().await;
        // Resigning a term this participant does not hold is a no-op: a late resign must never
        // depose the next leader.
        if st.leading != Some(term) {
            return Ok(());
        }
        // Closing the handle releases the lock.
        st.discard();
        tracing::info!(target: TARGET, holder = %self.holder, %term, "leadership resigned");
        Ok(())
    }
}
