//! [`MemoryPublisher`], which records every message, and [`Deduplicator`], which applies the
//! consumers' deduplication rule to what was recorded.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use dory_core::testing::PublishedLog;
use dory_core::{OutputMessage, ProcessorId, Publisher, Result, Sequence};

/// An in-memory [`Publisher`] that records every message in publish order, duplicates
/// included, so tests can check both the raw stream ("a planned move publishes no duplicate")
/// and the deduplicated one ("no output lost").
///
/// A publish is durable as soon as it is recorded, so [`flush`](Publisher::flush) has nothing
/// to wait for. A cheap handle: clones share one record.
#[derive(Clone, Default)]
pub struct MemoryPublisher {
    messages: Arc<Mutex<Vec<OutputMessage>>>,
}

impl MemoryPublisher {
    /// A publisher with nothing recorded.
    pub fn new() -> Self {
        MemoryPublisher::default()
    }

    /// Every message published so far, in publish order.
    pub fn messages(&self) -> Vec<OutputMessage> {
        self.lock().clone()
    }

    /// Every message of `processor` published so far, in publish order.
    pub fn messages_of(&self, processor: &ProcessorId) -> Vec<OutputMessage> {
        self.lock()
            .iter()
            .filter(|m| &m.processor == processor)
            .cloned()
            .collect()
    }

    /// How many messages were published.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was published.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Everything published so far, after the consumers' deduplication rule.
    pub fn deduplicated(&self) -> Deduplicator {
        let mut dedup = Deduplicator::new();
        dedup.extend(self.lock().iter().cloned());
        dedup
    }

    fn lock(&self) -> MutexGuard<'_, Vec<OutputMessage>> {
        self.messages.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: OutputMessage) -> Result<()> {
        self.lock().push(message);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl PublishedLog for MemoryPublisher {
    async fn published(&self, processor: &ProcessorId) -> Result<Vec<OutputMessage>> {
        Ok(self.messages_of(processor))
    }
}

/// What [`Deduplicator::offer`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offer {
    /// The first copy of its `(processor, sequence)`: kept.
    New,
    /// The same routing key and payload as the kept copy: a harmless duplicate (a retried
    /// publish, or a replay after a failover). The copy of the higher epoch is kept.
    Duplicate,
    /// Different content from a higher epoch than the kept copy: it replaced the kept copy.
    Replaced,
    /// Different content from a lower epoch than the kept copy: dropped.
    Dropped,
    /// Different content from the **same** epoch as the kept copy: one instance published two
    /// different messages under one sequence, which no rule can settle. The first is kept;
    /// tests should count these as failures.
    Conflicting,
}

/// How many messages a [`Deduplicator`] saw of each [`Offer`] kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DedupStats {
    /// First copies.
    pub new: u64,
    /// Identical copies.
    pub duplicate: u64,
    /// Copies that replaced a lower epoch's different copy.
    pub replaced: u64,
    /// Copies dropped for a higher epoch's different copy.
    pub dropped: u64,
    /// Different copies from one epoch.
    pub conflicting: u64,
}

impl DedupStats {
    /// Every message offered.
    pub fn offered(&self) -> u64 {
        self.new + self.duplicate + self.replaced + self.dropped + self.conflicting
    }
}

/// The consumers' deduplication rule from the design brief: messages are identified by
/// `(processor, sequence)`; when two copies of one sequence differ, the higher epoch wins.
///
/// Kept messages are iterated in `(processor, sequence)` order, so "no output lost" is a check
/// for gaps in [`sequences_of`](Deduplicator::sequences_of).
#[derive(Clone, Debug, Default)]
pub struct Deduplicator {
    kept: BTreeMap<(ProcessorId, Sequence), OutputMessage>,
    stats: DedupStats,
}

impl Deduplicator {
    /// A deduplicator that has seen nothing.
    pub fn new() -> Self {
        Deduplicator::default()
    }

    /// Applies the rule to one more message, in delivery order.
    pub fn offer(&mut self, message: OutputMessage) -> Offer {
        let key = (message.processor.clone(), message.sequence);
        let offer = match self.kept.get(&key) {
            None => Offer::New,
            Some(kept)
                if (&kept.routing_key, &kept.payload)
                    == (&message.routing_key, &message.payload) =>
            {
                Offer::Duplicate
            }
            Some(kept) if message.epoch > kept.epoch => Offer::Replaced,
            Some(kept) if message.epoch < kept.epoch => Offer::Dropped,
            Some(_) => Offer::Conflicting,
        };
        let stat = match offer {
            Offer::New => &mut self.stats.new,
            Offer::Duplicate => &mut self.stats.duplicate,
            Offer::Replaced => &mut self.stats.replaced,
            Offer::Dropped => &mut self.stats.dropped,
            Offer::Conflicting => &mut self.stats.conflicting,
        };
        *stat += 1;
        let keep_new = match offer {
            Offer::New | Offer::Replaced => true,
            Offer::Duplicate => self
                .kept
                .get(&key)
                .is_some_and(|kept| message.epoch > kept.epoch),
            Offer::Dropped | Offer::Conflicting => false,
        };
        if keep_new {
            self.kept.insert(key, message);
        }
        offer
    }

    /// The kept messages, by `(processor, sequence)`.
    pub fn messages(&self) -> impl Iterator<Item = &OutputMessage> {
        self.kept.values()
    }

    /// The kept messages of `processor`, by sequence.
    pub fn messages_of<'a>(
        &'a self,
        processor: &ProcessorId,
    ) -> impl Iterator<Item = &'a OutputMessage> + 'a {
        let from = (processor.clone(), Sequence(0));
        let processor = processor.clone();
        self.kept
            .range(from..)
            .map(|(_, m)| m)
            .take_while(move |m| m.processor == processor)
    }

    /// The sequences kept for `processor`, ascending.
    pub fn sequences_of(&self, processor: &ProcessorId) -> Vec<Sequence> {
        self.messages_of(processor).map(|m| m.sequence).collect()
    }

    /// How many messages are kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// What the offered messages amounted to.
    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// The kept messages, by `(processor, sequence)`.
    pub fn into_messages(self) -> Vec<OutputMessage> {
        self.kept.into_values().collect()
    }
}

impl Extend<OutputMessage> for Deduplicator {
    fn extend<I: IntoIterator<Item = OutputMessage>>(&mut self, messages: I) {
        for message in messages {
            self.offer(message);
        }
    }
}

impl FromIterator<OutputMessage> for Deduplicator {
    fn from_iter<I: IntoIterator<Item = OutputMessage>>(messages: I) -> Self {
        let mut dedup = Deduplicator::new();
        dedup.extend(messages);
        dedup
    }
}
