//! [`MemoryConfig`]: the desired processors, held in memory and edited by tests or the
//! simulator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use dory_core::{
    ChangeNotifier, Changes, ConfigSource, DesiredState, Error, Intent, InvalidEntry, NodeId,
    ProcessorId, ProcessorSpec, Result,
};

/// An in-memory [`ConfigSource`].
///
/// Specs are validated when the desired state is read, as a config file would be parsed: a
/// spec that fails [`ProcessorSpec::validate`] shows up in [`DesiredState::invalid`], not in
/// `processors`. Entries that would not even parse are added with
/// [`add_invalid`](MemoryConfig::add_invalid). Every change, by an editing method or a recorded
/// intent, nudges subscribers.
///
/// A cheap handle: clones share one config.
#[derive(Clone, Default)]
pub struct MemoryConfig {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    notifier: ChangeNotifier,
}

#[derive(Default)]
struct State {
    processors: BTreeMap<ProcessorId, ProcessorSpec>,
    invalid: BTreeMap<String, String>,
    cordoned: BTreeSet<NodeId>,
    intents: Vec<Intent>,
}

impl MemoryConfig {
    /// An empty config.
    pub fn new() -> Self {
        MemoryConfig::default()
    }

    /// A config holding `specs`.
    pub fn with_processors(specs: impl IntoIterator<Item = ProcessorSpec>) -> Self {
        let config = MemoryConfig::new();
        config.set_processors(specs);
        config
    }

    /// Replaces every processor with `specs` (later specs with the same id win). Pins come
    /// with the specs as given: an earlier pin intent is not carried over.
    pub fn set_processors(&self, specs: impl IntoIterator<Item = ProcessorSpec>) {
        self.edit(|state| {
            state.processors = specs.into_iter().map(|s| (s.id.clone(), s)).collect()
        });
    }

    /// Adds `spec`, or replaces the spec with its id.
    pub fn upsert_processor(&self, spec: ProcessorSpec) {
        self.edit(|state| {
            state.processors.insert(spec.id.clone(), spec);
        });
    }

    /// Removes a processor; returns whether it was there.
    pub fn remove_processor(&self, id: &ProcessorId) -> bool {
        self.edit(|state| state.processors.remove(id).is_some())
    }

    /// Adds an entry that failed to parse, reported in [`DesiredState::invalid`] until removed.
    /// `id` is the id as written (it need not be a valid processor id); `error` names the field.
    pub fn add_invalid(&self, id: impl Into<String>, error: impl Into<String>) {
        self.edit(|state| {
            state.invalid.insert(id.into(), error.into());
        });
    }

    /// Removes an invalid entry; returns whether it was there.
    pub fn remove_invalid(&self, id: &str) -> bool {
        self.edit(|state| state.invalid.remove(id).is_some())
    }

    /// The desired state as [`desired`](ConfigSource::desired) returns it, read synchronously:
    /// processors and invalid entries sorted by id.
    pub fn desired_now(&self) -> DesiredState {
        let state = self.lock();
        let mut desired = DesiredState {
            processors: Vec::with_capacity(state.processors.len()),
            invalid: Vec::new(),
            cordoned: state.cordoned.clone(),
        };
        let mut invalid = state.invalid.clone();
        for spec in state.processors.values() {
            match spec.validate() {
                Ok(()) => desired.processors.push(spec.clone()),
                Err(e) => {
                    invalid.insert(spec.id.to_string(), e.to_string());
                }
            }
        }
        desired.invalid = invalid
            .into_iter()
            .map(|(id, error)| InvalidEntry { id, error })
            .collect();
        desired
    }

    /// Every intent recorded so far, oldest first.
    pub fn intents(&self) -> Vec<Intent> {
        self.lock().intents.clone()
    }

    fn edit<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let out = change(&mut self.lock());
        self.shared.notifier.notify();
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ConfigSource for MemoryConfig {
    async fn desired(&self) -> Result<DesiredState> {
        Ok(self.desired_now())
    }

    fn changes(&self) -> Changes {
        self.shared.notifier.subscribe()
    }

    async fn record_intent(&self, intent: &Intent) -> Result<()> {
        {
            let mut state = self.lock();
            match intent {
                Intent::Pin { processor, node } => {
                    let spec = state.processors.get_mut(processor).ok_or_else(|| {
                        let to = node
                            .as_ref()
                            .map_or_else(|| "unpin".to_string(), |n| format!("pin to node {n}"));
                        Error::not_found(format!(
                            "{to} processor {processor}: it is not in the config"
                        ))
                    })?;
                    spec.pin = node.clone();
                }
                Intent::Cordon { node } => {
                    state.cordoned.insert(node.clone());
                }
                Intent::Uncordon { node } => {
                    state.cordoned.remove(node);
                }
            }
            state.intents.push(intent.clone());
        }
        self.shared.notifier.notify();
        Ok(())
    }
}
