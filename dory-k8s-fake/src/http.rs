//! The wire protocol: routing of Kubernetes API paths, query parameters, bodies, `Status`
//! answers, and watch streams of newline-delimited JSON events.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::hooks::{Hooks, RecordedRequest, Verb};
use crate::patch::PatchKind;
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::store::{Change, ChangeKind, DeleteOpts, Deleted, Mode, Store, WatchInit, WatchStart};
use crate::util::{meta, meta_mut, parse_rv};

/// The real server's default request body limit (3 MiB).
const BODY_LIMIT: usize = 3 * 1024 * 1024;

/// State shared by the HTTP handlers, the controller task and the server handle.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    pub(crate) hooks: Mutex<Hooks>,
    pub(crate) bookmark_interval: Duration,
}

impl Shared {
    /// The store. A panic while holding the lock cannot leave it half-written in a way a
    /// later request would trip on more than the panic itself, so poisoning is ignored.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn hooks(&self) -> MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// A request path resolved to a resource.
struct Route {
    resource: usize,
    group: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Route {
    /// The resource as the request log and faults name it: `pods`, `pods/status`.
    fn label(&self) -> String {
        match &self.sub {
            Some(sub) => format!("{}/{sub}", self.plural),
            None => self.plural.clone(),
        }
    }
}

fn route(store: &Store, path: &str) -> Result<Route, Error> {
    let unknown = || Error::UnknownResource(path.to_string());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(unknown()),
    };
    let namespaced_path = match rest {
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => store
            .resource(group, version, plural)
            .filter(|&r| store.def(r).namespaced)
            .map(|r| (r, Some((*ns).to_string()), tail)),
        _ => None,
    };
    let (resource, namespace, tail) = match namespaced_path {
        Some(found) => found,
        None => match rest {
            [plural, tail @ ..] if tail.len() <= 2 => {
                let r = store.resource(group, version, plural).ok_or_else(unknown)?;
                // A namespaced resource is addressed by name only within a namespace.
                if store.def(r).namespaced && !tail.is_empty() {
                    return Err(unknown());
                }
                (r, None, tail)
            }
            _ => return Err(unknown()),
        },
    };
    let name = tail.first().map(|s| (*s).to_string());
    let sub = tail.get(1).map(|s| (*s).to_string());
    if name.as_deref() == Some("") {
        return Err(unknown());
    }
    let def = store.def(resource);
    match sub.as_deref() {
        None => {}
        Some("status") if def.status_subresource => {}
        Some("eviction") if resource == store.pods() => {}
        Some(_) => return Err(unknown()),
    }
    Ok(Route {
        resource,
        group: group.to_string(),
        plural: def.id.plural.clone(),
        namespace,
        name,
        sub,
    })
}

/// Query parameters, first value wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && v == "All")
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Error> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse()
                    .map_err(|_| Error::bad_request(format!("{key}: invalid value {v:?}")))
            })
            .transpose()
    }
}

fn verb_of(method: &Method, route: &Route, query: &Query) -> Option<Verb> {
    let named = route.name.is_some();
    let sub = route.sub.as_deref();
    Some(match *method {
        Method::GET if named => Verb::Get,
        Method::GET if query.flag("watch") => Verb::Watch,
        Method::GET => Verb::List,
        Method::POST if !named => Verb::Create,
        Method::POST if sub == Some("eviction") => Verb::Create,
        Method::PUT if named && sub != Some("eviction") => Verb::Update,
        Method::PATCH if named && sub != Some("eviction") => Verb::Patch,
        Method::DELETE if named && sub.is_none() => Verb::Delete,
        Method::DELETE if !named => Verb::DeleteCollection,
        _ => return None,
    })
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let routed = route(&shared.store(), &path);
    let route = match routed {
        Ok(route) => route,
        Err(e) => {
            tracing::debug!(target: "dory::k8s_fake", method = %parts.method, %path, "no such resource");
            return error_response(&e);
        }
    };
    let query = Query::parse(parts.uri.query());
    let Some(verb) = verb_of(&parts.method, &route, &query) else {
        return error_response(&Error::MethodNotAllowed {
            message: format!(
                "the server does not allow this method on the requested resource ({})",
                parts.method
            ),
        });
    };
    let latency = shared.hooks().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let tripped = shared.hooks().trip(verb, &route.label());
    let response = match tripped {
        Some(fault) => error_response(&Error::Injected {
            code: fault.code,
            message: fault.message,
            retry_after: fault.retry_after,
        }),
        None => match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(bytes) => serve(&shared, verb, &route, &query, &parts.headers, &bytes),
            Err(_) => error_response(&Error::TooLarge {
                message: format!(
                    "the request body is larger than {BODY_LIMIT} bytes or unreadable"
                ),
            }),
        },
    };
    let code = response.status().as_u16();
    tracing::trace!(target: "dory::k8s_fake", %verb, resource = %route.label(), code, "request");
    shared.hooks().log.record(RecordedRequest {
        seq: 0,
        at: Instant::now(),
        verb,
        group: route.group.clone(),
        resource: route.label(),
        namespace: route.namespace.clone(),
        name: route.name.clone(),
        code,
    });
    response
}

fn serve(
    shared: &Arc<Shared>,
    verb: Verb,
    route: &Route,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let result = match verb {
        Verb::Get => get(shared, route, headers),
        Verb::List => list(shared, route, query, headers),
        Verb::Watch => {
            return watch(shared, route, query, headers).unwrap_or_else(|e| error_response(&e));
        }
        Verb::Create => create(shared, route, query, body),
        Verb::Update => update(shared, route, query, body),
        Verb::Patch => patch(shared, route, query, headers, body),
        Verb::Delete => delete(shared, route, query, body),
        Verb::DeleteCollection => delete_collection(shared, route, query, body),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

fn parse_body(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).map_err(|e| {
        Error::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("as=PartialObjectMetadata"))
}

fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta(obj).cloned().map(Value::Object).unwrap_or_else(|| json!({})),
    })
}

fn object_response(code: StatusCode, obj: &Value, headers: &HeaderMap) -> Response {
    if metadata_only(headers) {
        json_response(code, &partial(obj))
    } else {
        json_response(code, obj)
    }
}

fn json_response<T: Serialize + ?Sized>(code: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => Response::builder()
            .status(code)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .unwrap_or_else(|_| Response::new(Body::empty())),
        Err(e) => error_response(&Error::Internal {
            message: format!("encoding the answer: {e}"),
        }),
    }
}

pub(crate) fn error_response(e: &Error) -> Response {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(code, &e.status());
    if let Error::Injected {
        retry_after: Some(secs),
        ..
    } = e
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
    }
    response
}

fn success_status(route: &Route, obj: &Value) -> Value {
    let mut details = json!({
        "name": route.name.clone().unwrap_or_default(),
        "kind": route.plural,
        "uid": meta(obj).and_then(|m| m.get("uid")).cloned().unwrap_or(Value::Null),
    });
    if !route.group.is_empty() {
        details["group"] = route.group.clone().into();
    }
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details })
}

fn get(shared: &Shared, route: &Route, headers: &HeaderMap) -> Result<Response, Error> {
    let name = route.name.as_deref().unwrap_or("");
    let obj = shared
        .store()
        .get(route.resource, route.namespace.as_deref(), name)?;
    Ok(object_response(StatusCode::OK, &obj, headers))
}

fn selectors(store: &Store, route: &Route, query: &Query) -> Result<Selectors, Error> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(Error::bad_request)?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").unwrap_or(""),
        store.def(route.resource),
    )
    .map_err(Error::bad_request)?;
    Ok(Selectors { labels, fields })
}

/// A list item as the real server encodes it: without `apiVersion` and `kind`.
struct Item<'a>(&'a Value, bool);

impl Serialize for Item<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.1 {
            return partial(self.0).serialize(s);
        }
        let Some(map) = self.0.as_object() else {
            return self.0.serialize(s);
        };
        let mut out = s.serialize_map(None)?;
        for (k, v) in map
            .iter()
            .filter(|(k, _)| *k != "apiVersion" && *k != "kind")
        {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    kind: String,
    api_version: String,
    metadata: ListMeta,
    items: Vec<Item<'a>>,
}

fn list(
    shared: &Shared,
    route: &Route,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let (page, kind, api_version) = {
        let store = shared.store();
        let selectors = selectors(&store, route, query)?;
        let page = store.list(
            route.resource,
            route.namespace.as_deref(),
            &selectors,
            query.number("limit")?,
            query.get("continue"),
            query.get("resourceVersion"),
            query.get("resourceVersionMatch"),
        )?;
        let def = store.def(route.resource);
        (page, format!("{}List", def.kind), def.id.api_version())
    };
    // Encoded outside the lock: a list of thousands of pods must not stall every writer.
    let partial_items = metadata_only(headers);
    let (kind, api_version) = if partial_items {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (kind, api_version)
    };
    let body = List {
        kind,
        api_version,
        metadata: ListMeta {
            resource_version: page.resource_version.to_string(),
            continue_token: page.continue_token,
        },
        items: page.items.iter().map(|i| Item(i, partial_items)).collect(),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn create(shared: &Shared, route: &Route, query: &Query, body: &[u8]) -> Result<Response, Error> {
    let value = parse_body(body)?;
    let ns = route.namespace.as_deref();
    if route.sub.as_deref() == Some("eviction") {
        let name = route.name.as_deref().unwrap_or("");
        shared.store().evict(ns.unwrap_or(""), name, &value)?;
        let ok = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201 });
        return Ok(json_response(StatusCode::CREATED, &ok));
    }
    let obj = shared
        .store()
        .create(route.resource, ns, value, Mode::Main, query.dry_run())?;
    Ok(json_response(StatusCode::CREATED, &*obj))
}

fn mode(route: &Route) -> Mode {
    if route.sub.as_deref() == Some("status") {
        Mode::Status
    } else {
        Mode::Main
    }
}

fn update(shared: &Shared, route: &Route, query: &Query, body: &[u8]) -> Result<Response, Error> {
    let value = parse_body(body)?;
    let name = route.name.as_deref().unwrap_or("");
    let obj = shared.store().update(
        route.resource,
        route.namespace.as_deref(),
        name,
        value,
        mode(route),
        query.dry_run(),
    )?;
    Ok(json_response(StatusCode::OK, &*obj))
}

fn patch(
    shared: &Shared,
    route: &Route,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let kind = PatchKind::from_content_type(content_type).ok_or_else(|| Error::UnsupportedMediaType {
        message: format!(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
        ),
    })?;
    if kind == PatchKind::Apply && query.get("fieldManager").is_none_or(str::is_empty) {
        return Err(Error::invalid(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let value = parse_body(body)?;
    let name = route.name.as_deref().unwrap_or("");
    let (obj, created) = shared.store().patch(
        route.resource,
        route.namespace.as_deref(),
        name,
        kind,
        &value,
        mode(route),
        query.dry_run(),
    )?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(object_response(code, &obj, headers))
}

fn delete_opts(query: &Query, body: &[u8]) -> Result<DeleteOpts, Error> {
    let mut opts = DeleteOpts {
        grace: query.number("gracePeriodSeconds")?,
        dry_run: query.dry_run(),
        ..DeleteOpts::default()
    };
    match query.get("propagationPolicy") {
        Some("Orphan") => opts.orphan = true,
        Some("Background" | "Foreground") | None => {}
        Some(other) => {
            return Err(Error::bad_request(format!(
                "unknown propagationPolicy {other:?}"
            )));
        }
    }
    if query.flag("orphanDependents") {
        opts.orphan = true;
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        opts.merge_body(&parse_body(body)?)?;
    }
    Ok(opts)
}

fn delete(shared: &Shared, route: &Route, query: &Query, body: &[u8]) -> Result<Response, Error> {
    let opts = delete_opts(query, body)?;
    let name = route.name.as_deref().unwrap_or("");
    let mut store = shared.store();
    let outcome = store.delete(route.resource, route.namespace.as_deref(), name, &opts)?;
    let return_object = store.def(route.resource).return_deleted_object;
    drop(store);
    Ok(match outcome {
        Deleted::Pending(obj) => json_response(StatusCode::OK, &*obj),
        Deleted::Gone(obj) if return_object => json_response(StatusCode::OK, &*obj),
        Deleted::Gone(obj) => json_response(StatusCode::OK, &success_status(route, &obj)),
    })
}

fn delete_collection(
    shared: &Shared,
    route: &Route,
    query: &Query,
    body: &[u8],
) -> Result<Response, Error> {
    let opts = delete_opts(query, body)?;
    let mut store = shared.store();
    let selectors = selectors(&store, route, query)?;
    let targets: Vec<Arc<Value>> = store
        .all(route.resource, route.namespace.as_deref())
        .into_iter()
        .filter(|o| selectors.matches(o))
        .collect();
    let mut items = Vec::with_capacity(targets.len());
    for t in targets {
        let ns = meta(&t)
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(String::from);
        let name = meta(&t)
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match store.delete(route.resource, ns.as_deref(), &name, &opts)? {
            Deleted::Gone(o) | Deleted::Pending(o) => items.push(o),
        }
    }
    let def = store.def(route.resource);
    let (kind, api_version) = (format!("{}List", def.kind), def.id.api_version());
    let rv = store.resource_version();
    drop(store);
    let body = List {
        kind,
        api_version,
        metadata: ListMeta {
            resource_version: rv.to_string(),
            continue_token: None,
        },
        items: items.iter().map(|i| Item(i, false)).collect(),
    };
    Ok(json_response(StatusCode::OK, &body))
}

// -------------------------------------------------------------------- watch

/// The body of a watch response: lines handed over by the watch task.
struct LineStream(mpsc::Receiver<Bytes>);

impl futures_core::Stream for LineStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|line| line.map(Ok))
    }
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    object: &'a Value,
}

fn event_line(kind: &'static str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&Event { kind, object }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(
    shared: &Arc<Shared>,
    route: &Route,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let rv = query.get("resourceVersion").unwrap_or("");
    let start = match rv {
        "" | "0" => WatchStart::Initial,
        s => WatchStart::After(
            parse_rv(s)
                .ok_or_else(|| Error::bad_request(format!("invalid resource version: {s:?}")))?,
        ),
    };
    let timeout = query
        .number::<u64>("timeoutSeconds")?
        .map(Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial = query.flag("sendInitialEvents");
    let (init, selectors, kind, api_version) = {
        let mut store = shared.store();
        let selectors = selectors(&store, route, query)?;
        let def = store.def(route.resource);
        let (kind, api_version) = (def.kind.clone(), def.id.api_version());
        let init = store.watch(route.resource, route.namespace.as_deref(), start);
        (init, selectors, kind, api_version)
    };
    let (tx, rx) = mpsc::channel(64);
    let task = WatchTask {
        shared: Arc::clone(shared),
        selectors,
        bookmarks,
        initial_end: send_initial && bookmarks && matches!(start, WatchStart::Initial),
        after: match start {
            WatchStart::Initial => 0,
            WatchStart::After(n) => n,
        },
        timeout,
        kind,
        api_version,
        metadata_only: metadata_only(headers),
        out: tx,
    };
    tokio::spawn(task.run(init));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(LineStream(rx)))
        .unwrap_or_else(|_| Response::new(Body::empty())))
}

struct WatchTask {
    shared: Arc<Shared>,
    selectors: Selectors,
    bookmarks: bool,
    initial_end: bool,
    after: u64,
    timeout: Option<Duration>,
    kind: String,
    api_version: String,
    metadata_only: bool,
    out: mpsc::Sender<Bytes>,
}

/// The client went away.
struct Closed;

impl WatchTask {
    async fn run(self, init: Result<WatchInit, Error>) {
        let init = match init {
            Ok(init) => init,
            Err(e) => {
                // As the real server: the watch opens, then says why it cannot go on.
                let _ = self.out.send(event_line("ERROR", &e.status())).await;
                return;
            }
        };
        let _ = self.stream(init).await;
    }

    async fn stream(&self, init: WatchInit) -> Result<(), Closed> {
        let WatchInit {
            initial,
            replay,
            mut rx,
            resource_version,
        } = init;
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        for obj in &initial {
            if self.selectors.matches(obj) {
                self.send("ADDED", obj).await?;
            }
        }
        if self.initial_end {
            self.bookmark(resource_version, true).await?;
        }
        for change in &replay {
            self.emit(change).await?;
        }
        // Initial state and replay cover every change up to the registration's version.
        let mut last = resource_version.max(self.after);
        let interval = self.shared.bookmark_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                () = sleep_until(deadline) => return Ok(()),
                _ = tick.tick(), if self.bookmarks => {
                    // Everything up to `current` is already in the channel: hand it over
                    // first so the bookmark never runs ahead of an event.
                    let current = self.shared.store().resource_version();
                    while let Ok(change) = rx.try_recv() {
                        self.emit(&change).await?;
                        last = last.max(change.rv);
                    }
                    last = last.max(current);
                    self.bookmark(last, false).await?;
                }
                change = rx.recv() => match change {
                    Some(change) => {
                        self.emit(&change).await?;
                        last = last.max(change.rv);
                    }
                    None => return Ok(()),
                },
                () = self.out.closed() => return Err(Closed),
            }
        }
    }

    async fn emit(&self, change: &Change) -> Result<(), Closed> {
        if change.rv <= self.after {
            return Ok(());
        }
        let now_matches = self.selectors.matches(&change.object);
        match change.kind {
            ChangeKind::Added if now_matches => self.send("ADDED", &change.object).await,
            ChangeKind::Deleted if now_matches => self.send("DELETED", &change.object).await,
            ChangeKind::Added | ChangeKind::Deleted => Ok(()),
            ChangeKind::Modified => {
                let before = change
                    .previous
                    .as_deref()
                    .is_some_and(|p| self.selectors.matches(p));
                match (before, now_matches) {
                    (true, true) => self.send("MODIFIED", &change.object).await,
                    (false, true) => self.send("ADDED", &change.object).await,
                    (true, false) => {
                        // As the watch cache: the previous state, at this change's version.
                        let mut gone = change.previous.as_deref().cloned().unwrap_or(Value::Null);
                        meta_mut(&mut gone)
                            .insert("resourceVersion".into(), change.rv.to_string().into());
                        self.send("DELETED", &gone).await
                    }
                    (false, false) => Ok(()),
                }
            }
        }
    }

    async fn send(&self, kind: &'static str, obj: &Value) -> Result<(), Closed> {
        let line = if self.metadata_only {
            event_line(kind, &partial(obj))
        } else {
            event_line(kind, obj)
        };
        self.out.send(line).await.map_err(|_| Closed)
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> Result<(), Closed> {
        let mut metadata = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
        if initial_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let (kind, api_version) = if self.metadata_only {
            ("PartialObjectMetadata", "meta.k8s.io/v1")
        } else {
            (self.kind.as_str(), self.api_version.as_str())
        };
        let obj = json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata });
        self.out
            .send(event_line("BOOKMARK", &obj))
            .await
            .map_err(|_| Closed)
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
