//! The operator commands' read-only view of a Kubernetes cluster, and the cordon they set.
//!
//! Not `dory_k8s::KubePlacement`: that is the orchestrator's (it keeps the
//! PodDisruptionBudget in place and checks instances at their pod IPs, which an operator's
//! machine does not reach). A command only lists the nodes and Dory's pods, and maps them as
//! the placement does, so `dory nodes` and a drain's progress show what the orchestrator
//! sees.

use anyhow::{Context as _, Result};
use dory_core::{Epoch, Instance, Node, NodeId, Phase, ProcessorId, Timestamp};
use dory_k8s::KubeConfig;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};

/// Nodes and Dory's pods of one cluster, as the core model's nodes and instances.
pub(crate) struct ClusterView {
    nodes: Api<KubeNode>,
    pods: Api<Pod>,
    config: KubeConfig,
}

impl ClusterView {
    /// A view through `client` of the cluster the placement `config` describes.
    pub(crate) fn new(client: kube::Client, config: &KubeConfig) -> ClusterView {
        ClusterView {
            nodes: Api::all(client.clone()),
            pods: Api::namespaced(client, &config.namespace),
            config: config.clone(),
        }
    }

    /// Every node: site from the site label, readiness, cordon, allocatable capacity and the
    /// interruption its cordon and taints announce (`dory_k8s::interruption`).
    pub(crate) async fn nodes(&self) -> Result<Vec<Node>> {
        let list = self
            .nodes
            .list(&ListParams::default())
            .await
            .map_err(unreachable_api)
            .context("list the cluster's nodes")?;
        let now = now();
        let mut nodes: Vec<Node> = list
            .items
            .iter()
            .filter_map(|n| dory_k8s::node_model(n, &self.config, now))
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Every Dory pod in the namespace as an instance (processor, epoch, node, phase).
    pub(crate) async fn instances(&self) -> Result<Vec<Instance>> {
        let list = self
            .pods
            .list(&ListParams::default().labels(&dory_k8s::managed_selector()))
            .await
            .map_err(unreachable_api)
            .with_context(|| format!("list Dory's pods in namespace {}", self.config.namespace))?;
        Ok(list.items.iter().filter_map(to_instance).collect())
    }

    /// Cordons (`spec.unschedulable: true`) or uncordons a node, as `kubectl cordon` and
    /// `kubectl uncordon` do.
    pub(crate) async fn cordon(&self, node: &NodeId, cordoned: bool) -> Result<()> {
        let patch = serde_json::json!({ "spec": { "unschedulable": cordoned } });
        let verb = if cordoned { "cordon" } else { "uncordon" };
        self.nodes
            .patch(
                node.as_str(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 404 => {
                    anyhow::Error::new(crate::commands::OperationFailed(format!(
                        "there is no node {node} in the cluster (see `dory nodes`)"
                    )))
                }
                _ => unreachable_api(e),
            })
            .with_context(|| format!("{verb} node {node}"))?;
        Ok(())
    }
}

/// An API error as the exit code sees it: no answer or an overloaded server is an
/// unreachable backend (3), anything else a failed operation (1).
fn unreachable_api(e: kube::Error) -> anyhow::Error {
    let unavailable = match &e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    };
    if unavailable {
        anyhow::Error::new(dory_core::Error::Unavailable(format!(
            "the Kubernetes API server: {e}"
        )))
    } else {
        anyhow::Error::new(e)
    }
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// A Dory pod as an instance: its labels name processor and epoch; the node is where it was
/// scheduled, else the node it is pinned to. The phase is the pod's (standby, running and
/// frozen look alike from outside the instance; the orchestrator asks the instance itself).
fn to_instance(pod: &Pod) -> Option<Instance> {
    let labels = pod.metadata.labels.as_ref()?;
    let processor = ProcessorId::new(labels.get(dory_k8s::LABEL_PROCESSOR)?).ok()?;
    let epoch = Epoch(labels.get(dory_k8s::LABEL_EPOCH)?.parse().ok()?);
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(dory_k8s::ANNOTATION_NODE).cloned())
        })?;
    let status = pod.status.as_ref();
    let phase = if pod.metadata.deletion_timestamp.is_some() {
        Phase::Terminating
    } else {
        match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => Phase::Running,
            Some("Succeeded") => Phase::Exited { code: 0 },
            Some("Failed") => Phase::Failed {
                reason: status
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_else(|| "the pod failed".into()),
            },
            _ => Phase::Starting,
        }
    };
    Some(Instance {
        processor,
        epoch,
        node: NodeId::new(node),
        phase,
        revision: 0,
        started_at: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| Timestamp(t.0.as_millisecond().max(0) as u64))
            .unwrap_or_default(),
        endpoint: None,
    })
}
