//! dory-mock's integration tests: the shared behaviour suites run against the in-memory
//! backends, plus what only the mocks promise (injected clock, deposing, fault switches).

mod config;
mod faults;
mod leadership;
mod publisher;
mod status;
mod store;

use std::sync::Arc;

use dory_core::{Epoch, OutputMessage, ProcessorId, Sequence, Timestamp, TokioClock};
use dory_mock::MemoryStore;

/// A store on tokio's clock, reading `start` now; under a paused runtime, simulated time.
fn store_at(start: Timestamp) -> MemoryStore {
    MemoryStore::new(Arc::new(TokioClock::starting_at(start)))
}

fn store() -> MemoryStore {
    store_at(Timestamp(1_700_000_000_000))
}

fn pid(id: &str) -> ProcessorId {
    ProcessorId::new(id).unwrap()
}

/// A message of processor `p` without a routing key.
fn msg(p: &str, epoch: u64, sequence: u64, payload: &str) -> OutputMessage {
    OutputMessage {
        processor: pid(p),
        epoch: Epoch(epoch),
        sequence: Sequence(sequence),
        routing_key: None,
        payload: payload.as_bytes().to_vec(),
    }
}
mod orchestrator;
mod sim;
