//! The resources the fake serves: what a path names, whether it is namespaced, which
//! subresources and field selectors it has, and which built-in behaviour applies.

use std::fmt;

/// A resource by group, version and plural name: the coordinates in a request path
/// (`/apis/coordination.k8s.io/v1/namespaces/ns/leases`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version (`v1`).
    pub version: String,
    /// Plural resource name (`pods`).
    pub plural: String,
}

impl ResourceId {
    /// A resource by its coordinates.
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }

    /// The resource of a typed object (`ResourceId::of::<Pod>()`).
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Self {
        Self {
            group: K::group(&()).into_owned(),
            version: K::version(&()).into_owned(),
            plural: K::plural(&()).into_owned(),
        }
    }

    /// Core `v1` pods.
    pub fn pods() -> Self {
        Self::new("", "v1", "pods")
    }

    /// Core `v1` nodes.
    pub fn nodes() -> Self {
        Self::new("", "v1", "nodes")
    }

    /// Core `v1` namespaces.
    pub fn namespaces() -> Self {
        Self::new("", "v1", "namespaces")
    }

    /// `policy/v1` PodDisruptionBudgets.
    pub fn pod_disruption_budgets() -> Self {
        Self::new("policy", "v1", "poddisruptionbudgets")
    }

    /// The `apiVersion` objects of this resource carry (`v1`, `policy/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group and resource as the real server names them in messages.
    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.plural)
    }
}

/// A group and resource as error messages name them: `pods`, `leases.coordination.k8s.io`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupResource {
    /// API group; empty for the core group.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// Built-in behaviour beyond generic storage, chosen by resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Special {
    None,
    Pod,
    Node,
    Namespace,
    Pdb,
    Secret,
}

/// What the fake knows about one resource.
#[derive(Clone, Debug)]
pub struct ResourceDef {
    /// Group, version and plural.
    pub id: ResourceId,
    /// The object kind (`Pod`); list kinds are this plus `List`.
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether the resource has a `status` subresource: then writes to the main resource
    /// ignore `.status` and writes to `/status` change only `.status`.
    pub status_subresource: bool,
    /// Whether a delete answers with the object rather than a `Status` (the registry's
    /// `ReturnDeletedObject`; true for pods).
    pub return_deleted_object: bool,
    /// Field selector keys beyond `metadata.name` and `metadata.namespace`.
    pub selectable_fields: Vec<String>,
}

impl ResourceDef {
    /// A namespaced resource with no subresources.
    pub fn namespaced(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            id: ResourceId::new(group, version, plural),
            kind: kind.into(),
            namespaced: true,
            status_subresource: false,
            return_deleted_object: false,
            selectable_fields: Vec::new(),
        }
    }

    /// A cluster-scoped resource with no subresources.
    pub fn cluster_scoped(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            namespaced: false,
            ..Self::namespaced(group, version, plural, kind)
        }
    }

    /// The same with a `status` subresource.
    #[must_use]
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// The same with one more selectable field (a dotted path such as `spec.nodeName`).
    #[must_use]
    pub fn with_field(mut self, path: &str) -> Self {
        self.selectable_fields.push(path.into());
        self
    }

    /// The resources every fake serves: core `pods` (with `status` and `eviction`),
    /// `secrets`, `configmaps`, `events`, `serviceaccounts`, `nodes` and `namespaces`
    /// (cluster-scoped, with `status`); `policy/v1` `poddisruptionbudgets` (with `status`);
    /// `coordination.k8s.io/v1` `leases`; `events.k8s.io/v1` `events`.
    pub fn builtins() -> Vec<Self> {
        let mut pods = Self::namespaced("", "v1", "pods", "Pod").with_status();
        pods.return_deleted_object = true;
        for field in [
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ] {
            pods = pods.with_field(field);
        }
        let mut namespaces = Self::cluster_scoped("", "v1", "namespaces", "Namespace")
            .with_status()
            .with_field("status.phase");
        namespaces.return_deleted_object = true;
        let mut service_accounts = Self::namespaced("", "v1", "serviceaccounts", "ServiceAccount");
        service_accounts.return_deleted_object = true;
        vec![
            pods,
            Self::namespaced("", "v1", "secrets", "Secret").with_field("type"),
            Self::namespaced("", "v1", "configmaps", "ConfigMap"),
            Self::namespaced("", "v1", "events", "Event")
                .with_field("involvedObject.kind")
                .with_field("involvedObject.name")
                .with_field("involvedObject.namespace")
                .with_field("involvedObject.uid")
                .with_field("reason")
                .with_field("type"),
            service_accounts,
            Self::cluster_scoped("", "v1", "nodes", "Node")
                .with_status()
                .with_field("spec.unschedulable"),
            namespaces,
            Self::namespaced(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
            )
            .with_status(),
            Self::namespaced("coordination.k8s.io", "v1", "leases", "Lease"),
            Self::namespaced("events.k8s.io", "v1", "events", "Event"),
        ]
    }

    pub(crate) fn special(&self) -> Special {
        match (
            self.id.group.as_str(),
            self.id.version.as_str(),
            self.id.plural.as_str(),
        ) {
            ("", "v1", "pods") => Special::Pod,
            ("", "v1", "nodes") => Special::Node,
            ("", "v1", "namespaces") => Special::Namespace,
            ("", "v1", "secrets") => Special::Secret,
            ("policy", _, "poddisruptionbudgets") => Special::Pdb,
            _ => Special::None,
        }
    }

    /// Whether `field` may appear in a field selector on this resource.
    pub(crate) fn selectable(&self, field: &str) -> bool {
        field == "metadata.name"
            || (field == "metadata.namespace" && self.namespaced)
            || self.selectable_fields.iter().any(|f| f == field)
    }
}
