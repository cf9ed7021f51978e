//! [`LeaseLeadership`]: leadership among orchestrator replicas through a
//! `coordination.k8s.io/v1` Lease, around the state store's leadership that issues the
//! fencing term.
//!
//! No crate is used for the Lease: `kube-leader-election` (last release May 2024) and
//! `kube-lease-manager` (0.8, March 2025) each pin an older kube release, so either would put
//! a second kube and k8s-openapi in the tree; and what Dory needs is small: take an
//! expired or free Lease, renew it, give it back, and know locally, without a request, whether
//! it is still held.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{Leadership, Term};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff;
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::duration;
use crate::error::{KubeError, status_code};

/// The Lease's name, timings and this replica's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// The Lease's namespace. Default `dory`.
    pub namespace: String,
    /// The Lease's name. Default `dory-orchestrator`.
    pub name: String,
    /// This replica's identity in `holderIdentity`; empty: the `POD_NAME` environment
    /// variable (the Downward API), else `HOSTNAME`.
    pub holder: String,
    /// `leaseDurationSeconds`: how long after its last renewal another replica may take the
    /// Lease. Default 15 s.
    #[serde(with = "duration")]
    pub duration: Duration,
    /// How often the holder renews. Default 5 s.
    #[serde(with = "duration")]
    pub renew_every: Duration,
    /// How long the holder counts itself leader after its last successful renewal was sent;
    /// shorter than `duration`, so it steps down before anyone may take over. Default 10 s.
    #[serde(with = "duration")]
    pub renew_deadline: Duration,
    /// How often a replica that is not leading looks at the Lease. Default 2 s.
    #[serde(with = "duration")]
    pub retry_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            namespace: "dory".into(),
            name: "dory-orchestrator".into(),
            holder: String::new(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

impl LeaseConfig {
    fn check(&self) -> Result<(), KubeError> {
        let bad = |why: &str| Err(KubeError::Config(format!("lease {}: {why}", self.name)));
        if self.name.is_empty() || self.namespace.is_empty() {
            return bad("`name` and `namespace` must be set");
        }
        if self.duration.as_secs() == 0 || self.renew_every.is_zero() || self.retry_every.is_zero()
        {
            return bad("`duration` (at least 1 s), `renew_every` and `retry_every` must be set");
        }
        if !(self.renew_every < self.renew_deadline && self.renew_deadline < self.duration) {
            return bad("`renew_every` < `renew_deadline` < `duration` is required");
        }
        Ok(())
    }
}

/// What the holder knows locally.
#[derive(Debug, Default)]
struct Held {
    /// Until when this replica counts itself leader (the last renewal sent plus
    /// `renew_deadline`); `None`: not leading.
    until: Option<Instant>,
}

/// [`Leadership`] through a Kubernetes Lease, wrapped around the store's leadership `L`.
///
/// [`acquire`](Leadership::acquire) wins the Lease (one replica at a time), keeps it renewed
/// in the background, then acquires `L`, whose term fences every write to the store: the
/// Lease only decides which replica tries, so a replica that loses the Lease while a write is
/// in flight is stopped by the term, not by the Lease. [`check`](Leadership::check) costs no
/// request: the Lease is held while the last renewal sent is younger than `renew_deadline`
/// (renewals that fail, or find the Lease taken, let it run out) and `L` agrees.
/// [`resign`](Leadership::resign) stops renewing, gives the Lease back (clears the holder)
/// so another replica takes over at once, and resigns `L`.
///
/// Whether another holder's Lease has expired is judged on this replica's own monotonic
/// clock, by how long its record has stayed unchanged (as client-go does), never by comparing
/// the holder's `renewTime` with this machine's wall clock.
pub struct LeaseLeadership<L> {
    inner: L,
    api: Api<Lease>,
    config: LeaseConfig,
    holder: String,
    held: Arc<Mutex<Held>>,
    renewer: Mutex<Option<JoinHandle<()>>>,
}

impl<L> std::fmt::Debug for LeaseLeadership<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLeadership")
            .field("lease", &self.config.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl<L> Drop for LeaseLeadership<L> {
    fn drop(&mut self) {
        if let Some(task) = self
            .renewer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// The holder's identity: configured, else the pod's name, else the host name.
fn default_holder() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("dory-{}", std::process::id()))
}

/// What one look at the Lease found.
enum Look {
    /// This replica holds it now (the renewal or takeover was written at `sent`); the Lease as
    /// written, whose resourceVersion the next renewal writes against.
    Won { sent: Instant, written: Box<Lease> },
    /// Another holder has it; its record (resourceVersion) as seen.
    Taken { holder: String, version: String },
}

impl<L: Leadership> LeaseLeadership<L> {
    /// Leadership through the Lease `config` names, around `inner`.
    pub fn new(client: Client, config: LeaseConfig, inner: L) -> Result<Self, KubeError> {
        config.check()?;
        let holder = if config.holder.is_empty() {
            default_holder()
        } else {
            config.holder.clone()
        };
        Ok(LeaseLeadership {
            inner,
            api: Api::namespaced(client, &config.namespace),
            config,
            holder,
            held: Arc::new(Mutex::new(Held::default())),
            renewer: Mutex::new(None),
        })
    }

    /// The store's leadership inside, which issues the fencing terms.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// This replica's identity in the Lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this replica holds the Lease now, by its local renewal state.
    pub fn holds_lease(&self) -> bool {
        holds(&self.held)
    }

    fn stop_renewing(&self) {
        if let Some(task) = self
            .renewer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .until = None;
    }

    /// Waits until this replica holds the Lease, then starts renewing it.
    async fn win_lease(&self) {
        // The other holder's record and when it was first seen unchanged.
        let mut observed: Option<(String, Instant)> = None;
        loop {
            match try_take(&self.api, &self.config, &self.holder, observed.as_ref()).await {
                Ok(Look::Won { sent, written }) => {
                    self.held
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .until = Some(sent + self.config.renew_deadline);
                    tracing::info!(target: "dory::k8s", lease = %self.config.name, holder = %self.holder, "lease acquired");
                    let task = tokio::spawn(renew_loop(
                        self.api.clone(),
                        self.config.clone(),
                        self.holder.clone(),
                        Arc::clone(&self.held),
                        *written,
                    ));
                    if let Some(old) = self
                        .renewer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .replace(task)
                    {
                        old.abort();
                    }
                    return;
                }
                Ok(Look::Taken { holder, version }) => {
                    if observed.as_ref().is_none_or(|(v, _)| *v != version) {
                        tracing::debug!(target: "dory::k8s", lease = %self.config.name, %holder, "lease held by another replica");
                        observed = Some((version, Instant::now()));
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "dory::k8s", lease = %self.config.name, "{e}");
                }
            }
            tokio::time::sleep(self.config.retry_every).await;
        }
    }
}

fn holds(held: &Mutex<Held>) -> bool {
    held.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .until
        .is_some_and(|until| Instant::now() < until)
}

/// One attempt to take or renew the Lease. `observed` is another holder's record and since
/// when it has been seen unchanged: once that is longer than the record's
/// `leaseDurationSeconds`, the Lease has expired and may be taken.
async fn try_take(
    api: &Api<Lease>,
    config: &LeaseConfig,
    holder: &str,
    observed: Option<&(String, Instant)>,
) -> Result<Look, KubeError> {
    let what = |verb: &str| format!("{verb} lease {}", config.name);
    let sent = Instant::now();
    let duration = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let current = api
        .get_opt(&config.name)
        .await
        .map_err(|e| KubeError::api(what("read"), e))?;
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(written) => Ok(Look::Won {
                sent,
                written: Box::new(written),
            }),
            // Another replica created it first.
            Err(e) if status_code(&e) == Some(409) => Ok(Look::Taken {
                holder: String::new(),
                version: String::new(),
            }),
            Err(e) => Err(KubeError::api(what("create"), e)),
        };
    };
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.get_or_insert_with(Default::default);
    let current_holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = current_holder == holder;
    if !ours && !current_holder.is_empty() {
        let their_duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(duration)).unwrap_or(0),
        );
        let expired =
            observed.is_some_and(|(v, since)| *v == version && since.elapsed() > their_duration);
        if !expired {
            return Ok(Look::Taken {
                holder: current_holder,
                version,
            });
        }
        tracing::info!(target: "dory::k8s", lease = %config.name, previous = %current_holder, "lease expired: taking it over");
    }
    if !ours {
        spec.holder_identity = Some(holder.into());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(duration);
    // Replaced with the resourceVersion just read: if anyone wrote in between, the server
    // answers 409 and this replica has not won.
    Ok(replace_lease(api, config, &lease, sent)
        .await?
        .unwrap_or_else(|| Look::Taken {
            holder: String::new(),
            version: String::new(),
        }))
}

/// Replaces the Lease with `lease`, against the resourceVersion it carries; `None` when the
/// server answers 409 (someone else wrote since).
async fn replace_lease(
    api: &Api<Lease>,
    config: &LeaseConfig,
    lease: &Lease,
    sent: Instant,
) -> Result<Option<Look>, KubeError> {
    match api
        .replace(&config.name, &PostParams::default(), lease)
        .await
    {
        Ok(written) => Ok(Some(Look::Won {
            sent,
            written: Box::new(written),
        })),
        Err(e) if status_code(&e) == Some(409) => Ok(None),
        Err(e) => Err(KubeError::api(format!("renew lease {}", config.name), e)),
    }
}

/// Renews the Lease this replica wrote last, against that write's resourceVersion: one request
/// while nobody else touched the Lease. A `409` means someone did, and [`try_take`] reads it
/// again to see whether this replica still holds it.
async fn renew_written(
    api: &Api<Lease>,
    config: &LeaseConfig,
    holder: &str,
    mut lease: Lease,
) -> Result<Look, KubeError> {
    let sent = Instant::now();
    lease.spec.get_or_insert_with(Default::default).renew_time = Some(now_micro());
    match replace_lease(api, config, &lease, sent).await? {
        Some(won) => Ok(won),
        None => try_take(api, config, holder, None).await,
    }
}

/// Renews the Lease every `renew_every` while it is held; a renewal that finds the Lease
/// taken ends the leadership at once, failing ones let it run out at `renew_deadline`.
/// `written` is the Lease as this replica last wrote it.
async fn renew_loop(
    api: Api<Lease>,
    config: LeaseConfig,
    holder: String,
    held: Arc<Mutex<Held>>,
    written: Lease,
) {
    // None after a failed attempt: the next one reads the Lease first.
    let mut written = Some(written);
    let mut next = Instant::now() + config.renew_every;
    loop {
        tokio::time::sleep_until(next).await;
        if !holds(&held) {
            tracing::warn!(target: "dory::k8s", lease = %config.name, %holder, "lease not renewed in time: stepping down");
            held.lock().unwrap_or_else(PoisonError::into_inner).until = None;
            return;
        }
        let renewed = match written.take() {
            Some(lease) => renew_written(&api, &config, &holder, lease).await,
            None => try_take(&api, &config, &holder, None).await,
        };
        match renewed {
            Ok(Look::Won { sent, written: now }) => {
                held.lock().unwrap_or_else(PoisonError::into_inner).until =
                    Some(sent + config.renew_deadline);
                written = Some(*now);
                next = Instant::now() + config.renew_every;
            }
            Ok(Look::Taken { holder: other, .. }) => {
                tracing::warn!(target: "dory::k8s", lease = %config.name, %holder, taken_by = %other, "lease taken by another replica: stepping down");
                held.lock().unwrap_or_else(PoisonError::into_inner).until = None;
                return;
            }
            Err(e) => {
                tracing::warn!(target: "dory::k8s", lease = %config.name, "renewal failed, retrying: {e}");
                next = Instant::now() + config.retry_every.min(config.renew_every);
            }
        }
    }
}

#[async_trait]
impl<L: Leadership> Leadership for LeaseLeadership<L> {
    async fn acquire(&self) -> dory_core::Result<Term> {
        loop {
            self.win_lease().await;
            let term = self.inner.acquire().await?;
            // The store's leadership may have taken a while (a deposed leader still holding
            // it): lead only if the Lease is still ours.
            if self.holds_lease() {
                tracing::info!(target: "dory::k8s", lease = %self.config.name, holder = %self.holder, %term, "leading");
                return Ok(term);
            }
            let _ = self.inner.resign(term).await;
        }
    }

    async fn check(&self, term: Term) -> dory_core::Result<()> {
        if !self.holds_lease() {
            return Err(KubeError::Lease {
                lease: self.config.name.clone(),
                why: format!("{} no longer holds it", self.holder),
            }
            .into());
        }
        self.inner.check(term).await
    }

    async fn resign(&self, term: Term) -> dory_core::Result<()> {
        self.stop_renewing();
        // Give the Lease back only if it is still ours; a 409 means someone else wrote it.
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.holder.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = Some(now_micro());
            match self
                .api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    tracing::info!(target: "dory::k8s", lease = %self.config.name, holder = %self.holder, "lease released");
                }
                Err(e) => {
                    tracing::warn!(target: "dory::k8s", lease = %self.config.name, "releasing the lease failed (it expires by itself): {e}");
                }
            }
        }
        self.inner.resign(term).await
    }
}
