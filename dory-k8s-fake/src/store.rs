//! The in-memory object store: objects as JSON keyed by resource, namespace and name; one
//! global resourceVersion; a bounded history of changes for watch resumption; the watchers;
//! and the server-side semantics of every verb.
//!
//! Everything here runs under one mutex held for the length of one operation (never across
//! an `.await`), so every operation is atomic and the resourceVersion order is the commit
//! order. Work the real control plane does asynchronously (garbage collection, scheduling,
//! namespace cleanup) is queued as [`Work`] for the controller task.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::patch::{self, PatchKind};
use crate::resources::{ResourceDef, Special};
use crate::selector::{LabelSelector, Selectors};
use crate::util::{
    at_path, condition_status, meta, meta_mut, meta_str, name_suffix, new_uid, now, parse_rv,
    pod_ready, rfc3339, set_condition,
};

/// Namespace (empty for cluster-scoped objects) and name.
pub(crate) type Key = (String, String);

/// What a change did, as a watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change: the unit of history and of watch fan-out.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: usize,
    pub(crate) kind: ChangeKind,
    /// The object after the change; for a deletion its last state at the deletion's version.
    pub(crate) object: Arc<Value>,
    /// The object before the change, so a watcher can tell an object that stopped matching
    /// its selector.
    pub(crate) previous: Option<Arc<Value>>,
    pub(crate) namespace: String,
}

struct WatchSink {
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<Arc<Change>>,
}

/// How pods leave the store after a graceful delete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodTermination {
    /// As a real cluster: a pod bound to a node keeps its `deletionTimestamp` until a kubelet
    /// confirms with a delete of grace period 0 (see
    /// [`FakeApiServer::confirm_pod_deletion`](crate::FakeApiServer::confirm_pod_deletion)).
    #[default]
    AwaitKubelet,
    /// As a kubelet that stops every container at once and confirms when the grace period is
    /// over: the pod is removed when its `deletionTimestamp` arrives.
    AfterGracePeriod,
    /// No kubelet: every pod delete removes the pod at once.
    Immediate,
}

/// Background work the real control plane would do asynchronously.
#[derive(Debug)]
pub(crate) enum Work {
    /// An owner is gone: delete or orphan its dependents.
    Collect { owner_uid: String, orphan: bool },
    /// An object was written with owner references: delete it if they all dangle.
    CheckOwners { resource: usize, key: Key },
    /// A pod was created: bind it if it is pinned to a node.
    Schedule { key: Key },
    /// A node changed: retry the pods waiting for it.
    NodeChanged { node: String },
    /// A namespace is terminating: delete its contents, then it.
    CleanNamespace { name: String },
    /// A pod's grace period runs out after `after` ([`PodTermination::AfterGracePeriod`]).
    GraceTimer {
        key: Key,
        uid: String,
        after: Duration,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) history: usize,
    pub(crate) pod_termination: PodTermination,
    pub(crate) scheduler: bool,
}

/// Fixed indices of the resources with built-in behaviour.
#[derive(Clone, Copy, Debug)]
struct Builtins {
    pods: usize,
    nodes: usize,
    namespaces: usize,
    pdbs: usize,
}

/// Parsed `DeleteOptions`.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOpts {
    pub(crate) grace: Option<i64>,
    pub(crate) uid: Option<String>,
    pub(crate) resource_version: Option<String>,
    pub(crate) orphan: bool,
    pub(crate) dry_run: bool,
}

impl DeleteOpts {
    /// Reads a `DeleteOptions` body, leaving what it does not set as it is.
    pub(crate) fn merge_body(&mut self, body: &Value) -> Result<(), Error> {
        let Some(o) = body.as_object() else {
            return if body.is_null() {
                Ok(())
            } else {
                Err(Error::bad_request("DeleteOptions must be a JSON object"))
            };
        };
        if let Some(g) = o.get("gracePeriodSeconds").filter(|v| !v.is_null()) {
            self.grace = Some(
                g.as_i64()
                    .ok_or_else(|| Error::bad_request("gracePeriodSeconds: not an integer"))?,
            );
        }
        if let Some(p) = o.get("preconditions").and_then(Value::as_object) {
            self.uid = p.get("uid").and_then(Value::as_str).map(String::from);
            self.resource_version = p
                .get("resourceVersion")
                .and_then(Value::as_str)
                .map(String::from);
        }
        match o.get("propagationPolicy").and_then(Value::as_str) {
            Some("Orphan") => self.orphan = true,
            Some("Background" | "Foreground") => self.orphan = false,
            Some(other) => {
                return Err(Error::bad_request(format!(
                    "unknown propagationPolicy {other:?}"
                )));
            }
            None => {}
        }
        if let Some(orphan) = o.get("orphanDependents").and_then(Value::as_bool) {
            self.orphan = orphan;
        }
        if let Some(dry) = o.get("dryRun").and_then(Value::as_array) {
            self.dry_run = dry.iter().any(|d| d == "All");
        }
        Ok(())
    }
}

/// How a write treats `.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The main resource: `.status` is kept as stored for kinds with a status subresource.
    Main,
    /// The `status` subresource: only `.status` changes.
    Status,
    /// A test writing through the store: everything but uid and creation time as given.
    Direct,
}

/// The outcome of a delete.
pub(crate) enum Deleted {
    /// The object is gone; its last state.
    Gone(Arc<Value>),
    /// The object is terminating (grace period or finalizers); its current state.
    Pending(Arc<Value>),
}

/// One page of a list.
pub(crate) struct ListPage {
    pub(crate) items: Vec<Arc<Value>>,
    pub(crate) resource_version: u64,
    pub(crate) continue_token: Option<String>,
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WatchStart {
    /// `resourceVersion` unset or `0`: synthetic ADDED events for what exists, then changes.
    Initial,
    /// After this resourceVersion, from history.
    After(u64),
}

/// A registered watch: what to send first, and the channel of later changes.
pub(crate) struct WatchInit {
    pub(crate) initial: Vec<Arc<Value>>,
    pub(crate) replay: Vec<Arc<Change>>,
    pub(crate) rx: mpsc::UnboundedReceiver<Arc<Change>>,
    /// The store's resourceVersion when the watch was registered.
    pub(crate) resource_version: u64,
}

pub(crate) struct Store {
    defs: Vec<ResourceDef>,
    specials: Vec<Special>,
    by_path: HashMap<(String, String, String), usize>,
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    /// Every change after this version is in `history`; a watch from before it is expired.
    floor: u64,
    watchers: Vec<Vec<WatchSink>>,
    uids: HashMap<String, (usize, Key)>,
    /// Owner uid → objects naming it in `ownerReferences`.
    dependents: HashMap<String, BTreeSet<(usize, Key)>>,
    /// Node name → pods the scheduler could not bind to it yet.
    waiting: HashMap<String, BTreeSet<Key>>,
    settings: Settings,
    builtins: Builtins,
    work: mpsc::UnboundedSender<Work>,
    pending_work: Arc<AtomicUsize>,
}

const RFC1123: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
characters, '-' or '.', and must start and end with an alphanumeric character (e.g. \
'example.com', regex used for validation is \
'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    meta(obj)
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|v| !v.is_null())
}

fn finalizers_empty(obj: &Value) -> bool {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
}

/// Everything an object holds outside `metadata` and `status`: what `generation` counts.
fn same_spec(a: &Value, b: &Value) -> bool {
    let skip = |k: &String| matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind");
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .iter()
            .filter(|(k, _)| !skip(k))
            .eq(b.iter().filter(|(k, _)| !skip(k))),
        _ => a == b,
    }
}

impl Store {
    pub(crate) fn new(
        defs: Vec<ResourceDef>,
        settings: Settings,
        work: mpsc::UnboundedSender<Work>,
        pending_work: Arc<AtomicUsize>,
    ) -> Self {
        let find = |plural: &str, group: &str| {
            defs.iter()
                .position(|d| d.id.plural == plural && d.id.group == group)
                .expect("built-in resources are always registered")
        };
        let builtins = Builtins {
            pods: find("pods", ""),
            nodes: find("nodes", ""),
            namespaces: find("namespaces", ""),
            pdbs: find("poddisruptionbudgets", "policy"),
        };
        let by_path = defs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    (
                        d.id.group.clone(),
                        d.id.version.clone(),
                        d.id.plural.clone(),
                    ),
                    i,
                )
            })
            .collect();
        Self {
            specials: defs.iter().map(ResourceDef::special).collect(),
            objects: defs.iter().map(|_| BTreeMap::new()).collect(),
            watchers: defs.iter().map(|_| Vec::new()).collect(),
            defs,
            by_path,
            rv: 1,
            history: VecDeque::new(),
            floor: 0,
            uids: HashMap::new(),
            dependents: HashMap::new(),
            waiting: HashMap::new(),
            settings,
            builtins,
            work,
            pending_work,
        }
    }

    pub(crate) fn resource(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .copied()
    }

    pub(crate) fn def(&self, r: usize) -> &ResourceDef {
        &self.defs[r]
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    pub(crate) fn pods(&self) -> usize {
        self.builtins.pods
    }

    pub(crate) fn nodes(&self) -> usize {
        self.builtins.nodes
    }

    fn queue(&self, work: Work) {
        self.pending_work.fetch_add(1, Ordering::SeqCst);
        if self.work.send(work).is_err() {
            // The controller is gone (shutdown): nothing will process it.
            self.pending_work.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn key(&self, r: usize, namespace: Option<&str>, name: &str) -> Key {
        let ns = if self.defs[r].namespaced {
            namespace.unwrap_or("")
        } else {
            ""
        };
        (ns.to_string(), name.to_string())
    }

    // ---------------------------------------------------------------- commit and history

    /// Writes (`Some`) or removes (`None`) an object at the next resourceVersion, records the
    /// change and hands it to the watchers.
    fn commit(&mut self, r: usize, key: Key, new: Option<Value>) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let previous = self.objects[r].get(&key).cloned();
        let (kind, object) = match new {
            Some(mut v) => {
                meta_mut(&mut v).insert("resourceVersion".into(), rv.to_string().into());
                let v = Arc::new(v);
                self.objects[r].insert(key.clone(), Arc::clone(&v));
                let kind = if previous.is_some() {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                (kind, v)
            }
            None => {
                let gone = self.objects[r]
                    .remove(&key)
                    .expect("callers remove what exists");
                let mut v = (*gone).clone();
                meta_mut(&mut v).insert("resourceVersion".into(), rv.to_string().into());
                (ChangeKind::Deleted, Arc::new(v))
            }
        };
        self.index(
            r,
            &key,
            previous.as_deref(),
            (kind != ChangeKind::Deleted).then_some(&*object),
        );
        let change = Arc::new(Change {
            rv,
            resource: r,
            kind,
            object: Arc::clone(&object),
            previous,
            namespace: key.0.clone(),
        });
        self.history.push_back(Arc::clone(&change));
        while self.history.len() > self.settings.history {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        // Dropping a sink whose receiver is gone is how closed watches are cleaned up.
        self.watchers[r].retain(|w| {
            if w.namespace.as_deref().is_some_and(|ns| ns != key.0) {
                return !w.tx.is_closed();
            }
            w.tx.send(Arc::clone(&change)).is_ok()
        });
        object
    }

    /// Keeps the uid and owner indices in step with a write.
    fn index(&mut self, r: usize, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        let old_owners = old.map(owner_uids).unwrap_or_default();
        let new_owners = new.map(owner_uids).unwrap_or_default();
        for uid in old_owners.iter().filter(|u| !new_owners.contains(u)) {
            if let Some(set) = self.dependents.get_mut(uid) {
                set.remove(&(r, key.clone()));
                if set.is_empty() {
                    self.dependents.remove(uid);
                }
            }
        }
        for uid in new_owners.iter().filter(|u| !old_owners.contains(u)) {
            self.dependents
                .entry(uid.clone())
                .or_default()
                .insert((r, key.clone()));
        }
        match (
            old.and_then(|o| meta_str(o, "uid")),
            new.and_then(|n| meta_str(n, "uid")),
        ) {
            (Some(u), None) => {
                self.uids.remove(u);
            }
            (_, Some(u)) => {
                self.uids.insert(u.to_string(), (r, key.clone()));
            }
            (None, None) => {}
        }
    }

    /// Makes every resourceVersion issued so far too old to resume a watch from, as an etcd
    /// compaction does. Consumes a resourceVersion so a list made afterwards can be watched.
    pub(crate) fn compact(&mut self) {
        self.rv += 1;
        self.floor = self.rv;
        self.history.clear();
    }

    /// Ends every open watch (their channels close; the HTTP streams end cleanly).
    pub(crate) fn close_watches(&mut self) {
        for w in &mut self.watchers {
            w.clear();
        }
    }

    pub(crate) fn open_watches(&self) -> usize {
        self.watchers
            .iter()
            .flatten()
            .filter(|w| !w.tx.is_closed())
            .count()
    }

    // ---------------------------------------------------------------- reads

    pub(crate) fn get(
        &self,
        r: usize,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, Error> {
        let key = self.key(r, namespace, name);
        self.objects[r]
            .get(&key)
            .cloned()
            .ok_or_else(|| Error::not_found(self.defs[r].id.group_resource(), name))
    }

    fn namespace_range(
        &self,
        r: usize,
        namespace: Option<&str>,
    ) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        self.namespace_range_after(r, namespace, None)
    }

    /// Objects in a namespace (or all), in key order, starting after `after`: a continued
    /// page starts where the last one ended instead of scanning from the beginning.
    fn namespace_range_after(
        &self,
        r: usize,
        namespace: Option<&str>,
        after: Option<Key>,
    ) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        let map = &self.objects[r];
        let ns = namespace
            .filter(|_| self.defs[r].namespaced)
            .map(String::from);
        let ns_start = ns.as_ref().map(|ns| (ns.clone(), String::new()));
        let start = match (ns_start, after) {
            (Some(first), Some(after)) if after < first => Bound::Included(first),
            (_, Some(after)) => Bound::Excluded(after),
            (Some(first), None) => Bound::Included(first),
            (None, None) => Bound::Unbounded,
        };
        map.range((start, Bound::Unbounded))
            .take_while(move |(k, _)| ns.as_ref().is_none_or(|ns| &k.0 == ns))
    }

    /// Every object of a resource, in a namespace or in all.
    pub(crate) fn all(&self, r: usize, namespace: Option<&str>) -> Vec<Arc<Value>> {
        self.namespace_range(r, namespace)
            .map(|(_, v)| Arc::clone(v))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn list(
        &self,
        r: usize,
        namespace: Option<&str>,
        selectors: &Selectors,
        limit: Option<usize>,
        continue_token: Option<&str>,
        resource_version: Option<&str>,
        version_match: Option<&str>,
    ) -> Result<ListPage, Error> {
        let requested =
            match resource_version.filter(|s| !s.is_empty()) {
                None => None,
                Some(s) => Some(parse_rv(s).ok_or_else(|| {
                    Error::bad_request(format!("invalid resource version: {s:?}"))
                })?),
            };
        if let Some(n) = requested {
            if n > self.rv {
                return Err(Error::Timeout {
                    message: format!("Too large resource version: {n}, current: {}", self.rv),
                });
            }
            if version_match == Some("Exact") && n != self.rv {
                if n < self.floor {
                    return Err(Error::Expired {
                        message: format!("too old resource version: {n} ({})", self.floor),
                    });
                }
                // The fake keeps no old states; an exact list is possible only when nothing
                // of this resource changed since.
                let changed = self
                    .history
                    .iter()
                    .rev()
                    .take_while(|c| c.rv > n)
                    .any(|c| c.resource == r);
                if changed {
                    return Err(Error::Internal {
                        message: format!(
                            "the fake API server cannot list at an older exact resourceVersion ({n})"
                        ),
                    });
                }
            }
        }
        // `resourceVersion=0` is served from the watch cache, which ignores `limit`.
        let limit = limit
            .filter(|&l| l > 0)
            .filter(|_| requested != Some(0) || version_match == Some("Exact"));
        let (list_rv, after) = match continue_token.filter(|t| !t.is_empty()) {
            None => (self.rv, None),
            Some(token) => {
                let mut parts = token.splitn(3, '/');
                let (Some(rv), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(Error::bad_request(format!(
                        "invalid continue token {token:?}"
                    )));
                };
                let rv = parse_rv(rv).ok_or_else(|| {
                    Error::bad_request(format!("invalid continue token {token:?}"))
                })?;
                if rv < self.floor {
                    return Err(Error::Expired {
                        message:
                            "The provided continue parameter is too old to display a consistent \
                                  list result. You can start a new list without the continue \
                                  parameter, or use the continue token in this response to \
                                  retrieve the remainder of the results. Continuing with the \
                                  provided token results in an inconsistent list - objects that \
                                  were created, modified, or deleted between the time the first \
                                  chunk was returned and now may show up in the list."
                                .into(),
                    });
                }
                (rv, Some((ns.to_string(), name.to_string())))
            }
        };
        let mut items = Vec::new();
        let mut continue_token = None;
        let iter = self
            .namespace_range_after(r, namespace, after)
            .filter(|(_, v)| selectors.matches(v));
        let mut last_key: Option<&Key> = None;
        for (key, obj) in iter {
            if limit.is_some_and(|l| items.len() >= l) {
                if let Some((ns, name)) = last_key {
                    continue_token = Some(format!("{list_rv}/{ns}/{name}"));
                }
                break;
            }
            items.push(Arc::clone(obj));
            last_key = Some(key);
        }
        Ok(ListPage {
            items,
            resource_version: list_rv,
            continue_token,
        })
    }

    /// Registers a watch. `Err` is the 410 the stream opens with when `start` is older than
    /// the history kept.
    pub(crate) fn watch(
        &mut self,
        r: usize,
        namespace: Option<&str>,
        start: WatchStart,
    ) -> Result<WatchInit, Error> {
        let namespace = namespace.filter(|_| self.defs[r].namespaced);
        let mut initial = Vec::new();
        let mut replay = Vec::new();
        match start {
            WatchStart::Initial => initial = self.all(r, namespace),
            WatchStart::After(n) if n < self.floor => {
                return Err(Error::Expired {
                    message: format!("too old resource version: {n} ({})", self.floor),
                });
            }
            WatchStart::After(n) => {
                let first = self.history.partition_point(|c| c.rv <= n);
                replay = self
                    .history
                    .range(first..)
                    .filter(|c| c.resource == r)
                    .filter(|c| namespace.is_none_or(|ns| c.namespace == ns))
                    .cloned()
                    .collect();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers[r].push(WatchSink {
            namespace: namespace.map(String::from),
            tx,
        });
        Ok(WatchInit {
            initial,
            replay,
            rx,
            resource_version: self.rv,
        })
    }

    // ---------------------------------------------------------------- writes

    /// Fills or checks `apiVersion` and `kind` against the resource.
    fn check_types(&self, r: usize, body: &mut Value) -> Result<(), Error> {
        let def = &self.defs[r];
        let api_version = def.id.api_version();
        let obj = body
            .as_object_mut()
            .ok_or_else(|| Error::bad_request("the request body must be a JSON object"))?;
        match obj.get("kind").and_then(Value::as_str) {
            None | Some("") => {
                obj.insert("kind".into(), def.kind.clone().into());
            }
            Some(k) if k == def.kind => {}
            Some(k) => {
                return Err(Error::bad_request(format!(
                    "the API version in the data ({}) does not match the expected API version ({api_version}) or kind {k} is not {}",
                    obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
                    def.kind
                )));
            }
        }
        match obj.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => {
                obj.insert("apiVersion".into(), api_version.into());
            }
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(Error::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
        }
        Ok(())
    }

    /// The namespace a write lands in: the path's, which the body must agree with.
    fn check_namespace(
        &self,
        r: usize,
        path_ns: Option<&str>,
        body: &mut Value,
    ) -> Result<Option<String>, Error> {
        if !self.defs[r].namespaced {
            meta_mut(body).remove("namespace");
            return Ok(None);
        }
        let body_ns = meta_str(body, "namespace")
            .filter(|s| !s.is_empty())
            .map(String::from);
        let ns = match (path_ns, body_ns) {
            (Some(p), Some(b)) if p != b => {
                return Err(Error::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(p), _) => p.to_string(),
            (None, Some(b)) => b,
            (None, None) => return Err(Error::bad_request("a namespace is required")),
        };
        meta_mut(body).insert("namespace".into(), ns.clone().into());
        Ok(Some(ns))
    }

    fn check_namespace_open(&self, ns: &str) -> Result<(), Error> {
        let key = (String::new(), ns.to_string());
        match self.objects[self.builtins.namespaces].get(&key) {
            None => Err(Error::not_found(
                self.defs[self.builtins.namespaces].id.group_resource(),
                ns,
            )),
            Some(n) if is_deleting(n) => Err(Error::Forbidden {
                message: format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    pub(crate) fn create(
        &mut self,
        r: usize,
        path_ns: Option<&str>,
        mut body: Value,
        mode: Mode,
        dry_run: bool,
    ) -> Result<Arc<Value>, Error> {
        self.check_types(r, &mut body)?;
        let ns = self.check_namespace(r, path_ns, &mut body)?;
        let gr = self.defs[r].id.group_resource();
        let name = match meta_str(&body, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&body, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let prefix = prefix.to_string();
                    loop {
                        let candidate = format!("{prefix}{}", name_suffix());
                        if !self.objects[r].contains_key(&self.key(r, ns.as_deref(), &candidate)) {
                            break candidate;
                        }
                    }
                }
                None => {
                    return Err(Error::invalid(format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        self.defs[r].kind
                    )));
                }
            },
        };
        if !valid_name(&name) {
            return Err(Error::invalid(format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": {RFC1123}",
                self.defs[r].kind
            )));
        }
        let key = self.key(r, ns.as_deref(), &name);
        if self.objects[r].contains_key(&key) {
            return Err(Error::AlreadyExists { resource: gr, name });
        }
        if let Some(ns) = &ns {
            self.check_namespace_open(ns)?;
        }
        let m = meta_mut(&mut body);
        m.insert("name".into(), name.clone().into());
        m.insert("uid".into(), new_uid().into());
        m.insert("creationTimestamp".into(), now().into());
        m.insert("generation".into(), 1.into());
        for server_owned in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(server_owned);
        }
        if mode != Mode::Direct {
            self.prepare_create(r, &mut body);
        }
        if dry_run {
            return Ok(Arc::new(body));
        }
        let owners = owner_uids(&body);
        let obj = self.commit(r, key.clone(), Some(body));
        match self.specials[r] {
            Special::Pod if self.settings.scheduler => {
                self.queue(Work::Schedule { key: key.clone() })
            }
            Special::Node => self.queue(Work::NodeChanged { node: name }),
            _ => {}
        }
        if !owners.is_empty() && owners.iter().all(|u| !self.uids.contains_key(u)) {
            self.queue(Work::CheckOwners { resource: r, key });
        }
        Ok(obj)
    }

    /// The defaults and status resets the real registry applies on create.
    fn prepare_create(&self, r: usize, body: &mut Value) {
        let obj = body.as_object_mut().expect("checked to be an object");
        match self.specials[r] {
            Special::Pod => {
                let spec = obj.entry("spec").or_insert_with(|| json!({}));
                if let Some(spec) = spec.as_object_mut() {
                    spec.entry("terminationGracePeriodSeconds")
                        .or_insert(30.into());
                    spec.entry("restartPolicy").or_insert("Always".into());
                    spec.entry("dnsPolicy").or_insert("ClusterFirst".into());
                    spec.entry("schedulerName")
                        .or_insert("default-scheduler".into());
                }
                obj.insert("status".into(), json!({ "phase": "Pending" }));
            }
            Special::Pdb => {
                obj.insert(
                    "status".into(),
                    json!({ "disruptionsAllowed": 0, "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0 }),
                );
            }
            Special::Namespace => {
                obj.insert("status".into(), json!({ "phase": "Active" }));
            }
            Special::Secret => {
                obj.entry("type").or_insert("Opaque".into());
            }
            Special::Node | Special::None => {}
        }
    }

    /// `new` as it will be stored after a write through `mode` over `old`.
    fn prepare_update(&self, r: usize, old: &Value, mut new: Value, mode: Mode) -> Value {
        let has_status = self.defs[r].status_subresource;
        match mode {
            Mode::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                let o = new.as_object_mut().expect("stored objects are objects");
                match status {
                    Some(s) => o.insert("status".into(), s),
                    None => o.remove("status"),
                };
            }
            Mode::Main if has_status => {
                let o = new.as_object_mut().expect("checked to be an object");
                match old.get("status") {
                    Some(s) => o.insert("status".into(), s.clone()),
                    None => o.remove("status"),
                };
            }
            Mode::Main | Mode::Direct => {}
        }
        let old_meta = meta(old).cloned().unwrap_or_default();
        let keep: &[&str] = if mode == Mode::Direct {
            &["uid", "creationTimestamp", "name", "namespace"]
        } else {
            &[
                "uid",
                "creationTimestamp",
                "name",
                "namespace",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ]
        };
        let m = meta_mut(&mut new);
        for field in keep {
            match old_meta.get(*field) {
                Some(v) => m.insert((*field).into(), v.clone()),
                None => m.remove(*field),
            };
        }
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if same_spec(old, &new) {
            generation
        } else {
            generation + 1
        };
        meta_mut(&mut new).insert("generation".into(), generation.into());
        meta_mut(&mut new).insert(
            "resourceVersion".into(),
            old_meta
                .get("resourceVersion")
                .cloned()
                .unwrap_or(Value::Null),
        );
        new
    }

    /// Stores `new` over `old`: nothing happens when nothing changed (no new version, no
    /// event, as the real server); an object whose deletion waited only for finalizers goes.
    fn write_existing(
        &mut self,
        r: usize,
        key: Key,
        old: &Arc<Value>,
        new: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, Error> {
        if new == **old {
            return Ok(Arc::clone(old));
        }
        if dry_run {
            return Ok(Arc::new(new));
        }
        let grace_done = meta(&new)
            .and_then(|m| m.get("deletionGracePeriodSeconds"))
            .and_then(Value::as_i64)
            .is_none_or(|g| g == 0);
        if is_deleting(&new) && finalizers_empty(&new) && grace_done {
            // As the registry: the update that clears the last finalizer is the deletion
            // (one DELETED event carrying the final state, no MODIFIED before it).
            self.index(r, &key, Some(old), Some(&new));
            self.objects[r].insert(key.clone(), Arc::new(new));
            return Ok(self.remove(r, key, false));
        }
        let owners = owner_uids(&new);
        let obj = self.commit(r, key.clone(), Some(new));
        if self.specials[r] == Special::Node {
            self.queue(Work::NodeChanged {
                node: key.1.clone(),
            });
        }
        if !owners.is_empty() && owners.iter().any(|u| !self.uids.contains_key(u)) {
            self.queue(Work::CheckOwners { resource: r, key });
        }
        Ok(obj)
    }

    fn check_preconditions(
        &self,
        r: usize,
        name: &str,
        old: &Value,
        uid: Option<&str>,
        rv: Option<&str>,
    ) -> Result<(), Error> {
        let gr = self.defs[r].id.group_resource();
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            let have = meta_str(old, "uid").unwrap_or("");
            if uid != have {
                return Err(Error::conflict(
                    gr,
                    name,
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                    ),
                ));
            }
        }
        if let Some(rv) = rv.filter(|v| !v.is_empty()) {
            let have = meta_str(old, "resourceVersion").unwrap_or("");
            if rv != have {
                return Err(Error::stale(gr, name));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        r: usize,
        path_ns: Option<&str>,
        name: &str,
        mut body: Value,
        mode: Mode,
        dry_run: bool,
    ) -> Result<Arc<Value>, Error> {
        self.check_types(r, &mut body)?;
        let ns = self.check_namespace(r, path_ns, &mut body)?;
        let body_name = meta_str(&body, "name").unwrap_or("");
        if body_name != name {
            return Err(Error::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = self.key(r, ns.as_deref(), name);
        let Some(old) = self.objects[r].get(&key).cloned() else {
            if mode == Mode::Direct {
                return self.create(r, ns.as_deref(), body, Mode::Direct, dry_run);
            }
            return Err(Error::not_found(self.defs[r].id.group_resource(), name));
        };
        if mode != Mode::Direct {
            self.check_preconditions(
                r,
                name,
                &old,
                meta_str(&body, "uid"),
                meta_str(&body, "resourceVersion"),
            )?;
        }
        let new = self.prepare_update(r, &old, body, mode);
        self.write_existing(r, key, &old, new, dry_run)
    }

    /// Applies a patch. `Ok((object, true))` when a server-side apply created the object.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        r: usize,
        path_ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        mode: Mode,
        dry_run: bool,
    ) -> Result<(Arc<Value>, bool), Error> {
        let key = self.key(r, path_ns, name);
        let Some(old) = self.objects[r].get(&key).cloned() else {
            if kind == PatchKind::Apply && mode == Mode::Main {
                let mut obj = body.clone();
                if !obj.is_object() {
                    return Err(Error::bad_request("an apply patch must be an object"));
                }
                meta_mut(&mut obj).insert("name".into(), name.into());
                let created = self.create(r, path_ns, obj, Mode::Main, dry_run)?;
                return Ok((created, true));
            }
            return Err(Error::not_found(self.defs[r].id.group_resource(), name));
        };
        let mut doc = (*old).clone();
        patch::apply(kind, &mut doc, body).map_err(|(code, message)| match code {
            400 => Error::bad_request(message),
            _ => Error::invalid(message),
        })?;
        if !doc.is_object() {
            return Err(Error::invalid("the patched object is not a JSON object"));
        }
        // A patch naming a resourceVersion or uid is an optimistic lock on it.
        self.check_preconditions(
            r,
            name,
            &old,
            at_path(body, "metadata.uid").and_then(Value::as_str),
            at_path(body, "metadata.resourceVersion").and_then(Value::as_str),
        )?;
        self.check_types(r, &mut doc)?;
        let new = self.prepare_update(r, &old, doc, mode);
        Ok((self.write_existing(r, key, &old, new, dry_run)?, false))
    }

    /// Removes an object now and queues the garbage collection of its dependents.
    fn remove(&mut self, r: usize, key: Key, orphan: bool) -> Arc<Value> {
        let gone = self.commit(r, key.clone(), None);
        self.waiting.values_mut().for_each(|w| {
            w.remove(&key);
        });
        if let Some(uid) = meta_str(&gone, "uid")
            && self.dependents.contains_key(uid)
        {
            self.queue(Work::Collect {
                owner_uid: uid.to_string(),
                orphan,
            });
        }
        if self.specials[r] == Special::Node {
            self.queue(Work::NodeChanged { node: key.1 });
        }
        gone
    }

    pub(crate) fn delete(
        &mut self,
        r: usize,
        path_ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Deleted, Error> {
        let key = self.key(r, path_ns, name);
        let old = self.get(r, path_ns, name)?;
        self.check_preconditions(
            r,
            name,
            &old,
            opts.uid.as_deref(),
            opts.resource_version.as_deref(),
        )?;
        let special = self.specials[r];
        let grace = match special {
            Special::Pod => self.pod_grace(&old, opts.grace),
            _ => 0,
        };
        if special == Special::Namespace {
            if is_deleting(&old) {
                return Ok(Deleted::Pending(old));
            }
            let mut new = (*old).clone();
            meta_mut(&mut new).insert("deletionTimestamp".into(), now().into());
            meta_mut(&mut new).insert("deletionGracePeriodSeconds".into(), 0.into());
            new["status"] = json!({ "phase": "Terminating" });
            if opts.dry_run {
                return Ok(Deleted::Pending(Arc::new(new)));
            }
            let obj = self.commit(r, key, Some(new));
            self.queue(Work::CleanNamespace {
                name: name.to_string(),
            });
            return Ok(Deleted::Pending(obj));
        }
        if grace > 0 || !finalizers_empty(&old) {
            let current = meta(&old)
                .and_then(|m| m.get("deletionGracePeriodSeconds"))
                .and_then(Value::as_i64);
            // A second delete may shorten a grace period, never lengthen it.
            if is_deleting(&old) && current.is_some_and(|c| c <= grace) {
                return Ok(Deleted::Pending(old));
            }
            let mut new = (*old).clone();
            let at = SystemTime::now() + Duration::from_secs(grace.unsigned_abs());
            let generation = meta(&old)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let m = meta_mut(&mut new);
            m.insert("deletionTimestamp".into(), rfc3339(at).into());
            m.insert("deletionGracePeriodSeconds".into(), grace.into());
            m.insert("generation".into(), (generation + 1).into());
            if opts.dry_run {
                return Ok(Deleted::Pending(Arc::new(new)));
            }
            if grace == 0 {
                // Only finalizers hold it: `write_existing` removes it once they are gone.
                let obj = self.commit(r, key, Some(new));
                return Ok(Deleted::Pending(obj));
            }
            let obj = self.commit(r, key.clone(), Some(new));
            if special == Special::Pod
                && self.settings.pod_termination == PodTermination::AfterGracePeriod
            {
                let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
                self.queue(Work::GraceTimer {
                    key,
                    uid,
                    after: Duration::from_secs(grace.unsigned_abs()),
                });
            }
            return Ok(Deleted::Pending(obj));
        }
        if opts.dry_run {
            return Ok(Deleted::Gone(old));
        }
        Ok(Deleted::Gone(self.remove(r, key, opts.orphan)))
    }

    /// The grace period a pod delete gets, as the pod registry decides it: the request's or
    /// the pod's own; none for a pod never bound to a node or already finished.
    fn pod_grace(&self, pod: &Value, requested: Option<i64>) -> i64 {
        if self.settings.pod_termination == PodTermination::Immediate {
            return 0;
        }
        let unbound = at_path(pod, "spec.nodeName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        let phase = at_path(pod, "status.phase").and_then(Value::as_str);
        if unbound || matches!(phase, Some("Succeeded" | "Failed")) {
            return 0;
        }
        let own = at_path(pod, "spec.terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        requested.unwrap_or(own).max(0)
    }

    // ---------------------------------------------------------------- eviction

    /// `POST pods/{name}/eviction`, as the eviction REST handler decides it.
    pub(crate) fn evict(&mut self, ns: &str, name: &str, body: &Value) -> Result<(), Error> {
        let pods = self.builtins.pods;
        if let Some(n) = meta_str(body, "name").filter(|n| !n.is_empty())
            && n != name
        {
            return Err(Error::bad_request(
                "name in URL does not match name in Eviction object",
            ));
        }
        let mut opts = DeleteOpts::default();
        if let Some(o) = body.get("deleteOptions") {
            opts.merge_body(o)?;
        }
        let pod = self.get(pods, Some(ns), name)?;
        let phase = at_path(&pod, "status.phase").and_then(Value::as_str);
        // Terminal, pending and terminating pods are not protected by any budget.
        if matches!(phase, Some("Succeeded" | "Failed" | "Pending")) || is_deleting(&pod) {
            self.delete(pods, Some(ns), name, &opts)?;
            return Ok(());
        }
        let pdbs: Vec<Arc<Value>> = self
            .all(self.builtins.pdbs, Some(ns))
            .into_iter()
            .filter(|pdb| {
                at_path(pdb, "spec.selector")
                    .map(LabelSelector::from_object)
                    .and_then(Result::ok)
                    .flatten()
                    .is_some_and(|s| s.matches(&pod))
            })
            .collect();
        let pdb = match pdbs.as_slice() {
            [] => {
                self.delete(pods, Some(ns), name, &opts)?;
                return Ok(());
            }
            [one] => Arc::clone(one),
            _ => {
                return Err(Error::Internal {
                    message: "This pod has more than one PodDisruptionBudget, which the eviction \
                              subresource does not support."
                        .into(),
                });
            }
        };
        let budget = self.budget(ns, &pdb);
        if !pod_ready(&pod) {
            let always = at_path(&pdb, "spec.unhealthyPodEvictionPolicy").and_then(Value::as_str)
                == Some("AlwaysAllow");
            if always || (budget.current >= budget.desired && budget.desired > 0) {
                self.delete(pods, Some(ns), name, &opts)?;
                return Ok(());
            }
        }
        if budget.allowed <= 0 {
            return Err(Error::TooManyRequests {
                message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                causes: vec![(
                    "DisruptionBudget".into(),
                    format!(
                        "The disruption budget {} needs {} healthy pods and has {} currently",
                        meta_str(&pdb, "name").unwrap_or(""),
                        budget.desired,
                        budget.current
                    ),
                )],
            });
        }
        self.delete(pods, Some(ns), name, &opts)?;
        Ok(())
    }

    /// What the disruption controller would have put in the budget's status, computed now.
    fn budget(&self, ns: &str, pdb: &Value) -> Budget {
        let selector = at_path(pdb, "spec.selector")
            .map(LabelSelector::from_object)
            .and_then(Result::ok)
            .flatten();
        let pods: Vec<Arc<Value>> = match &selector {
            Some(s) => self
                .all(self.builtins.pods, Some(ns))
                .into_iter()
                .filter(|p| s.matches(p))
                .collect(),
            None => Vec::new(),
        };
        let expected = i64::try_from(pods.len()).unwrap_or(i64::MAX);
        let current = i64::try_from(
            pods.iter()
                .filter(|p| pod_ready(p) && !is_deleting(p))
                .count(),
        )
        .unwrap_or(i64::MAX);
        let scaled = |v: &Value, round_up: bool| -> i64 {
            match v {
                Value::Number(n) => n.as_i64().unwrap_or(0),
                Value::String(s) => {
                    let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
                    let x = pct * expected;
                    if round_up { (x + 99) / 100 } else { x / 100 }
                }
                _ => 0,
            }
        };
        // The disruption controller needs a controller's scale for anything but an integer
        // minAvailable; for pods without one it fails safe to no disruptions.
        let needs_scale = at_path(pdb, "spec.maxUnavailable").is_some_and(|v| !v.is_null())
            || at_path(pdb, "spec.minAvailable").is_some_and(Value::is_string);
        let uncontrolled = pods.iter().any(|p| {
            !meta(p)
                .and_then(|m| m.get("ownerReferences"))
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r.get("controller") == Some(&Value::Bool(true)))
                })
        });
        let desired =
            if let Some(max) = at_path(pdb, "spec.maxUnavailable").filter(|v| !v.is_null()) {
                (expected - scaled(max, true)).max(0)
            } else if let Some(min) = at_path(pdb, "spec.minAvailable").filter(|v| !v.is_null()) {
                scaled(min, true)
            } else {
                0
            };
        let allowed = if needs_scale && uncontrolled {
            0
        } else {
            (current - desired).max(0)
        };
        Budget {
            desired,
            current,
            allowed,
        }
    }

    // ---------------------------------------------------------------- controllers

    /// The garbage collector's decision for one object with owner references: delete it when
    /// no owner remains, drop the references to owners that are gone otherwise.
    pub(crate) fn collect_object(&mut self, r: usize, key: &Key, orphan_of: Option<&str>) {
        let Some(obj) = self.objects[r].get(key).cloned() else {
            return;
        };
        let refs: Vec<Value> = meta(&obj)
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let alive = |r: &Value, uids: &HashMap<String, (usize, Key)>| {
            r.get("uid")
                .and_then(Value::as_str)
                .is_some_and(|u| uids.contains_key(u))
        };
        let keep: Vec<Value> = refs
            .iter()
            .filter(|rf| match orphan_of {
                Some(owner) => rf.get("uid").and_then(Value::as_str) != Some(owner),
                None => alive(rf, &self.uids),
            })
            .cloned()
            .collect();
        if keep.len() == refs.len() {
            return;
        }
        if keep.is_empty() && orphan_of.is_none() {
            tracing::debug!(target: "dory::k8s_fake", resource = %self.defs[r].id, namespace = %key.0, name = %key.1, "garbage collecting");
            let ns = Some(key.0.as_str()).filter(|s| !s.is_empty());
            if let Err(e) = self.delete(r, ns, &key.1, &DeleteOpts::default()) {
                tracing::debug!(target: "dory::k8s_fake", error = %e, "garbage collection delete failed");
            }
            return;
        }
        let mut new = (*obj).clone();
        let m = meta_mut(&mut new);
        if keep.is_empty() {
            m.remove("ownerReferences");
        } else {
            m.insert("ownerReferences".into(), Value::Array(keep));
        }
        self.commit(r, key.clone(), Some(new));
    }

    pub(crate) fn collect(&mut self, owner_uid: &str, orphan: bool) {
        let Some(deps) = self.dependents.get(owner_uid).cloned() else {
            return;
        };
        for (r, key) in deps {
            self.collect_object(r, &key, orphan.then_some(owner_uid));
        }
    }

    /// Binds a pod pinned to one node by a required node affinity on `kubernetes.io/hostname`
    /// (or `metadata.name`), or marks it unschedulable and waits for the node to change.
    pub(crate) fn schedule(&mut self, key: &Key) {
        let pods = self.builtins.pods;
        let Some(pod) = self.objects[pods].get(key).cloned() else {
            return;
        };
        let bound = at_path(&pod, "spec.nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if bound || is_deleting(&pod) {
            return;
        }
        let Some(target) = pinned_node(&pod) else {
            return;
        };
        let verdict = self.fits(&pod, &target);
        let mut new = (*pod).clone();
        match verdict {
            Ok(node) => {
                new["spec"]["nodeName"] = node.into();
                set_condition(&mut new, "PodScheduled", "True", None, None);
                self.commit(pods, key.clone(), Some(new));
            }
            Err(message) => {
                self.waiting.entry(target).or_default().insert(key.clone());
                let same = condition_status(&pod, "PodScheduled") == Some("False")
                    && at_path(&pod, "status.conditions")
                        .and_then(Value::as_array)
                        .is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c.get("message") == Some(&Value::String(message.clone())))
                        });
                if !same {
                    set_condition(
                        &mut new,
                        "PodScheduled",
                        "False",
                        Some("Unschedulable"),
                        Some(&message),
                    );
                    self.commit(pods, key.clone(), Some(new));
                }
            }
        }
    }

    pub(crate) fn node_changed(&mut self, node: &str) {
        if let Some(waiting) = self.waiting.remove(node) {
            for key in waiting {
                self.schedule(&key);
            }
        }
    }

    /// Whether the pod may run on the node its affinity names: the node exists with that
    /// hostname label, is not cordoned, and has no taint the pod does not tolerate.
    fn fits(&self, pod: &Value, target: &str) -> Result<String, String> {
        let nodes = &self.objects[self.builtins.nodes];
        let total = nodes.len();
        let hostname = |n: &Value| {
            at_path(n, "metadata.labels")
                .and_then(|l| l.get("kubernetes.io/hostname"))
                .and_then(Value::as_str)
                .map(String::from)
        };
        let by_name = nodes
            .get(&(String::new(), target.to_string()))
            .filter(|n| hostname(n).as_deref() == Some(target));
        let node = by_name.or_else(|| {
            nodes
                .values()
                .find(|n| hostname(n).as_deref() == Some(target))
        });
        let Some(node) = node else {
            return Err(format!(
                "0/{total} nodes are available: {total} node(s) didn't match Pod's node affinity/selector."
            ));
        };
        let others = total.saturating_sub(1);
        let tolerations: Vec<Value> = at_path(pod, "spec.tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let tolerates = |key: &str, value: &str, effect: &str| {
            tolerations.iter().any(|t| {
                let t_key = t.get("key").and_then(Value::as_str).unwrap_or("");
                let op = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
                let t_value = t.get("value").and_then(Value::as_str).unwrap_or("");
                let t_effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
                (t_key.is_empty() && op == "Exists" || t_key == key)
                    && (op == "Exists" || t_value == value)
                    && (t_effect.is_empty() || t_effect == effect)
            })
        };
        if at_path(node, "spec.unschedulable").and_then(Value::as_bool) == Some(true)
            && !tolerates("node.kubernetes.io/unschedulable", "", "NoSchedule")
        {
            return Err(format!(
                "0/{total} nodes are available: 1 node(s) were unschedulable, {others} node(s) didn't match Pod's node affinity/selector."
            ));
        }
        for taint in at_path(node, "spec.taints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = taint.get("key").and_then(Value::as_str).unwrap_or("");
            let value = taint.get("value").and_then(Value::as_str).unwrap_or("");
            let effect = taint.get("effect").and_then(Value::as_str).unwrap_or("");
            if matches!(effect, "NoSchedule" | "NoExecute") && !tolerates(key, value, effect) {
                return Err(format!(
                    "0/{total} nodes are available: 1 node(s) had untolerated taint {{{key}: {value}}}, {others} node(s) didn't match Pod's node affinity/selector."
                ));
            }
        }
        if let Some(selector) = at_path(pod, "spec.nodeSelector").and_then(Value::as_object) {
            let labels = at_path(node, "metadata.labels");
            if selector
                .iter()
                .any(|(k, v)| labels.and_then(|l| l.get(k)) != Some(v))
            {
                return Err(format!(
                    "0/{total} nodes are available: {total} node(s) didn't match Pod's node affinity/selector."
                ));
            }
        }
        Ok(meta_str(node, "name").unwrap_or(target).to_string())
    }

    /// Deletes a terminating namespace's contents; `true` once it is empty and removed.
    pub(crate) fn clean_namespace(&mut self, name: &str) -> bool {
        let ns_idx = self.builtins.namespaces;
        let key = (String::new(), name.to_string());
        if !self.objects[ns_idx]
            .get(&key)
            .is_some_and(|n| is_deleting(n))
        {
            return true;
        }
        let mut remaining = 0;
        for r in 0..self.defs.len() {
            if !self.defs[r].namespaced {
                continue;
            }
            let keys: Vec<Key> = self
                .namespace_range(r, Some(name))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                match self.delete(r, Some(name), &k.1, &DeleteOpts::default()) {
                    Ok(Deleted::Gone(_)) => {}
                    _ => remaining += 1,
                }
            }
        }
        if remaining > 0 {
            return false;
        }
        self.remove(ns_idx, key, false);
        true
    }

    /// A pod's grace period ran out ([`PodTermination::AfterGracePeriod`]).
    pub(crate) fn grace_expired(&mut self, key: &Key, uid: &str) {
        let pods = self.builtins.pods;
        let Some(pod) = self.objects[pods].get(key) else {
            return;
        };
        if meta_str(pod, "uid") == Some(uid) && is_deleting(pod) {
            let opts = DeleteOpts {
                grace: Some(0),
                ..DeleteOpts::default()
            };
            let ns = Some(key.0.as_str());
            if let Err(e) = self.delete(pods, ns, &key.1, &opts) {
                tracing::debug!(target: "dory::k8s_fake", error = %e, "grace period confirmation failed");
            }
        }
    }

    /// The dependents index, for tests of the index itself.
    #[cfg(test)]
    fn dependents_of(&self, uid: &str) -> usize {
        self.dependents.get(uid).map_or(0, BTreeSet::len)
    }
}

struct Budget {
    desired: i64,
    current: i64,
    allowed: i64,
}

/// The single node a pod's required node affinity (or node selector) pins it to.
fn pinned_node(pod: &Value) -> Option<String> {
    let terms = at_path(
        pod,
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
    )
    .and_then(Value::as_array);
    for term in terms.into_iter().flatten() {
        for (list, key) in [
            ("matchExpressions", "kubernetes.io/hostname"),
            ("matchFields", "metadata.name"),
        ] {
            for expr in term
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let values = expr.get("values").and_then(Value::as_array);
                if expr.get("key").and_then(Value::as_str) == Some(key)
                    && expr.get("operator").and_then(Value::as_str) == Some("In")
                    && let Some([Value::String(v)]) = values.map(Vec::as_slice)
                {
                    return Some(v.clone());
                }
            }
        }
    }
    at_path(pod, "spec.nodeSelector")
        .and_then(|s| s.get("kubernetes.io/hostname"))
        .and_then(Value::as_str)
        .map(String::from)
}

/// Converts a map of labels to the JSON object form.
pub(crate) fn labels_object(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
            .collect::<Map<_, _>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(history: usize) -> (Store, mpsc::UnboundedReceiver<Work>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Settings {
            history,
            pod_termination: PodTermination::AwaitKubelet,
            scheduler: true,
        };
        let mut s = Store::new(
            ResourceDef::builtins(),
            settings,
            tx,
            Arc::new(AtomicUsize::new(0)),
        );
        let ns = s.resource("", "v1", "namespaces").unwrap();
        s.create(
            ns,
            None,
            json!({ "metadata": { "name": "default" } }),
            Mode::Main,
            false,
        )
        .unwrap();
        (s, rx)
    }

    fn cm(name: &str) -> Value {
        json!({ "metadata": { "name": name }, "data": { "k": "v" } })
    }

    #[test]
    fn versions_are_global_and_history_is_bounded() {
        let (mut s, _rx) = store(3);
        let r = s.resource("", "v1", "configmaps").unwrap();
        let a = s
            .create(r, Some("default"), cm("a"), Mode::Main, false)
            .unwrap();
        let b = s
            .create(r, Some("default"), cm("b"), Mode::Main, false)
            .unwrap();
        let rv = |v: &Value| parse_rv(meta_str(v, "resourceVersion").unwrap()).unwrap();
        assert!(rv(&b) > rv(&a));
        assert!(s.watch(r, None, WatchStart::After(rv(&a))).is_ok());
        for n in ["c", "d", "e"] {
            s.create(r, Some("default"), cm(n), Mode::Main, false)
                .unwrap();
        }
        assert!(matches!(
            s.watch(r, None, WatchStart::After(rv(&a))),
            Err(Error::Expired { .. })
        ));
        let init = s
            .watch(r, None, WatchStart::After(s.resource_version() - 2))
            .unwrap();
        assert_eq!(init.replay.len(), 2);
    }

    #[test]
    fn no_op_updates_do_not_bump_the_version() {
        let (mut s, _rx) = store(10);
        let r = s.resource("", "v1", "configmaps").unwrap();
        let a = s
            .create(r, Some("default"), cm("a"), Mode::Main, false)
            .unwrap();
        let again = s
            .update(r, Some("default"), "a", (*a).clone(), Mode::Main, false)
            .unwrap();
        assert_eq!(
            meta_str(&a, "resourceVersion"),
            meta_str(&again, "resourceVersion")
        );
    }

    #[test]
    fn owner_index_follows_writes() {
        let (mut s, _rx) = store(10);
        let r = s.resource("", "v1", "configmaps").unwrap();
        let owner = s
            .create(r, Some("default"), cm("owner"), Mode::Main, false)
            .unwrap();
        let uid = meta_str(&owner, "uid").unwrap().to_string();
        let mut dep = cm("dep");
        dep["metadata"]["ownerReferences"] =
            json!([{ "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid }]);
        let dep = s
            .create(r, Some("default"), dep, Mode::Main, false)
            .unwrap();
        assert_eq!(s.dependents_of(&uid), 1);
        let mut freed = (*dep).clone();
        meta_mut(&mut freed).remove("ownerReferences");
        s.update(r, Some("default"), "dep", freed, Mode::Main, false)
            .unwrap();
        assert_eq!(s.dependents_of(&uid), 0);
    }
}
