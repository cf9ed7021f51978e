//! The wire format: routes, headers, bodies, and the one mapping between error meanings and
//! HTTP status codes that the server and the client both use.
//!
//! # Routes
//!
//! | route | token | request body | success |
//! |---|---|---|---|
//! | `GET /healthz` | no | — | 200, [`Health`] as JSON |
//! | `GET /readyz` | no | — | 200, [`Readiness`] as JSON (503 with an [`ErrorBody`] when not ready) |
//! | `GET /metrics` | no | — | 200, Prometheus text ([`CONTENT_TYPE_METRICS`]) |
//! | `POST /state/freeze` | yes | [`FreezeRequest`] as JSON (empty: [`DEFAULT_FREEZE_TIMEOUT`]) | 200, [`SnapshotMeta`] as JSON |
//! | `POST /state/precopy` | yes | [`FreezeRequest`] as JSON (empty: [`DEFAULT_FREEZE_TIMEOUT`]) | 200, the full checkpoint just stored ([`CONTENT_TYPE_SNAPSHOT`]) |
//! | `GET /state` | yes | — | 200, the encoded snapshot ([`CONTENT_TYPE_SNAPSHOT`]): a delta against the last pre-copy when there was one |
//! | `GET /state/full` | yes | — | 200, the frozen state as a full snapshot |
//! | `PUT /state` | yes | the encoded snapshot, at most the server's body limit | 204 |
//! | `POST /state/resume` | yes | [`ResumeRequest`] as JSON (empty: no expectation) | 204 |
//!
//! The token travels as `Authorization: Bearer <token>` ([`bearer`]). Every failure answers
//! with an [`ErrorBody`] (`{"error": "<kind>", "message": "..."}`) and the status of its
//! [`ErrorKind`]:
//!
//! | kind | status | arrives as |
//! |---|---|---|
//! | `invalid` | 400 Bad Request | [`Error::Invalid`] |
//! | `unauthorized` | 401 Unauthorized (with `WWW-Authenticate: Bearer`) | [`Error::Invalid`] |
//! | `not_found` | 404 Not Found | [`Error::NotFound`] |
//! | `conflict` | 409 Conflict | [`Error::Conflict`] |
//! | `fenced` | 412 Precondition Failed | [`Error::Fenced`] |
//! | `too_large` | 413 Content Too Large | [`Error::Invalid`] |
//! | `unavailable` | 503 Service Unavailable | [`Error::Unavailable`] |
//! | `timeout` | 504 Gateway Timeout | [`Error::Unavailable`] |
//!
//! Every kind has its own status, so an answer whose body was lost or mangled (a proxy's error
//! page) still maps back by its status alone: another 4xx arrives as [`Error::Invalid`], any
//! other status as [`Error::Unavailable`]. `fenced` is 412 rather than 409 so that it never
//! reads as a retryable `conflict`: the precondition of the call, that this epoch still owns
//! the processor, no longer holds. `timeout` is a freeze that reached no safe point in time;
//! the processor keeps running, and the orchestrator may try again later, so it arrives as
//! the retryable [`Error::Unavailable`].

use std::fmt;
use std::time::Duration;

use dory_core::Error;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

pub use dory_core::{Health, SnapshotMeta};

/// `GET`: liveness and what the instance says about itself ([`Health`]).
pub const HEALTHZ: &str = "/healthz";
/// `GET`: readiness ([`Readiness`]).
pub const READYZ: &str = "/readyz";
/// `GET`: Prometheus text.
pub const METRICS: &str = "/metrics";
/// `GET` the frozen snapshot, `PUT` a snapshot to load.
pub const STATE: &str = "/state";
/// `POST`: freeze at the next safe point.
pub const STATE_FREEZE: &str = "/state/freeze";
/// `POST`: start (or restart) the run loop.
pub const STATE_RESUME: &str = "/state/resume";
/// `POST`: store a full checkpoint at the next safe point, keep running, answer its bytes (the
/// base a pre-copy move loads into the replacement before the freeze).
pub const STATE_PRECOPY: &str = "/state/precopy";
/// `GET`: the frozen state as a full snapshot, even when `GET /state` answers a delta.
pub const STATE_FULL: &str = "/state/full";

/// The authentication scheme of the state routes' `Authorization` header.
pub const BEARER_SCHEME: &str = "Bearer";
/// Content type of JSON bodies (requests, answers and errors).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Content type of an encoded snapshot (see [`dory_core::snapshot`]).
pub const CONTENT_TYPE_SNAPSHOT: &str = "application/octet-stream";
/// Content type of `GET /metrics`: the Prometheus text exposition format.
pub const CONTENT_TYPE_METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The default limit on a snapshot body, both for `PUT /state` on the server and for
/// `GET /state` answers on the client: 256 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 256 << 20;
/// The limit on every other body (freeze requests, JSON answers, error bodies): 64 KiB.
pub const CONTROL_BODY_LIMIT: usize = 64 << 10;
/// The freeze timeout of a `POST /state/freeze` without a body.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// One of the instance's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET /healthz`.
    Health,
    /// `GET /readyz`.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `POST /state/freeze`.
    Freeze,
    /// `GET /state`.
    Fetch,
    /// `PUT /state`.
    Load,
    /// `POST /state/resume`.
    Resume,
    /// `POST /state/precopy`.
    PreCopy,
    /// `GET /state/full`.
    FetchFull,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 9] = [
        Route::Health,
        Route::Ready,
        Route::Metrics,
        Route::Freeze,
        Route::Fetch,
        Route::Load,
        Route::Resume,
        Route::PreCopy,
        Route::FetchFull,
    ];

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Route::Health | Route::Ready | Route::Metrics | Route::Fetch | Route::FetchFull => {
                Method::GET
            }
            Route::Freeze | Route::Resume | Route::PreCopy => Method::POST,
            Route::Load => Method::PUT,
        }
    }

    /// The path.
    pub fn path(self) -> &'static str {
        match self {
            Route::Health => HEALTHZ,
            Route::Ready => READYZ,
            Route::Metrics => METRICS,
            Route::Freeze => STATE_FREEZE,
            Route::Fetch | Route::Load => STATE,
            Route::Resume => STATE_RESUME,
            Route::PreCopy => STATE_PRECOPY,
            Route::FetchFull => STATE_FULL,
        }
    }

    /// Whether the route needs the instance's bearer token (the state routes do).
    pub fn needs_token(self) -> bool {
        matches!(
            self,
            Route::Freeze
                | Route::Fetch
                | Route::Load
                | Route::Resume
                | Route::PreCopy
                | Route::FetchFull
        )
    }

    /// What the route does, as errors and logs name it.
    pub fn operation(self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Ready => "readiness",
            Route::Metrics => "metrics",
            Route::Freeze => "freeze",
            Route::Fetch => "fetch snapshot",
            Route::Load => "load snapshot",
            Route::Resume => "resume",
            Route::PreCopy => "pre-copy",
            Route::FetchFull => "fetch full snapshot",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path())
    }
}

/// The value of the `Authorization` header carrying `token`.
pub fn bearer(token: &str) -> String {
    format!("{BEARER_SCHEME} {token}")
}

/// The token of an `Authorization` header value, if it is a bearer token (the scheme is
/// matched case-insensitively, as HTTP requires).
pub fn parse_bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = BEARER_SCHEME.len();
    if value.len() <= scheme
        || !value[..scheme].eq_ignore_ascii_case(BEARER_SCHEME.as_bytes())
        || value[scheme] != b' '
    {
        return None;
    }
    Some(value[scheme + 1..].trim_ascii())
}

/// The body of `POST /state/freeze`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRequest {
    /// How long the instance may take to reach a safe point (with every outstanding publish
    /// confirmed); after that the freeze fails with [`ErrorKind::Timeout`] and the processor
    /// keeps running. On the wire: `timeout_ms`, integer milliseconds.
    #[serde(rename = "timeout_ms", with = "dory_core::model::duration_ms")]
    pub timeout: Duration,
}

/// The body of `POST /state/resume`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// The sequence of the snapshot the orchestrator committed for this instance's epoch. A
    /// standby that loaded another snapshot, or none, restores this one from the state store
    /// before it runs: the load and the commit of a move run at once, so a failed load or an
    /// orchestrator that died between them must not leave the replacement running an older
    /// state. Absent: the instance resumes with what it holds. On the wire:
    /// `committed_sequence`.
    #[serde(
        rename = "committed_sequence",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub committed: Option<dory_core::Sequence>,
}

/// The answer of `GET /readyz` when the instance is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Always `true`: an instance that is not ready answers 503 with an [`ErrorBody`].
    pub ready: bool,
}

/// What went wrong, as it travels: the meanings of [`dory_core::Error`] plus the failures the
/// HTTP layer adds. Each kind has exactly one status code ([`ErrorKind::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Invalid`]: a malformed request or snapshot (bad header, checksum, processor
    /// id, or (epoch, sequence)).
    Invalid,
    /// No bearer token, or the wrong one.
    Unauthorized,
    /// [`Error::NotFound`], or a route that does not exist.
    NotFound,
    /// [`Error::Conflict`]: the instance is in the wrong phase for the call (e.g. fetching
    /// from an instance that is not frozen).
    Conflict,
    /// [`Error::Fenced`]: the instance no longer owns the processor.
    Fenced,
    /// The request body is over the server's limit.
    TooLarge,
    /// [`Error::Unavailable`]: the instance cannot answer now.
    Unavailable,
    /// A freeze that reached no safe point in time; the processor keeps running.
    Timeout,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Invalid,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::Fenced,
        ErrorKind::TooLarge,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
    ];

    /// The kind of an error, by its meaning. A variant added to [`dory_core::Error`] later
    /// travels as `unavailable` until it has a kind of its own.
    pub fn of(error: &Error) -> ErrorKind {
        match error {
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Fenced(_) => ErrorKind::Fenced,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Unavailable,
        }
    }

    /// The status code the kind is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Fenced => StatusCode::PRECONDITION_FAILED,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The kind of an error answer known only by its status (its body was missing or not an
    /// [`ErrorBody`]): the inverse of [`ErrorKind::status`], and otherwise `invalid` for a 4xx
    /// and `unavailable` for anything else.
    pub fn from_status(status: StatusCode) -> ErrorKind {
        ErrorKind::ALL
            .into_iter()
            .find(|kind| kind.status() == status)
            .unwrap_or(if status.is_client_error() {
                ErrorKind::Invalid
            } else {
                ErrorKind::Unavailable
            })
    }

    /// The name on the wire (`"invalid"`, `"too_large"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Fenced => "fenced",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
        }
    }

    /// The [`dory_core::Error`] an answer of this kind arrives as, with `message`. Refusals
    /// the caller cannot fix by retrying (`unauthorized`, `too_large`) are `Invalid`, their
    /// message starting with the kind; a freeze `timeout` is the retryable `Unavailable`.
    pub fn into_error(self, message: impl fmt::Display) -> Error {
        match self {
            ErrorKind::Invalid => Error::invalid(message.to_string()),
            ErrorKind::NotFound => Error::not_found(message.to_string()),
            ErrorKind::Conflict => Error::conflict(message.to_string()),
            ErrorKind::Fenced => Error::fenced(message.to_string()),
            ErrorKind::Unavailable => Error::unavailable(message.to_string()),
            ErrorKind::Unauthorized | ErrorKind::TooLarge => {
                Error::invalid(format!("{}: {message}", self.name()))
            }
            ErrorKind::Timeout => Error::unavailable(format!("{}: {message}", self.name())),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The JSON body of every error answer: `{"error": "<kind>", "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of failure it is; its status is [`ErrorKind::status`].
    pub error: ErrorKind,
    /// What was wrong, for people (never a token).
    pub message: String,
}

impl ErrorBody {
    /// A body of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            error: kind,
            message: message.into(),
        }
    }

    /// The body for `error`: its kind and its message without the kind's prefix.
    pub fn from_error(error: &Error) -> Self {
        ErrorBody::new(ErrorKind::of(error), message_of(error))
    }

    /// The status this body is answered with.
    pub fn status(&self) -> StatusCode {
        self.error.status()
    }

    /// The error this body arrives as (see [`ErrorKind::into_error`]).
    pub fn into_error(self) -> Error {
        self.error.into_error(self.message)
    }

    /// The error an answer with `status` and `body` arrives as: the body's own kind and
    /// message when it is an [`ErrorBody`], else the kind of the status with the body's text
    /// (cut short) as the message.
    pub fn decode(status: StatusCode, body: &[u8]) -> Error {
        /// An error body of a kind this build does not know (a newer server's).
        #[derive(Deserialize)]
        struct Unknown {
            error: String,
            message: String,
        }
        if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
            return parsed.into_error();
        }
        match serde_json::from_slice::<Unknown>(body) {
            Ok(Unknown { error, message }) => {
                ErrorKind::from_status(status).into_error(format!("{error}: {message}"))
            }
            Err(_) => {
                const SHOWN: usize = 200;
                let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]);
                let text = text.trim();
                let cut = if body.len() > SHOWN { "..." } else { "" };
                let message = if text.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {text}{cut}")
                };
                ErrorKind::from_status(status).into_error(message)
            }
        }
    }
}

/// The message of an error without its kind's prefix (`"checksum mismatch"`, not
/// `"invalid: checksum mismatch"`).
pub fn message_of(error: &Error) -> String {
    match error {
        Error::Invalid(m)
        | Error::NotFound(m)
        | Error::Conflict(m)
        | Error::Fenced(m)
        | Error::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_status_and_maps_back() {
        let mut seen = std::collections::BTreeSet::new();
        for kind in ErrorKind::ALL {
            assert!(
                seen.insert(kind.status().as_u16()),
                "{kind} shares a status"
            );
            assert_eq!(ErrorKind::from_status(kind.status()), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).unwrap(), kind);
        }
        assert_eq!(
            ErrorKind::from_status(StatusCode::METHOD_NOT_ALLOWED),
            ErrorKind::Invalid
        );
        assert_eq!(
            ErrorKind::from_status(StatusCode::INTERNAL_SERVER_ERROR),
            ErrorKind::Unavailable
        );
        assert_eq!(
            ErrorKind::from_status(StatusCode::BAD_GATEWAY),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn core_errors_round_trip_with_meaning_and_message() {
        for error in [
            Error::invalid("snapshot of processor p epoch e3: checksum mismatch"),
            Error::not_found("no snapshot"),
            Error::conflict("instance is running; freeze it first"),
            Error::fenced("epoch e3 no longer owns p"),
            Error::unavailable("shutting down"),
        ] {
            let body = ErrorBody::from_error(&error);
            let json = serde_json::to_vec(&body).unwrap();
            assert_eq!(ErrorBody::decode(body.status(), &json), error);
            // The status alone keeps the meaning too.
            let by_status = ErrorBody::decode(body.status(), b"");
            assert_eq!(
                std::mem::discriminant(&by_status),
                std::mem::discriminant(&error),
                "{by_status}"
            );
        }
    }

    #[test]
    fn http_failures_arrive_as_clear_errors() {
        let e = ErrorKind::Unauthorized.into_error("wrong bearer token");
        assert_eq!(e, Error::invalid("unauthorized: wrong bearer token"));
        let e = ErrorKind::TooLarge.into_error("body over 10 bytes");
        assert_eq!(e, Error::invalid("too_large: body over 10 bytes"));
        let e = ErrorKind::Timeout.into_error("no safe point within 5s");
        assert!(e.is_retryable());
        assert_eq!(
            e.to_string(),
            "unavailable: timeout: no safe point within 5s"
        );
    }

    #[test]
    fn foreign_error_bodies_map_by_status() {
        let e = ErrorBody::decode(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(
            e,
            Error::unavailable("HTTP 502 Bad Gateway: <html>bad gateway</html>")
        );
        let long = vec![b'x'; 1000];
        let Error::Invalid(m) = ErrorBody::decode(StatusCode::METHOD_NOT_ALLOWED, &long) else {
            panic!("not invalid")
        };
        assert!(m.ends_with("...") && m.len() < 300, "{m}");
        let unknown = br#"{"error": "from_the_future", "message": "m"}"#;
        assert_eq!(
            ErrorBody::decode(StatusCode::SERVICE_UNAVAILABLE, unknown),
            Error::unavailable("from_the_future: m")
        );
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(ErrorKind::TooLarge, "over");
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": "too_large", "message": "over"})
        );
        assert_eq!(
            serde_json::to_value(FreezeRequest {
                timeout: Duration::from_millis(1500)
            })
            .unwrap(),
            serde_json::json!({"timeout_ms": 1500})
        );
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("t0k"), "Bearer t0k");
        assert_eq!(parse_bearer(b"Bearer t0k"), Some(&b"t0k"[..]));
        assert_eq!(parse_bearer(b"bearer  t0k "), Some(&b"t0k"[..]));
        assert_eq!(parse_bearer(b"Basic dXNlcg=="), None);
        assert_eq!(parse_bearer(b"Bearer"), None);
        assert_eq!(parse_bearer(b"Bearert0k"), None);
    }

    #[test]
    fn routes() {
        for route in Route::ALL {
            assert!(route.path().starts_with('/'));
            assert_eq!(route.needs_token(), route.path().starts_with(STATE));
        }
        assert_eq!(Route::Load.to_string(), "PUT /state");
    }
}
