//! Processor pods and their Secrets: names, labels, the manifests a launch creates, and what a
//! pod object says about its instance. Pure functions, tested without an API server.

use std::collections::BTreeMap;

use dory_core::env as vars;
use dory_core::{Epoch, LaunchRequest, NodeId, Phase, ProcessorId, SitePreference, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, PreferredSchedulingTerm,
    Probe, ResourceRequirements, Secret, SecretKeySelector, Toleration,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::{KubeConfig, TAINT_NOT_READY, TAINT_UNREACHABLE};
use crate::error::KubeError;
use crate::nodes::timestamp;

/// `dory.io/processor-id`: the processor a pod runs (a processor id is a DNS-1123 label of at
/// most 42 characters, so it is always a valid label value as is).
pub const LABEL_PROCESSOR: &str = "dory.io/processor-id";
/// `dory.io/epoch`: the pod's epoch, in decimal.
pub const LABEL_EPOCH: &str = "dory.io/epoch";
/// `app.kubernetes.io/managed-by`: `dory` on every object Dory creates; the pod watch selects
/// by it.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "dory";
/// `dory.io/revision`: the spec revision the instance was launched with.
pub const ANNOTATION_REVISION: &str = "dory.io/revision";
/// `dory.io/mode`: `restore` or `standby`.
pub const ANNOTATION_MODE: &str = "dory.io/mode";
/// `dory.io/node`: the node the planner chose (the pod is pinned there by node affinity;
/// until it is bound, this is where it is).
pub const ANNOTATION_NODE: &str = "dory.io/node";
/// `dory.io/launch`: a nonce of the launch that created the pod, so a create retried after a
/// lost answer recognises its own pod in the `409`.
pub const ANNOTATION_LAUNCH: &str = "dory.io/launch";
/// The key of the token in an instance's Secret.
pub const SECRET_TOKEN_KEY: &str = "token";
/// The name of the processor's container.
pub const CONTAINER: &str = "processor";
/// The node label the pin's required node affinity matches.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The selector of every Dory pod: what the pod watch and the PodDisruptionBudget select.
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// The pod (and Secret) name of an instance: `<processor>-<epoch>`. At most 42 + 1 + 20 = 63
/// characters, a DNS-1123 label; deterministic, so a second create of the same instance after
/// a crash gets `409`. Unambiguous: epochs are digits, so the last `-` splits it.
pub fn pod_name(processor: &ProcessorId, epoch: Epoch) -> String {
    format!("{processor}-{}", epoch.0)
}

/// What the pod object says about its instance, before any health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PodState {
    /// Not yet running with an address (pending, unscheduled, pulling, waiting for its
    /// Secret).
    Starting,
    /// Its container runs and it has an IP: the instance answers its own phase.
    Alive {
        /// The pod IP.
        ip: String,
        /// The pod's Ready condition.
        ready: bool,
    },
    /// Being deleted.
    Terminating,
    /// Ended.
    Ended(Phase),
}

/// The parts of a pod the placement reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodView {
    pub(crate) name: String,
    pub(crate) uid: Option<String>,
    pub(crate) processor: ProcessorId,
    pub(crate) epoch: Epoch,
    pub(crate) node: NodeId,
    pub(crate) revision: u64,
    pub(crate) started_at: Timestamp,
    pub(crate) state: PodState,
}

/// Reads a pod; `None` (with a warning) for one that is not a Dory instance after all (its
/// labels missing or malformed: someone else's pod with Dory's label, or a hand edit).
pub(crate) fn view(pod: &Pod) -> Option<PodView> {
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k));
    let processor = label(LABEL_PROCESSOR).and_then(|p| ProcessorId::new(p.as_str()).ok());
    let epoch = label(LABEL_EPOCH)
        .and_then(|e| e.parse::<u64>().ok())
        .map(Epoch);
    let (Some(processor), Some(epoch)) = (processor, epoch) else {
        tracing::warn!(target: "dory::k8s", pod = %name, "a pod labelled {} without a valid {LABEL_PROCESSOR} and {LABEL_EPOCH} is skipped", managed_selector());
        return None;
    };
    let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
    let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let node = spec_node
        .or_else(|| annotation(ANNOTATION_NODE).cloned())
        .unwrap_or_default();
    Some(PodView {
        uid: meta.uid.clone(),
        processor,
        epoch,
        node: NodeId::new(node),
        revision: annotation(ANNOTATION_REVISION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        started_at: meta
            .creation_timestamp
            .as_ref()
            .map(timestamp)
            .unwrap_or_default(),
        state: state(pod),
        name,
    })
}

fn state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == CONTAINER));
    let terminated = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    if let Some(t) = terminated {
        return PodState::Ended(Phase::Exited { code: t.exit_code });
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    match phase {
        "Succeeded" => return PodState::Ended(Phase::Exited { code: 0 }),
        "Failed" => {
            let reason = status
                .and_then(|s| s.reason.clone().or_else(|| s.message.clone()))
                .unwrap_or_else(|| "the pod failed".into());
            return PodState::Ended(Phase::Failed { reason });
        }
        _ => {}
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    // With one container and `restartPolicy: Never`, a Running pod's container runs.
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    match (phase, ip) {
        ("Running", Some(ip)) => PodState::Alive {
            ip,
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True"),
        },
        _ => PodState::Starting,
    }
}

/// The objects of one launch: the pod, then (once the pod has a uid) its Secret.
pub(crate) struct Manifests {
    pub(crate) pod: Pod,
    pub(crate) token: String,
}

fn labels(processor: &ProcessorId, epoch: Epoch) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_PROCESSOR.to_string(), processor.to_string()),
        (LABEL_EPOCH.to_string(), epoch.0.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
    ])
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The pod of a launch. `token` goes into the Secret only; the pod reads it through a
/// `secretKeyRef`.
pub(crate) fn pod_manifest(
    request: &LaunchRequest,
    config: &KubeConfig,
    token: String,
    nonce: &str,
) -> Result<Manifests, KubeError> {
    let spec = &request.spec;
    let (processor, epoch) = (&spec.id, request.epoch);
    let name = pod_name(processor, epoch);
    let image = spec
        .workload
        .image
        .clone()
        .or_else(|| config.default_image.clone())
        .ok_or_else(|| {
            KubeError::Config(format!(
                "processor {processor}: field `workload.image` is not set and there is no `default_image`"
            ))
        })?;
    if request.node.as_str().is_empty() {
        return Err(KubeError::Config(format!(
            "launch of {epoch} of {processor}: no node"
        )));
    }
    let settings = &config.instance;
    // Below the contract's variables: a workload cannot override its own identity.
    let mut extra: BTreeMap<String, String> = settings.env.clone();
    extra.extend(spec.workload.env.clone());
    let contract = vars::InstanceEnv {
        processor: processor.clone(),
        epoch,
        mode: request.mode,
        token: String::new(),
        port: config.sdk_port,
        store_url: settings.store_url.clone(),
        publisher_url: settings.publisher_url.clone(),
        input_url: settings.input_url.clone(),
        lease: settings.lease,
        checkpoint_interval: spec.checkpoint_interval,
        config: spec.config.clone(),
        address_file: None,
    }
    .to_vars();
    let mut env_vars: Vec<EnvVar> = extra
        .into_iter()
        .filter(|(k, _)| !contract.contains_key(k) && k != vars::TOKEN)
        .map(|(k, v)| env(&k, v))
        .collect();
    for (k, v) in contract {
        if k == vars::TOKEN {
            env_vars.push(EnvVar {
                name: k,
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: SECRET_TOKEN_KEY.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
            });
        } else {
            env_vars.push(env(&k, v));
        }
    }
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if spec.resources.cpu_millis > 0 {
        requests.insert(
            "cpu".to_string(),
            Quantity(format!("{}m", spec.resources.cpu_millis)),
        );
    }
    if spec.resources.memory_mib > 0 {
        let memory = Quantity(format!("{}Mi", spec.resources.memory_mib));
        requests.insert("memory".to_string(), memory.clone());
        // A memory limit equal to the request: the planner packs nodes by requests, so an
        // instance using more would take another's memory. No CPU limit: throttling would
        // stretch a move's pause.
        limits.insert("memory".to_string(), memory);
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(config.sdk_port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image),
        image_pull_policy: config.image_pull_policy.clone(),
        command: (!spec.workload.command.is_empty()).then(|| spec.workload.command.clone()),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("dory".into()),
            container_port: i32::from(config.sdk_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }),
        // Readiness turns false quickly when the instance freezes itself (a lost lease), so
        // the placement checks it; liveness only kills an endpoint that stopped answering
        // (`/healthz` never waits on user code, so a frozen instance stays live).
        readiness_probe: Some(probe("/readyz", 2, 1)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        ..Default::default()
    };
    let pinned = NodeSelectorRequirement {
        key: HOSTNAME_LABEL.into(),
        operator: "In".into(),
        values: Some(vec![request.node.to_string()]),
    };
    let site = match spec.site {
        SitePreference::Any => None,
        SitePreference::Edge => Some("edge"),
        SitePreference::Cloud => Some("cloud"),
    };
    let site_requirement = site.map(|site| NodeSelectorRequirement {
        key: config.site_label.clone(),
        operator: "In".into(),
        values: Some(vec![site.into()]),
    });
    let mut required = vec![pinned];
    if !spec.fallback
        && let Some(r) = &site_requirement
    {
        required.push(r.clone());
    }
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            // Pinned with a required affinity, not `spec.nodeName`: the scheduler still
            // checks resources and taints, and a pod that cannot fit stays Pending visibly
            // instead of failing on the kubelet (`OutOfcpu`).
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(required),
                    match_fields: None,
                }],
            }),
            // The site preference, for whoever reads the pod; the pin already decides.
            preferred_during_scheduling_ignored_during_execution: site_requirement.map(|r| {
                vec![PreferredSchedulingTerm {
                    weight: 100,
                    preference: NodeSelectorTerm {
                        match_expressions: Some(vec![r]),
                        match_fields: None,
                    },
                }]
            }),
        }),
        ..Default::default()
    };
    let lost = i64::try_from(config.node_lost_toleration.as_secs()).unwrap_or(i64::MAX);
    let mut tolerations: Vec<Toleration> = [TAINT_NOT_READY, TAINT_UNREACHABLE]
        .into_iter()
        .map(|key| Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(lost),
            value: None,
        })
        .collect();
    tolerations.extend(config.edge_taints.iter().map(|key| Toleration {
        key: Some(key.clone()),
        operator: Some("Exists".into()),
        ..Default::default()
    }));
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels(processor, epoch)),
            annotations: Some(BTreeMap::from([
                (ANNOTATION_REVISION.to_string(), spec.revision().to_string()),
                (ANNOTATION_MODE.to_string(), request.mode.to_string()),
                (ANNOTATION_NODE.to_string(), request.node.to_string()),
                (ANNOTATION_LAUNCH.to_string(), nonce.to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            // Dory restarts a processor itself, under a new epoch and with its crash-loop
            // breaker; a kubelet restart would rerun an epoch the store may have fenced.
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(
                i64::try_from(config.termination_grace.as_secs()).unwrap_or(i64::MAX),
            ),
            service_account_name: config.service_account.clone(),
            // A processor has no business with the Kubernetes API.
            automount_service_account_token: Some(false),
            // Service links would add variables for every Service in the namespace.
            enable_service_links: Some(false),
            affinity: Some(affinity),
            tolerations: Some(tolerations),
            ..Default::default()
        }),
        status: None,
    };
    Ok(Manifests { pod, token })
}

/// The Secret holding an instance's token, owned by its pod (so the garbage collector deletes
/// it with the pod).
pub(crate) fn secret_manifest(
    processor: &ProcessorId,
    epoch: Epoch,
    namespace: &str,
    pod_uid: &str,
    token: &str,
) -> Secret {
    let name = pod_name(processor, epoch);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.into()),
            labels: Some(labels(processor, epoch)),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name,
                uid: pod_uid.into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            SECRET_TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        immutable: Some(true),
        ..Default::default()
    }
}

/// The token in an instance's Secret, if it holds a readable one.
pub(crate) fn secret_token(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(SECRET_TOKEN_KEY)?;
    String::from_utf8(bytes.0.clone())
        .ok()
        .filter(|t| !t.is_empty())
}

/// The one PodDisruptionBudget over every Dory pod: no voluntary eviction while Dory has not
/// moved the pod; an unhealthy pod may always be evicted (it serves nothing, and blocking it
/// would block node drains for good).
pub(crate) fn pdb_manifest(name: &str, namespace: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(pdb_spec()),
        status: None,
    }
}

pub(crate) fn pdb_spec() -> PodDisruptionBudgetSpec {
    PodDisruptionBudgetSpec {
        max_unavailable: Some(IntOrString::Int(0)),
        min_available: None,
        selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_string(),
                MANAGED_BY.to_string(),
            )])),
            match_expressions: None,
        }),
        unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
    }
}

/// A fresh random token (128 bits from the operating system), hex-encoded.
pub(crate) fn new_token() -> Result<String, KubeError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| KubeError::Config(format!("cannot read /dev/urandom for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use dory_core::{LaunchMode, ProcessorSpec, Resources};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
        PodCondition, PodStatus,
    };

    use super::*;

    fn request() -> LaunchRequest {
        let mut spec = ProcessorSpec::new(ProcessorId::new("counter").unwrap());
        spec.workload.image = Some("registry/counter:1".into());
        spec.workload.env.insert("RUST_LOG".into(), "info".into());
        spec.workload.env.insert(vars::EPOCH.into(), "99".into());
        spec.resources = Resources::new(250, 128);
        spec.site = SitePreference::Edge;
        LaunchRequest {
            spec,
            epoch: Epoch(3),
            node: NodeId::new("edge-1"),
            mode: LaunchMode::Standby,
        }
    }

    fn config() -> KubeConfig {
        let mut c = KubeConfig::default();
        c.instance.store_url = "postgres://dory@db/dory".into();
        c.edge_taints = vec!["dory.io/edge".into()];
        c
    }

    #[test]
    fn names_are_dns_labels_and_unambiguous() {
        let p = ProcessorId::new("a".repeat(42)).unwrap();
        assert_eq!(pod_name(&p, Epoch(u64::MAX)).len(), 63);
        assert_eq!(
            pod_name(&ProcessorId::new("a-1").unwrap(), Epoch(2)),
            "a-1-2"
        );
    }

    #[test]
    fn the_pod_carries_identity_pin_and_no_token() {
        let m = pod_manifest(&request(), &config(), "s3cret".into(), "n1").unwrap();
        let json = serde_json::to_string(&m.pod).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        let meta = &m.pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("counter-3"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_PROCESSOR], "counter");
        assert_eq!(labels[LABEL_EPOCH], "3");
        assert_eq!(labels[LABEL_MANAGED_BY], "dory");
        let spec = m.pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name, None, "pinned by affinity, not nodeName");
        let required = &spec
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms[0];
        let pin = &required.match_expressions.as_ref().unwrap()[0];
        assert_eq!(pin.key, HOSTNAME_LABEL);
        assert_eq!(pin.values.as_deref(), Some(&["edge-1".to_string()][..]));
        let tolerations = spec.tolerations.as_ref().unwrap();
        for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
            let t = tolerations
                .iter()
                .find(|t| t.key.as_deref() == Some(key))
                .unwrap();
            assert_eq!(t.toleration_seconds, Some(3600));
        }
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("dory.io/edge"))
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.termination_grace_period_seconds, Some(60));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry/counter:1"));
        let env: BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(
            env[vars::EPOCH].value.as_deref(),
            Some("3"),
            "the contract wins"
        );
        assert_eq!(env[vars::MODE].value.as_deref(), Some("standby"));
        assert_eq!(env[vars::PORT].value.as_deref(), Some("8080"));
        assert_eq!(env["RUST_LOG"].value.as_deref(), Some("info"));
        let token = env[vars::TOKEN].value_from.as_ref().unwrap();
        let secret = token.secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("counter-3", "token")
        );
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "250m");
        assert_eq!(requests["memory"].0, "128Mi");
    }

    #[test]
    fn a_spec_without_an_image_is_refused() {
        let mut r = request();
        r.spec.workload.image = None;
        let err = pod_manifest(&r, &config(), "t".into(), "n").err().unwrap();
        assert!(err.to_string().contains("workload.image"), "{err}");
        let mut c = config();
        c.default_image = Some("dory/processor:1".into());
        assert!(pod_manifest(&r, &c, "t".into(), "n").is_ok());
    }

    #[test]
    fn the_secret_is_owned_by_the_pod() {
        let s = secret_manifest(
            &ProcessorId::new("p").unwrap(),
            Epoch(1),
            "ns",
            "uid-1",
            "tok",
        );
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "uid-1"));
        assert_eq!(secret_token(&s).as_deref(), Some("tok"));
    }

    fn pod_with(phase: &str, running: bool, ip: Option<&str>, ready: bool) -> Pod {
        let mut m = pod_manifest(&request(), &config(), "t".into(), "n").unwrap();
        m.pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ip.map(Into::into),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            container_statuses: Some(vec![ContainerStatus {
                name: CONTAINER.into(),
                state: Some(ContainerState {
                    running: running.then(ContainerStateRunning::default),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        m.pod
    }

    #[test]
    fn pods_tell_starting_alive_terminating_and_ended() {
        let v = view(&pod_with("Pending", false, None, false)).unwrap();
        assert_eq!(v.state, PodState::Starting);
        assert_eq!(v.node, NodeId::new("edge-1"), "the pinned node until bound");
        assert_eq!(
            view(&pod_with("Running", true, Some("10.0.0.7"), true))
                .unwrap()
                .state,
            PodState::Alive {
                ip: "10.0.0.7".into(),
                ready: true
            }
        );
        let mut deleting = pod_with("Running", true, Some("10.0.0.7"), true);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(view(&deleting).unwrap().state, PodState::Terminating);
        let mut exited = pod_with("Failed", false, Some("10.0.0.7"), false);
        exited
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 3,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            view(&exited).unwrap().state,
            PodState::Ended(Phase::Exited { code: 3 })
        );
        let mut evicted = pod_with("Failed", false, None, false);
        evicted.status.as_mut().unwrap().reason = Some("Evicted".into());
        evicted.status.as_mut().unwrap().container_statuses = None;
        assert_eq!(
            view(&evicted).unwrap().state,
            PodState::Ended(Phase::Failed {
                reason: "Evicted".into()
            })
        );
    }

    #[test]
    fn pods_without_identity_are_skipped_not_fatal() {
        let mut p = pod_with("Running", true, Some("10.0.0.1"), true);
        p.metadata.labels.as_mut().unwrap().remove(LABEL_EPOCH);
        assert!(view(&p).is_none());
        assert!(view(&Pod::default()).is_none());
    }

    #[test]
    fn the_pdb_never_allows_a_voluntary_disruption() {
        let pdb = pdb_manifest("dory-processors", "ns");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(
            spec.unhealthy_pod_eviction_policy.as_deref(),
            Some("AlwaysAllow")
        );
    }
}
