//! The local placement's errors, each naming the processor, epoch, node or path involved, and
//! each mapped to the meaning the orchestrator decides by ([`dory_core::Error`]).

use std::path::PathBuf;

use dory_core::{Epoch, NodeId, ProcessorId};

/// What went wrong in the local placement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The configuration cannot work (no nodes, duplicate nodes, no supervisor command).
    #[error("local placement config: {0}")]
    Config(String),
    /// A launch of a `(processor, epoch)` whose instance directory already exists: nothing was
    /// started.
    #[error("instance {epoch} of {processor} already exists ({})", path.display())]
    AlreadyExists {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
        /// Its instance directory.
        path: PathBuf,
    },
    /// No such instance.
    #[error("instance {epoch} of {processor} is not known to the local placement")]
    UnknownInstance {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
    },
    /// No such node in the configuration.
    #[error("node {node} is not one of the local placement's nodes")]
    UnknownNode {
        /// The node.
        node: NodeId,
    },
    /// A node name that cannot name a state file.
    #[error(
        "{node:?} cannot be a local node name: use letters, digits, '.', '_' and '-', not starting with '.'"
    )]
    BadNodeName {
        /// The name given.
        node: String,
    },
    /// The node was killed ([`crate::LocalNodes::kill_node`]) and not revived, or is cut off
    /// ([`crate::LocalNodes::partition`]) and not healed: nothing starts there.
    #[error("node {node} is down (killed or cut off); revive or heal it first")]
    NodeDown {
        /// The node.
        node: NodeId,
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
    /// The spec gives the local placement nothing to run.
    #[error(
        "processor {processor}: field `workload.command` is empty; the local placement runs a command"
    )]
    NoCommand {
        /// The processor.
        processor: ProcessorId,
    },
    /// The supervisor could not be started; the failure is recorded in the instance's `exit`
    /// file too.
    #[error(
        "cannot start the supervisor {program:?} for instance {epoch} of {processor} on node {node}: {source}"
    )]
    Spawn {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
        /// The node.
        node: NodeId,
        /// The supervisor program.
        program: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A registry or node state file does not parse.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`"create"`, `"read"`, `"write"`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot send {signal} to {target} of instance {epoch} of {processor}: {source}")]
    Signal {
        /// The processor.
        processor: ProcessorId,
        /// The epoch.
        epoch: Epoch,
        /// The signal's name.
        signal: &'static str,
        /// `pid N` or `process group N`.
        target: String,
        /// What the operating system said.
        source: std::io::Error,
    },
}

impl LocalError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        LocalError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<LocalError> for dory_core::Error {
    fn from(e: LocalError) -> Self {
        let message = e.to_string();
        match e {
            LocalError::AlreadyExists { .. } | LocalError::NotEnded { .. } => {
                dory_core::Error::Conflict(message)
            }
            LocalError::UnknownInstance { .. } | LocalError::UnknownNode { .. } => {
                dory_core::Error::NotFound(message)
            }
            LocalError::NodeDown { .. } | LocalError::Io { .. } | LocalError::Signal { .. } => {
                dory_core::Error::Unavailable(message)
            }
            LocalError::Config(_)
            | LocalError::BadNodeName { .. }
            | LocalError::NoCommand { .. }
            | LocalError::Spawn { .. }
            | LocalError::Corrupt { .. } => dory_core::Error::Invalid(message),
        }
    }
}
