//! This crate's setup errors, and the mapping of SQLite and I/O errors to Dory's meanings.

use std::path::PathBuf;

use dory_core::Error as CoreError;
use dory_core::error::Meaning;

/// What can go wrong while opening an embedded backend.
///
/// Failures of individual operations are [`dory_core::Error`]s; this type is only for
/// [`EmbeddedDb::open`](crate::EmbeddedDb::open), [`FileConfig::open`](crate::FileConfig::open)
/// and [`FilePublisher::open`](crate::FilePublisher::open), and converts into a
/// [`dory_core::Error`] for callers that only deal in those.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database file could not be opened or created (a missing directory, no permission,
    /// not a SQLite file, locked beyond the busy timeout).
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// SQLite would not put the database in WAL mode (it kept `mode`): the file system gives
    /// no shared memory, as on some network file systems. Readers would wait for writers and
    /// concurrent processes could fail at once, so the file is not used.
    #[error("cannot put the database {path} in WAL mode (SQLite kept journal mode {mode:?})")]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// Applying the migrations failed (or the file was written by a newer release).
    #[error("migrating the database {path} to schema version {version} failed: {source}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The schema version being applied (or found, for a file from a newer release).
        version: i64,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A file or directory could not be read, created or watched.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done (`read the processors file`, `create the output directory`).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The processors file's directory could not be watched.
    #[error("cannot watch {path} for changes: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: notify::Error,
    },
    /// A background task could not be started: there is no tokio runtime to run it on.
    #[error("{what} must be called inside a tokio runtime")]
    NoRuntime {
        /// The function called.
        what: &'static str,
    },
}

impl Error {
    /// Whether trying again later may succeed (the file was locked or busy, or an I/O error
    /// that may pass).
    pub fn is_unavailable(&self) -> bool {
        self.meaning() == Meaning::Unavailable
    }

    /// Which [`dory_core::Error`] variant this error means.
    fn meaning(&self) -> Meaning {
        match self {
            Error::Open { source, .. } => map_sqlx(source).meaning(),
            Error::Migrate {
                source: sqlx::Error::Protocol(_),
                ..
            } => Meaning::Invalid,
            Error::Migrate { source, .. } => map_sqlx(source).meaning(),
            Error::NoWal { .. } => Meaning::Invalid,
            Error::Io { source, .. } => map_io(source).meaning(),
            Error::Watch { .. } => Meaning::Unavailable,
            Error::NoRuntime { .. } => Meaning::Invalid,
        }
    }
}

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        e.meaning().error(format!("embedded setup: {e}"))
    }
}

/// SQLite's primary result codes that mean "try again": busy or locked beyond the busy
/// timeout, an I/O error, a full disk, a file that cannot be opened, a lock protocol error.
const RETRYABLE_CODES: [i64; 6] = [
    5,  // SQLITE_BUSY
    6,  // SQLITE_LOCKED
    10, // SQLITE_IOERR
    13, // SQLITE_FULL
    14, // SQLITE_CANTOPEN
    15, // SQLITE_PROTOCOL
];

/// Maps a sqlx error to Dory's meaning: what the executor needs to choose between retrying
/// and giving up. Add the operation with [`CoreError::context`].
pub(crate) fn map_sqlx(e: &sqlx::Error) -> CoreError {
    let msg = e.to_string();
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => CoreError::unavailable(msg),
        sqlx::Error::RowNotFound => CoreError::not_found(msg),
        sqlx::Error::Database(db) => {
            if db.is_unique_violation() {
                // A concurrent writer won; re-read and decide again.
                return CoreError::conflict(msg);
            }
            // sqlx reports SQLite's extended result code; its low byte is the primary code.
            let code: i64 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
            if RETRYABLE_CODES.contains(&(code & 0xff)) {
                CoreError::unavailable(msg)
            } else {
                CoreError::invalid(msg)
            }
        }
        _ => CoreError::invalid(msg),
    }
}

/// Maps an I/O error to Dory's meaning: a missing file is not found, a bad path or a
/// permission problem is invalid (trying again will not help), the rest may pass.
pub(crate) fn map_io(e: &std::io::Error) -> CoreError {
    use std::io::ErrorKind;
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::NotFound => CoreError::not_found(msg),
        ErrorKind::PermissionDenied
        | ErrorKind::InvalidInput
        | ErrorKind::InvalidData
        | ErrorKind::IsADirectory
        | ErrorKind::NotADirectory
        | ErrorKind::ReadOnlyFilesystem => CoreError::invalid(msg),
        _ => CoreError::unavailable(msg),
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
        let missing = Error::Io {
            what: "read the processors file",
            path: "/nowhere/dory.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(!missing.is_unavailable());
        let core = CoreError::from(missing);
        assert!(matches!(core, CoreError::NotFound(_)), "{core}");
        assert!(core.to_string().contains("/nowhere/dory.toml"), "{core}");
        let busy = Error::Open {
            path: "x.db".into(),
            source: sqlx::Error::PoolTimedOut,
        };
        assert!(busy.is_unavailable());
        assert!(CoreError::from(busy).is_retryable());
        let no_rt = CoreError::from(Error::NoRuntime {
            what: "FileConfig::open",
        });
        assert!(matches!(no_rt, CoreError::Invalid(_)), "{no_rt}");
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
