//! What a Rust processor implements ([`Processor`]) and what it is lent each iteration
//! ([`Context`]).

use std::sync::Arc;

use async_trait::async_trait;
use dory_core::{
    Admission, Epoch, Error, Input, InputMessage, InputPosition, OutputMessage, ProcessorId,
    Publisher, Result, Sequence,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StepError;
use crate::shared::Shared;

/// A Rust processor: a loop body over state the runtime owns.
///
/// The runtime keeps [`Processor::State`] between iterations and lends it to
/// [`step`](Processor::step) one iteration at a time. Between two steps (a **safe point**) it
/// can snapshot it, checkpoint it, freeze it for a move or save it on shutdown; it never does
/// so in the middle of a step. Keep a step short (one message, one tick): a freeze waits for
/// the step in progress to return.
///
/// ```
/// use dory_runtime::{Context, Processor, StepError};
///
/// /// Publishes 1, 2, 3, ... one number per step.
/// struct Counter;
///
/// #[async_trait::async_trait]
/// impl Processor for Counter {
///     type State = u64;
///
///     async fn step(&mut self, count: &mut u64, ctx: &mut Context) -> Result<(), StepError> {
///         ctx.publish(None, (*count + 1).to_le_bytes().to_vec()).await?;
///         *count += 1;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Processor: Send + 'static {
    /// The processor's state: serialized with bincode into every snapshot. A fresh instance
    /// with no snapshot to restore starts from `Default`.
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;

    /// One iteration. Return an error to have the step tried again after a short pause; an
    /// error holding [`Error::Fenced`] stops the run loop.
    async fn step(&mut self, state: &mut Self::State, ctx: &mut Context) -> Result<(), StepError>;
}

/// What the runtime lends a [`Processor`] with its state: publishing, checkpoint requests and
/// the input.
///
/// The output sequence and the input position live here, not in user state, but they are
/// part of every snapshot, so they continue across checkpoints, moves and restarts.
pub struct Context {
    pub(crate) shared: Arc<Shared>,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) input: Option<Arc<dyn Input>>,
    pub(crate) sequence: Sequence,
    pub(crate) position: InputPosition,
    pub(crate) checkpoint_requested: bool,
    pub(crate) checkpoint_interval: std::time::Duration,
}

impl Context {
    /// The processor's id.
    pub fn processor(&self) -> &ProcessorId {
        &self.shared.processor
    }

    /// This instance's epoch.
    pub fn epoch(&self) -> Epoch {
        self.shared.epoch
    }

    /// The sequence of the last message published (0 before the first).
    pub fn sequence(&self) -> Sequence {
        self.sequence
    }

    /// The processor's configuration (`DORY_CONFIG`).
    pub fn config(&self) -> &serde_json::Value {
        &self.shared.config
    }

    /// The input position kept in the snapshot (read-only; [`Context::next_message`] keeps
    /// it).
    pub fn position(&self) -> &InputPosition {
        &self.position
    }

    /// Publishes `payload` with the next sequence number and waits for the broker's
    /// confirmation. The sequence only advances when the publish succeeded, so a failed
    /// publish retried in a later step carries the same message id.
    ///
    /// Refused with [`Error::Fenced`] once the instance lost ownership, and with
    /// [`Error::Unavailable`] while its lease cannot be renewed or a due checkpoint cannot be
    /// stored (the runtime stops publishing rather than run ahead of committed state).
    pub async fn publish(&mut self, routing_key: Option<String>, payload: Vec<u8>) -> Result<()> {
        self.shared.may_publish()?;
        let sequence = Sequence(self.sequence.0 + 1);
        let message = OutputMessage {
            processor: self.shared.processor.clone(),
            epoch: self.shared.epoch,
            sequence,
            routing_key,
            payload,
        };
        self.publisher.publish(message).await?;
        self.sequence = sequence;
        self.shared.published(sequence);
        Ok(())
    }

    /// Asks for a checkpoint at the next safe point (after this step), in addition to the
    /// periodic ones.
    pub fn checkpoint(&mut self) {
        self.checkpoint_requested = true;
    }

    /// Resolves once the runtime wants a safe point (a freeze, a shutdown or a fence is
    /// waiting). A step that waits on something else (a timer, a request from another
    /// thread) races its wait against this one and returns when it resolves first, so that
    /// the freeze does not wait for it.
    pub async fn safe_point_wanted(&self) {
        self.shared.wants_safe_point().await;
    }

    /// The next input message the state does not hold yet, skipping redelivered ones the
    /// [`InputPosition`] says were already folded in; waits for one.
    ///
    /// Answers `Ok(None)` when the runtime needs a safe point (a freeze or shutdown is
    /// waiting) before a message arrived: return from the step then. It also answers
    /// `Ok(None)`, asking for a checkpoint, when messages are held unreleased and none came
    /// for a checkpoint interval: the broker sends no more than its prefetch before the held
    /// ones are acknowledged, which only a checkpoint does. This drops the input's
    /// pending `next` future, so the input must be cancel-safe (losing no message when a
    /// `next` call is dropped). [`Error::Invalid`] when the runtime was given no input.
    pub async fn next_message(&mut self) -> Result<Option<InputMessage>> {
        let Some(input) = self.input.clone() else {
            return Err(Error::invalid(
                "this processor was started without an input",
            ));
        };
        loop {
            let held = input.unreleased() > 0;
            let message = tokio::select! {
                biased;
                () = self.shared.wants_safe_point() => return Ok(None),
                () = tokio::time::sleep(self.checkpoint_interval), if held => {
                    self.checkpoint_requested = true;
                    return Ok(None);
                }
                message = input.next() => message?,
            };
            match self.position.admit(&message) {
                Admission::Duplicate => {
                    tracing::debug!(target: "dory::runtime", origin = ?message.origin, "skipped a message the state already holds");
                }
                Admission::New | Admission::Unnumbered => return Ok(Some(message)),
            }
        }
    }
}
