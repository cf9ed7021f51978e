//! The Kubernetes backend's errors, each naming what was being done, and each mapped to the
//! meaning the orchestrator decides by ([`dory_core::Error`]).

use dory_core::{Epoch, ProcessorId};

/// What went wrong in the Kubernetes backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// The configuration or a processor's spec cannot make a pod (no image, a bad quantity).
    #[error("kubernetes placement config: {0}")]
    Config(String),
    /// A launch of a `(processor, epoch)` whose pod already exists: nothing was started.
    #[error("instance {epoch} of {processor} already exists (pod {pod})")]
    AlreadyExists {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
        /// The pod's name.
        pod: String,
    },
    /// [`forget`](dory_core::Placement::forget) of an instance that has not ended.
    #[error("instance {epoch} of {processor} is {phase}, not ended")]
    NotEnded {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
        /// Its phase.
        phase: String,
    },
    /// The API server refused or failed a request; `what` names the request.
    #[error("{what}: {source}")]
    Api {
        /// The request (`create pod counter-3`).
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The Lease was lost, or is held by another holder.
    #[error("lease {lease}: {why}")]
    Lease {
        /// The Lease's name.
        lease: String,
        /// What happened.
        why: String,
    },
    /// The watches have not delivered their first full list in time.
    #[error("the {what} watch has not listed yet")]
    NotSynced {
        /// `pods` or `nodes`.
        what: &'static str,
    },
}

impl KubeError {
    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Self {
        KubeError::Api {
            what: what.into(),
            source,
        }
    }

    /// The HTTP status of an API error, if the server answered with one.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            KubeError::Api { source, .. } => status_code(source),
            _ => None,
        }
    }
}

/// The HTTP status the API server answered with, if it answered.
pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Whether the same request may succeed later: throttled (`429`), a server error, or no
/// answer at all (transport, timeout).
pub(crate) fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

impl From<KubeError> for dory_core::Error {
    fn from(e: KubeError) -> Self {
        let message = e.to_string();
        match &e {
            KubeError::AlreadyExists { .. } | KubeError::NotEnded { .. } => {
                dory_core::Error::Conflict(message)
            }
            KubeError::Config(_) => dory_core::Error::Invalid(message),
            KubeError::Lease { .. } => dory_core::Error::Fenced(message),
            KubeError::NotSynced { .. } => dory_core::Error::Unavailable(message),
            KubeError::Api { source, .. } => match status_code(source) {
                Some(404 | 410) => dory_core::Error::NotFound(message),
                Some(409) => dory_core::Error::Conflict(message),
                // 400 and 422 are a malformed object: retrying the same one cannot help.
                Some(400 | 422) => dory_core::Error::Invalid(message),
                // 401/403 may be RBAC being rolled out; 429 and 5xx are load. All may pass.
                _ => dory_core::Error::Unavailable(message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> KubeError {
        KubeError::api(
            "create pod p-1",
            kube::Error::Api(Box::new(
                kube::core::Status::failure("no", "Reason").with_code(code),
            )),
        )
    }

    #[test]
    fn api_errors_map_to_meanings() {
        use dory_core::error::Meaning::*;
        for (code, meaning) in [
            (404, NotFound),
            (409, Conflict),
            (422, Invalid),
            (429, Unavailable),
            (500, Unavailable),
            (403, Unavailable),
        ] {
            let e: dory_core::Error = api(code).into();
            assert_eq!(e.meaning(), meaning, "{code}");
            assert!(e.to_string().contains("create pod p-1"), "{e}");
        }
        let e: dory_core::Error = KubeError::Lease {
            lease: "dory".into(),
            why: "taken by b".into(),
        }
        .into();
        assert!(e.is_fenced());
    }
}
