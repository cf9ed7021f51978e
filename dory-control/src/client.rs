//! The orchestrator side: [`HttpControl`], the [`InstanceControl`] that reaches instances over
//! HTTP/1.
//!
//! One client serves every placement backend (local processes, Kubernetes pods): it only needs
//! [`Instance::endpoint`], the address and bearer token the placement reported. Connections
//! are plain TCP (instances are reached on their address inside the cluster network) and
//! pooled per address.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dory_core::{
    ControlEndpoint, Error, Health, Instance, InstanceControl, Result, Sequence, SnapshotMeta,
};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::wire::{
    self, CONTENT_TYPE_JSON, CONTENT_TYPE_SNAPSHOT, CONTROL_BODY_LIMIT, DEFAULT_BODY_LIMIT,
    ErrorBody, ErrorKind, FreezeRequest, ResumeRequest, Route,
};

/// How [`HttpControl`] calls instances.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientSettings {
    /// How long one call may take, from connecting to the last byte of the answer, before it
    /// fails as [`Error::Unavailable`]. A freeze may take its own timeout on top of this, so
    /// the instance's clean "no safe point in time" answer arrives before the client gives up.
    /// Default 10 s.
    pub timeout: Duration,
    /// How long establishing a connection may take. Default 3 s.
    pub connect_timeout: Duration,
    /// The largest snapshot [`fetch`](InstanceControl::fetch) accepts; a larger answer is
    /// refused with [`Error::Invalid`] without reading it. Default [`DEFAULT_BODY_LIMIT`].
    pub max_snapshot_bytes: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_snapshot_bytes: DEFAULT_BODY_LIMIT,
        }
    }
}

impl ClientSettings {
    /// The same settings with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same settings with another connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The same settings with another snapshot size limit.
    pub fn with_max_snapshot_bytes(mut self, bytes: usize) -> Self {
        self.max_snapshot_bytes = bytes;
        self
    }
}

/// The [`InstanceControl`] of every real placement backend: HTTP/1 calls to the instance's
/// endpoints (see [`crate::wire`]), with the bearer token of [`Instance::endpoint`].
///
/// Errors keep the meaning the instance answered with (see the table in [`crate::wire`]) and
/// name the operation, processor, epoch and address, never the token. An instance without an
/// endpoint yet, a refused connection and a call that takes longer than
/// [`ClientSettings::timeout`] are [`Error::Unavailable`]. Cloning is cheap and shares the
/// connection pool.
#[derive(Clone)]
pub struct HttpControl {
    client: Client<HttpConnector, Full<Bytes>>,
    settings: ClientSettings,
}

impl HttpControl {
    /// A client with the default settings.
    pub fn new() -> Self {
        HttpControl::with_settings(ClientSettings::default())
    }

    /// A client with these settings.
    pub fn with_settings(settings: ClientSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        // Control calls are small request/answer exchanges: no Nagle delay on them.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(connector);
        HttpControl { client, settings }
    }

    /// The settings.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// Calls `route` on `instance` and returns the answer's body; `extra` is added to the
    /// per-call timeout and `limit` bounds a successful answer's body.
    async fn call(
        &self,
        instance: &Instance,
        route: Route,
        body: Option<(&'static str, Bytes)>,
        extra: Duration,
        limit: usize,
    ) -> Result<Bytes> {
        let Some(endpoint) = &instance.endpoint else {
            return Err(Error::unavailable(format!(
                "{}: the instance has no control endpoint yet",
                describe(route, instance)
            )));
        };
        let started = Instant::now();
        let wait = self.settings.timeout.saturating_add(extra);
        let outcome = match self.request(endpoint, route, body) {
            Ok(request) => match tokio::time::timeout(wait, self.exchange(request, limit)).await {
                Ok(answer) => answer,
                Err(_) => Err(Error::unavailable(format!("no answer within {wait:?}"))),
            },
            Err(e) => Err(e),
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(bytes) => {
                tracing::debug!(
                    target: "dory::control",
                    epoch = instance.epoch.0,
                    processor.id = %instance.processor,
                    address = %endpoint.address,
                    route = %route,
                    elapsed_ms,
                    bytes = bytes.len(),
                    "control call done"
                );
                Ok(bytes)
            }
            Err(e) => {
                let e = e.context(describe(route, instance));
                tracing::debug!(
                    target: "dory::control",
                    epoch = instance.epoch.0,
                    processor.id = %instance.processor,
                    address = %endpoint.address,
                    route = %route,
                    elapsed_ms,
                    error = %e,
                    "control call failed"
                );
                Err(e)
            }
        }
    }

    fn request(
        &self,
        endpoint: &ControlEndpoint,
        route: Route,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Request<Full<Bytes>>> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.address.as_str())
            .path_and_query(route.path())
            .build()
            .map_err(|e| {
                Error::invalid(format!(
                    "control address {:?} is not host:port: {e}",
                    endpoint.address
                ))
            })?;
        let mut request = Request::builder().method(route.method()).uri(uri);
        if route.needs_token() {
            let mut value =
                HeaderValue::from_str(&wire::bearer(&endpoint.token)).map_err(|_| {
                    // The header's error would not show the token, but say nothing about it at all.
                    Error::invalid("the instance's bearer token is not a valid header value")
                })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let body = match body {
            Some((content_type, bytes)) => {
                request = request
                    .header(CONTENT_TYPE, content_type)
                    .header(CONTENT_LENGTH, bytes.len());
                bytes
            }
            None => Bytes::new(),
        };
        request
            .body(Full::new(body))
            .map_err(|e| Error::invalid(format!("could not build the request: {e}")))
    }

    /// Sends the request and reads the answer: its body on success, its error otherwise.
    async fn exchange(&self, request: Request<Full<Bytes>>, limit: usize) -> Result<Bytes> {
        let response = self.client.request(request).await.map_err(|e| {
            let what = if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            Error::unavailable(format!("{what}: {}", chain(&e)))
        })?;
        let status = response.status();
        if status.is_success() {
            let declared = response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(len) = declared
                && len > limit as u64
            {
                return Err(over_limit(&format!("{len} bytes"), limit));
            }
            match Limited::new(response.into_body(), limit).collect().await {
                Ok(collected) => Ok(collected.to_bytes()),
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    Err(over_limit("more bytes", limit))
                }
                Err(e) => Err(Error::unavailable(format!(
                    "answer cut short: {}",
                    chain(e.as_ref())
                ))),
            }
        } else {
            Err(read_error(status, response.into_body()).await)
        }
    }

    /// A snapshot answer, within the snapshot size limit.
    async fn fetch_route(&self, instance: &Instance, route: Route) -> Result<Vec<u8>> {
        let bytes = self
            .call(
                instance,
                route,
                None,
                Duration::ZERO,
                self.settings.max_snapshot_bytes,
            )
            .await?;
        Ok(Vec::from(bytes))
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        instance: &Instance,
        route: Route,
        body: Option<(&'static str, Bytes)>,
        extra: Duration,
    ) -> Result<T> {
        let bytes = self
            .call(instance, route, body, extra, CONTROL_BODY_LIMIT)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid(format!(
                "{}: the answer is not the expected JSON: {e}",
                describe(route, instance)
            ))
        })
    }
}

impl Default for HttpControl {
    fn default() -> Self {
        HttpControl::new()
    }
}

impl fmt::Debug for HttpControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpControl")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What a call was, as its errors name it: `freeze (processor p, epoch e3, at 10.0.0.7:8080)`.
fn describe(route: Route, instance: &Instance) -> String {
    let operation = route.operation();
    let (processor, epoch) = (&instance.processor, instance.epoch);
    match &instance.endpoint {
        Some(endpoint) => format!(
            "{operation} (processor {processor}, epoch {epoch}, at {})",
            endpoint.address
        ),
        None => format!("{operation} (processor {processor}, epoch {epoch})"),
    }
}

fn over_limit(size: &str, limit: usize) -> Error {
    Error::invalid(format!(
        "answer of {size} is over the client's limit of {limit} bytes"
    ))
}

/// The error of a non-success answer, from its [`ErrorBody`] or else its status.
async fn read_error(status: StatusCode, body: hyper::body::Incoming) -> Error {
    match Limited::new(body, CONTROL_BODY_LIMIT).collect().await {
        Ok(collected) => ErrorBody::decode(status, &collected.to_bytes()),
        Err(_) => ErrorKind::from_status(status).into_error(format!(
            "HTTP {status} (error body unreadable or over {CONTROL_BODY_LIMIT} bytes)"
        )),
    }
}

/// An error and its sources, `outer: inner: innermost`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[async_trait]
impl InstanceControl for HttpControl {
    async fn health(&self, instance: &Instance) -> Result<Health> {
        self.call_json(instance, Route::Health, None, Duration::ZERO)
            .await
    }

    async fn freeze(&self, instance: &Instance, timeout: Duration) -> Result<SnapshotMeta> {
        let request = serde_json::to_vec(&FreezeRequest { timeout })
            .map_err(|e| Error::invalid(format!("could not encode the freeze request: {e}")))?;
        // The instance gets the whole freeze timeout on top of an ordinary call's, so its own
        // "no safe point in time" answer arrives before this side gives up.
        self.call_json(
            instance,
            Route::Freeze,
            Some((CONTENT_TYPE_JSON, Bytes::from(request))),
            timeout,
        )
        .await
    }

    async fn fetch(&self, instance: &Instance) -> Result<Vec<u8>> {
        self.fetch_route(instance, Route::Fetch).await
    }

    async fn fetch_full(&self, instance: &Instance) -> Result<Vec<u8>> {
        self.fetch_route(instance, Route::FetchFull).await
    }

    async fn precopy(&self, instance: &Instance, timeout: Duration) -> Result<Vec<u8>> {
        let request = serde_json::to_vec(&FreezeRequest { timeout })
            .map_err(|e| Error::invalid(format!("could not encode the pre-copy request: {e}")))?;
        let bytes = self
            .call(
                instance,
                Route::PreCopy,
                Some((CONTENT_TYPE_JSON, Bytes::from(request))),
                timeout,
                self.settings.max_snapshot_bytes,
            )
            .await?;
        Ok(Vec::from(bytes))
    }

    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> Result<()> {
        let body = Bytes::copy_from_slice(snapshot);
        self.call(
            instance,
            Route::Load,
            Some((CONTENT_TYPE_SNAPSHOT, body)),
            Duration::ZERO,
            CONTROL_BODY_LIMIT,
        )
        .await
        .map(drop)
    }

    async fn resume(&self, instance: &Instance) -> Result<()> {
        self.call(
            instance,
            Route::Resume,
            None,
            Duration::ZERO,
            CONTROL_BODY_LIMIT,
        )
        .await
        .map(drop)
    }

    async fn resume_committed(&self, instance: &Instance, committed: Sequence) -> Result<()> {
        let request = serde_json::to_vec(&ResumeRequest {
            committed: Some(committed),
        })
        .map_err(|e| Error::invalid(format!("could not encode the resume request: {e}")))?;
        self.call(
            instance,
            Route::Resume,
            Some((CONTENT_TYPE_JSON, Bytes::from(request))),
            Duration::ZERO,
            CONTROL_BODY_LIMIT,
        )
        .await
        .map(drop)
    }
}
