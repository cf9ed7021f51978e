//! The error type every backend maps its failures to.
//!
//! The variants are meanings, not causes: the executor decides between retrying and giving up
//! from the variant alone, without knowing which backend produced it.

/// A `Result` with Dory's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A write was refused because the writer is no longer entitled to it: an epoch that does
    /// not own the processor, a sequence not above the stored one, or a leader term that is no
    /// longer current. Never retried: the writer must stop.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A concurrent change won (a compare-and-swap lost, a name already taken). Re-read and
    /// decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The backend could not be reached or did not answer in time. Retryable with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The input is malformed: a bad config entry, a corrupt snapshot, an oversized body.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// An [`Error`]'s meaning without its message: what a backend's own error type keeps of the
/// core error it was mapped from (its causes, such as a driver's error, are seldom `Clone`),
/// and turns back into an [`Error`] with its own message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Meaning {
    /// [`Error::Fenced`].
    Fenced,
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::Conflict`].
    Conflict,
    /// [`Error::Unavailable`].
    Unavailable,
    /// [`Error::Invalid`].
    Invalid,
}

impl Meaning {
    /// The error of this meaning with message `msg`.
    pub fn error(self, msg: impl Into<String>) -> Error {
        let msg = msg.into();
        match self {
            Meaning::Fenced => Error::Fenced(msg),
            Meaning::NotFound => Error::NotFound(msg),
            Meaning::Conflict => Error::Conflict(msg),
            Meaning::Unavailable => Error::Unavailable(msg),
            Meaning::Invalid => Error::Invalid(msg),
        }
    }
}

impl Error {
    /// What this error means, without its message.
    pub fn meaning(&self) -> Meaning {
        match self {
            Error::Fenced(_) => Meaning::Fenced,
            Error::NotFound(_) => Meaning::NotFound,
            Error::Conflict(_) => Meaning::Conflict,
            Error::Unavailable(_) => Meaning::Unavailable,
            Error::Invalid(_) => Meaning::Invalid,
        }
    }

    /// The message to put behind a place (`file:3:1: processor "a": …`): an
    /// [`Invalid`](Error::Invalid) error's message alone, since the place already says that
    /// something there is wrong; any other error whole, its meaning being news.
    pub fn reason(&self) -> String {
        match self {
            Error::Invalid(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// A [`Error::Fenced`] error.
    pub fn fenced(msg: impl Into<String>) -> Self {
        Error::Fenced(msg.into())
    }

    /// A [`Error::NotFound`] error.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }

    /// A [`Error::Conflict`] error.
    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }

    /// A [`Error::Unavailable`] error.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Error::Unavailable(msg.into())
    }

    /// A [`Error::Invalid`] error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Conflict(_))
    }

    /// Whether the writer has been fenced off.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced(_))
    }

    /// The same error with `context` (the operation that failed) put in front of its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            Error::Fenced(m) => Error::Fenced(wrap(m)),
            Error::NotFound(m) => Error::NotFound(wrap(m)),
            Error::Conflict(m) => Error::Conflict(wrap(m)),
            Error::Unavailable(m) => Error::Unavailable(wrap(m)),
            Error::Invalid(m) => Error::Invalid(wrap(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_meaning() {
        let e = Error::unavailable("connection refused").context("claim epoch for p");
        assert!(e.is_retryable());
        assert_eq!(
            e.to_string(),
            "unavailable: claim epoch for p: connection refused"
        );
        assert!(Error::fenced("x").is_fenced());
        assert!(!Error::invalid("x").is_retryable());
    }

    #[test]
    fn meanings_round_trip_and_reasons_drop_only_invalid() {
        for e in [
            Error::fenced("m"),
            Error::not_found("m"),
            Error::conflict("m"),
            Error::unavailable("m"),
            Error::invalid("m"),
        ] {
            assert_eq!(e.meaning().error("m"), e);
        }
        assert_eq!(Error::invalid("bad id").reason(), "bad id");
        assert_eq!(Error::conflict("taken").reason(), "conflict: taken");
    }
}
