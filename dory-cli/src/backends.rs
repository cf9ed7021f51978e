//! The backends a `dory.toml` names, connected.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use dory_control::HttpControl;
use dory_core::{ConfigSource, Leadership, StateStore, StatusSink};
use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStatus, EmbeddedStore, FileConfig};
use dory_local::{InstanceSettings, LocalConfig, LocalPlacement};
use dory_pg::{PgConfig, PgConfigSource, PgLeadership, PgStatus, PgStore};

use crate::config::{ConfigKind, Loaded, StoreKind};

/// Ownership, snapshots, status and leadership: one database.
pub(crate) struct Store {
    /// The state store.
    pub(crate) store: Arc<dyn StateStore>,
    /// Where statuses go.
    pub(crate) status: Arc<dyn StatusSink>,
    /// Orchestrator leadership with its fencing term.
    pub(crate) leadership: Arc<dyn Leadership>,
    pg: Option<PgStore>,
    db: Option<EmbeddedDb>,
}

/// Connects the store the config names.
pub(crate) async fn store(loaded: &Loaded) -> Result<Store> {
    let name = &loaded.config.orchestrator.name;
    match loaded.config.store.kind {
        StoreKind::Embedded => {
            let db = embedded_db(loaded).await?;
            Ok(Store {
                store: Arc::new(EmbeddedStore::new(&db)),
                status: Arc::new(EmbeddedStatus::new(&db)),
                leadership: Arc::new(EmbeddedLeadership::new(&db, name)),
                pg: None,
                db: Some(db),
            })
        }
        StoreKind::Postgres => {
            let url = loaded.config.store.url.as_deref().unwrap_or_default();
            let pg = PgStore::connect(&pg_config(url)?)
                .await
                .map_err(dory_core::Error::from)
                .context("connect to the postgres store (`store.url`)")?;
            Ok(Store {
                store: Arc::new(pg.clone()),
                status: Arc::new(PgStatus::new(&pg)),
                leadership: Arc::new(PgLeadership::new(&pg, name)),
                pg: Some(pg),
                db: None,
            })
        }
    }
}

/// The embedded database (`store.path`, else `<state_dir>/dory.db`); the file config source
/// keeps operator intents there whatever the store.
pub(crate) async fn embedded_db(loaded: &Loaded) -> Result<EmbeddedDb> {
    let path = loaded.db_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the state directory {}", dir.display()))?;
    }
    EmbeddedDb::open(&path)
        .await
        .map_err(dory_core::Error::from)
        .with_context(|| format!("open the embedded database {}", path.display()))
}

/// A Postgres URL with Dory's `?schema=` taken out, as instances read it.
fn pg_config(url: &str) -> Result<PgConfig> {
    Ok(dory_connect::store_config(url)?)
}

/// Connects the config source the config names.
pub(crate) async fn config_source(loaded: &Loaded, store: &Store) -> Result<Arc<dyn ConfigSource>> {
    match loaded.config.config.source {
        ConfigKind::File => {
            // One pool per process on the embedded file: the store's, when it is embedded.
            let db = match &store.db {
                Some(db) => db.clone(),
                None => embedded_db(loaded).await?,
            };
            let path = loaded.processors_file();
            let source = FileConfig::open(&path, &db)
                .with_context(|| format!("open the processors file {}", path.display()))?;
            Ok(Arc::new(source))
        }
        ConfigKind::Postgres => {
            let pg = match (&loaded.config.config.url, &store.pg) {
                (Some(url), _) => PgStore::connect(&pg_config(url)?)
                    .await
                    .map_err(dory_core::Error::from)
                    .context("connect to the postgres config source (`config.url`)")?,
                (None, Some(pg)) => pg.clone(),
                (None, None) => anyhow::bail!("`config.url` is not set"),
            };
            Ok(Arc::new(PgConfigSource::new(&pg).await.context(
                "start the postgres config source's change listener",
            )?))
        }
    }
}

/// The local placement over the config's virtual nodes; `supervisor` is how instances are
/// started (the `dory` binary's hidden `supervise` command).
pub(crate) fn placement(loaded: &Loaded, supervisor: Vec<String>) -> Result<LocalPlacement> {
    let config = local_config(loaded, supervisor);
    LocalPlacement::open(config).context("open the local placement")
}

/// The local placement's configuration.
pub(crate) fn local_config(loaded: &Loaded, supervisor: Vec<String>) -> LocalConfig {
    LocalConfig {
        state_dir: loaded.config.orchestrator.state_dir.clone(),
        nodes: loaded.nodes(),
        supervisor,
        instance: InstanceSettings {
            store_url: loaded.store_url(),
            publisher_url: Some(loaded.publisher_url()),
            input_url: None,
            lease: loaded.settings.planner.lease,
        },
    }
}

/// The control channel to instances.
pub(crate) fn control() -> Arc<HttpControl> {
    Arc::new(HttpControl::new())
}
