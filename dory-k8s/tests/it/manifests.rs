//! The example manifests (`examples/kubernetes/`), checked without a cluster: every YAML
//! document has the API version of its kind and survives the typed Kubernetes struct of that
//! kind without losing a field (serde drops a misspelt or misplaced field without a word; the
//! round trip names it), the RBAC grants exactly what `dory-k8s` calls, and the orchestrator's
//! Deployment, its `dory.toml`, its Secret and the sample processor row fit together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use dory_core::{ProcessorId, ProcessorSpec};
use dory_k8s::{KubeConfig, LeaseConfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API version of every kind the examples may hold. A document of a kind not listed here
/// fails: add the kind with its version, and its typed struct to [`typed_round_trip`].
const API_VERSIONS: &[(&str, &str)] = &[
    ("Namespace", "v1"),
    ("ServiceAccount", "v1"),
    ("ConfigMap", "v1"),
    ("Secret", "v1"),
    ("Service", "v1"),
    ("Role", "rbac.authorization.k8s.io/v1"),
    ("RoleBinding", "rbac.authorization.k8s.io/v1"),
    ("ClusterRole", "rbac.authorization.k8s.io/v1"),
    ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1"),
    ("Deployment", "apps/v1"),
    ("PodDisruptionBudget", "policy/v1"),
    ("Lease", "coordination.k8s.io/v1"),
    ("Kustomization", "kustomize.config.k8s.io/v1beta1"),
];

/// Where a grant applies: the Role in Dory's namespace, or the ClusterRole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Namespace,
    Cluster,
}

/// What the orchestrator's Role and ClusterRole grant, per (scope, API group, resource): exactly
/// the calls `dory-k8s` makes, no more, no less (kube's `get`/`get_opt` is get, `replace` is
/// update, a watcher is list and watch).
///
/// This table mirrors the code: when dory-k8s starts or stops calling a verb on a resource,
/// change it here and in `examples/kubernetes/rbac.yaml` together.
const GRANTED: &[(Scope, &str, &str, &[&str])] = &[
    // A pod per instance (`placement.rs`): watched by label selector, created, read back after
    // a 409, deleted. Never evicted, never patched.
    (
        Scope::Namespace,
        "",
        "pods",
        &["get", "list", "watch", "create", "delete"],
    ),
    // Each instance's token Secret: created, read by name. Never deleted by Dory: it is owned
    // by its pod and garbage-collected with it.
    (Scope::Namespace, "", "secrets", &["create", "get"]),
    // The PodDisruptionBudget over every Dory pod: created, read and replaced when it drifted,
    // watched so a deleted one is re-created.
    (
        Scope::Namespace,
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "create", "update"],
    ),
    // The leadership Lease (`lease.rs`): read, created, replaced to renew or take over.
    (
        Scope::Namespace,
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
    // Cordons, taints, readiness and the site label: watched only. Nodes are cluster-scoped.
    (Scope::Cluster, "", "nodes", &["list", "watch"]),
];

/// Files in the directory that kustomization.yaml must not apply.
const NOT_APPLIED: &[&str] = &["kustomization.yaml", "secret.example.yaml"];

/// One YAML document of one file.
struct Document {
    /// `file.yaml#n`, n counting documents from 1.
    place: String,
    value: Value,
}

impl Document {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes")
}

/// The `*.yaml` files of the directory, by name.
fn yaml_files() -> Vec<PathBuf> {
    let dir = manifest_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// Every document of every file (multi-document files too), as JSON values.
fn documents() -> Vec<Document> {
    let mut all = Vec::new();
    for path in yaml_files() {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let values: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        assert!(!values.is_empty(), "{} holds no document", path.display());
        for (n, value) in values.into_iter().enumerate() {
            all.push(Document {
                place: format!("{}#{}", file_name(&path), n + 1),
                value,
            });
        }
    }
    all
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Document], kind: &str, name: &str) -> &'a Document {
    let found: Vec<&Document> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name:?}");
    found[0]
}

fn typed<T: DeserializeOwned>(doc: &Document) -> T {
    serde_json::from_value(doc.value.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc.place))
}

/// `kustomization.yaml` has no struct in k8s-openapi; this is the part of it the examples use.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
}

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// The document read into the typed struct of its kind and written back.
fn typed_round_trip(kind: &str, value: &Value) -> Result<Value, String> {
    match kind {
        "Namespace" => round_trip::<Namespace>(value),
        "ServiceAccount" => round_trip::<ServiceAccount>(value),
        "ConfigMap" => round_trip::<ConfigMap>(value),
        "Secret" => round_trip::<Secret>(value),
        "Service" => round_trip::<Service>(value),
        "Role" => round_trip::<Role>(value),
        "RoleBinding" => round_trip::<RoleBinding>(value),
        "ClusterRole" => round_trip::<ClusterRole>(value),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(value),
        "Deployment" => round_trip::<Deployment>(value),
        "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(value),
        "Lease" => round_trip::<Lease>(value),
        "Kustomization" => round_trip::<Kustomization>(value),
        other => Err(format!("no typed struct for kind {other:?}")),
    }
}

/// The paths of `input` that `output` lost or changed: everything written must come back.
fn dropped(input: &Value, output: &Value, path: &str, lost: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (key, v) in i {
                let path = format!("{path}.{key}");
                match o.get(key) {
                    Some(w) => dropped(v, w, &path, lost),
                    None => lost.push(format!("{path} (dropped)")),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (v, w)) in i.iter().zip(o).enumerate() {
                dropped(v, w, &format!("{path}[{n}]"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path}: {a} came back as {b}")),
    }
}

/// What the round trip lost, or why the document does not read as its type.
fn round_trip_losses(doc: &Document) -> Vec<String> {
    match typed_round_trip(doc.kind(), &doc.value) {
        Ok(output) => {
            let mut lost = Vec::new();
            dropped(&doc.value, &output, "", &mut lost);
            lost
        }
        Err(e) => vec![format!("does not read as {}: {e}", doc.kind())],
    }
}

#[test]
fn every_manifest_has_the_api_version_of_its_kind() {
    let versions: BTreeMap<&str, &str> = API_VERSIONS.iter().copied().collect();
    let mut wrong = Vec::new();
    for doc in documents() {
        let kind = doc.kind();
        let version = doc.value["apiVersion"].as_str().unwrap_or("");
        match versions.get(kind) {
            None => wrong.push(format!("{}: unknown kind {kind:?}", doc.place)),
            Some(want) if *want != version => wrong.push(format!(
                "{}: {kind} has apiVersion {version:?}, want {want:?}",
                doc.place
            )),
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_manifest_field_is_lost_in_its_kubernetes_type() {
    let mut wrong = Vec::new();
    for doc in documents() {
        for loss in round_trip_losses(&doc) {
            wrong.push(format!("{}: {loss}", doc.place));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_misspelt_or_misplaced_field_is_reported_with_its_path() {
    let docs = documents();
    let mut doc = Document {
        place: "edited".into(),
        value: find(&docs, "Deployment", "dory-orchestrator").value.clone(),
    };
    doc.value["spec"]["replica"] = 3.into();
    doc.value["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] =
        true.into();
    // A pod-level field written at container level.
    doc.value["spec"]["template"]["spec"]["containers"][0]["serviceAccountName"] = "x".into();
    let lost = round_trip_losses(&doc);
    assert_eq!(
        lost,
        [
            ".spec.replica (dropped)",
            ".spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem (dropped)",
            ".spec.template.spec.containers[0].serviceAccountName (dropped)",
        ],
    );
}

/// The verbs `rules` grant, per (scope, API group, resource).
fn granted(
    rules: &[(Scope, &str, Vec<PolicyRule>)],
) -> BTreeMap<(Scope, String, String), BTreeSet<String>> {
    let mut granted: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for (scope, place, rules) in rules {
        for rule in rules {
            assert!(
                rule.non_resource_urls.is_none(),
                "{place}: non-resource URLs granted"
            );
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    granted
                        .entry((*scope, group.clone(), resource.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
    }
    granted
}

#[test]
fn the_rbac_grants_exactly_what_dory_k8s_calls() {
    let docs = documents();
    let role: Role = typed(find(&docs, "Role", "dory-orchestrator"));
    let nodes: ClusterRole = typed(find(&docs, "ClusterRole", "dory-orchestrator-nodes"));
    let actual = granted(&[
        (Scope::Namespace, "Role", role.rules.unwrap_or_default()),
        (
            Scope::Cluster,
            "ClusterRole",
            nodes.rules.unwrap_or_default(),
        ),
    ]);
    let expected: BTreeMap<(Scope, String, String), BTreeSet<String>> = GRANTED
        .iter()
        .map(|(scope, group, resource, verbs)| {
            (
                (*scope, group.to_string(), resource.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(actual, expected, "rbac.yaml and GRANTED differ");

    // Both are bound to the orchestrator's ServiceAccount, and only to it.
    let sa = find(&docs, "ServiceAccount", "dory-orchestrator");
    let namespace = sa.value["metadata"]["namespace"].as_str();
    let binding: RoleBinding = typed(find(&docs, "RoleBinding", "dory-orchestrator"));
    let cluster_binding: ClusterRoleBinding =
        typed(find(&docs, "ClusterRoleBinding", "dory-orchestrator-nodes"));
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", "dory-orchestrator")
    );
    assert_eq!(
        (
            cluster_binding.role_ref.kind.as_str(),
            cluster_binding.role_ref.name.as_str()
        ),
        ("ClusterRole", "dory-orchestrator-nodes")
    );
    for subjects in [binding.subjects, cluster_binding.subjects] {
        let subjects: Vec<_> = subjects
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.kind, s.name, s.namespace))
            .collect();
        assert_eq!(
            subjects,
            [(
                "ServiceAccount".to_string(),
                "dory-orchestrator".to_string(),
                namespace.map(str::to_string)
            )]
        );
    }
}

/// The orchestrator's `dory.toml`, from the ConfigMap.
fn dory_toml(docs: &[Document]) -> toml::Table {
    let config: ConfigMap = typed(find(docs, "ConfigMap", "dory-config"));
    let text = config
        .data
        .unwrap_or_default()
        .remove("dory.toml")
        .expect("the ConfigMap has a dory.toml");
    text.parse()
        .unwrap_or_else(|e| panic!("config.yaml: dory.toml is not TOML: {e}"))
}

fn toml_str<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    let mut value = None::<&toml::Value>;
    for key in path.split('.') {
        let table = match value {
            None => table,
            Some(v) => v
                .as_table()
                .unwrap_or_else(|| panic!("`{path}`: not a table")),
        };
        value = Some(
            table
                .get(key)
                .unwrap_or_else(|| panic!("`{path}` is missing")),
        );
    }
    value
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn orchestrator(docs: &[Document]) -> Deployment {
    typed(find(docs, "Deployment", "dory-orchestrator"))
}

#[test]
fn the_configmap_holds_a_dory_toml_that_fits_the_deployment_and_rbac() {
    let docs = documents();
    let config = dory_toml(&docs);
    assert_eq!(toml_str(&config, "placement.kind"), "kubernetes");
    assert_eq!(toml_str(&config, "store.kind"), "postgres");
    assert_eq!(toml_str(&config, "config.source"), "postgres");
    assert_eq!(toml_str(&config, "publisher.kind"), "rabbitmq");
    for key in ["store.url", "publisher.url"] {
        let url = toml_str(&config, key);
        let userinfo = url.split_once("://").map_or("", |(_, rest)| {
            rest.split_once('@').map_or("", |(userinfo, _)| userinfo)
        });
        assert!(
            !userinfo.contains(':'),
            "`{key}` carries a password, in a ConfigMap"
        );
    }

    // The kubernetes keys of [placement] are those of KubeConfig, which refuses any other,
    // and [placement.lease] is a LeaseConfig (as the `dory` command reads them).
    let mut placement = config["placement"]
        .as_table()
        .expect("[placement] is a table")
        .clone();
    placement.remove("kind");
    let lease: LeaseConfig = placement
        .remove("lease")
        .map(|v| {
            v.try_into().unwrap_or_else(|e| {
                panic!("config.yaml: [placement.lease] is not a LeaseConfig: {e}")
            })
        })
        .unwrap_or_default();
    let kube: KubeConfig = toml::Value::Table(placement)
        .try_into()
        .unwrap_or_else(|e| panic!("config.yaml: [placement] is not a KubeConfig: {e}"));

    // Processors go where the Role applies, reached at the SDK's port, without an API token.
    let namespace = find(&docs, "Namespace", "dory").name();
    assert_eq!(kube.namespace, namespace);
    assert_eq!(
        find(&docs, "Role", "dory-orchestrator").value["metadata"]["namespace"],
        namespace
    );
    assert_eq!(kube.sdk_port, dory_core::env::DEFAULT_PORT);
    let processor_sa: ServiceAccount = typed(find(
        &docs,
        "ServiceAccount",
        kube.service_account
            .as_deref()
            .expect("a processor service account"),
    ));
    assert_eq!(processor_sa.automount_service_account_token, Some(false));

    // The Lease the replicas elect a leader with is the one the Role lets them read and renew,
    // in the namespace the Role applies to (the `dory` command puts the Lease in the
    // placement's namespace unless [placement.lease] names another).
    let role: Role = typed(find(&docs, "Role", "dory-orchestrator"));
    let lease_names: Vec<Vec<String>> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.resources.as_deref() == Some(&["leases".to_string()][..]))
        .filter_map(|r| r.resource_names)
        .collect();
    assert_eq!(lease_names, [vec![lease.name.clone()]]);
    let lease_table = config["placement"]
        .get("lease")
        .and_then(toml::Value::as_table);
    let lease_namespace = match lease_table.and_then(|t| t.get("namespace")) {
        Some(_) => lease.namespace.as_str(),
        None => kube.namespace.as_str(),
    };
    assert_eq!(lease_namespace, namespace);

    // The daemon listens where the probes and the container port point, reads the file where
    // the ConfigMap is mounted, and keeps its state where it may write.
    let deployment = orchestrator(&docs);
    let pod = deployment
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &pod.containers[0];
    let listen: std::net::SocketAddr = toml_str(&config, "orchestrator.listen")
        .parse()
        .expect("`orchestrator.listen` is an address");
    assert!(
        listen.ip().is_unspecified(),
        "the probes come from the kubelet"
    );
    let http = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .expect("a port named http");
    assert_eq!(http.container_port, i32::from(listen.port()));
    let args = container.args.clone().unwrap_or_default();
    let config_at = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .expect("--config");
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mounted = |path: &str| {
        mounts
            .iter()
            .find(|m| Path::new(path).starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("{path} is not on a mounted volume"))
            .clone()
    };
    let config_mount = mounted(&config_at);
    assert_eq!(
        Path::new(&config_at),
        Path::new(&config_mount.mount_path).join("dory.toml")
    );
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let config_volume = volume(&config_mount.name);
    assert_eq!(
        config_volume.config_map.map(|c| c.name),
        Some("dory-config".to_string())
    );
    let state = mounted(toml_str(&config, "orchestrator.state_dir"));
    assert_ne!(state.read_only, Some(true), "state_dir is read-only");
    assert!(volume(&state.name).empty_dir.is_some());
}

#[test]
fn the_deployment_runs_two_hardened_replicas_on_different_nodes() {
    let docs = documents();
    let spec = orchestrator(&docs).spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    assert_eq!(spec.selector.match_labels.as_ref(), Some(&labels));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("dory-orchestrator")
    );
    // Each replica holds the Lease as itself: LeaseConfig's holder, left empty, is POD_NAME.
    assert_eq!(LeaseConfig::default().holder, "");
    let pod_name = pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "POD_NAME")
        .and_then(|v| v.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        pod_name,
        Some("metadata.name"),
        "POD_NAME from the Downward API"
    );

    let pod_security = pod.security_context.clone().expect("a pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.map(|s| s.type_),
        Some("RuntimeDefault".to_string())
    );
    assert_eq!(pod.containers.len(), 1);
    let container = &pod.containers[0];
    let security = container
        .security_context
        .clone()
        .expect("a securityContext");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.privileged, None);
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(capabilities.add, None);
    assert_eq!(
        security.seccomp_profile.map(|s| s.type_),
        Some("RuntimeDefault".to_string())
    );

    assert_eq!(
        container.args.as_deref().map(|a| &a[..3]),
        Some(&["orchestrator", "--config", "/etc/dory/dory.toml"].map(String::from)[..])
    );
    let resources = container.resources.clone().expect("resources");
    for (what, amounts) in [
        ("requests", resources.requests),
        ("limits", resources.limits),
    ] {
        let amounts = amounts.unwrap_or_default();
        for resource in ["cpu", "memory"] {
            assert!(amounts.contains_key(resource), "no {resource} in {what}");
        }
    }
    for (which, probe) in [
        ("liveness", &container.liveness_probe),
        ("readiness", &container.readiness_probe),
    ] {
        let get = probe
            .clone()
            .and_then(|p| p.http_get)
            .unwrap_or_else(|| panic!("no {which} probe"));
        assert_eq!(get.path.as_deref(), Some("/healthz"), "{which}");
    }

    // Preferably on different nodes: the term selects the replicas themselves.
    let anti = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("a podAntiAffinity");
    let terms = anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap_or_default();
    assert!(
        terms.iter().any(|t| {
            let term = &t.pod_affinity_term;
            term.topology_key == "kubernetes.io/hostname"
                && term
                    .label_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        }),
        "no preferred anti-affinity over kubernetes.io/hostname selecting the replicas"
    );
}

#[test]
fn the_orchestrator_pods_are_not_taken_for_processor_pods() {
    // dory-k8s watches processor pods, and its PDB (maxUnavailable: 0) covers them, by these
    // labels: an orchestrator pod carrying one would be adopted or would block every drain.
    let docs = documents();
    let spec = orchestrator(&docs).spec.expect("spec");
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    assert!(
        !labels.contains_key(dory_k8s::LABEL_PROCESSOR),
        "{labels:?}"
    );
    assert_ne!(
        labels.get(dory_k8s::LABEL_MANAGED_BY).map(String::as_str),
        Some(dory_k8s::MANAGED_BY),
        "{labels:?}"
    );
}

#[test]
fn the_deployment_reads_secrets_only_from_the_example_secret_by_reference() {
    let docs = documents();
    let secret: Secret = typed(find(&docs, "Secret", "dory-store"));
    let keys: BTreeSet<String> = secret.string_data.unwrap_or_default().into_keys().collect();
    let spec = orchestrator(&docs).spec.expect("spec");
    let container = &spec.template.spec.expect("pod spec").containers[0];
    let mut referenced = BTreeSet::new();
    for var in container.env.iter().flatten() {
        let from_secret = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref());
        match from_secret {
            Some(key) => {
                assert_eq!(key.name, "dory-store", "{}", var.name);
                assert!(keys.contains(&key.key), "the Secret has no {}", key.key);
                referenced.insert(key.key.clone());
            }
            None => {
                let name = var.name.to_ascii_uppercase();
                assert!(
                    !["PASSWORD", "URL", "TOKEN"]
                        .iter()
                        .any(|s| name.contains(s)),
                    "{} is given in clear",
                    var.name
                );
            }
        }
    }
    assert_eq!(
        referenced, keys,
        "the Deployment and the Secret name other keys"
    );
}

#[test]
fn the_kustomization_applies_every_manifest_but_the_example_secret() {
    let docs = documents();
    let kustomization: Kustomization = typed(
        docs.iter()
            .find(|d| d.kind() == "Kustomization")
            .expect("a Kustomization"),
    );
    let expected: Vec<String> = yaml_files()
        .iter()
        .map(|p| file_name(p))
        .filter(|name| !NOT_APPLIED.contains(&name.as_str()))
        .collect();
    let mut listed = kustomization.resources.clone();
    listed.sort();
    assert_eq!(listed, expected);
    assert_eq!(
        kustomization.namespace.as_deref(),
        Some(find(&docs, "Namespace", "dory").name())
    );
}

#[test]
fn the_sample_processor_row_is_a_valid_processor_spec() {
    let path = manifest_dir().join("processor.sql");
    let sql = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let statement = sql
        .split_once("INSERT INTO")
        .map(|(_, rest)| rest)
        .expect("an INSERT");
    let quoted: Vec<&str> = statement.split('\'').skip(1).step_by(2).collect();
    let (id, spec) = match quoted[..] {
        [id, spec, ..] => (id, spec),
        _ => panic!("processor.sql: expected VALUES ('<id>', '<spec>'::jsonb)"),
    };
    let id = ProcessorId::new(id).expect("a valid processor id");
    let fields: Value = serde_json::from_str(spec).expect("the spec is JSON");
    let map = fields
        .as_object()
        .expect("the spec is a JSON object")
        .clone();
    let parsed = ProcessorSpec::from_fields(&id, map, None)
        .unwrap_or_else(|e| panic!("processor.sql: {e:?}"));
    assert!(parsed.workload.image.is_some(), "a pod needs an image");
    // ProcessorSpec ignores fields it does not know: every field written must come back.
    let mut lost = Vec::new();
    dropped(
        &fields,
        &serde_json::to_value(&parsed).expect("serialises"),
        "spec",
        &mut lost,
    );
    assert!(lost.is_empty(), "processor.sql: {}", lost.join("\n"));
}
