//! The instance environment contract: the variables an instance is started with.
//!
//! Placement backends write these (pod env, child process env); the processor runtime reads
//! them. Defined once, here, so the two sides cannot drift apart.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::{Epoch, LaunchMode, ProcessorId};

/// `DORY_PROCESSOR_ID`: the processor's id.
pub const PROCESSOR_ID: &str = "DORY_PROCESSOR_ID";
/// `DORY_EPOCH`: the instance's epoch (a decimal integer).
pub const EPOCH: &str = "DORY_EPOCH";
/// `DORY_MODE`: `restore` or `standby`.
pub const MODE: &str = "DORY_MODE";
/// `DORY_TOKEN`: the bearer token for the state routes.
pub const TOKEN: &str = "DORY_TOKEN";
/// `DORY_PORT`: the endpoint port (`0` picks a free one and reports it).
pub const PORT: &str = "DORY_PORT";
/// `DORY_STORE_URL`: where the state store is (`postgres://…`, `sqlite://…`).
pub const STORE_URL: &str = "DORY_STORE_URL";
/// `DORY_PUBLISHER_URL`: where output goes (`amqp://…`, `file://…`).
pub const PUBLISHER_URL: &str = "DORY_PUBLISHER_URL";
/// `DORY_INPUT_URL`: where input comes from (`amqp://…?queue=…`), if the processor consumes
/// any.
pub const INPUT_URL: &str = "DORY_INPUT_URL";
/// `DORY_LEASE_MS`: the ownership lease period in milliseconds.
pub const LEASE_MS: &str = "DORY_LEASE_MS";
/// `DORY_CHECKPOINT_INTERVAL_MS`: the checkpoint interval in milliseconds.
pub const CHECKPOINT_INTERVAL_MS: &str = "DORY_CHECKPOINT_INTERVAL_MS";
/// `DORY_CONFIG`: the processor's free-form configuration, as JSON.
pub const CONFIG: &str = "DORY_CONFIG";
/// `DORY_ADDRESS_FILE` (optional): a file the runtime writes its bound `host:port` to, right
/// after binding and before it answers health checks, by writing a temporary file in the same
/// directory and renaming it (so a reader sees the whole address or no file). It is how a
/// placement that starts instances with `DORY_PORT=0` (the local one) learns the port each got.
pub const ADDRESS_FILE: &str = "DORY_ADDRESS_FILE";

/// `DORY_HOST` (optional): the host the instance's endpoint server binds, [`DEFAULT_HOST`]
/// when unset or empty. A placement sets it when its instances share one network namespace
/// but each has an address of its own: the Kubernetes placement's test kubelet gives every pod
/// its own loopback address (all of 127/8 is loopback on Linux) with the same SDK port, as
/// pods on a cluster each have their own IP.
pub const HOST: &str = "DORY_HOST";

/// The default endpoint port.
pub const DEFAULT_PORT: u16 = 8080;

/// The default of [`HOST`]: every interface.
pub const DEFAULT_HOST: &str = "0.0.0.0";

/// The host the endpoint server binds: [`HOST`] read through `get` (e.g.
/// `|k| std::env::var(k).ok()`), else [`DEFAULT_HOST`].
pub fn bind_host(get: impl Fn(&str) -> Option<String>) -> String {
    get(HOST)
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_HOST.to_string())
}

/// Everything an instance is started with.
#[derive(Clone, PartialEq)]
pub struct InstanceEnv {
    /// The processor.
    pub processor: ProcessorId,
    /// The instance's epoch.
    pub epoch: Epoch,
    /// How the instance gets its state.
    pub mode: LaunchMode,
    /// The bearer token for the state routes.
    pub token: String,
    /// The endpoint port.
    pub port: u16,
    /// The state store's URL.
    pub store_url: String,
    /// The publisher's URL, if output goes anywhere.
    pub publisher_url: Option<String>,
    /// The input's URL, if the processor consumes input.
    pub input_url: Option<String>,
    /// The ownership lease period.
    pub lease: Duration,
    /// The checkpoint interval.
    pub checkpoint_interval: Duration,
    /// The processor's configuration.
    pub config: serde_json::Value,
    /// Where the runtime reports the address it bound ([`ADDRESS_FILE`]), if anywhere.
    pub address_file: Option<PathBuf>,
}

impl fmt::Debug for InstanceEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceEnv")
            .field("processor", &self.processor)
            .field("epoch", &self.epoch)
            .field("mode", &self.mode)
            .field("token", &"<redacted>")
            .field("port", &self.port)
            .field("store_url", &redact_url(&self.store_url))
            .field(
                "publisher_url",
                &self.publisher_url.as_deref().map(redact_url),
            )
            .field("input_url", &self.input_url.as_deref().map(redact_url))
            .field("lease", &self.lease)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("address_file", &self.address_file)
            .finish()
    }
}

/// `url` with the password of its user part replaced: `scheme://user:***@host/...`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_string(),
    }
}

impl InstanceEnv {
    /// The variables, sorted by name.
    pub fn to_vars(&self) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            vars.insert(k.to_string(), v);
        };
        set(PROCESSOR_ID, self.processor.to_string());
        set(EPOCH, self.epoch.0.to_string());
        set(MODE, self.mode.to_string());
        set(TOKEN, self.token.clone());
        set(PORT, self.port.to_string());
        set(STORE_URL, self.store_url.clone());
        if let Some(url) = &self.publisher_url {
            set(PUBLISHER_URL, url.clone());
        }
        if let Some(url) = &self.input_url {
            set(INPUT_URL, url.clone());
        }
        set(LEASE_MS, self.lease.as_millis().to_string());
        set(
            CHECKPOINT_INTERVAL_MS,
            self.checkpoint_interval.as_millis().to_string(),
        );
        set(CONFIG, self.config.to_string());
        if let Some(path) = &self.address_file {
            set(ADDRESS_FILE, path.display().to_string());
        }
        vars
    }

    /// Reads the variables through `get` (e.g. `|k| std::env::var(k).ok()`); errors name the
    /// variable and what is wrong with it.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let required = |k: &str| {
            get(k).ok_or_else(|| Error::invalid(format!("environment variable {k} is not set")))
        };
        let number = |k: &str| -> Result<u64> {
            let v = required(k)?;
            v.trim().parse::<u64>().map_err(|_| {
                Error::invalid(format!(
                    "environment variable {k}={v:?} is not a non-negative integer"
                ))
            })
        };
        let processor = ProcessorId::new(required(PROCESSOR_ID)?)
            .map_err(|e| e.context(format!("environment variable {PROCESSOR_ID}")))?;
        let mode = match required(MODE)?.as_str() {
            "restore" => LaunchMode::Restore,
            "standby" => LaunchMode::Standby,
            other => {
                return Err(Error::invalid(format!(
                    "environment variable {MODE}={other:?} must be `restore` or `standby`"
                )));
            }
        };
        let port = match get(PORT) {
            None => DEFAULT_PORT,
            Some(_) => u16::try_from(number(PORT)?).map_err(|_| {
                Error::invalid(format!("environment variable {PORT} is not a port number"))
            })?,
        };
        let lease = Duration::from_millis(number(LEASE_MS)?);
        let checkpoint_interval = Duration::from_millis(number(CHECKPOINT_INTERVAL_MS)?);
        if lease.is_zero() || checkpoint_interval.is_zero() {
            return Err(Error::invalid(format!(
                "environment variables {LEASE_MS} and {CHECKPOINT_INTERVAL_MS} must be greater than zero"
            )));
        }
        let config = match get(CONFIG) {
            None => serde_json::Value::Null,
            Some(raw) => serde_json::from_str(&raw).map_err(|e| {
                Error::invalid(format!("environment variable {CONFIG} is not JSON: {e}"))
            })?,
        };
        Ok(InstanceEnv {
            processor,
            epoch: Epoch(number(EPOCH)?),
            mode,
            token: required(TOKEN)?,
            port,
            store_url: required(STORE_URL)?,
            publisher_url: get(PUBLISHER_URL),
            input_url: get(INPUT_URL),
            lease,
            checkpoint_interval,
            config,
            address_file: get(ADDRESS_FILE)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        })
    }

    /// Reads the process environment.
    pub fn from_process_env() -> Result<Self> {
        InstanceEnv::from_vars(|k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn debug_hides_passwords_in_urls() {
        assert_eq!(
            super::redact_url("postgres://dory:s3cret@db:5432/prod?schema=x"),
            "postgres://dory:***@db:5432/prod?schema=x"
        );
        assert_eq!(
            super::redact_url("amqp://guest@h/%2f"),
            "amqp://guest@h/%2f"
        );
        assert_eq!(super::redact_url("memory://"), "memory://");
        assert_eq!(super::redact_url("not a url"), "not a url");
        assert_eq!(
            super::redact_url("amqps://u:p@ss@h:5671/v"),
            "amqps://u:***@h:5671/v",
            "the last @ ends the user part"
        );
    }

    use super::*;

    fn sample() -> InstanceEnv {
        InstanceEnv {
            processor: ProcessorId::new("counter").unwrap(),
            epoch: Epoch(7),
            mode: LaunchMode::Standby,
            token: "secret".into(),
            port: 0,
            store_url: "sqlite:///tmp/x.db".into(),
            publisher_url: Some("file:///tmp/out".into()),
            input_url: Some("amqp://reader:hunter2@broker/%2f?queue=words".into()),
            lease: Duration::from_secs(15),
            checkpoint_interval: Duration::from_secs(5),
            config: serde_json::json!({"k": 1}),
            address_file: Some(PathBuf::from("/tmp/dory/counter-7/address")),
        }
    }

    #[test]
    fn round_trips_through_variables() {
        let env = sample();
        let vars = env.to_vars();
        let back = InstanceEnv::from_vars(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(back, env);
        assert_eq!(
            vars.get(INPUT_URL).map(String::as_str),
            Some("amqp://reader:hunter2@broker/%2f?queue=words")
        );
        let shown = format!("{env:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("amqp://reader:***@broker/%2f?queue=words"),
            "{shown}"
        );
    }

    #[test]
    fn optional_urls_may_be_absent() {
        let env = InstanceEnv {
            publisher_url: None,
            input_url: None,
            address_file: None,
            ..sample()
        };
        let vars = env.to_vars();
        assert!(!vars.contains_key(PUBLISHER_URL));
        assert!(!vars.contains_key(INPUT_URL));
        assert!(!vars.contains_key(ADDRESS_FILE));
        let back = InstanceEnv::from_vars(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn the_bind_host_defaults_to_every_interface() {
        let vars = BTreeMap::from([(HOST.to_string(), "127.0.3.4".to_string())]);
        assert_eq!(bind_host(|k| vars.get(k).cloned()), "127.0.3.4");
        assert_eq!(bind_host(|_| None), "0.0.0.0");
        assert_eq!(bind_host(|_| Some("  ".into())), "0.0.0.0");
    }

    #[test]
    fn errors_name_the_variable() {
        let mut vars = sample().to_vars();
        vars.insert(EPOCH.into(), "seven".into());
        let err = InstanceEnv::from_vars(|k| vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("DORY_EPOCH=\"seven\""), "{err}");
        vars.remove(TOKEN);
        vars.insert(EPOCH.into(), "7".into());
        let err = InstanceEnv::from_vars(|k| vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("DORY_TOKEN is not set"), "{err}");
        vars.insert(TOKEN.into(), "t".into());
        vars.insert(MODE.into(), "run".into());
        let err = InstanceEnv::from_vars(|k| vars.get(k).cloned()).unwrap_err();
        assert!(err.to_string().contains("DORY_MODE"), "{err}");
    }
}
