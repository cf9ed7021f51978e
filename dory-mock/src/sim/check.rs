//! The invariant checker: watches every publish and every committed checkpoint of a
//! simulation and records each violation of Dory's promises.

use std::collections::BTreeMap;

use dory_core::{Epoch, ProcessorId, Sequence, Timestamp};

use super::cluster::input;

#[derive(Default)]
struct Output {
    /// The latest epoch that has published.
    max_epoch: Epoch,
    /// The highest sequence published by anyone.
    highest: u64,
    /// Seen sequences after the design brief's rule (dedupe by sequence, higher epoch wins).
    by_seq: BTreeMap<u64, Epoch>,
    /// Expected running sums, index = sequence.
    expected: Vec<u64>,
    /// The last committed checkpoint seen.
    committed: Option<(Epoch, Sequence)>,
    /// Epochs whose first publish has been checked against the loss bound.
    loss_checked: BTreeMap<Epoch, u64>,
    /// Duplicates resolved by the rule (failovers only).
    resolved_duplicates: u64,
    /// Sequences up to here may be published again: they were published before the latest
    /// restore from a checkpoint (a failover or restart), which re-does them.
    redo_upto: u64,
}

impl Output {
    fn expected(&mut self, processor: &ProcessorId, seq: u64) -> u64 {
        if self.expected.is_empty() {
            self.expected.push(0);
        }
        while self.expected.len() as u64 <= seq {
            let n = self.expected.len() as u64;
            let prev = *self.expected.last().unwrap_or(&0);
            self.expected.push(prev.wrapping_add(input(processor, n)));
        }
        self.expected[seq as usize]
    }
}

/// Records violations of the invariants as a simulation runs.
#[derive(Default)]
pub struct Checker {
    outputs: BTreeMap<ProcessorId, Output>,
    violations: Vec<String>,
    max_loss: u64,
    publishes: u64,
}

/// Counters a run reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckerStats {
    /// Messages published.
    pub publishes: u64,
    /// Duplicates that the dedupe rule resolved (failovers).
    pub resolved_duplicates: u64,
    /// The largest loss seen in a failover, in steps.
    pub largest_loss: u64,
}

impl Checker {
    /// A checker allowing a failover to lose at most `max_loss_steps` steps.
    pub fn new(max_loss_steps: u64) -> Self {
        Checker {
            max_loss: max_loss_steps,
            ..Checker::default()
        }
    }

    fn violate(&mut self, at: Timestamp, what: String) {
        if self.violations.len() < 100 {
            self.violations.push(format!("at {}ms: {what}", at.0));
        }
    }

    /// The violations found so far.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Counters.
    pub fn stats(&self) -> CheckerStats {
        CheckerStats {
            publishes: self.publishes,
            resolved_duplicates: self.outputs.values().map(|o| o.resolved_duplicates).sum(),
            largest_loss: self
                .outputs
                .values()
                .flat_map(|o| o.loss_checked.values().copied())
                .max()
                .unwrap_or(0),
        }
    }

    /// The highest sequence each processor has published.
    pub fn highest(&self, processor: &ProcessorId) -> u64 {
        self.outputs.get(processor).map_or(0, |o| o.highest)
    }

    /// Records one publish. `owner` is the store's owner at that instant, `cut_off` whether the
    /// publishing instance is cut off from the store, `lease_until` its own view of its lease.
    #[allow(clippy::too_many_arguments)]
    pub fn on_publish(
        &mut self,
        processor: &ProcessorId,
        epoch: Epoch,
        seq: u64,
        value: u64,
        owner: Option<Epoch>,
        cut_off: bool,
        lease_until: Timestamp,
        now: Timestamp,
    ) {
        self.publishes += 1;
        let mut found = Vec::new();
        if !self.outputs.contains_key(processor) {
            self.outputs.insert(processor.clone(), Output::default());
        }
        let Some(out) = self.outputs.get_mut(processor) else {
            return;
        };
        let expected = out.expected(processor, seq);
        if value != expected {
            found.push(format!(
                "{processor} {epoch} published seq {seq} with value {value}, expected {expected}: state was lost or corrupted"
            ));
        }
        if owner != Some(epoch) && !(cut_off && lease_until > now) {
            found.push(format!(
                "{processor} {epoch} published seq {seq} without ownership (owner {owner:?}, cut off {cut_off})"
            ));
        }
        if epoch < out.max_epoch {
            found.push(format!(
                "{processor}: two writers: {epoch} published seq {seq} after {} had published",
                out.max_epoch
            ));
        }
        out.max_epoch = out.max_epoch.max(epoch);
        match out.by_seq.get(&seq).copied() {
            Some(prev) if prev == epoch => {
                found.push(format!("{processor} {epoch} published seq {seq} twice"))
            }
            Some(prev) => {
                if seq <= out.redo_upto {
                    out.resolved_duplicates += 1;
                } else {
                    found.push(format!(
                        "{processor}: seq {seq} published by {prev} and by {epoch} with no restore in between (a planned move duplicated output, or two writers)"
                    ));
                }
                if epoch > prev {
                    out.by_seq.insert(seq, epoch);
                }
            }
            None => {
                if seq > out.highest + 1 {
                    found.push(format!(
                        "{processor}: gap in output: seq {} to {seq}",
                        out.highest
                    ));
                }
                out.by_seq.insert(seq, epoch);
            }
        }
        out.highest = out.highest.max(seq);
        for f in found {
            self.violate(now, f);
        }
    }

    /// Records that `epoch` restored the processor from the checkpoint at `seq` (a failover
    /// or restart): what was published after `seq` is lost and will be published again.
    ///
    /// An `exact` restore (an evacuation: the frozen snapshot committed as this epoch's first
    /// checkpoint) must lose nothing and opens no window for duplicates.
    pub fn on_restore(
        &mut self,
        processor: &ProcessorId,
        epoch: Epoch,
        seq: u64,
        exact: bool,
        now: Timestamp,
    ) {
        let out = self.outputs.entry(processor.clone()).or_default();
        let lost = out.highest.saturating_sub(seq);
        out.loss_checked.insert(epoch, lost);
        // An evacuation restores the frozen state exactly: it may only "lose" what an earlier
        // restore already gave up and is redoing (up to `redo_upto`).
        let (unexplained, allowed) = if exact {
            (out.highest.saturating_sub(seq.max(out.redo_upto)), 0)
        } else {
            (lost, self.max_loss)
        };
        if !exact {
            out.redo_upto = out.redo_upto.max(out.highest);
        }
        if unexplained > allowed {
            let what = if exact {
                format!(
                    "{processor} {epoch} restored the evacuated snapshot at seq {seq} but seq {} had been published: an evacuation lost {unexplained} steps",
                    out.highest
                )
            } else {
                format!(
                    "{processor} {epoch} restored at seq {seq} but seq {} had been published: lost {lost} steps, more than one checkpoint interval ({allowed})",
                    out.highest
                )
            };
            self.violate(now, what);
        }
    }

    /// Records the committed checkpoint of a processor as the store shows it.
    pub fn on_committed(
        &mut self,
        processor: &ProcessorId,
        committed: (Epoch, Sequence),
        now: Timestamp,
    ) {
        if !self.outputs.contains_key(processor) {
            self.outputs.insert(processor.clone(), Output::default());
        }
        let Some(out) = self.outputs.get_mut(processor) else {
            return;
        };
        let before = out.committed;
        if let Some(prev) = before
            && (committed.1 < prev.1 || committed.0 < prev.0)
        {
            let what = format!(
                "{processor}: committed state went backwards from ({}, {}) to ({}, {})",
                prev.0, prev.1, committed.0, committed.1
            );
            self.violate(now, what);
            return;
        }
        out.committed = Some(committed);
    }

    /// Records a failed end-of-run check.
    pub fn fail(&mut self, now: Timestamp, what: String) {
        self.violate(now, what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> ProcessorId {
        ProcessorId::new("p").unwrap()
    }

    fn publish_run(c: &mut Checker, epoch: u64, from: u64, to: u64) {
        let mut out = Output::default();
        for seq in from..=to {
            let v = out.expected(&p(), seq);
            c.on_publish(
                &p(),
                Epoch(epoch),
                seq,
                v,
                Some(Epoch(epoch)),
                false,
                Timestamp(0),
                Timestamp(seq),
            );
        }
    }

    #[test]
    fn a_clean_move_passes() {
        let mut c = Checker::new(10);
        publish_run(&mut c, 1, 1, 20);
        publish_run(&mut c, 2, 21, 40);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn a_move_duplicate_a_gap_and_a_wrong_value_are_caught() {
        let mut c = Checker::new(10);
        publish_run(&mut c, 1, 1, 20);
        publish_run(&mut c, 2, 20, 25);
        assert!(
            c.violations()
                .iter()
                .any(|v| v.contains("no restore in between"))
        );
        let mut c = Checker::new(10);
        publish_run(&mut c, 1, 1, 20);
        publish_run(&mut c, 2, 23, 25);
        assert!(c.violations().iter().any(|v| v.contains("gap")));
        let mut c = Checker::new(10);
        c.on_publish(
            &p(),
            Epoch(1),
            1,
            12345,
            Some(Epoch(1)),
            false,
            Timestamp(0),
            Timestamp(0),
        );
        assert!(c.violations().iter().any(|v| v.contains("expected")));
    }

    #[test]
    fn failover_duplicates_pass_within_the_loss_bound() {
        let mut c = Checker::new(10);
        publish_run(&mut c, 1, 1, 20);
        c.on_restore(&p(), Epoch(2), 14, false, Timestamp(0));
        publish_run(&mut c, 2, 15, 30);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        assert_eq!(c.stats().resolved_duplicates, 6);
        let mut c = Checker::new(3);
        publish_run(&mut c, 1, 1, 20);
        c.on_restore(&p(), Epoch(2), 14, false, Timestamp(0));
        publish_run(&mut c, 2, 15, 30);
        assert!(c.violations().iter().any(|v| v.contains("lost 6 steps")));
        let mut c = Checker::new(10);
        publish_run(&mut c, 1, 1, 20);
        c.on_restore(&p(), Epoch(2), 19, true, Timestamp(0));
        assert!(
            c.violations()
                .iter()
                .any(|v| v.contains("an evacuation lost 1 steps")),
            "an evacuation must lose nothing"
        );
    }

    #[test]
    fn non_owners_and_stale_writers_are_caught() {
        let mut c = Checker::new(10);
        let mut out = Output::default();
        let v = out.expected(&p(), 1);
        c.on_publish(
            &p(),
            Epoch(1),
            1,
            v,
            Some(Epoch(2)),
            false,
            Timestamp(0),
            Timestamp(0),
        );
        assert!(
            c.violations()
                .iter()
                .any(|v| v.contains("without ownership"))
        );
        let mut c = Checker::new(10);
        publish_run(&mut c, 2, 1, 3);
        let v = out.expected(&p(), 4);
        c.on_publish(
            &p(),
            Epoch(1),
            4,
            v,
            Some(Epoch(1)),
            true,
            Timestamp(99),
            Timestamp(5),
        );
        assert!(c.violations().iter().any(|v| v.contains("two writers")));
    }

    #[test]
    fn committed_state_never_goes_backwards() {
        let mut c = Checker::new(10);
        c.on_committed(&p(), (Epoch(2), Sequence(10)), Timestamp(0));
        c.on_committed(&p(), (Epoch(3), Sequence(10)), Timestamp(1));
        assert!(c.violations().is_empty());
        c.on_committed(&p(), (Epoch(3), Sequence(9)), Timestamp(2));
        assert!(c.violations().iter().any(|v| v.contains("backwards")));
    }
}
