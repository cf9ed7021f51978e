//! The instance side: the [`InstanceEndpoint`] trait the processor runtime implements, and the
//! axum [`router`] that serves it with the wire format of [`crate::wire`].
//!
//! The router owns everything that is the same for every runtime: routing, the bearer-token
//! check (constant time), body limits, the freeze deadline and the error bodies. The runtime
//! only answers what the instance is and does.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use dory_core::{Error, Health, Result, Sequence, SnapshotMeta};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::wire::{
    self, BEARER_SCHEME, CONTENT_TYPE_JSON, CONTENT_TYPE_METRICS, CONTENT_TYPE_SNAPSHOT,
    CONTROL_BODY_LIMIT, DEFAULT_BODY_LIMIT, DEFAULT_FREEZE_TIMEOUT, ErrorBody, ErrorKind,
    FreezeRequest, Readiness, ResumeRequest, Route,
};

/// What an instance answers on its endpoints; the processor runtime implements it.
///
/// # Contract
/// - [`health`](InstanceEndpoint::health), [`ready`](InstanceEndpoint::ready) and
///   [`metrics`](InstanceEndpoint::metrics) are plain functions, not futures, so that they
///   can never wait on anything user code holds (a lock, the run loop, the Python GIL): they
///   answer from values the runtime keeps up to date (atomics, a `watch` channel) and return
///   at once.
/// - [`freeze`](InstanceEndpoint::freeze) resolves once the run loop has stopped at a safe
///   point with every outstanding publish confirmed, holding an exact snapshot; freezing a
///   frozen instance answers the same snapshot's metadata again. The router bounds it by the
///   request's timeout: a future still pending then is **dropped**, and so it is when the
///   caller hangs up. Dropping it must withdraw the freeze request and leave the processor
///   running (or running again, if it had just stopped); it never leaves it half frozen.
/// - [`snapshot`](InstanceEndpoint::snapshot) returns the frozen snapshot's encoded bytes
///   (see [`dory_core::snapshot`]), the same bytes on every call until the instance resumes;
///   [`Error::Conflict`] when it is not frozen.
/// - [`load`](InstanceEndpoint::load) only loads (no running), is idempotent, and refuses a
///   snapshot with a bad header or checksum, of another processor, or with an (epoch,
///   sequence) the instance must not take, with [`Error::Invalid`] naming what was wrong,
///   leaving the state untouched. The body is at most the router's body limit.
/// - [`resume`](InstanceEndpoint::resume) starts (or restarts) the run loop; idempotent. An
///   instance that has lost ownership answers [`Error::Fenced`]. Given the sequence the
///   orchestrator committed, a standby that loaded another snapshot or none restores that one
///   from the state store first (see [`ResumeRequest`]).
/// - Errors travel with the status of their meaning ([`ErrorKind::of`]); their messages are
///   shown to operators and must not contain secrets.
#[async_trait]
pub trait InstanceEndpoint: Send + Sync + 'static {
    /// What the instance says about itself (`GET /healthz`); never blocks.
    fn health(&self) -> Health;

    /// Whether the instance is ready (`GET /readyz`): `Ok`, or why not (usually
    /// [`Error::Unavailable`], answered 503); never blocks.
    fn ready(&self) -> Result<()>;

    /// The metrics in the Prometheus text format (`GET /metrics`); never blocks.
    fn metrics(&self) -> String;

    /// Stops at the next safe point (`POST /state/freeze`); see the contract for `timeout`.
    async fn freeze(&self, timeout: Duration) -> Result<SnapshotMeta>;

    /// The frozen snapshot, encoded (`GET /state`).
    async fn snapshot(&self) -> Result<Bytes>;

    /// Loads an encoded snapshot without running (`PUT /state`).
    async fn load(&self, snapshot: Bytes) -> Result<()>;

    /// Starts the run loop (`POST /state/resume`); `committed` is the sequence of the
    /// snapshot the orchestrator committed for this epoch, when it says.
    async fn resume(&self, committed: Option<Sequence>) -> Result<()>;

    /// Stores a full checkpoint at the next safe point and keeps running (`POST
    /// /state/precopy`); answers the stored snapshot, the base of the delta the next freeze
    /// takes. The router bounds it by the request's timeout. An endpoint that cannot
    /// pre-copy answers [`Error::Conflict`], and the orchestrator moves without it.
    async fn precopy(&self, timeout: Duration) -> Result<Bytes> {
        let _ = timeout;
        Err(dory_core::Error::conflict(
            "this instance does not pre-copy",
        ))
    }

    /// The frozen state as a full snapshot (`GET /state/full`), for when the delta that
    /// [`snapshot`](Self::snapshot) answers cannot be used.
    async fn full_snapshot(&self) -> Result<Bytes> {
        self.snapshot().await
    }
}

/// How the [`router`] guards the state routes.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerSettings {
    /// The bearer token the state routes require (the instance's `DORY_TOKEN`). An empty token
    /// closes the state routes: every call gets 401.
    pub token: String,
    /// The largest `PUT /state` body accepted; a larger one gets 413 and is never read into
    /// memory beyond this many bytes. Default [`DEFAULT_BODY_LIMIT`].
    pub body_limit: usize,
    /// The longest freeze timeout a request may ask for; longer ones get 400. Default 5
    /// minutes.
    pub max_freeze_timeout: Duration,
}

impl ServerSettings {
    /// The default [`ServerSettings::max_freeze_timeout`].
    pub const DEFAULT_MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(300);

    /// Settings with this token and the default limits.
    pub fn new(token: impl Into<String>) -> Self {
        ServerSettings {
            token: token.into(),
            body_limit: DEFAULT_BODY_LIMIT,
            max_freeze_timeout: Self::DEFAULT_MAX_FREEZE_TIMEOUT,
        }
    }

    /// The same settings with another body limit.
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The same settings with another longest freeze timeout.
    pub fn with_max_freeze_timeout(mut self, timeout: Duration) -> Self {
        self.max_freeze_timeout = timeout;
        self
    }
}

impl fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSettings")
            .field("token", &"<redacted>")
            .field("body_limit", &self.body_limit)
            .field("max_freeze_timeout", &self.max_freeze_timeout)
            .finish()
    }
}

struct Shared {
    endpoint: Arc<dyn InstanceEndpoint>,
    settings: ServerSettings,
}

type SharedState = State<Arc<Shared>>;

/// The router of an instance's endpoints (see the route table in [`crate::wire`]), ready for
/// `axum::serve`. The state routes check the bearer token before anything else, so an
/// unauthorized request never reaches the endpoint and its body is never read.
pub fn router(endpoint: Arc<dyn InstanceEndpoint>, settings: ServerSettings) -> Router {
    if settings.token.is_empty() {
        tracing::warn!(target: "dory::control", "no bearer token configured: the state routes refuse every request");
    }
    let shared = Arc::new(Shared { endpoint, settings });
    let state_routes = Router::new()
        .route(wire::STATE_FREEZE, post(freeze))
        .route(wire::STATE, get(fetch).put(load))
        .route(wire::STATE_RESUME, post(resume))
        .route(wire::STATE_PRECOPY, post(precopy))
        .route(wire::STATE_FULL, get(fetch_full))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorize));
    Router::new()
        .route(wire::HEALTHZ, get(health))
        .route(wire::READYZ, get(ready))
        .route(wire::METRICS, get(metrics))
        .merge(state_routes)
        .fallback(no_route)
        .with_state(shared)
}

/// An error answer: the status of its kind and an [`ErrorBody`].
struct Failure(ErrorBody);

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure(ErrorBody::new(kind, message))
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure(ErrorBody::from_error(&error))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let mut response = json(status, &self.0);
        if self.0.error == ErrorKind::Unauthorized {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(BEARER_SCHEME));
        }
        response
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(CONTENT_TYPE, CONTENT_TYPE_JSON)], body).into_response(),
        // Only a broken `Serialize` impl gets here; the error body itself is plain strings.
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("could not encode the answer: {e}"),
        )
            .into_response(),
    }
}

async fn authorize(State(shared): SharedState, request: Request, next: Next) -> Response {
    match check_token(request.headers(), &shared.settings.token) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            tracing::warn!(
                target: "dory::control",
                method = %request.method(),
                path = request.uri().path(),
                "refused: {why}"
            );
            Failure::new(ErrorKind::Unauthorized, why).into_response()
        }
    }
}

/// Checks the `Authorization` header against `expected`. The comparison takes the same time
/// wherever the first differing byte is (`subtle`), so response times do not reveal how much
/// of a guess was right; only the token's length may show, and tokens are generated at one
/// fixed length.
fn check_token(headers: &HeaderMap, expected: &str) -> Result<(), &'static str> {
    if expected.is_empty() {
        return Err("the instance has no token configured; its state routes are closed");
    }
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err("missing bearer token");
    };
    let Some(presented) = wire::parse_bearer(value.as_bytes()) else {
        return Err("the Authorization header does not hold a bearer token");
    };
    if bool::from(presented.ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err("wrong bearer token")
    }
}

/// Reads a request body of at most `limit` bytes: a declared length over the limit is refused
/// before reading anything, and reading stops as soon as the limit is passed.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<Bytes, Failure> {
    let too_large = |size: &str| {
        Failure::new(
            ErrorKind::TooLarge,
            format!("{what} of {size} is over the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        return Err(too_large(&format!("{len} bytes")));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large("more bytes")),
        Err(e) => Err(Failure::new(
            ErrorKind::Invalid,
            format!("could not read the {what}: {e}"),
        )),
    }
}

fn log_outcome<T>(route: Route, started: Instant, outcome: &Result<T, Failure>) {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(_) => {
            tracing::info!(target: "dory::control", route = %route, elapsed_ms, "{} done", route.operation())
        }
        Err(Failure(body)) => tracing::warn!(
            target: "dory::control",
            route = %route,
            elapsed_ms,
            error = %body.error,
            "{} failed: {}",
            route.operation(),
            body.message
        ),
    }
}

async fn health(State(shared): SharedState) -> Response {
    json(StatusCode::OK, &shared.endpoint.health())
}

async fn ready(State(shared): SharedState) -> Response {
    match shared.endpoint.ready() {
        Ok(()) => json(StatusCode::OK, &Readiness { ready: true }),
        Err(e) => Failure::from(e).into_response(),
    }
}

async fn metrics(State(shared): SharedState) -> Response {
    (
        [(CONTENT_TYPE, CONTENT_TYPE_METRICS)],
        shared.endpoint.metrics(),
    )
        .into_response()
}

/// A small JSON request body (`shape` says what it should look like), or `None` when the body
/// is empty.
async fn read_request<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    what: &str,
    shape: &str,
) -> std::result::Result<Option<T>, Failure> {
    let body = read_body(headers, body, CONTROL_BODY_LIMIT, what).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| Failure::new(ErrorKind::Invalid, format!("{what} is not {shape}: {e}")))
}

/// The timeout of a freeze or pre-copy request (`{"timeout_ms": …}`, or empty for the
/// default), within the server's longest.
async fn safe_point_timeout(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
    what: &str,
) -> std::result::Result<Duration, Failure> {
    let request: Option<FreezeRequest> =
        read_request(headers, body, what, "{\"timeout_ms\": <integer>}").await?;
    let timeout = request.map_or(DEFAULT_FREEZE_TIMEOUT, |r| r.timeout);
    let max = shared.settings.max_freeze_timeout;
    if timeout > max {
        return Err(Failure::new(
            ErrorKind::Invalid,
            format!("{what}: timeout {timeout:?} is over the longest allowed, {max:?}"),
        ));
    }
    Ok(timeout)
}

async fn freeze(State(shared): SharedState, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let outcome = async {
        let timeout = safe_point_timeout(&shared, &headers, body, "freeze request").await?;
        // Dropping the endpoint's future withdraws the freeze (its contract), so the deadline
        // holds even for a processor stuck in user code.
        match tokio::time::timeout(timeout, shared.endpoint.freeze(timeout)).await {
            Ok(frozen) => Ok(frozen?),
            Err(_) => Err(Failure::new(
                ErrorKind::Timeout,
                format!(
                    "no safe point reached within {timeout:?}; the freeze was withdrawn and the processor keeps running"
                ),
            )),
        }
    }
    .await;
    log_outcome(Route::Freeze, started, &outcome);
    match outcome {
        Ok(meta) => json(StatusCode::OK, &meta),
        Err(failure) => failure.into_response(),
    }
}

async fn precopy(State(shared): SharedState, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let outcome = async {
        let timeout = safe_point_timeout(&shared, &headers, body, "pre-copy request").await?;
        match tokio::time::timeout(timeout, shared.endpoint.precopy(timeout)).await {
            Ok(stored) => Ok(stored?),
            Err(_) => Err(Failure::new(
                ErrorKind::Timeout,
                format!("no safe point reached within {timeout:?}; the pre-copy was withdrawn"),
            )),
        }
    }
    .await;
    snapshot_response(Route::PreCopy, started, outcome)
}

async fn fetch(State(shared): SharedState) -> Response {
    let started = Instant::now();
    let outcome = shared.endpoint.snapshot().await.map_err(Failure::from);
    snapshot_response(Route::Fetch, started, outcome)
}

async fn fetch_full(State(shared): SharedState) -> Response {
    let started = Instant::now();
    let outcome = shared.endpoint.full_snapshot().await.map_err(Failure::from);
    snapshot_response(Route::FetchFull, started, outcome)
}

fn snapshot_response(
    route: Route,
    started: Instant,
    outcome: std::result::Result<Bytes, Failure>,
) -> Response {
    log_outcome(route, started, &outcome);
    match outcome {
        Ok(bytes) => ([(CONTENT_TYPE, CONTENT_TYPE_SNAPSHOT)], bytes).into_response(),
        Err(failure) => failure.into_response(),
    }
}

async fn load(State(shared): SharedState, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let outcome = async {
        let bytes = read_body(&headers, body, shared.settings.body_limit, "snapshot").await?;
        shared.endpoint.load(bytes).await.map_err(Failure::from)
    }
    .await;
    log_outcome(Route::Load, started, &outcome);
    match outcome {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => failure.into_response(),
    }
}

async fn resume(State(shared): SharedState, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let outcome = async {
        let request: Option<ResumeRequest> = read_request(
            &headers,
            body,
            "resume request",
            "{\"committed_sequence\": <integer>}",
        )
        .await?;
        let request = request.unwrap_or_default();
        shared
            .endpoint
            .resume(request.committed)
            .await
            .map_err(Failure::from)
    }
    .await;
    log_outcome(Route::Resume, started, &outcome);
    match outcome {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => failure.into_response(),
    }
}

async fn no_route(method: Method, uri: Uri) -> Response {
    Failure::new(
        ErrorKind::NotFound,
        format!("no route {method} {}", uri.path()),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = authorization {
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_check() {
        assert_eq!(
            check_token(&headers(Some("Bearer s3cret")), "s3cret"),
            Ok(())
        );
        assert_eq!(
            check_token(&headers(None), "s3cret"),
            Err("missing bearer token")
        );
        assert_eq!(
            check_token(&headers(Some("Bearer s3creT")), "s3cret"),
            Err("wrong bearer token")
        );
        assert_eq!(
            check_token(&headers(Some("Bearer s3cret-and-more")), "s3cret"),
            Err("wrong bearer token")
        );
        assert!(check_token(&headers(Some("Basic czNjcmV0")), "s3cret").is_err());
        // An instance without a token refuses even an empty bearer.
        assert!(check_token(&headers(Some("Bearer ")), "").is_err());
        assert!(check_token(&headers(Some("Bearer x")), "").is_err());
    }

    #[test]
    fn settings_hide_the_token() {
        let s = ServerSettings::new("s3cret").with_body_limit(10);
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.body_limit, 10);
    }
}
