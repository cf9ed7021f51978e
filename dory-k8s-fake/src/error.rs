//! The crate's error type, and its rendering as the `Status` object the real API server
//! answers failures with.

use serde_json::{Value, json};

use crate::resources::GroupResource;

/// Why a request, or a direct store operation, failed.
///
/// The API variants mirror the `reason` of a Kubernetes `Status`; [`Error::code`] is the HTTP
/// status the fake answers with, [`Error::status`] the body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 404 `NotFound`.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// The resource, as the real server names it.
        resource: GroupResource,
        /// The object's name.
        name: String,
    },
    /// 409 `AlreadyExists`: a create of a name that is taken.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// The resource.
        resource: GroupResource,
        /// The object's name.
        name: String,
    },
    /// 409 `Conflict`: a stale resourceVersion or a failed precondition.
    #[error("{message}")]
    Conflict {
        /// The resource.
        resource: GroupResource,
        /// The object's name.
        name: String,
        /// The real server's message.
        message: String,
    },
    /// 422 `Invalid`: the object or patch is not acceptable.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// 400 `BadRequest`: the request itself is malformed.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
    },
    /// 403 `Forbidden` (e.g. creating in a terminating namespace).
    #[error("{message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// 429 `TooManyRequests`, e.g. an eviction a PodDisruptionBudget refuses.
    #[error("{message}")]
    TooManyRequests {
        /// The real server's message.
        message: String,
        /// `(reason, message)` causes carried in `details.causes`.
        causes: Vec<(String, String)>,
    },
    /// 410 `Expired`: a resourceVersion or continue token older than the history kept.
    #[error("{message}")]
    Expired {
        /// The real server's message.
        message: String,
    },
    /// 504 `Timeout`: a resourceVersion newer than the store's.
    #[error("{message}")]
    Timeout {
        /// The real server's message.
        message: String,
    },
    /// 405 `MethodNotAllowed`.
    #[error("{message}")]
    MethodNotAllowed {
        /// What was not allowed.
        message: String,
    },
    /// 415 `UnsupportedMediaType`: a patch content type the fake does not know.
    #[error("{message}")]
    UnsupportedMediaType {
        /// The real server's message.
        message: String,
    },
    /// 413 `RequestEntityTooLarge`.
    #[error("{message}")]
    TooLarge {
        /// The limit.
        message: String,
    },
    /// 500 `InternalError`.
    #[error("{message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
    /// A failure injected by a test ([`crate::Fault`]).
    #[error("injected fault {code}: {message}")]
    Injected {
        /// The HTTP status answered.
        code: u16,
        /// The message in the `Status`.
        message: String,
        /// `Retry-After` seconds, if any.
        retry_after: Option<u32>,
    },
    /// The resource is not served by this fake.
    #[error("the server could not find the requested resource ({0})")]
    UnknownResource(String),
    /// Binding or serving the listener failed.
    #[error("fake API server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Building a `kube::Client` for the fake failed.
    #[error("building a kube client for the fake API server: {0}")]
    Client(#[from] kube::Error),
    /// A typed object did not convert to or from JSON.
    #[error("object does not convert to or from JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub(crate) fn not_found(resource: GroupResource, name: &str) -> Self {
        Self::NotFound {
            resource,
            name: name.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
        }
    }

    pub(crate) fn conflict(resource: GroupResource, name: &str, message: String) -> Self {
        Self::Conflict {
            resource,
            name: name.into(),
            message,
        }
    }

    /// The real server's message for a write with a stale resourceVersion.
    pub(crate) fn stale(resource: GroupResource, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {resource} \"{name}\": the object has been \
             modified; please apply your changes to the latest version and try again"
        );
        Self::conflict(resource, name, message)
    }

    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound { .. } | Self::UnknownResource(_) => 404,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => 409,
            Self::Invalid { .. } => 422,
            Self::BadRequest { .. } | Self::Json(_) => 400,
            Self::Forbidden { .. } => 403,
            Self::TooManyRequests { .. } => 429,
            Self::Expired { .. } => 410,
            Self::Timeout { .. } => 504,
            Self::MethodNotAllowed { .. } => 405,
            Self::UnsupportedMediaType { .. } => 415,
            Self::TooLarge { .. } => 413,
            Self::Internal { .. } | Self::Io(_) | Self::Client(_) => 500,
            Self::Injected { code, .. } => *code,
        }
    }

    /// The `reason` of the `Status`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AlreadyExists { .. } => "AlreadyExists",
            other => reason_for(other.code()),
        }
    }

    /// The `Status` object the real server answers this failure with.
    pub fn status(&self) -> Value {
        let message = match self {
            Self::UnknownResource(_) => "the server could not find the requested resource".into(),
            Self::Injected { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. } => Some(details(resource, name)),
            Self::TooManyRequests { causes, .. } if !causes.is_empty() => Some(json!({
                "causes": causes
                    .iter()
                    .map(|(reason, message)| json!({ "reason": reason, "message": message }))
                    .collect::<Vec<_>>()
            })),
            Self::Injected {
                retry_after: Some(secs),
                ..
            } => Some(json!({ "retryAfterSeconds": secs })),
            _ => None,
        };
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }
}

fn details(resource: &GroupResource, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": resource.resource });
    if !resource.group.is_empty() {
        d["group"] = resource.group.clone().into();
    }
    d
}

/// The `StatusReason` the real server pairs with an HTTP status.
pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_real_server() {
        let gr = GroupResource {
            group: "coordination.k8s.io".into(),
            resource: "leases".into(),
        };
        let s = Error::stale(gr.clone(), "leader").status();
        assert_eq!(s["code"], 409);
        assert_eq!(s["reason"], "Conflict");
        assert_eq!(
            s["message"],
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\": the object \
             has been modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(s["details"]["group"], "coordination.k8s.io");
        let s = Error::not_found(
            GroupResource {
                group: String::new(),
                resource: "pods".into(),
            },
            "p",
        )
        .status();
        assert_eq!(s["message"], "pods \"p\" not found");
        assert_eq!(s["details"], json!({ "name": "p", "kind": "pods" }));
    }
}
