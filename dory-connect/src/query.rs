//! Dory's own settings carried as query parameters of a backend URL, taken out before the URL
//! reaches the driver.

use crate::error::ConnectError;

/// The query parameters a driver reads itself: they stay in the URL, as written.
pub(crate) struct Driver {
    /// The driver's name, for error messages.
    pub(crate) name: &'static str,
    /// The parameters it reads.
    pub(crate) params: &'static [&'static str],
    /// Parameters whose names start with one of these are the driver's too (`options[…]`).
    pub(crate) prefixes: &'static [&'static str],
}

impl Driver {
    fn reads(&self, name: &str) -> bool {
        self.params.contains(&name) || self.prefixes.iter().any(|p| name.starts_with(p))
    }
}

/// What sqlx's `PgConnectOptions` reads from a URL's query (sqlx-postgres 0.9,
/// `options/parse.rs`). It ignores anything else with a warning, so a misspelt parameter
/// would be lost: this list lets `dory-connect` refuse it instead.
pub(crate) const SQLX: Driver = Driver {
    name: "the Postgres driver",
    params: &[
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
        "statement-cache-capacity",
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "application_name",
        "options",
    ],
    prefixes: &["options["],
};

/// What lapin's `AMQPUri` reads from a URL's query (amq-protocol-uri 10). It ignores anything
/// else without a word, so a misspelt parameter would be lost: this list lets `dory-connect`
/// refuse it instead.
pub(crate) const LAPIN: Driver = Driver {
    name: "the AMQP client",
    params: &[
        "heartbeat",
        "frame_max",
        "channel_max",
        "connection_timeout",
        "auth_mechanism",
    ],
    prefixes: &[],
};

/// A URL with Dory's parameters taken out.
#[derive(Debug)]
pub(crate) struct Split {
    /// The URL for the driver: as given, minus Dory's parameters.
    pub(crate) url: String,
    /// Dory's parameters, decoded.
    ours: Vec<(&'static str, String)>,
}

impl Split {
    /// The decoded value of Dory's parameter `name`, if the URL has it.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.ours
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The scheme of `url` (before `://`), lowercased; `None` when there is no `://`.
pub(crate) fn scheme(url: &str) -> Option<String> {
    let (scheme, _) = url.split_once("://")?;
    Some(scheme.to_ascii_lowercase())
}

/// Splits `url` (the value of `var`) into the driver's URL and Dory's parameters `ours`;
/// every other parameter must be one `driver` reads. Nothing of the URL appears in an error
/// but parameter names: the URL may hold a password (in its user part, or as a driver
/// parameter).
pub(crate) fn split(
    var: &'static str,
    url: &str,
    ours: &'static [&'static str],
    driver: &Driver,
) -> Result<Split, ConnectError> {
    let Some(authority_start) = url.find("://").map(|i| i + 3) else {
        return Err(ConnectError::BadUrl {
            var,
            reason: "it has no scheme (`scheme://…`)".into(),
        });
    };
    let rest = &url[authority_start..];
    let authority_end = authority_start + rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if url[authority_end..].contains('#') {
        // Everything after `#` is a fragment the drivers drop without a word: a parameter
        // there would be lost, and a `#` in a password cuts the URL short.
        return Err(ConnectError::BadUrl {
            var,
            reason: "it has a fragment (`#…`); write a `#` in a password or a parameter as `%23`"
                .into(),
        });
    }
    let Some(query_start) = url[authority_end..].find('?').map(|i| authority_end + i) else {
        return Ok(Split {
            url: url.to_string(),
            ours: Vec::new(),
        });
    };
    let base = &url[..query_start];
    let mut kept = Vec::new();
    let mut taken: Vec<(&'static str, String)> = Vec::new();
    for pair in url[query_start + 1..].split('&').filter(|p| !p.is_empty()) {
        let (name, value) = form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        if let Some(&known) = ours.iter().find(|&&o| o == name) {
            if taken.iter().any(|(n, _)| *n == known) {
                return Err(ConnectError::DuplicateParameter { var, name: known });
            }
            taken.push((known, value.into_owned()));
        } else if driver.reads(&name) {
            kept.push(pair);
        } else if !plain(&name) {
            // Not a name: most likely a piece of a password whose `?` started the query early.
            // It is not shown.
            return Err(ConnectError::BadUrl {
                var,
                reason: "its query has a parameter name that is not plain text (write a `?` in \
                         a password as `%3F`)"
                    .into(),
            });
        } else {
            return Err(ConnectError::UnknownParameter {
                var,
                name: name.into_owned(),
                known: format!(
                    "Dory reads {}; {} reads {}",
                    ours.join(", "),
                    driver.name,
                    driver.params.join(", ")
                ),
            });
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Split { url, ours: taken })
}

/// Whether `name` looks like a parameter name, so that an error may show it.
fn plain(name: &str) -> bool {
    name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.[]".contains(c))
}

/// The value of `name` in `url`'s query, decoded, if it has one.
pub(crate) fn param(url: &str, name: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAR: &str = "DORY_TEST_URL";

    #[test]
    fn takes_ours_out_and_keeps_the_drivers_as_written() {
        let s = split(
            VAR,
            "amqp://u:p@h/%2f?heartbeat=5&queue=a%2Fb&frame_max=4096",
            &["queue"],
            &LAPIN,
        )
        .unwrap();
        assert_eq!(s.url, "amqp://u:p@h/%2f?heartbeat=5&frame_max=4096");
        assert_eq!(s.get("queue"), Some("a/b"), "values are percent-decoded");
        let s = split(VAR, "amqp://h/%2f?queue=q", &["queue"], &LAPIN).unwrap();
        assert_eq!(s.url, "amqp://h/%2f");
        let s = split(VAR, "amqp://h?queue=q&&", &["queue"], &LAPIN).unwrap();
        assert_eq!((s.url.as_str(), s.get("queue")), ("amqp://h", Some("q")));
        let s = split(VAR, "amqp://h/%2f", &["queue"], &LAPIN).unwrap();
        assert_eq!((s.url.as_str(), s.get("queue")), ("amqp://h/%2f", None));
        let s = split(
            VAR,
            "postgres://u@h/db?options[search_path]=x&sslmode=disable",
            &["schema"],
            &SQLX,
        )
        .unwrap();
        assert_eq!(
            s.url,
            "postgres://u@h/db?options[search_path]=x&sslmode=disable"
        );
    }

    #[test]
    fn refuses_unknown_duplicate_and_fragment() {
        let e = split(VAR, "amqp://h/%2f?qeueu=x", &["queue"], &LAPIN).unwrap_err();
        assert!(
            matches!(&e, ConnectError::UnknownParameter { name, .. } if name == "qeueu"),
            "{e}"
        );
        let e = split(VAR, "amqp://h/%2f?queue=a&queue=b", &["queue"], &LAPIN).unwrap_err();
        assert!(
            matches!(e, ConnectError::DuplicateParameter { name: "queue", .. }),
            "{e}"
        );
        let e = split(VAR, "amqp://u:se#cret@h/%2f", &["queue"], &LAPIN).unwrap_err();
        assert!(matches!(e, ConnectError::BadUrl { .. }), "{e}");
        assert!(!e.to_string().contains("cret"), "{e}");
        let e = split(VAR, "amqp://u:pa?ss@h/%2f", &["queue"], &LAPIN).unwrap_err();
        assert!(matches!(e, ConnectError::BadUrl { .. }), "{e}");
        assert!(!e.to_string().contains("ss@h"), "{e}");
        let e = split(VAR, "no scheme", &["queue"], &LAPIN).unwrap_err();
        assert!(matches!(e, ConnectError::BadUrl { .. }), "{e}");
    }
}
