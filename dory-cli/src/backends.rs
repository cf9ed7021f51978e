//! The backends a `dory.toml` names, connected.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use dory_control::HttpControl;
use dory_core::{
    ConfigSource, InstanceControl, Leadership, Placement, StateStore, StatusSink, Term,
};
use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStatus, EmbeddedStore, FileConfig};
use dory_k8s::{KubePlacement, LeaseLeadership};
use dory_local::{InstanceSettings, LocalConfig, LocalPlacement};
use dory_pg::{PgConfig, PgConfigSource, PgLeadership, PgStatus, PgStore};

use crate::config::{ConfigKind, KubeSection, Loaded, StoreKind};

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
    let name = loaded.replica_name();
    match loaded.config.store.kind {
        StoreKind::Embedded => {
            let db = embedded_db(loaded).await?;
            Ok(Store {
                store: Arc::new(EmbeddedStore::new(&db)),
                status: Arc::new(EmbeddedStatus::new(&db)),
                leadership: Arc::new(EmbeddedLeadership::new(&db, name.as_str())),
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
                leadership: Arc::new(PgLeadership::new(&pg, name.as_str())),
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

/// The placement a config names, started, with what the orchestrator uses beside it.
pub(crate) struct Placed {
    /// Where instances run.
    pub(crate) placement: Arc<dyn Placement>,
    /// The control channel that goes with that placement.
    pub(crate) control: Arc<dyn InstanceControl>,
    /// Leadership among orchestrator replicas: the store's, inside a Lease on Kubernetes.
    pub(crate) leadership: Arc<dyn Leadership>,
    /// What to say in the daemon's first log line.
    pub(crate) describe: String,
}

/// Starts the placement the config names: the local placement over its virtual nodes (with
/// `supervisor`, how instances are started: the `dory` binary's hidden `supervise` command),
/// or the Kubernetes placement through the API server of the pod's service account or of
/// `KUBECONFIG`, its control channel, and the store's leadership inside the Lease.
pub(crate) async fn placed(
    loaded: &Loaded,
    store: &Store,
    supervisor: Vec<String>,
) -> Result<Placed> {
    match loaded.kube() {
        None => Ok(Placed {
            placement: Arc::new(placement(loaded, supervisor)?),
            control: control(),
            leadership: store.leadership.clone(),
            describe: format!("local, {} node(s)", loaded.node_sections().len()),
        }),
        Some(k) => {
            let client = kube_client().await?;
            let placement = KubePlacement::start(client.clone(), k.kube.clone())
                .await
                .map_err(dory_core::Error::from)
                .with_context(|| {
                    format!(
                        "start the kubernetes placement in namespace {}",
                        k.kube.namespace
                    )
                })?;
            let control = Arc::new(placement.control());
            let leadership = lease_leadership(client, k, store)?;
            let describe = format!(
                "kubernetes, namespace {}, lease {}/{} held as {}",
                k.kube.namespace,
                k.lease.namespace,
                k.lease.name,
                leadership.holder()
            );
            Ok(Placed {
                placement: Arc::new(placement),
                control,
                leadership: Arc::new(leadership),
                describe,
            })
        }
    }
}

/// A client of the API server: the pod's service account inside a cluster, else the current
/// context of `KUBECONFIG` (or `~/.kube/config`).
pub(crate) async fn kube_client() -> Result<kube::Client> {
    kube::Client::try_default().await.context(
        "connect to the Kubernetes API server (in a pod: its service account; elsewhere: KUBECONFIG or ~/.kube/config)",
    )
}

/// The store's leadership (whose term fences every write) inside the config's Lease, held as
/// `POD_NAME` (the Deployment sets it from the Downward API) unless `placement.lease.holder`
/// names the holder.
fn lease_leadership(
    client: kube::Client,
    k: &KubeSection,
    store: &Store,
) -> Result<LeaseLeadership<StoreLeadership>> {
    LeaseLeadership::new(
        client,
        k.lease.clone(),
        StoreLeadership(store.leadership.clone()),
    )
    .map_err(dory_core::Error::from)
    .context("set up the leadership lease (`placement.lease`)")
}

/// The store's leadership, held as a trait object, as the `L` of `LeaseLeadership<L>`.
pub(crate) struct StoreLeadership(Arc<dyn Leadership>);

#[async_trait]
impl Leadership for StoreLeadership {
    async fn acquire(&self) -> dory_core::Result<Term> {
        self.0.acquire().await
    }

    async fn check(&self, term: Term) -> dory_core::Result<()> {
        self.0.check(term).await
    }

    async fn resign(&self, term: Term) -> dory_core::Result<()> {
        self.0.resign(term).await
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
