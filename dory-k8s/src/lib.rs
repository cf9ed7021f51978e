//! Dory placement on Kubernetes: a pod per processor instance, node disruption signals as the
//! core model's interruptions, one PodDisruptionBudget over every Dory pod, and leadership
//! through a `coordination.k8s.io/v1` Lease.
//!
//! - [`KubePlacement`] is the [`Placement`](dory_core::Placement): it launches each instance
//!   as a pod named `<processor>-<epoch>` pinned to the planner's node by a required node
//!   affinity, with its bearer token in a Secret the pod owns, and observes pods and nodes
//!   through watches only.
//! - [`KubeControl`] is the matching [`InstanceControl`](dory_core::InstanceControl): the
//!   HTTP control client of every placement, reaching pods at their IP.
//! - [`interruption`] turns a node's cordon and taints (Karpenter, the AWS Node Termination
//!   Handler, GKE, configured ones) into an [`Interruption`](dory_core::Interruption).
//! - [`LeaseLeadership`] wraps the store's [`Leadership`](dory_core::Leadership) (whose term
//!   fences writes) in a Lease, so one orchestrator replica of several acts.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use dory_k8s::{KubeConfig, KubePlacement};
//!
//! let client = kube::Client::try_default().await?;
//! let mut config = KubeConfig::default();
//! config.instance.store_url = "postgres://dory@postgres.dory/dory".into();
//! let placement = KubePlacement::start(client, config).await?;
//! let control = placement.control();
//! # let _ = control;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod lease;
mod nodes;
mod placement;
mod pods;
mod writes;

pub use config::{
    HealthChecks, InstanceSettings, KubeConfig, SignalConfig, TAINT_NOT_READY, TAINT_UNREACHABLE,
    TAINT_UNSCHEDULABLE, TaintSignal, WriteLimits,
};
pub use error::KubeError;
pub use lease::{LeaseConfig, LeaseLeadership};
pub use nodes::{interruption, interruption_seen, node_model};
pub use placement::{KubeControl, KubePlacement};
pub use pods::{
    ANNOTATION_LAUNCH, ANNOTATION_MODE, ANNOTATION_NODE, ANNOTATION_REVISION, CONTAINER,
    HOSTNAME_LABEL, LABEL_EPOCH, LABEL_MANAGED_BY, LABEL_PROCESSOR, MANAGED_BY, SECRET_TOKEN_KEY,
    managed_selector, pod_name,
};
