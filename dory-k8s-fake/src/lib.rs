//! An in-process fake of the Kubernetes API server that speaks the real wire protocol, so
//! Dory's Kubernetes backend is tested through the real `kube::Client`, `Api<K>` and
//! kube-runtime watchers without a cluster.
//!
//! [`FakeApiServer::start`] binds `127.0.0.1` on a free port (plain HTTP/1.1);
//! [`FakeApiServer::client`] is a `kube::Client` for it. Objects are stored as JSON, so any
//! kind works and what clients send is what they get back.
//!
//! ```
//! use k8s_openapi::api::core::v1::Pod;
//! use kube::api::{Api, PostParams};
//! use dory_k8s_fake::{FakeApiServer, PodReport};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let server = FakeApiServer::start().await?;
//! let pods: Api<Pod> = Api::default_namespaced(server.client()?);
//! let mut pod = Pod::default();
//! pod.metadata.name = Some("p".into());
//! pods.create(&PostParams::default(), &pod).await?;
//!
//! // Play the kubelet through the store, then read it back over HTTP.
//! server.report_pod("default", "p", &PodReport::running("10.0.0.7"))?;
//! let pod = pods.get("p").await?;
//! assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.0.0.7"));
//! server.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Faithful to the real server
//!
//! - Paths (`/api/v1/...`, `/apis/<group>/<version>/...`, namespaced and cluster-scoped,
//!   cluster-wide lists such as `/api/v1/pods`), verbs, status codes, and failure bodies as
//!   `Status` objects with the real `reason` and message (`pods "p" not found`, `Operation
//!   cannot be fulfilled on leases.coordination.k8s.io "l": the object has been modified…`).
//! - One global resourceVersion, an increasing integer, set on every write; lists carry the
//!   store's current version; list items carry no `apiVersion`/`kind`, watch objects do.
//! - create: `409 AlreadyExists`, `generateName`, uid, creationTimestamp, generation (bumped
//!   on changes outside metadata and status); the namespace must exist and not be
//!   terminating. Pods get `status.phase: Pending` and the registry's grace-period defaults.
//! - update: `409 Conflict` on a stale `metadata.resourceVersion` (missing = unconditional),
//!   `404` on a missing object; an update that changes nothing writes nothing (no version, no
//!   event). Kinds with a status subresource (pods, nodes, namespaces, PDBs) keep `.status`
//!   on main writes; `/status` writes change only `.status`.
//! - patch: JSON merge patch, JSON patch, and strategic merge patch (see below); a
//!   `metadata.resourceVersion` in the patch is an optimistic lock.
//! - delete: `preconditions` (uid, resourceVersion), `gracePeriodSeconds`,
//!   `propagationPolicy`, `dryRun`; pods answer with the object, other kinds with a success
//!   `Status`. A pod bound to a node is deleted gracefully: `deletionTimestamp` and
//!   `deletionGracePeriodSeconds` are set (a MODIFIED event) and it goes when a kubelet
//!   confirms with grace 0 ([`FakeApiServer::confirm_pod_deletion`]) — or see
//!   [`PodTermination`]. Unbound and finished pods go at once. Finalizers hold any object
//!   until they are removed.
//! - Garbage collection in the background: when an object goes, objects whose
//!   `ownerReferences` name its uid are deleted (or lose that reference if another owner
//!   remains; `Orphan` propagation only drops the reference). Objects written with only
//!   dangling owners are collected too. Terminating namespaces are emptied, then removed.
//! - list and watch: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`),
//!   `fieldSelector` on `metadata.name`, `metadata.namespace` and each kind's selectable
//!   fields (pods: `spec.nodeName`, `status.phase`, …; others refused with `400 field label
//!   not supported`), `limit`/`continue`. Watches send chunked newline-delimited
//!   `{"type","object"}` events; `resourceVersion` unset or `0` starts with synthetic ADDED
//!   events; a version is resumed from the history, and one older than the history kept
//!   gets an ERROR event with a `410 Expired` `Status` (`too old resource version`), after a
//!   `200`, as the watch cache answers; `allowWatchBookmarks` gets BOOKMARK events;
//!   `sendInitialEvents` ends the initial events with the `k8s.io/initial-events-end`
//!   bookmark; `timeoutSeconds` ends the stream. Selectors filter events, and an object that
//!   stops matching is a DELETED event for that watcher (an object that starts matching, an
//!   ADDED). `Accept: …;as=PartialObjectMetadata` answers metadata only.
//! - eviction (`POST pods/<name>/eviction`), as the eviction handler decides: terminal,
//!   pending and terminating pods are deleted without looking at budgets; more than one
//!   matching PodDisruptionBudget is a 500; with one, an unready pod may go under
//!   `unhealthyPodEvictionPolicy: AlwaysAllow` (or `IfHealthyBudget` with the budget met),
//!   and otherwise a pod goes only if the budget allows a disruption, else `429
//!   TooManyRequests` "Cannot evict pod as it would violate the pod's disruption budget."
//!   with the `DisruptionBudget` cause. A successful eviction is a graceful delete.
//!
//! # Simplified
//!
//! - Budgets are computed at eviction time from the pods in the namespace (what the
//!   disruption controller would have written into `.status`); PDB `.status` is not kept up
//!   to date. A controller's scale is approximated by the number of matching pods; as the
//!   real controller, `maxUnavailable` or a percentage over pods without a controller
//!   owner allows no disruption.
//! - Strategic merge patch merges by key only the lists Dory patches (`status.conditions`
//!   by `type`, containers, env, ports, volumes by name, `ownerReferences` by uid;
//!   `finalizers` as a set), honours `$patch: delete|replace` and
//!   `$deleteFromPrimitiveList`, and replaces every other list.
//! - Server-side apply (`application/apply-patch+yaml`, JSON body) creates a missing object
//!   and otherwise merges like a strategic merge patch: no field managers, no ownership
//!   conflicts, and fields left out of an apply configuration are not removed.
//! - No admission, validation beyond names, defaulting beyond the fields above, RBAC,
//!   authentication, discovery, protobuf or tables. Lists at an old exact resourceVersion
//!   are served only when nothing of that resource changed since; continued pages show the
//!   current state. Watches resumed with a version newer than the store's start at once.
//! - `expire_watches` compacts all history at once (the real server compacts by time).
//! - kube's `Api::evict` sends its delete options as `delete_options`, a field the real
//!   server ignores; the fake honours only `deleteOptions`, as the real one.
//!
//! # Test hooks
//!
//! Request log and counts ([`FakeApiServer::requests_since`],
//! [`FakeApiServer::non_watch_requests_since`]), fault injection ([`Fault`]), latency,
//! [`FakeApiServer::expire_watches`], [`FakeApiServer::close_watches`], direct store access
//! (`put`, `get`, `list`, `modify`, `delete`, typed or as JSON), kubelet and operator
//! helpers ([`FakeApiServer::report_pod`], [`FakeApiServer::cordon_node`],
//! [`FakeApiServer::taint_node`], …), [`FakeApiServer::settle`] for the background work,
//! and a minimal scheduler ([`FakeApiServerBuilder::scheduler`]).

mod error;
mod hooks;
mod http;
mod patch;
mod resources;
mod selector;
mod server;
mod store;
mod util;

pub use error::Error;
pub use hooks::{Fault, RecordedRequest, RequestMark, Verb};
pub use resources::{GroupResource, ResourceDef, ResourceId};
pub use server::{FakeApiServer, FakeApiServerBuilder, PodReport};
pub use store::PodTermination;
