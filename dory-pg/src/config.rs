//! [`PgConfig`]: where the database is and how to talk to it.

use std::fmt;
use std::time::Duration;

use crate::error::Error;

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "dory";

/// Connection settings of the Postgres backends.
///
/// TLS is chosen by the URL's `sslmode` parameter (`disable`, `prefer`, `require`,
/// `verify-ca`, `verify-full`), as with `psql`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgConfig {
    /// The connection URL, e.g. `postgres://dory@db.internal:5432/dory?sslmode=verify-full`.
    pub url: String,
    /// The schema holding Dory's tables (and sqlx's migrations table); created if missing.
    /// A plain lowercase identifier, so each deployment (or test) can have its own.
    pub schema: String,
    /// The most connections the store's pool opens.
    pub pool_size: u32,
    /// The longest any one statement may run before the server cancels it (`0` for none).
    pub statement_timeout: Duration,
    /// How long to wait for a connection (new or from the pool) before giving up.
    pub connect_timeout: Duration,
}

impl PgConfig {
    /// Settings for `url` with the defaults: schema `dory`, 10 connections, a 10 s statement
    /// timeout and a 5 s connect timeout.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_string(),
            pool_size: 10,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The same settings in another schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The same settings with another pool size (at least 1).
    pub fn with_pool_size(mut self, pool_size: u32) -> Self {
        self.pool_size = pool_size.max(1);
        self
    }

    /// The same settings with another statement timeout.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The same settings with another connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

impl fmt::Debug for PgConfig {
    // The URL may carry a password; it must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `url` with the password of its user info, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Checks that `schema` is a plain identifier: it is spliced into `CREATE SCHEMA` and
/// `search_path`, where binds are not allowed, so only names that need no quoting pass.
pub(crate) fn validate_schema(schema: &str) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::InvalidSchema {
            schema: schema.to_string(),
            reason: reason.to_string(),
        })
    };
    let Some(first) = schema.chars().next() else {
        return bad("must not be empty");
    };
    if schema.len() > 63 {
        return bad("is longer than 63 bytes, the longest Postgres identifier");
    }
    if !(first.is_ascii_lowercase() || first == '_') {
        return bad("must start with a lowercase letter or '_'");
    }
    if !schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return bad("may only contain lowercase letters, digits and '_'");
    }
    if schema.starts_with("pg_") {
        return bad("names starting with 'pg_' are reserved for the system");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["dory", "_x", "dory_test_1"] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Dory",
            "1x",
            "a-b",
            "a\"b",
            "pg_x",
            "x; DROP",
            &"a".repeat(64),
        ] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let c = PgConfig::new("postgres://u:secret@h:5432/db?sslmode=require");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("postgres://u:***@h:5432/db"), "{shown}");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("not a url"), "not a url");
    }
}
