//! The rules of an ownership row, in one place.
//!
//! Every [`StateStore`](crate::StateStore) decides its fenced writes by these rules, each over
//! the row as it holds it (a locked database row, an in-memory map entry), so that all stores
//! refuse the same writes with the same meanings. The store supplies the row and does the
//! writing; the rules only say yes or why not.

use crate::error::{Error, Result};
use crate::model::{Epoch, Sequence};

/// What the rules need to know of one processor's ownership row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnershipRules {
    /// The owning epoch.
    pub owner: Option<Epoch>,
    /// The highest epoch ever claimed.
    pub highest: Epoch,
    /// The newest epoch that ever owned the processor: ownership only moves above it, so an
    /// epoch that was released or moved away from can never own again.
    pub newest_owner: Epoch,
    /// Whether the owner's lease is still running, in the store's clock.
    pub lease_running: bool,
    /// The latest committed checkpoint.
    pub committed: Option<(Epoch, Sequence)>,
}

impl OwnershipRules {
    /// A checkpoint or lease renewal from `epoch`: only the owner may.
    pub fn check_owner(&self, what: &str, epoch: Epoch) -> Result<()> {
        match self.owner {
            Some(owner) if owner == epoch => Ok(()),
            Some(owner) => Err(Error::fenced(format!(
                "{what}: epoch {epoch} does not own the processor, {owner} does"
            ))),
            None => Err(Error::fenced(format!(
                "{what}: epoch {epoch} does not own the processor, no epoch does"
            ))),
        }
    }

    /// A new checkpoint at `sequence`: it must be above the committed one.
    pub fn check_above_committed(&self, what: &str, sequence: Sequence) -> Result<()> {
        match self.committed {
            Some((_, committed)) if sequence <= committed => Err(Error::fenced(format!(
                "{what}: sequence {sequence} is not above the committed {committed}"
            ))),
            _ => Ok(()),
        }
    }

    /// Ownership moving from `expected` to `epoch` without a snapshot (a start, restart or
    /// failover): compare-and-swap on the owner, and never while the owner's lease runs (a
    /// cut-off owner may have renewed it since the orchestrator looked).
    pub fn check_assign(&self, what: &str, expected: Option<Epoch>, epoch: Epoch) -> Result<()> {
        if self.owner != expected {
            return Err(Error::conflict(format!(
                "{what}: expected owner {}, but it is {}",
                show(expected),
                show(self.owner)
            )));
        }
        if expected.is_some() && self.lease_running {
            return Err(Error::conflict(format!(
                "{what}: the lease of {} has not run out",
                show(expected)
            )));
        }
        self.check_new_owner(what, epoch)
    }

    /// A move's commit from `from` to `to` with a snapshot at `sequence`: `from` must own,
    /// `to` must be a newer claimed epoch, and the snapshot must not be older than the
    /// committed one (equal is fine: nothing was published since).
    pub fn check_commit(
        &self,
        what: &str,
        from: Epoch,
        to: Epoch,
        sequence: Sequence,
    ) -> Result<()> {
        if self.owner != Some(from) {
            return Err(Error::conflict(format!(
                "{what}: the owner is {}",
                show(self.owner)
            )));
        }
        self.check_new_owner(what, to)?;
        match self.committed {
            Some((epoch, committed)) if sequence < committed => Err(Error::fenced(format!(
                "{what}: snapshot {sequence} is older than the committed {committed} of {epoch}"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses an epoch that was never claimed or is not newer than every earlier owner.
    fn check_new_owner(&self, what: &str, epoch: Epoch) -> Result<()> {
        if epoch > self.highest {
            return Err(Error::invalid(format!(
                "{what}: epoch {epoch} was never claimed (the highest claimed is {})",
                self.highest
            )));
        }
        if epoch <= self.newest_owner {
            return Err(Error::fenced(format!(
                "{what}: epoch {epoch} is not newer than {}, which already owned the processor",
                self.newest_owner
            )));
        }
        Ok(())
    }
}

/// An optional epoch for messages.
pub fn show(epoch: Option<Epoch>) -> String {
    epoch.map_or_else(|| "none".to_string(), |e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> OwnershipRules {
        OwnershipRules {
            owner: Some(Epoch(2)),
            highest: Epoch(4),
            newest_owner: Epoch(2),
            lease_running: false,
            committed: Some((Epoch(2), Sequence(10))),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_meaning() {
        let r = row();
        assert!(r.check_owner("put", Epoch(2)).is_ok());
        assert!(r.check_owner("put", Epoch(1)).unwrap_err().is_fenced());
        assert!(r.check_above_committed("put", Sequence(11)).is_ok());
        assert!(
            r.check_above_committed("put", Sequence(10))
                .unwrap_err()
                .is_fenced()
        );
        assert!(r.check_assign("assign", Some(Epoch(2)), Epoch(3)).is_ok());
        assert!(matches!(
            r.check_assign("assign", None, Epoch(3)),
            Err(Error::Conflict(_))
        ));
        let running = OwnershipRules {
            lease_running: true,
            ..row()
        };
        assert!(matches!(
            running.check_assign("assign", Some(Epoch(2)), Epoch(3)),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            r.check_assign("assign", Some(Epoch(2)), Epoch(9)),
            Err(Error::Invalid(_))
        ));
        assert!(
            r.check_assign("assign", Some(Epoch(2)), Epoch(2))
                .unwrap_err()
                .is_fenced()
        );
        assert!(
            r.check_commit("commit", Epoch(2), Epoch(3), Sequence(10))
                .is_ok()
        );
        assert!(
            r.check_commit("commit", Epoch(2), Epoch(3), Sequence(9))
                .unwrap_err()
                .is_fenced()
        );
        assert!(matches!(
            r.check_commit("commit", Epoch(1), Epoch(3), Sequence(10)),
            Err(Error::Conflict(_))
        ));
    }
}
