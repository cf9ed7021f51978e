//! The pure part: each backend's settings read from the instance environment, no I/O.

use std::path::PathBuf;
use std::time::Duration;

use dory_amqp::{AmqpConfig, AmqpInputConfig};
use dory_core::InstanceEnv;
use dory_core::env::{INPUT_URL, PUBLISHER_URL, STORE_URL};
use dory_pg::PgConfig;
use lapin::uri::AMQPUri;

use crate::error::ConnectError;
use crate::query::{LAPIN, SQLX, Split, param, scheme, split};

/// The exchange the publisher uses when `DORY_PUBLISHER_URL` names none: RabbitMQ's built-in
/// topic exchange, which exists on every broker.
pub const DEFAULT_EXCHANGE: &str = "amq.topic";

/// The state store's connection pool size: an instance checkpoints and renews its lease, a
/// few statements at a time.
pub const STORE_POOL_SIZE: u32 = 4;

/// Which state store `DORY_STORE_URL` names, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreConfig {
    /// `postgres://…`: a [`dory_pg::PgStore`] ([`store_config`]).
    Postgres(PgConfig),
    /// `sqlite:///abs/path/dory.db`: a [`dory_embedded::EmbeddedStore`] in that file (the
    /// embedded database every process on the machine shares).
    Sqlite(PathBuf),
}

/// Which publisher `DORY_PUBLISHER_URL` names, with its settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PublisherConfig {
    /// `amqp://…`, `amqps://…`: a [`dory_amqp::AmqpPublisher`] ([`publisher_config`]).
    Amqp(AmqpConfig),
    /// `file:///abs/dir`: a [`dory_embedded::FilePublisher`] writing
    /// `<dir>/<processor>.jsonl`.
    File(PathBuf),
}

/// The state store's settings from `url` (the value of `DORY_STORE_URL`), whichever store it
/// names: `postgres://…` and `postgresql://…` as [`store_config`] reads them, or
/// `sqlite:///abs/path/dory.db` (an absolute path, percent-encoded where needed; no query
/// parameters).
pub fn store_settings(url: &str) -> Result<StoreConfig, ConnectError> {
    let var = STORE_URL;
    match scheme(url).as_deref() {
        Some("sqlite") => local_path(var, url, "sqlite", "sqlite:///var/lib/dory/dory.db")
            .map(StoreConfig::Sqlite),
        Some("postgres" | "postgresql") => store_config(url).map(StoreConfig::Postgres),
        _ => {
            check_scheme(
                var,
                url,
                &["postgres", "postgresql", "sqlite"],
                "postgres://, postgresql://, sqlite://",
            )?;
            unreachable_scheme(var)
        }
    }
}

/// The publisher's settings from `DORY_PUBLISHER_URL`, whichever publisher it names:
/// `amqp://…` and `amqps://…` as [`publisher_config`] reads them, or `file:///abs/dir` (an
/// absolute directory, percent-encoded where needed; no query parameters).
pub fn publisher_settings(env: &InstanceEnv) -> Result<PublisherConfig, ConnectError> {
    let var = PUBLISHER_URL;
    let Some(url) = &env.publisher_url else {
        return Err(missing_publisher());
    };
    match scheme(url).as_deref() {
        Some("file") => {
            local_path(var, url, "file", "file:///var/lib/dory/output").map(PublisherConfig::File)
        }
        Some("amqp" | "amqps") => publisher_config(env).map(PublisherConfig::Amqp),
        _ => {
            check_scheme(
                var,
                url,
                &["amqp", "amqps", "file"],
                "amqp://, amqps://, file://",
            )?;
            unreachable_scheme(var)
        }
    }
}

/// After `check_scheme` refused every scheme not matched above: cannot happen, reported as a
/// bad URL rather than a panic.
fn unreachable_scheme<T>(var: &'static str) -> Result<T, ConnectError> {
    Err(ConnectError::BadUrl {
        var,
        reason: "its scheme is not supported".into(),
    })
}

fn missing_publisher() -> ConnectError {
    ConnectError::Missing {
        var: PUBLISHER_URL,
        why: "an instance publishes its output through it (amqp://… or file:///…)",
    }
}

/// The absolute local path of a `scheme:///path` URL: no host, no query, no fragment; `%XX`
/// escapes decoded (a path may hold any character but `/` and NUL).
fn local_path(
    var: &'static str,
    url: &str,
    scheme: &str,
    example: &'static str,
) -> Result<PathBuf, ConnectError> {
    let bad_url = |reason: String| ConnectError::BadUrl { var, reason };
    // The scheme was matched case-insensitively; what follows `://` is the rest.
    let rest = &url[scheme.len() + 3..];
    if !rest.starts_with('/') {
        return Err(bad_url(format!(
            "a {scheme}:// URL names a local absolute path with no host, e.g. {example}"
        )));
    }
    if rest.contains('#') {
        return Err(bad_url(
            "it has a fragment (`#…`); write a `#` in a path as `%23`".into(),
        ));
    }
    if let Some((_, query)) = rest.split_once('?') {
        let name = form_urlencoded::parse(query.as_bytes())
            .next()
            .map(|(n, _)| n.into_owned())
            .unwrap_or_default();
        return Err(ConnectError::UnknownParameter {
            var,
            name,
            known: format!("a {scheme}:// URL takes no parameters; write a `?` in a path as `%3F`"),
        });
    }
    let decoded = percent_decode(rest)
        .ok_or_else(|| bad_url("it has a `%` that is not followed by two hex digits".into()))?;
    let path =
        String::from_utf8(decoded).map_err(|_| bad_url("its decoded path is not UTF-8".into()))?;
    if path.contains('\0') || (scheme == "sqlite" && path.ends_with('/')) {
        return Err(bad_url(format!(
            "a {scheme}:// URL must name a file, e.g. {example}"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Decodes `%XX` escapes; `None` for a `%` without two hex digits after it.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The Postgres state store's settings from `url` (the value of `DORY_STORE_URL`); the
/// Postgres half of [`store_settings`], for tools that only speak Postgres (other schemes,
/// `sqlite://` included, are refused).
///
/// `postgres://…` or `postgresql://…`. Dory's parameter `schema` (the schema holding Dory's
/// tables; [`dory_pg::DEFAULT_SCHEMA`] without it) is taken out; the driver's own
/// (`sslmode`, `sslrootcert`, `application_name`, …) stay. Any other parameter is refused.
pub fn store_config(url: &str) -> Result<PgConfig, ConnectError> {
    let var = STORE_URL;
    check_scheme(
        var,
        url,
        &["postgres", "postgresql"],
        "postgres://, postgresql://",
    )?;
    let split = split(var, url, &["schema"], &SQLX)?;
    let config = PgConfig::new(split.url.clone()).with_pool_size(STORE_POOL_SIZE);
    Ok(match split.get("schema") {
        None => config,
        Some("") => {
            return Err(bad(var, "schema", "", "must not be empty"));
        }
        // The schema's spelling is checked by `PgStore::connect`, before any I/O.
        Some(schema) => config.with_schema(schema),
    })
}

/// The RabbitMQ publisher's settings from `DORY_PUBLISHER_URL`; the AMQP half of
/// [`publisher_settings`] (other schemes, `file://` included, are refused).
///
/// `amqp://…` or `amqps://…`. Dory's parameters `exchange` (default [`DEFAULT_EXCHANGE`];
/// `exchange=` with no value is the broker's default exchange, which routes by queue name)
/// and `routing_key` (default: the processor id) are taken out; lapin's own (`heartbeat`,
/// `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism`) stay. Any other
/// parameter is refused.
pub fn publisher_config(env: &InstanceEnv) -> Result<AmqpConfig, ConnectError> {
    let var = PUBLISHER_URL;
    let Some(url) = &env.publisher_url else {
        return Err(missing_publisher());
    };
    let split = amqp_split(var, url, &["exchange", "routing_key"])?;
    let exchange = split.get("exchange").unwrap_or(DEFAULT_EXCHANGE);
    let routing_key = match split.get("routing_key") {
        Some(key) => key.to_string(),
        None => env.processor.to_string(),
    };
    Ok(AmqpConfig::new(split.url.clone(), exchange).with_routing_key(routing_key))
}

/// The input's settings from `DORY_INPUT_URL`; `None` when it is not set (the processor
/// consumes no input).
///
/// `amqp://…` or `amqps://…`. Dory's parameters are taken out: `queue` (required: the queue to
/// consume, which must exist), `prefetch` (optional, 1 to 65535: the most messages held
/// between two checkpoints; [`dory_amqp::DEFAULT_PREFETCH`] without it) and
/// `consumer_timeout_ms` (optional: the broker's `consumer_timeout` when it is not RabbitMQ's
/// 30 minutes). The checkpoint interval is `DORY_CHECKPOINT_INTERVAL_MS`; it must be at most
/// half the consumer timeout. lapin's own parameters stay; any other is refused.
pub fn input_config(env: &InstanceEnv) -> Result<Option<AmqpInputConfig>, ConnectError> {
    let var = INPUT_URL;
    let Some(url) = &env.input_url else {
        return Ok(None);
    };
    let split = amqp_split(var, url, &["queue", "prefetch", "consumer_timeout_ms"])?;
    let queue = match split.get("queue") {
        Some(queue) if !queue.is_empty() => queue,
        _ => {
            return Err(ConnectError::MissingParameter {
                var,
                name: "queue",
                example: "amqp://…/%2f?queue=words",
            });
        }
    };
    let broker = AmqpConfig::new(split.url.clone(), "");
    let mut config = AmqpInputConfig::new(broker, queue, env.checkpoint_interval);
    if let Some(value) = split.get("prefetch") {
        let prefetch = value
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(var, "prefetch", value, "is not a number from 1 to 65535"))?;
        config = config.with_prefetch(prefetch);
    }
    if let Some(value) = split.get("consumer_timeout_ms") {
        let ms = value
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms > 0)
            .ok_or_else(|| {
                bad(
                    var,
                    "consumer_timeout_ms",
                    value,
                    "is not a positive number of milliseconds",
                )
            })?;
        config = config.with_consumer_timeout(Duration::from_millis(ms));
    }
    config.validate().map_err(|source| ConnectError::Refused {
        var,
        source: Box::new(source),
    })?;
    Ok(Some(config))
}

/// Everything an instance connects to, read from its environment and not yet connected:
/// adjust a setting (a pool size, a publisher window) before [`connect`](Self::connect).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BackendsConfig {
    /// The state store, from `DORY_STORE_URL` ([`store_settings`]).
    pub store: StoreConfig,
    /// The publisher, from `DORY_PUBLISHER_URL` ([`publisher_settings`]).
    pub publisher: PublisherConfig,
    /// The input, from `DORY_INPUT_URL` ([`input_config`]), if the processor consumes any.
    pub input: Option<AmqpInputConfig>,
}

impl BackendsConfig {
    /// Reads every backend's settings from `env`; the first error found, naming its variable.
    pub fn from_env(env: &InstanceEnv) -> Result<BackendsConfig, ConnectError> {
        Ok(BackendsConfig {
            store: store_settings(&env.store_url)?,
            publisher: publisher_settings(env)?,
            input: input_config(env)?,
        })
    }
}

/// Checks that `url` has one of the `schemes`.
fn check_scheme(
    var: &'static str,
    url: &str,
    schemes: &[&str],
    supported: &'static str,
) -> Result<(), ConnectError> {
    match scheme(url) {
        None => Err(ConnectError::BadUrl {
            var,
            reason: format!("it has no scheme; expected one of {supported}"),
        }),
        Some(s) if schemes.contains(&s.as_str()) => Ok(()),
        Some(scheme) => Err(ConnectError::UnsupportedScheme {
            var,
            scheme,
            supported,
        }),
    }
}

fn bad(var: &'static str, name: &'static str, value: &str, reason: &str) -> ConnectError {
    ConnectError::BadParameter {
        var,
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Splits an AMQP URL and checks what is left parses as lapin will parse it.
fn amqp_split(
    var: &'static str,
    url: &str,
    ours: &'static [&'static str],
) -> Result<Split, ConnectError> {
    check_scheme(var, url, &["amqp", "amqps"], "amqp://, amqps://")?;
    let split = split(var, url, ours, &LAPIN)?;
    // lapin's own message for a bad number does not say which parameter holds it.
    for (name, max) in [
        ("heartbeat", u64::from(u16::MAX)),
        ("channel_max", u64::from(u16::MAX)),
        ("frame_max", u64::from(u32::MAX)),
        ("connection_timeout", u64::MAX),
    ] {
        if let Some(value) = param(&split.url, name)
            && !value.parse::<u64>().is_ok_and(|n| n <= max)
        {
            return Err(bad(
                var,
                name,
                &value,
                &format!("is not a number from 0 to {max}"),
            ));
        }
    }
    // lapin's parse errors name a URL part or a parameter value, never the user part: the
    // scheme was checked above, so the one message that quotes the whole URL (a URL that
    // cannot be a base) cannot occur.
    split
        .url
        .parse::<AMQPUri>()
        .map_err(|reason| ConnectError::BadUrl { var, reason })?;
    Ok(split)
}

#[cfg(test)]
mod tests {
    use dory_core::{Epoch, LaunchMode, ProcessorId};

    use std::path::Path;

    use super::*;

    const SECRET: &str = "hunter2";

    fn env(publisher: Option<&str>, input: Option<&str>) -> InstanceEnv {
        InstanceEnv {
            processor: ProcessorId::new("counter").unwrap(),
            epoch: Epoch(1),
            mode: LaunchMode::Restore,
            token: "t".into(),
            port: 0,
            store_url: format!("postgres://dory:{SECRET}@db/dory"),
            publisher_url: publisher.map(str::to_string),
            input_url: input.map(str::to_string),
            lease: Duration::from_secs(15),
            checkpoint_interval: Duration::from_secs(5),
            config: serde_json::Value::Null,
            address_file: None,
        }
    }

    /// Every error names its variable and shows no password.
    fn check(e: &ConnectError, var: &str) {
        let text = e.to_string();
        assert_eq!(e.var(), var, "{text}");
        assert!(text.starts_with(var), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }

    #[test]
    fn store_schema_comes_from_the_url() {
        let c =
            store_config("postgres://u:hunter2@h:5432/db?sslmode=disable&schema=tenant_a").unwrap();
        assert_eq!(c.url, "postgres://u:hunter2@h:5432/db?sslmode=disable");
        assert_eq!(c.schema, "tenant_a");
        assert_eq!(c.pool_size, STORE_POOL_SIZE);
        let c = store_config("postgresql://u@h/db?schema=x").unwrap();
        assert_eq!(
            (c.url.as_str(), c.schema.as_str()),
            ("postgresql://u@h/db", "x")
        );
        let c = store_config("postgres://u@h/db").unwrap();
        assert_eq!(c.schema, dory_pg::DEFAULT_SCHEMA);
        let c = store_config("postgres://u@h/db?options[statement_timeout]=5s").unwrap();
        assert_eq!(c.url, "postgres://u@h/db?options[statement_timeout]=5s");
    }

    #[test]
    fn bad_store_urls_name_the_variable() {
        for url in [
            "sqlite:///tmp/x.db",
            "nonsense",
            "postgres://u:hunter2@h/db?schema=",
            "postgres://u:hunter2@h/db?schema=a&schema=b",
            "postgres://u:hunter2@h/db?shcema=a",
            "postgres://u:hunter2@h/db?connect_timeout=5",
            "postgres://u:hunter2@h/db#x",
            "postgres://u:hun?ter2@h/db",
        ] {
            let e = store_config(url).unwrap_err();
            check(&e, "DORY_STORE_URL");
        }
        let e = store_config("sqlite:///tmp/x.db").unwrap_err();
        assert!(
            matches!(&e, ConnectError::UnsupportedScheme { scheme, .. } if scheme == "sqlite"),
            "{e}"
        );
    }

    #[test]
    fn publisher_defaults_and_parameters() {
        let e = env(Some("amqp://guest:hunter2@h/%2f"), None);
        let c = publisher_config(&e).unwrap();
        assert_eq!(c.url, "amqp://guest:hunter2@h/%2f");
        assert_eq!(
            (c.exchange.as_str(), c.routing_key.as_str()),
            ("amq.topic", "counter")
        );
        let e = env(
            Some("amqps://guest@h/%2f?exchange=out&heartbeat=10&routing_key=counts.%231"),
            None,
        );
        let c = publisher_config(&e).unwrap();
        assert_eq!(c.url, "amqps://guest@h/%2f?heartbeat=10");
        assert_eq!(
            (c.exchange.as_str(), c.routing_key.as_str()),
            ("out", "counts.#1")
        );
        let e = env(Some("amqp://h?exchange=&routing_key=q"), None);
        let c = publisher_config(&e).unwrap();
        assert_eq!((c.exchange.as_str(), c.routing_key.as_str()), ("", "q"));
    }

    #[test]
    fn bad_publisher_urls_name_the_variable() {
        let e = publisher_config(&env(None, None)).unwrap_err();
        assert!(matches!(e, ConnectError::Missing { .. }), "{e}");
        check(&e, "DORY_PUBLISHER_URL");
        for url in [
            "file:///tmp/out",
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h/%2f?exchnage=out",
            "amqp://u:hunter2@h/%2f?exchange=a&exchange=b",
            "amqp://u:hunter2@h/%2f?heartbeat=soon",
            "amqp://u:hunter2@h/%2f?channel_max=70000",
            "amqp://u:hunter2@h/%2f?auth_mechanism=magic",
            "amqp://u:hunter2@h:port/%2f",
            "amqp://u:hunter2@h/%2f#x",
            "amqp://u:hun?ter2@h/%2f",
        ] {
            let e = publisher_config(&env(Some(url), None)).unwrap_err();
            check(&e, "DORY_PUBLISHER_URL");
        }
    }

    #[test]
    fn input_parameters() {
        assert_eq!(input_config(&env(None, None)).unwrap(), None);
        let e = env(
            None,
            Some("amqp://guest:hunter2@h/%2f?queue=words&prefetch=100&channel_max=8"),
        );
        let c = input_config(&e).unwrap().unwrap();
        assert_eq!(c.queue, "words");
        assert_eq!(c.prefetch, 100);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(5));
        assert_eq!(c.consumer_timeout, dory_amqp::BROKER_CONSUMER_TIMEOUT);
        assert_eq!(c.broker.url, "amqp://guest:hunter2@h/%2f?channel_max=8");
        let e = env(
            None,
            Some("amqp://h/%2f?queue=words&consumer_timeout_ms=60000"),
        );
        let c = input_config(&e).unwrap().unwrap();
        assert_eq!(c.prefetch, dory_amqp::DEFAULT_PREFETCH);
        assert_eq!(c.consumer_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_input_urls_name_the_variable() {
        for (url, what) in [
            ("amqp://u:hunter2@h/%2f", "missing queue"),
            ("amqp://u:hunter2@h/%2f?queue=", "empty queue"),
            ("amqp://u:hunter2@h/%2f?queue=q&prefetch=0", "prefetch 0"),
            (
                "amqp://u:hunter2@h/%2f?queue=q&prefetch=70000",
                "prefetch too big",
            ),
            (
                "amqp://u:hunter2@h/%2f?queue=q&prefetch=many",
                "prefetch not a number",
            ),
            (
                "amqp://u:hunter2@h/%2f?queue=q&consumer_timeout_ms=0",
                "zero timeout",
            ),
            // A 5 s checkpoint interval needs a consumer timeout of at least 10 s.
            (
                "amqp://u:hunter2@h/%2f?queue=q&consumer_timeout_ms=9000",
                "interval too long",
            ),
            (
                "amqp://u:hunter2@h/%2f?queue=q&durable=true",
                "unknown parameter",
            ),
            ("kafka://u:hunter2@h/words", "unsupported scheme"),
        ] {
            let e = input_config(&env(None, Some(url))).unwrap_err();
            check(&e, "DORY_INPUT_URL");
            match what {
                "missing queue" | "empty queue" => assert!(
                    matches!(e, ConnectError::MissingParameter { name: "queue", .. }),
                    "{what}: {e}"
                ),
                "interval too long" => {
                    assert!(matches!(e, ConnectError::Refused { .. }), "{what}: {e}")
                }
                "unknown parameter" => {
                    assert!(
                        matches!(e, ConnectError::UnknownParameter { .. }),
                        "{what}: {e}"
                    )
                }
                "unsupported scheme" => {
                    assert!(
                        matches!(e, ConnectError::UnsupportedScheme { .. }),
                        "{what}: {e}"
                    )
                }
                _ => assert!(
                    matches!(e, ConnectError::BadParameter { .. }),
                    "{what}: {e}"
                ),
            }
        }
    }

    #[test]
    fn local_files_come_from_sqlite_and_file_urls() {
        assert_eq!(
            store_settings("sqlite:///var/lib/dory/dory.db").unwrap(),
            StoreConfig::Sqlite(PathBuf::from("/var/lib/dory/dory.db"))
        );
        assert_eq!(
            store_settings("SQLITE:///tmp/my%20dir/d%23b.db").unwrap(),
            StoreConfig::Sqlite(PathBuf::from("/tmp/my dir/d#b.db"))
        );
        assert!(matches!(
            store_settings("postgres://u@h/db?schema=x").unwrap(),
            StoreConfig::Postgres(c) if c.schema == "x"
        ));
        let mut e = env(Some("file:///srv/out"), None);
        assert!(matches!(
            publisher_settings(&e).unwrap(),
            PublisherConfig::File(dir) if dir == Path::new("/srv/out")
        ));
        e.publisher_url = Some("amqp://h/%2f?exchange=x".into());
        assert!(matches!(
            publisher_settings(&e).unwrap(),
            PublisherConfig::Amqp(c) if c.exchange == "x"
        ));
    }

    #[test]
    fn bad_local_urls_name_the_variable() {
        for (url, what) in [
            ("sqlite://relative/dory.db", "host"),
            ("sqlite:dory.db", "scheme"),
            ("sqlite:///tmp/dory.db?mode=ro", "parameter"),
            ("sqlite:///tmp/dory.db#x", "fragment"),
            ("sqlite:///tmp/%zz.db", "escape"),
            ("sqlite:///tmp/", "directory"),
            ("sqlite:///tmp/%ff.db", "utf8"),
            ("mysql://h/db", "scheme"),
        ] {
            let e = store_settings(url).unwrap_err();
            check(&e, "DORY_STORE_URL");
            match what {
                "parameter" => assert!(
                    matches!(&e, ConnectError::UnknownParameter { name, .. } if name == "mode"),
                    "{url}: {e}"
                ),
                "scheme" if url.starts_with("mysql") => assert!(
                    matches!(&e, ConnectError::UnsupportedScheme { supported, .. } if supported.contains("sqlite://")),
                    "{url}: {e}"
                ),
                _ => assert!(matches!(e, ConnectError::BadUrl { .. }), "{url}: {e}"),
            }
        }
        for url in ["file://host/out", "file:///out?x=1", "kafka://h/t"] {
            let e = publisher_settings(&env(Some(url), None)).unwrap_err();
            check(&e, "DORY_PUBLISHER_URL");
        }
        let e = publisher_settings(&env(None, None)).unwrap_err();
        assert!(matches!(e, ConnectError::Missing { .. }), "{e}");
    }

    #[test]
    fn from_env_reads_all_three() {
        let e = env(
            Some("amqp://guest:hunter2@h/%2f?exchange=out"),
            Some("amqp://guest:hunter2@h/%2f?queue=words"),
        );
        let c = BackendsConfig::from_env(&e).unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Postgres(pg) if pg.schema == dory_pg::DEFAULT_SCHEMA),
            "{c:?}"
        );
        assert!(
            matches!(&c.publisher, PublisherConfig::Amqp(amqp) if amqp.exchange == "out"),
            "{c:?}"
        );
        assert_eq!(c.input.map(|i| i.queue).as_deref(), Some("words"));
        let shown = format!("{:?}", BackendsConfig::from_env(&e).unwrap());
        assert!(!shown.contains(SECRET), "{shown}");
    }
}
