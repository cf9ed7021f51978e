//! Change nudges: a backend tells the orchestrator "something changed, look again".
//!
//! Nudges carry no data on purpose: the orchestrator is level-triggered and always re-reads
//! the full state, so a nudge that is lost or merged with another loses nothing.

use tokio::sync::watch;

/// The sending side of a change nudge, held by a backend.
#[derive(Debug)]
pub struct ChangeNotifier(watch::Sender<u64>);

impl Default for ChangeNotifier {
    fn default() -> Self {
        ChangeNotifier::new()
    }
}

impl ChangeNotifier {
    /// A notifier with no subscribers yet.
    pub fn new() -> Self {
        ChangeNotifier(watch::channel(0).0)
    }

    /// Wakes every subscriber once (several nudges before a subscriber looks merge into one).
    pub fn notify(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new subscription; it sees nudges sent from now on.
    pub fn subscribe(&self) -> Changes {
        Changes(Some(self.0.subscribe()))
    }
}

/// The receiving side of a change nudge, held by the orchestrator.
#[derive(Debug, Clone)]
pub struct Changes(Option<watch::Receiver<u64>>);

impl Changes {
    /// A subscription that never fires, for backends that have no change feed (the
    /// orchestrator then relies on its periodic resync).
    pub fn never() -> Self {
        Changes(None)
    }

    /// Waits for the next nudge. When the backend has gone away this waits for ever, so a
    /// `select!` over several subscriptions keeps working.
    pub async fn changed(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.0 = None;
                    std::future::pending::<()>().await
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}
