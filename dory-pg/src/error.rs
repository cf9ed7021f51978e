//! This crate's setup errors, and the mapping of sqlx errors to Dory's meanings.

use dory_core::Error as CoreError;
use dory_core::error::Meaning;

/// What can go wrong while setting up a Postgres backend.
///
/// Failures of individual operations are [`dory_core::Error`]s; this type is only for
/// [`PgStore::connect`](crate::PgStore::connect) and friends, and converts into a
/// [`dory_core::Error`] for callers that only deal in those.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configured schema name is not a plain identifier.
    #[error("invalid schema name {schema:?}: {reason}")]
    InvalidSchema {
        /// The name as configured.
        schema: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection URL does not parse.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The database could not be reached (or refused the connection) within the timeout.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// The schema could not be created.
    #[error("cannot create schema {schema:?}: {source}")]
    CreateSchema {
        /// The schema.
        schema: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the migrations failed.
    #[error("migrating schema {schema:?} failed: {source}")]
    Migrate {
        /// The schema.
        schema: String,
        /// Why.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

impl Error {
    /// Whether trying again later may succeed (the database was unreachable or busy).
    pub fn is_unavailable(&self) -> bool {
        self.meaning() == Meaning::Unavailable
    }

    /// Which [`dory_core::Error`] variant this error means.
    fn meaning(&self) -> Meaning {
        match self {
            Error::InvalidSchema { .. } | Error::InvalidUrl(_) => Meaning::Invalid,
            Error::Connect(_) => Meaning::Unavailable,
            Error::CreateSchema { source, .. } => map_sqlx(source).meaning(),
            Error::Migrate { source, .. } => match source {
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => map_sqlx(e).meaning(),
                _ => Meaning::Invalid,
            },
        }
    }
}

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        e.meaning().error(format!("postgres setup: {e}"))
    }
}

/// Maps a sqlx error to Dory's meaning: what the executor needs to choose between retrying
/// and giving up. Add the operation with [`CoreError::context`].
pub(crate) fn map_sqlx(e: &sqlx::Error) -> CoreError {
    let msg = e.to_string();
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => CoreError::unavailable(msg),
        sqlx::Error::RowNotFound => CoreError::not_found(msg),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // serialization_failure, deadlock_detected, unique_violation: a concurrent
                // writer won; re-read and decide again.
                "40001" | "40P01" | "23505" => CoreError::conflict(msg),
                // query_canceled (statement timeout), lock_not_available, the server shutting
                // down or terminating the session, too many connections, out of resources.
                "57014" | "55P03" | "57P01" | "57P02" | "57P03" | "53300" => {
                    CoreError::unavailable(msg)
                }
                // Class 08 (connection exception) and 53 (insufficient resources).
                c if c.starts_with("08") || c.starts_with("53") => CoreError::unavailable(msg),
                _ => CoreError::invalid(msg),
            }
        }
        _ => CoreError::invalid(msg),
    }
}

/// `map_err` helper: maps a sqlx error and names the operation, e.g.
/// `.map_err(sql("put_checkpoint of p e3 #4"))`.
pub(crate) fn sql(what: &str) -> impl FnOnce(sqlx::Error) -> CoreError + '_ {
    move |e| map_sqlx(&e).context(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_keep_their_meaning() {
        let bad = Error::InvalidSchema {
            schema: "X".into(),
            reason: "uppercase".into(),
        };
        assert!(!bad.is_unavailable());
        assert!(matches!(CoreError::from(bad), CoreError::Invalid(_)));
        let down = Error::Connect(sqlx::Error::PoolTimedOut);
        assert!(down.is_unavailable());
        let core = CoreError::from(down);
        assert!(core.is_retryable(), "{core}");
    }

    #[test]
    fn sqlx_errors_map_by_meaning() {
        assert!(matches!(
            map_sqlx(&sqlx::Error::PoolTimedOut),
            CoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_sqlx(&sqlx::Error::RowNotFound),
            CoreError::NotFound(_)
        ));
        let e = sql("claim_epoch of p")(sqlx::Error::PoolClosed);
        assert!(e.to_string().contains("claim_epoch of p"), "{e}");
    }
}
