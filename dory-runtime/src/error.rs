//! The runtime's own errors: what can stop [`Runtime`](crate::Runtime) from starting or
//! serving. Everything a backend answers keeps its meaning as a [`dory_core::Error`].

/// Why the runtime could not start or keep serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A backend or the instance environment answered with an error of this meaning.
    #[error(transparent)]
    Core(#[from] dory_core::Error),
    /// The endpoint port could not be bound.
    #[error("cannot bind the endpoint server to {address}: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The bound address could not be written to the instance's `DORY_ADDRESS_FILE`.
    #[error("cannot write the bound address to {}: {source}", path.display())]
    AddressFile {
        /// The file named by `DORY_ADDRESS_FILE`.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The shutdown signal handler could not be installed.
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// The error user code returns from [`Processor::step`](crate::Processor::step): any error.
/// A [`dory_core::Error::Fenced`] inside it (as [`Context::publish`](crate::Context::publish)
/// returns once the instance lost ownership) stops the run loop; any other error is logged
/// and the step is tried again after a short pause.
pub type StepError = Box<dyn std::error::Error + Send + Sync + 'static>;
