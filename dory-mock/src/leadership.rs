//! [`MemoryLeadership`]: leadership among simulated orchestrator replicas, with the term kept
//! in a [`MemoryStore`].

use async_trait::async_trait;
use dory_core::{Error, Leadership, Result, Term};

use crate::store::MemoryStore;

/// One participant in leadership over a shared [`MemoryStore`].
///
/// The store holds the current term and its holder, so every participant made from clones of
/// one store competes for the same leadership, and the store refuses writes carrying any term
/// but the current one. [`acquire`](Leadership::acquire) bumps the term; a participant that
/// already leads gets its current term back.
///
/// [`depose`](MemoryLeadership::depose) takes leadership away as a lost lock would: `check`
/// fails at once, while the store keeps accepting the old term until another participant
/// acquires, exactly the window a real orchestrator has to cope with.
pub struct MemoryLeadership {
    store: MemoryStore,
    id: u64,
}

impl MemoryLeadership {
    /// A new participant competing for leadership over `store`.
    pub fn new(store: &MemoryStore) -> Self {
        let mut state = store.lock();
        state.participants += 1;
        let id = state.participants;
        drop(state);
        MemoryLeadership {
            store: store.clone(),
            id,
        }
    }

    /// Whether this participant leads now.
    pub fn leads(&self) -> bool {
        self.store.lock().leader == Some(self.id)
    }

    /// Ends this participant's leadership as if its lock were lost; returns whether it led.
    pub fn depose(&self) -> bool {
        let mut state = self.store.lock();
        if state.leader != Some(self.id) {
            return false;
        }
        state.leader = None;
        drop(state);
        self.store.leadership_freed();
        true
    }
}

impl std::fmt::Debug for MemoryLeadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLeadership")
            .field("participant", &self.id)
            .finish()
    }
}

#[async_trait]
impl Leadership for MemoryLeadership {
    async fn acquire(&self) -> Result<Term> {
        // Subscribed before the first look, so a release between the look and the wait still
        // wakes this waiter.
        let mut freed = self.store.watch_leadership();
        loop {
            {
                let mut state = self.store.lock();
                match state.leader {
                    Some(id) if id == self.id => return Ok(state.term),
                    Some(_) => {}
                    None => {
                        state.leader = Some(self.id);
                        state.term = Term(state.term.0 + 1);
                        return Ok(state.term);
                    }
                }
            }
            // The sender lives as long as the store this participant holds, so this never errs.
            let _ = freed.changed().await;
        }
    }

    async fn check(&self, term: Term) -> Result<()> {
        let state = self.store.lock();
        if state.leader == Some(self.id) && state.term == term {
            return Ok(());
        }
        let holder = match state.leader {
            Some(id) if id == self.id => "this participant".to_string(),
            Some(id) => format!("participant {id}"),
            None => "no one".to_string(),
        };
        Err(Error::fenced(format!(
            "leadership term {term} of participant {} is not current: {} is, held by {holder}",
            self.id, state.term
        )))
    }

    async fn resign(&self, term: Term) -> Result<()> {
        let mut state = self.store.lock();
        // Resigning a term already lost is a no-op: it must never depose the next leader.
        if state.leader != Some(self.id) || state.term != term {
            return Ok(());
        }
        state.leader = None;
        drop(state);
        self.store.leadership_freed();
        Ok(())
    }
}
