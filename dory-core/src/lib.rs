//! Dory's core: the domain model, the backend traits, the snapshot codec and the orchestrator
//! engine (a pure planner and an executor).
//!
//! `dory-core` knows no backend. Backends (Kubernetes, Postgres, RabbitMQ, local files, the
//! in-memory mocks) implement the traits in [`backend`]; the [`orchestrator`] drives any set of
//! them.
//!
//! ```
//! use dory_core::{ProcessorId, ProcessorSpec};
//!
//! let spec = ProcessorSpec::new(ProcessorId::new("counter")?);
//! spec.validate()?;
//! assert!(ProcessorId::new("Not_A_Label").is_err());
//! # Ok::<(), dory_core::Error>(())
//! ```

pub mod backend;
pub mod changes;
pub mod clock;
pub mod columns;
pub mod env;
pub mod error;
pub mod input;
pub mod model;
pub mod orchestrator;
pub mod ownership;
pub mod planner;
pub mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{
    CONTROL_PROTOCOL, ConfigSource, Health, InstanceControl, Intent, Leadership, OutputMessage,
    Placement, Publisher, RecordedIntents, StateStore, StatusSink,
};
pub use changes::{ChangeNotifier, Changes};
pub use clock::{Clock, SystemClock, TokioClock};
pub use env::InstanceEnv;
pub use error::{Error, Result};
pub use input::{Admission, Input, InputMark, InputMessage, InputPosition, MAX_GAPS, Origin};
pub use model::*;
