//! Test hooks around every request: the request log, injected faults and latency.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// A request's verb, as Kubernetes audit logs and RBAC name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    /// `GET` of one object.
    Get,
    /// `GET` of a collection.
    List,
    /// `GET` of a collection with `watch=true`.
    Watch,
    /// `POST` (including `pods/eviction`).
    Create,
    /// `PUT`.
    Update,
    /// `PATCH` (including server-side apply).
    Patch,
    /// `DELETE` of one object.
    Delete,
    /// `DELETE` of a collection.
    DeleteCollection,
}

impl Verb {
    /// The lowercase name (`deletecollection`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::DeleteCollection => "deletecollection",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One request the fake answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Position in the log; increases in the order requests were answered.
    pub seq: u64,
    /// When it was answered (for a watch: when the stream opened).
    pub at: Instant,
    /// The verb.
    pub verb: Verb,
    /// API group; empty for the core group.
    pub group: String,
    /// The resource, with the subresource if any: `pods`, `pods/status`, `pods/eviction`.
    pub resource: String,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// The object's name, if any.
    pub name: Option<String>,
    /// The HTTP status answered.
    pub code: u16,
}

impl RecordedRequest {
    /// Whether this opened a watch stream.
    pub fn is_watch(&self) -> bool {
        self.verb == Verb::Watch
    }
}

/// A point in the request log: [`crate::FakeApiServer::requests_since`] returns what came
/// after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestMark(pub(crate) u64);

#[derive(Default)]
pub(crate) struct RequestLog {
    next: u64,
    entries: Vec<RecordedRequest>,
    counts: BTreeMap<(Verb, String), u64>,
}

impl RequestLog {
    pub(crate) fn record(&mut self, mut request: RecordedRequest) {
        request.seq = self.next;
        self.next += 1;
        *self
            .counts
            .entry((request.verb, request.resource.clone()))
            .or_default() += 1;
        self.entries.push(request);
    }

    pub(crate) fn mark(&self) -> RequestMark {
        RequestMark(self.next)
    }

    pub(crate) fn since(&self, mark: RequestMark) -> Vec<RecordedRequest> {
        // Sequence numbers are dense from the first entry kept.
        let first = self.entries.first().map_or(self.next, |e| e.seq);
        let skip = usize::try_from(mark.0.saturating_sub(first)).unwrap_or(usize::MAX);
        self.entries.iter().skip(skip).cloned().collect()
    }

    pub(crate) fn all(&self) -> Vec<RecordedRequest> {
        self.entries.clone()
    }

    pub(crate) fn counts(&self) -> BTreeMap<(Verb, String), u64> {
        self.counts.clone()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.counts.clear();
    }
}

/// A failure to inject: the next `times` requests matching `verb` and `resource` are answered
/// with `code` and a `Status` instead of being served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub(crate) verb: Option<Verb>,
    pub(crate) resource: Option<String>,
    pub(crate) code: u16,
    pub(crate) times: u32,
    pub(crate) message: String,
    pub(crate) retry_after: Option<u32>,
}

impl Fault {
    /// Fails the next matching request with HTTP `code` (500, 429, 409, …); matches every
    /// request until narrowed with [`Fault::verb`] and [`Fault::resource`].
    pub fn new(code: u16) -> Self {
        Self {
            verb: None,
            resource: None,
            code,
            times: 1,
            message: format!("injected fault ({code})"),
            retry_after: None,
        }
    }

    /// Only requests with this verb.
    #[must_use]
    pub fn verb(mut self, verb: Verb) -> Self {
        self.verb = Some(verb);
        self
    }

    /// Only requests on this resource, named as in [`RecordedRequest::resource`] (`pods`,
    /// `pods/status`, `leases`).
    #[must_use]
    pub fn resource(mut self, resource: &str) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// How many matching requests fail (default 1).
    #[must_use]
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// The message of the `Status`.
    #[must_use]
    pub fn message(mut self, message: &str) -> Self {
        self.message = message.into();
        self
    }

    /// A `Retry-After` header (and `details.retryAfterSeconds`), as the real server sends
    /// with 429s from API priority and fairness. Note that `kube`'s default client retries
    /// 429, 503 and 504 by itself, honouring this header.
    #[must_use]
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn matches(&self, verb: Verb, resource: &str) -> bool {
        self.verb.is_none_or(|v| v == verb)
            && self.resource.as_deref().is_none_or(|r| r == resource)
    }
}

#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) log: RequestLog,
    faults: Vec<Fault>,
    pub(crate) latency: Duration,
}

impl Hooks {
    pub(crate) fn inject(&mut self, fault: Fault) {
        if fault.times > 0 {
            self.faults.push(fault);
        }
    }

    pub(crate) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The fault this request trips, if any, counting it down.
    pub(crate) fn trip(&mut self, verb: Verb, resource: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| f.matches(verb, resource))?;
        let fault = self.faults[i].clone();
        self.faults[i].times -= 1;
        if self.faults[i].times == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(verb: Verb, resource: &str) -> RecordedRequest {
        RecordedRequest {
            seq: 0,
            at: Instant::now(),
            verb,
            group: String::new(),
            resource: resource.into(),
            namespace: None,
            name: None,
            code: 200,
        }
    }

    #[test]
    fn faults_count_down_and_match() {
        let mut h = Hooks::default();
        h.inject(Fault::new(500).verb(Verb::Create).resource("pods").times(2));
        assert!(h.trip(Verb::Get, "pods").is_none());
        assert!(h.trip(Verb::Create, "secrets").is_none());
        assert_eq!(h.trip(Verb::Create, "pods").map(|f| f.code), Some(500));
        assert!(h.trip(Verb::Create, "pods").is_some());
        assert!(h.trip(Verb::Create, "pods").is_none());
    }

    #[test]
    fn marks_cut_the_log() {
        let mut log = RequestLog::default();
        log.record(req(Verb::List, "pods"));
        let mark = log.mark();
        log.record(req(Verb::Watch, "pods"));
        log.record(req(Verb::Update, "leases"));
        let since = log.since(mark);
        assert_eq!(since.len(), 2);
        assert_eq!(since[0].verb, Verb::Watch);
        log.clear();
        log.record(req(Verb::Get, "pods"));
        assert_eq!(log.since(mark).len(), 1);
        assert_eq!(log.counts()[&(Verb::Get, "pods".to_string())], 1);
    }
}
