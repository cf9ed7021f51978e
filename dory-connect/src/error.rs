//! [`ConnectError`]: why an instance's backends could not be wired from its environment.

/// Why an instance's backends could not be wired from its environment. Every variant names
/// the variable at fault (`DORY_STORE_URL`, `DORY_PUBLISHER_URL`, `DORY_INPUT_URL`), and no
/// message carries a URL, so a password in one never reaches an error or a log line; the
/// backends' own errors show URLs without their password (a local-file backend's error names
/// its path, which holds no secret).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A variable the instance needs is not set.
    #[error("{var} is not set: {why}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// What it is needed for.
        why: &'static str,
    },
    /// The URL's scheme names a backend this crate does not connect.
    #[error("{var}: unsupported scheme {scheme:?}; supported: {supported}")]
    UnsupportedScheme {
        /// The variable.
        var: &'static str,
        /// The scheme, as given.
        scheme: String,
        /// The schemes that are supported.
        supported: &'static str,
    },
    /// The URL does not parse.
    #[error("{var} is not a valid URL: {reason}")]
    BadUrl {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A query parameter that neither Dory nor the driver reads: a misspelt one would
    /// otherwise be ignored without a word.
    #[error("{var}: unknown query parameter {name:?} ({known})")]
    UnknownParameter {
        /// The variable.
        var: &'static str,
        /// The parameter's name.
        name: String,
        /// Which parameters are read, in words.
        known: String,
    },
    /// One of Dory's query parameters is given twice.
    #[error("{var}: query parameter {name} is given twice")]
    DuplicateParameter {
        /// The variable.
        var: &'static str,
        /// The parameter.
        name: &'static str,
    },
    /// A query parameter Dory needs is missing (or empty).
    #[error("{var}: query parameter {name} is required, e.g. {example}")]
    MissingParameter {
        /// The variable.
        var: &'static str,
        /// The parameter.
        name: &'static str,
        /// An example of the URL with it.
        example: &'static str,
    },
    /// One of Dory's query parameters has a value it cannot use.
    #[error("{var}: query parameter {name}={value:?} {reason}")]
    BadParameter {
        /// The variable.
        var: &'static str,
        /// The parameter.
        name: &'static str,
        /// Its value, decoded.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The settings read from the variable were refused before connecting (for the input: a
    /// checkpoint interval longer than half the broker's consumer timeout).
    #[error("{var}: {source}")]
    Refused {
        /// The variable.
        var: &'static str,
        /// What the backend refused.
        #[source]
        source: Box<dory_amqp::Error>,
    },
    /// The state store could not be reached or set up (schema, migrations).
    #[error("{var}: cannot connect to the state store: {source}")]
    Store {
        /// The variable.
        var: &'static str,
        /// What the Postgres backend reported.
        #[source]
        source: Box<dory_pg::Error>,
    },
    /// A local-file backend (the `sqlite://` store, the `file://` publisher) could not be
    /// opened: a missing directory, no permission, a file that is not a database.
    #[error("{var}: cannot open the {role}: {source}")]
    Local {
        /// The variable.
        var: &'static str,
        /// `state store` or `publisher`.
        role: &'static str,
        /// What the embedded backend reported.
        #[source]
        source: Box<dory_embedded::Error>,
    },
    /// The broker could not be reached, or refused what was asked (a missing exchange or
    /// queue, no permission).
    #[error("{var}: cannot connect the {role}: {source}")]
    Broker {
        /// The variable.
        var: &'static str,
        /// `publisher` or `input`.
        role: &'static str,
        /// What the RabbitMQ backend reported.
        #[source]
        source: Box<dory_amqp::Error>,
    },
}

impl ConnectError {
    /// The variable at fault.
    pub fn var(&self) -> &'static str {
        match self {
            ConnectError::Missing { var, .. }
            | ConnectError::UnsupportedScheme { var, .. }
            | ConnectError::BadUrl { var, .. }
            | ConnectError::UnknownParameter { var, .. }
            | ConnectError::DuplicateParameter { var, .. }
            | ConnectError::MissingParameter { var, .. }
            | ConnectError::BadParameter { var, .. }
            | ConnectError::Refused { var, .. }
            | ConnectError::Store { var, .. }
            | ConnectError::Local { var, .. }
            | ConnectError::Broker { var, .. } => var,
        }
    }
}

/// What a failed wiring means to the runtime: a backend's error keeps the meaning that
/// backend gives it (an unreachable database or broker is unavailable, a missing queue is not
/// found, a bad TLS file invalid), with the variable in front; a wrong variable is invalid.
impl From<ConnectError> for dory_core::Error {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Store { var, source } => dory_core::Error::from(*source)
                .context(format!("{var}: cannot connect to the state store")),
            ConnectError::Broker { var, role, source } => {
                dory_core::Error::from(*source).context(format!("{var}: cannot connect the {role}"))
            }
            ConnectError::Local { var, role, source } => {
                dory_core::Error::from(*source).context(format!("{var}: cannot open the {role}"))
            }
            ConnectError::Refused { var, source } => dory_core::Error::from(*source).context(var),
            other => dory_core::Error::invalid(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_the_backends_meaning_and_name_the_variable() {
        let missing = ConnectError::Missing {
            var: "DORY_STORE_URL",
            why: "the state store",
        };
        let core = dory_core::Error::from(missing);
        assert!(matches!(core, dory_core::Error::Invalid(_)), "{core:?}");
        assert!(core.to_string().contains("DORY_STORE_URL"), "{core}");

        let refused = ConnectError::Broker {
            var: "DORY_INPUT_URL",
            role: "input",
            source: Box::new(dory_amqp::Error::Config("prefetch 0".into())),
        };
        let core = dory_core::Error::from(refused);
        assert!(matches!(core, dory_core::Error::Invalid(_)), "{core:?}");
        let text = core.to_string();
        assert!(
            text.contains("DORY_INPUT_URL: cannot connect the input")
                && text.contains("prefetch 0"),
            "{text}"
        );
    }
}
