//! Dory placement on one machine: instances are OS processes on named virtual nodes.
//!
//! [`LocalPlacement`] implements [`dory_core::Placement`] over virtual nodes (a name, a site
//! and a capacity from the [`LocalConfig`]). Each instance is a child process started through
//! a supervisor ([`supervise`]) in a session of its own, with the environment a Kubernetes pod
//! gets ([`dory_core::InstanceEnv`]: processor id, epoch, mode, token, port 0, store and broker
//! URLs, and `DORY_ADDRESS_FILE` to report the port it bound). Its output goes to log files and
//! its exit status to a file, all in its directory of the on-disk [`registry`], so instances
//! outlive the orchestrator and a restarted one re-adopts them all.
//!
//! Node faults are operations on this backend ([`LocalNodes`]: cordon, drain, spot notice with
//! a deadline, kill a whole node, revive it), kept in files so another process can play them
//! while the orchestrator runs: the fault scenarios of Kubernetes, on one machine.
//!
//! ```no_run
//! use dory_core::{NodeId, Placement, Resources, Site};
//! use dory_local::{InstanceSettings, LocalConfig, LocalNode, LocalNodes, LocalPlacement};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let placement = LocalPlacement::open(LocalConfig {
//!     state_dir: "/var/lib/dory".into(),
//!     nodes: vec![LocalNode {
//!         id: NodeId::new("edge-1"),
//!         site: Site::Edge,
//!         capacity: Resources::new(2000, 1024),
//!         exec_prefix: vec![],
//!         store_url: None,
//!         publisher_url: None,
//!         reach_host: None,
//!     }],
//!     supervisor: vec!["/usr/local/bin/dory-supervise".into()],
//!     instance: InstanceSettings {
//!         store_url: "sqlite:///var/lib/dory/dory.db".into(),
//!         publisher_url: None,
//!         input_url: None,
//!         lease: std::time::Duration::from_secs(10),
//!     },
//! })?;
//! for instance in placement.instances().await? {
//!     println!("{} {} on {}: {}", instance.processor, instance.epoch, instance.node, instance.phase);
//! }
//! // From any other process that knows the state directory:
//! LocalNodes::new("/var/lib/dory").kill_node(&NodeId::new("edge-1"))?;
//! # Ok(())
//! # }
//! ```
//!
//! Linux only: processes are identified through `/proc`.

mod config;
mod error;
mod nodes;
mod placement;
mod process;
pub mod registry;
mod supervise;

pub use config::{InstanceSettings, LocalConfig, LocalNode};
pub use error::LocalError;
pub use nodes::{LocalNodes, NodeState};
pub use placement::LocalPlacement;
pub use process::{ProcStat, ProcessRef};
pub use registry::{ExitRecord, ExitStatus, InstanceRecord, TerminateRecord};
pub use supervise::supervise;
