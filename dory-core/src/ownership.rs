//! The rules of an ownership row, in one place.
//!
//! Every [`StateStore`](crate::StateStore) decides its fenced writes by these rules, each over
//! the row as it holds it (a locked database row, an in-memory map entry), so that all stores
//! refuse the same writes with the same meanings. The store supplies the row and does the
//! writing; the rules only say yes or why not.

use crate::columns::{self, count, timestamp};
use crate::error::{Error, Result};
use crate::model::{Epoch, Ownership, ProcessorId, Sequence};

/// What a SQL store reads of an ownership row to decide a write, column by column, in the
/// order [`OwnershipRules::from_columns`] takes them: owner, highest claimed, newest owner,
/// whether the lease runs (compared in the store's clock), committed epoch and sequence.
pub type RulesColumns = (Option<i64>, i64, i64, bool, Option<i64>, Option<i64>);

/// An ownership row as a SQL store lists it, column by column, in the order
/// [`Ownership::from_columns`] takes them: processor, owner, highest claimed, lease expiry (ms
/// since the Unix epoch), committed epoch, committed sequence, committed at (ms).
pub type OwnershipColumns = (
    String,
    Option<i64>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

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
    /// The rules over a row a SQL store read (see [`RulesColumns`]); a negative number is
    /// [`Error::Invalid`] naming `what`.
    pub fn from_columns(row: RulesColumns, what: &str) -> Result<OwnershipRules> {
        let (owner, highest, newest_owner, lease_running, c_epoch, c_seq) = row;
        Ok(OwnershipRules {
            owner: owner.map(|o| count(o, what).map(Epoch)).transpose()?,
            highest: Epoch(count(highest, what)?),
            newest_owner: Epoch(count(newest_owner, what)?),
            lease_running,
            committed: columns::committed(c_epoch, c_seq, what)?,
        })
    }

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

impl Ownership {
    /// An ownership row a SQL store listed (see [`OwnershipColumns`]); a negative number or a
    /// processor id that is not one is [`Error::Invalid`] naming `what`.
    pub fn from_columns(row: OwnershipColumns, what: &str) -> Result<Ownership> {
        let (processor, owner, highest, lease, c_epoch, c_seq, c_at) = row;
        Ok(Ownership {
            processor: ProcessorId::new(processor).map_err(|e| e.context(what))?,
            owner: owner.map(|o| count(o, what).map(Epoch)).transpose()?,
            highest_epoch: Epoch(count(highest, what)?),
            lease_expires: lease.map(timestamp),
            committed: columns::committed(c_epoch, c_seq, what)?,
            committed_at: c_at.map(timestamp),
        })
    }
}

/// A release of `epoch` given the current `owner`: `Ok(true)` when `epoch` owns and the store
/// must clear the owner and its lease, `Ok(false)` when nothing owns (released already: a
/// retried release succeeds), [`Conflict`](Error::Conflict) when another epoch owns.
pub fn check_release(what: &str, owner: Option<Epoch>, epoch: Epoch) -> Result<bool> {
    match owner {
        None => Ok(false),
        Some(owner) if owner == epoch => Ok(true),
        Some(owner) => Err(Error::conflict(format!("{what}: {owner} owns it"))),
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
    fn rows_read_from_columns() {
        let rules = OwnershipRules::from_columns((Some(2), 4, 2, false, Some(2), Some(10)), "r");
        assert_eq!(rules.unwrap(), row());
        let bad = OwnershipRules::from_columns((Some(-2), 4, 2, false, None, None), "row of p");
        assert!(matches!(bad, Err(Error::Invalid(m)) if m.contains("row of p")));
        let listed =
            Ownership::from_columns(("p".into(), None, 3, Some(-1), Some(1), None, Some(9)), "r")
                .unwrap();
        assert_eq!(listed.processor.as_str(), "p");
        assert_eq!(listed.owner, None);
        assert_eq!(listed.highest_epoch, Epoch(3));
        assert_eq!(listed.lease_expires, Some(crate::Timestamp(0)));
        assert_eq!(listed.committed, None);
        assert_eq!(listed.committed_at, Some(crate::Timestamp(9)));
        let bad =
            Ownership::from_columns(("Not_A_Label".into(), None, 1, None, None, None, None), "r");
        assert!(matches!(bad, Err(Error::Invalid(_))));
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
        assert_eq!(
            check_release("release", Some(Epoch(2)), Epoch(2)).ok(),
            Some(true)
        );
        assert_eq!(check_release("release", None, Epoch(2)).ok(), Some(false));
        assert!(matches!(
            check_release("release", Some(Epoch(3)), Epoch(2)),
            Err(Error::Conflict(_))
        ));
    }
}
