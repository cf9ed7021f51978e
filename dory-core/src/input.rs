//! A processor's input: the [`Input`] a backend implements (RabbitMQ in `dory-amqp`) and the
//! [`InputPosition`] kept in the processor's state.
//!
//! # The end-to-end guarantee
//!
//! An input message is acknowledged to its source only after a checkpoint that includes its
//! effect has committed ([`Input::release`] with the [`InputMark`] taken when the snapshot
//! was cut). Until then the source keeps it, and gives it again to whichever instance
//! consumes next — after a crash, a failover or a move. The [`InputPosition`] travels in the
//! same snapshot as the state, so the instance that restores that snapshot recognises the
//! messages the state already contains and skips them. Together:
//!
//! - **State: exactly once** for messages that carry an [`Origin`] (producer and sequence;
//!   every Dory processor's output does): each is folded into the committed state once.
//! - **State: at least once** for messages without an origin: one redelivered after a crash
//!   is folded in again.
//! - **Output: at least once**: output published after the last checkpoint is published
//!   again by the instance that resumes from it, with the same sequence numbers, so
//!   consumers drop the copies by message id.
//!
//! Messages may come back out of order (one held by a connection the broker has not yet
//! noticed is dead returns after later ones): the position records which sequences the state
//! holds, not just the highest, so a late one is still folded in. Only one instance consumes
//! a processor's input at a time: Dory runs one instance per processor and a frozen instance
//! [pauses](Input::pause) its input before handing over; declaring the queue with a single
//! active consumer makes the broker enforce it too.
//!
//! When a producer fails over and publishes a sequence again with different content, the
//! position keeps the copy it saw first: state cannot be un-folded.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Who produced an input message and its number in that producer's stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The producer: a processor id, or any name a numbered stream is known by.
    pub producer: String,
    /// The message's number in the producer's stream; numbers only grow.
    pub sequence: u64,
}

/// One message from a processor's input.
#[derive(Clone, PartialEq, Eq)]
pub struct InputMessage {
    /// The payload.
    pub payload: Vec<u8>,
    /// The routing key it was published with, if the source has one.
    pub routing_key: Option<String>,
    /// Its origin, when the producer numbers its messages; without one, duplicates cannot be
    /// recognised.
    pub origin: Option<Origin>,
    /// The source gave this message before (to this consumer or another) and it was not
    /// acknowledged: it may already be in the state.
    pub redelivered: bool,
}

impl fmt::Debug for InputMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputMessage")
            .field("origin", &self.origin)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("payload", &self.payload.len())
            .finish()
    }
}

/// A point in an input: it covers every message [`Input::next`] returned before it was
/// taken. Marks only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InputMark(pub u64);

/// Where a processor's messages come from.
///
/// # Contract
/// - [`next`](Input::next) waits for the next message. A message not released before the
///   consumer goes (closed, crashed, cut off) is given again, with `redelivered` set, to
///   whoever consumes next. It is cancel-safe: dropping the future before it resolves loses
///   no message (a runtime drops it to reach a safe point when a freeze is asked for).
/// - [`mark`](Input::mark) covers every message `next` has returned so far. Take it when
///   the state is snapshotted, at a safe point between two messages.
/// - [`release`](Input::release) acknowledges every message the mark covers. Call it only
///   once a checkpoint holding their effect has committed. Releasing a mark again, or an
///   older one, does nothing.
/// - [`pause`](Input::pause) stops taking messages from the source and gives back, unacknowledged,
///   those taken but not yet returned by `next`, so the instance that consumes next receives
///   them in order; a frozen instance pauses before its snapshot is handed over. `next`
///   after `pause` consumes again.
/// - [`unreleased`](Input::unreleased) counts the messages returned and not yet released.
///   A source with a prefetch limit stops giving messages when it reaches it, so a runtime
///   that sees it there checkpoints early instead of waiting for its interval.
#[async_trait]
pub trait Input: Send + Sync + 'static {
    /// The next message, waiting for one.
    async fn next(&self) -> Result<InputMessage>;

    /// A mark after every message returned so far.
    fn mark(&self) -> InputMark;

    /// Acknowledges every message before `mark` to the source.
    async fn release(&self, mark: InputMark) -> Result<()>;

    /// Stops consuming and gives back every message not yet returned by `next`.
    async fn pause(&self) -> Result<()>;

    /// Messages returned by `next` and not yet released.
    fn unreleased(&self) -> usize;
}

/// The most gaps a producer's record keeps; past it the oldest gap is closed (see
/// [`InputPosition`]).
pub const MAX_GAPS: usize = 1024;

/// For each producer, the sequences already folded into the state, as disjoint ranges.
///
/// Keep it in the processor's state, so that it is in every snapshot, and pass each message
/// through [`admit`](InputPosition::admit) before the state sees it.
///
/// Ranges rather than a highest sequence, because a broker may give a message back out of
/// order: one held by a connection the broker has not yet noticed is dead comes back after
/// later ones were delivered on the new connection, and must still be folded in. A stream
/// with gaps (messages routed elsewhere) costs one range per gap, up to [`MAX_GAPS`]; beyond
/// that the oldest gap is closed, so a message arriving after [`MAX_GAPS`] newer gaps were
/// opened is taken for a duplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputPosition {
    producers: BTreeMap<String, Vec<(u64, u64)>>,
}

/// What [`InputPosition::admit`] decided about a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Not in the state yet: process it.
    New,
    /// Its origin says the state already holds it: skip it (it is still released with the
    /// others, so the source forgets it).
    Duplicate,
    /// It has no origin: process it, knowing it may be a redelivered copy.
    Unnumbered,
}

impl InputPosition {
    /// An empty position: nothing consumed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides whether `message` is new to the state, and records it if so.
    pub fn admit(&mut self, message: &InputMessage) -> Admission {
        let Some(origin) = &message.origin else {
            return Admission::Unnumbered;
        };
        let ranges = self.producers.entry(origin.producer.clone()).or_default();
        if insert(ranges, origin.sequence) {
            Admission::New
        } else {
            Admission::Duplicate
        }
    }

    /// Whether `producer`'s message `sequence` is in the state.
    pub fn contains(&self, producer: &str, sequence: u64) -> bool {
        self.producers.get(producer).is_some_and(|ranges| {
            let i = ranges.partition_point(|&(_, end)| end < sequence);
            ranges.get(i).is_some_and(|&(start, _)| start <= sequence)
        })
    }

    /// The highest sequence of `producer` in the state, if any.
    pub fn highest(&self, producer: &str) -> Option<u64> {
        self.producers
            .get(producer)
            .and_then(|ranges| ranges.last())
            .map(|&(_, end)| end)
    }

    /// Every producer seen, with the ranges of its sequences in the state, in name order.
    pub fn producers(&self) -> impl Iterator<Item = (&str, &[(u64, u64)])> {
        self.producers
            .iter()
            .map(|(p, ranges)| (p.as_str(), ranges.as_slice()))
    }
}

/// Adds `sequence` to the sorted, disjoint, non-adjacent `ranges`; false if it was there.
fn insert(ranges: &mut Vec<(u64, u64)>, sequence: u64) -> bool {
    // The first range that ends at or after `sequence - 1`: the only ones it can touch.
    let i = ranges.partition_point(|&(_, end)| end.saturating_add(1) < sequence);
    match ranges.get(i).copied() {
        Some((start, end)) if start <= sequence && sequence <= end => return false,
        Some((start, _)) if sequence.saturating_add(1) == start => ranges[i].0 = sequence,
        Some((_, end)) if end.saturating_add(1) == sequence => {
            ranges[i].1 = sequence;
            // It may now touch the next range too.
            if let Some(&(next_start, next_end)) = ranges.get(i + 1)
                && next_start == sequence + 1
            {
                ranges[i].1 = next_end;
                ranges.remove(i + 1);
            }
        }
        _ => ranges.insert(i, (sequence, sequence)),
    }
    if ranges.len() > MAX_GAPS + 1 {
        // Close the oldest gap: its messages are the least likely ever to come.
        let (_, end) = ranges.remove(1);
        ranges[0].1 = end;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(producer: &str, sequence: u64) -> InputMessage {
        InputMessage {
            payload: Vec::new(),
            routing_key: None,
            origin: Some(Origin {
                producer: producer.to_string(),
                sequence,
            }),
            redelivered: false,
        }
    }

    #[test]
    fn a_sequence_is_admitted_once_per_producer() {
        let mut position = InputPosition::new();
        assert_eq!(position.admit(&numbered("a", 1)), Admission::New);
        assert_eq!(position.admit(&numbered("a", 2)), Admission::New);
        assert_eq!(position.admit(&numbered("b", 1)), Admission::New);
        assert_eq!(position.admit(&numbered("a", 2)), Admission::Duplicate);
        assert_eq!(position.admit(&numbered("a", 1)), Admission::Duplicate);
        assert_eq!(position.highest("a"), Some(2));
        assert_eq!(position.highest("b"), Some(1));
        assert_eq!(position.highest("c"), None);
    }

    #[test]
    fn a_message_given_back_late_is_still_new() {
        // 5..=9 were held by a dead connection the broker had not noticed yet: they come back
        // after 10..=12 were delivered on the new one.
        let mut position = InputPosition::new();
        for s in (1..=4).chain(10..=12) {
            assert_eq!(position.admit(&numbered("a", s)), Admission::New, "{s}");
        }
        for s in 5..=9 {
            assert_eq!(position.admit(&numbered("a", s)), Admission::New, "{s}");
        }
        for s in 1..=12 {
            assert_eq!(
                position.admit(&numbered("a", s)),
                Admission::Duplicate,
                "{s}"
            );
        }
        assert_eq!(position.producers().next(), Some(("a", &[(1, 12)][..])));
    }

    #[test]
    fn ranges_merge_and_the_oldest_gap_closes_past_the_bound() {
        let mut position = InputPosition::new();
        // Every other sequence: one range per message, one gap between each two.
        for s in (0..=(2 * MAX_GAPS as u64 + 2)).step_by(2) {
            position.admit(&numbered("a", s));
        }
        let ranges = position.producers().next().expect("a").1.to_vec();
        assert_eq!(ranges.len(), MAX_GAPS + 1, "bounded");
        assert_eq!(ranges[0], (0, 2), "the oldest gap was closed");
        assert_eq!(position.admit(&numbered("a", 1)), Admission::Duplicate);
        assert_eq!(
            position.admit(&numbered("a", 3)),
            Admission::New,
            "a newer gap stays open"
        );
        assert!(
            position.contains("a", 2) && position.contains("a", 3) && position.contains("a", 4)
        );
        assert_eq!(
            position.producers().next().expect("a").1[0],
            (0, 4),
            "merged"
        );
        assert_eq!(position.highest("a"), Some(2 * MAX_GAPS as u64 + 2));
    }

    proptest::proptest! {
        #[test]
        fn admit_matches_a_set(sequences in proptest::collection::vec(0u64..200, 0..400)) {
            let mut position = InputPosition::new();
            let mut seen = std::collections::BTreeSet::new();
            for s in sequences {
                let new = seen.insert(s);
                let admission = position.admit(&numbered("a", s));
                proptest::prop_assert_eq!(admission == Admission::New, new, "sequence {}", s);
            }
            let ranges = position.producers().next().map(|(_, r)| r.to_vec()).unwrap_or_default();
            for pair in ranges.windows(2) {
                proptest::prop_assert!(pair[0].1 + 1 < pair[1].0, "disjoint, not adjacent: {:?}", ranges);
            }
            for s in 0..200 {
                proptest::prop_assert_eq!(position.contains("a", s), seen.contains(&s));
            }
        }
    }

    #[test]
    fn unnumbered_messages_are_always_processed() {
        let mut position = InputPosition::new();
        let mut message = numbered("a", 1);
        message.origin = None;
        assert_eq!(position.admit(&message), Admission::Unnumbered);
        assert_eq!(position.admit(&message), Admission::Unnumbered);
        assert_eq!(position.producers().count(), 0);
    }

    #[test]
    fn the_position_survives_a_snapshot_round_trip() {
        let mut position = InputPosition::new();
        position.admit(&numbered("a", 7));
        position.admit(&numbered("b", 2));
        let bytes = serde_json::to_vec(&position).expect("encode");
        let mut restored: InputPosition = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(restored, position);
        assert_eq!(restored.admit(&numbered("a", 7)), Admission::Duplicate);
        assert_eq!(restored.admit(&numbered("a", 8)), Admission::New);
    }
}
