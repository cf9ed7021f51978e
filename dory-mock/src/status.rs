//! [`MemoryStatus`]: observed status, kept in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use dory_core::{ProcessorStatus, Result, StatusSink};

/// An in-memory [`StatusSink`]: one status per processor id, read back sorted.
///
/// A cheap handle: clones share one table.
#[derive(Clone, Default)]
pub struct MemoryStatus {
    rows: Arc<Mutex<BTreeMap<String, ProcessorStatus>>>,
}

impl MemoryStatus {
    /// An empty status table.
    pub fn new() -> Self {
        MemoryStatus::default()
    }

    /// The status of one processor, read synchronously.
    pub fn get(&self, processor: &str) -> Option<ProcessorStatus> {
        self.lock().get(processor).cloned()
    }

    /// Every status, sorted by processor id, read synchronously.
    pub fn all(&self) -> Vec<ProcessorStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ProcessorStatus>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl StatusSink for MemoryStatus {
    async fn upsert(&self, statuses: &[ProcessorStatus]) -> Result<()> {
        let mut rows = self.lock();
        for status in statuses {
            rows.insert(status.processor.clone(), status.clone());
        }
        Ok(())
    }

    async fn remove(&self, processors: &[String]) -> Result<()> {
        let mut rows = self.lock();
        for processor in processors {
            rows.remove(processor);
        }
        Ok(())
    }

    async fn read(&self) -> Result<Vec<ProcessorStatus>> {
        Ok(self.all())
    }
}
