//! The planning rules.
//!
//! A plan is built in two passes. The first decides, per processor and in processor order,
//! what the processor needs: nothing, an action that needs no node (resume, roll a half-done
//! move forward or back, terminate, forget, release, mark failed), a note saying why it
//! waits, or a *candidate* that needs a node (start, move, evacuate). The second pass sorts
//! the candidates by urgency and places them one by one, charging each placement against the
//! nodes' free room and against the bound on concurrent moves, so the most urgent work gets
//! the room and the budget first.
//!
//! Everything is walked in sorted order, ties are broken by ids and restart jitter comes from a
//! hash of (processor, restarts), so the same inputs give the same plan.

use std::collections::BTreeSet;
use std::time::Duration;

use super::placement::{Nodes, unusable_reason};
use super::{Action, MoveReason, Observed, Plan, PlannerConfig, RestartHistory, StartReason};
use crate::model::{
    DesiredState, Epoch, Instance, InterruptionReason, Node, NodeId, Ownership, Phase, ProcessorId,
    ProcessorSpec, Resources, RestartMode, SitePreference, Timestamp,
};

/// Plans the next actions. Pure: the same inputs give the same plan.
///
/// Cost: linear in processors and instances when they arrive sorted (as [`Observed`]
/// documents; otherwise they are sorted first), plus `O(n log n)` to index `n` nodes and
/// `O(c log c + c log n)` for the `c` processors that need a node.
pub fn plan(
    desired: &DesiredState,
    observed: &Observed,
    now: Timestamp,
    config: &PlannerConfig,
) -> Plan {
    Planner::new(desired, observed, now, config).run()
}

static NO_HISTORY: RestartHistory = RestartHistory {
    restarts: 0,
    recent_failures: Vec::new(),
    failed: None,
    failed_revision: None,
};

/// One processor's inputs, gathered from the three sorted lists.
struct Entry<'a> {
    id: &'a ProcessorId,
    spec: Option<&'a ProcessorSpec>,
    /// Its instances: a range of [`Planner::instances`], sorted by epoch.
    instances: (usize, usize),
    ownership: Option<&'a Ownership>,
}

/// What one processor needs, from the first pass.
enum Decision<'a> {
    Nothing,
    Act(Action),
    Wait(String, Option<Timestamp>),
    Place(Candidate<'a>),
}

/// How urgent a candidate is; candidates get nodes and the move budget in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Interruption and cordon moves, evacuations.
    Urgent,
    Failover,
    /// New starts and restarts.
    Start,
    Pin,
    SpecChange,
    MoveBack,
}

enum Kind {
    Start {
        expected: Option<Epoch>,
        reason: StartReason,
    },
    Move {
        from: Epoch,
        reason: MoveReason,
    },
    Evacuate {
        from: Epoch,
        reason: InterruptionReason,
    },
}

/// Which nodes a candidate may go to.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// The preferred site, else (with fallback) any site.
    Spread,
    /// Only the pin node.
    Pin(&'a NodeId),
    /// The pin node if it can take the instance, else anywhere: an interrupted node's state
    /// must go somewhere even when the pin node cannot take it.
    PinFirst(&'a NodeId),
    /// A preferred-site node that has been ready for the stabilisation period.
    Stable,
}

/// A processor that needs a node.
struct Candidate<'a> {
    id: &'a ProcessorId,
    spec: &'a ProcessorSpec,
    class: Class,
    /// The interruption deadline, for urgent candidates.
    deadline: Option<Timestamp>,
    kind: Kind,
    target: Target<'a>,
    /// When a candidate left waiting changes by itself (an interruption move that becomes an
    /// evacuation).
    wake: Option<Timestamp>,
}

impl Candidate<'_> {
    fn order(&self) -> (Class, (bool, Timestamp), &ProcessorId) {
        (self.class, deadline_key(self.deadline), self.id)
    }

    fn action(self, node: &NodeId) -> Action {
        let processor = self.id.clone();
        let node = node.clone();
        match self.kind {
            Kind::Start { expected, reason } => Action::Start {
                processor,
                node,
                expected_owner: expected,
                reason,
            },
            Kind::Move { from, reason } => Action::Move {
                processor,
                from,
                to: node,
                reason,
            },
            Kind::Evacuate { from, reason } => Action::Evacuate {
                processor,
                from,
                to: node,
                reason,
            },
        }
    }
}

/// Deadlines first, earliest first; no deadline last.
fn deadline_key(deadline: Option<Timestamp>) -> (bool, Timestamp) {
    (deadline.is_none(), deadline.unwrap_or_default())
}

/// Where an owner instance's node stands.
enum Health {
    Ready,
    /// Not ready, but not for longer than the grace period: counts as lost at this time.
    Down(Timestamp),
    /// Gone or not ready past the grace period; why.
    Lost(String),
}

/// Where the plan's output accumulates.
#[derive(Default)]
struct Out<'a> {
    /// (urgency group, deadline, processor, action): sorted at the end.
    actions: Vec<(u8, (bool, Timestamp), &'a ProcessorId, Action)>,
    /// Collected first and built into the map at the end: building from a nearly sorted list
    /// is linear, inserting one by one is not (a cold start has a note per processor).
    waiting: Vec<(&'a ProcessorId, String)>,
    wake_at: Option<Timestamp>,
}

impl<'a> Out<'a> {
    fn act(&mut self, id: &'a ProcessorId, action: Action) {
        self.actions.push((2, deadline_key(None), id, action));
    }

    fn wait(&mut self, now: Timestamp, id: &'a ProcessorId, note: String, wake: Option<Timestamp>) {
        self.waiting.push((id, note));
        if let Some(at) = wake.filter(|at| *at > now) {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
    }

    fn finish(mut self) -> Plan {
        self.actions
            .sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        Plan {
            actions: self.actions.into_iter().map(|a| a.3).collect(),
            waiting: self
                .waiting
                .into_iter()
                .map(|(id, note)| (id.clone(), note))
                .collect(),
            wake_at: self.wake_at,
        }
    }
}

struct Planner<'a> {
    desired: &'a DesiredState,
    observed: &'a Observed,
    now: Timestamp,
    config: &'a PlannerConfig,
    invalid: BTreeSet<&'a str>,
    /// Every instance, sorted by (processor, epoch).
    instances: Vec<&'a Instance>,
    entries: Vec<Entry<'a>>,
    nodes: Nodes<'a>,
}

impl<'a> Planner<'a> {
    fn new(
        desired: &'a DesiredState,
        observed: &'a Observed,
        now: Timestamp,
        config: &'a PlannerConfig,
    ) -> Self {
        let specs = sorted_unique(&desired.processors, |s| (&s.id, Epoch(0)));
        let instances = sorted_unique(&observed.instances, |i| (&i.processor, i.epoch));
        let rows = sorted_unique(&observed.ownership, |o| (&o.processor, Epoch(0)));

        let entries = merge(&specs, &instances, &rows);
        let mut nodes = Nodes::new(
            &observed.nodes,
            &desired.cordoned,
            now,
            config.stabilisation,
        );
        for entry in &entries {
            // An undesired processor's resources are unknown (its spec is gone); it is being
            // terminated, so it is left out rather than guessed at.
            let Some(spec) = entry.spec else { continue };
            for instance in &instances[entry.instances.0..entry.instances.1] {
                // A terminating instance still holds its node's resources until it is gone.
                if !instance.phase.is_gone()
                    && let Some(idx) = nodes.find(&instance.node)
                {
                    nodes.charge(idx, spec.resources);
                }
            }
        }
        nodes.index();
        Planner {
            desired,
            observed,
            now,
            config,
            invalid: desired.invalid.iter().map(|e| e.id.as_str()).collect(),
            instances,
            entries,
            nodes,
        }
    }

    fn run(mut self) -> Plan {
        let mut out = Out::default();
        let mut candidates = Vec::new();
        for entry in &self.entries {
            let id = entry.id;
            if self.invalid.contains(id.as_str()) || self.observed.busy.contains(id) {
                continue;
            }
            let instances = &self.instances[entry.instances.0..entry.instances.1];
            let owner = entry.ownership.and_then(|o| o.owner);
            let (decision, cleanup) = match entry.spec {
                None => (self.undesired(id, instances, owner), None),
                Some(spec) => (
                    self.desired(id, spec, instances, entry.ownership),
                    // Only one action per processor: clearing away an ended instance is what a
                    // processor gets when it has nothing better to do.
                    instances
                        .iter()
                        .find(|i| i.phase.is_gone() && Some(i.epoch) != owner)
                        .map(|i| Action::Forget {
                            processor: id.clone(),
                            epoch: i.epoch,
                        }),
                ),
            };
            match decision {
                Decision::Nothing => {
                    if let Some(action) = cleanup {
                        out.act(id, action);
                    }
                }
                Decision::Act(action) => out.act(id, action),
                Decision::Wait(note, wake) => {
                    out.wait(self.now, id, note, wake);
                    if let Some(action) = cleanup {
                        out.act(id, action);
                    }
                }
                Decision::Place(candidate) => candidates.push((candidate, cleanup)),
            }
        }

        candidates.sort_by(|a, b| a.0.order().cmp(&b.0.order()));
        let mut budget = self
            .config
            .max_concurrent_moves
            .saturating_sub(self.observed.moves_in_flight);
        for (candidate, cleanup) in candidates {
            let placed = if budget == 0 {
                Err("waiting for the move bound".to_string())
            } else {
                self.resolve(&candidate)
            };
            match placed {
                Ok(idx) => {
                    self.nodes.take(idx, candidate.spec.resources);
                    budget -= 1;
                    let group = match candidate.class {
                        Class::Urgent => 0,
                        Class::Failover => 1,
                        _ => 2,
                    };
                    let key = deadline_key(if group == 0 { candidate.deadline } else { None });
                    let id = candidate.id;
                    let action = candidate.action(&self.nodes.node(idx).id);
                    out.actions.push((group, key, id, action));
                }
                Err(note) => {
                    out.wait(self.now, candidate.id, note, candidate.wake);
                    if let Some(action) = cleanup {
                        out.act(candidate.id, action);
                    }
                }
            }
        }

        out.finish()
    }

    /// A processor that is no longer desired is taken down, one step per plan.
    fn undesired(
        &self,
        id: &ProcessorId,
        instances: &[&Instance],
        owner: Option<Epoch>,
    ) -> Decision<'a> {
        let terminate = |i: &Instance, release: bool| {
            Decision::Act(Action::Terminate {
                processor: id.clone(),
                epoch: i.epoch,
                release,
            })
        };
        if let Some(i) = instances
            .iter()
            .find(|i| Some(i.epoch) == owner && i.phase.is_alive())
        {
            return terminate(i, true);
        }
        if let Some(i) = instances.iter().find(|i| i.phase.is_alive()) {
            return terminate(i, false);
        }
        if let Some(i) = instances.iter().find(|i| i.phase.is_gone()) {
            return Decision::Act(Action::Forget {
                processor: id.clone(),
                epoch: i.epoch,
            });
        }
        if let Some(i) = instances.iter().find(|i| i.phase == Phase::Terminating) {
            // Releasing now would let a late checkpoint of the stopping owner go unfenced.
            return Decision::Wait(
                format!("no longer desired; waiting for {} to stop", i.epoch),
                None,
            );
        }
        match owner {
            Some(epoch) => Decision::Act(Action::Release {
                processor: id.clone(),
                epoch,
            }),
            None => Decision::Nothing,
        }
    }

    fn desired(
        &self,
        id: &'a ProcessorId,
        spec: &'a ProcessorSpec,
        instances: &[&'a Instance],
        row: Option<&'a Ownership>,
    ) -> Decision<'a> {
        let history = self.observed.history.get(id).unwrap_or(&NO_HISTORY);
        if let Some(reason) = &history.failed
            && history.failed_revision == Some(spec.revision())
        {
            return Decision::Wait(
                format!("stopped by the crash-loop breaker ({reason}); change the spec to retry"),
                None,
            );
        }
        // The breaker tripped on an older revision: the new spec starts with a clean slate.
        let fresh = history.failed.is_some();
        let owner = row.and_then(|o| o.owner);
        let owner_instance = owner.and_then(|e| instances.iter().copied().find(|i| i.epoch == e));

        // Instances that do not own the processor are settled before anything else: a move
        // found half-done is rolled forward or back, any other stray is terminated. A stray
        // on a node that is not ready cannot be reached (a terminate would only queue until
        // its node is back) and cannot commit anything (the store fences it), so it does not
        // hold up the owner's own rules — an evacuation or a failover must not wait for it.
        let mut strays = instances
            .iter()
            .copied()
            .filter(|i| Some(i.epoch) != owner && i.phase.is_alive() && self.is_ready(&i.node));
        if let Some(stray) = strays.next() {
            let only = strays.next().is_none();
            return Decision::Act(self.settle(id, owner_instance, stray, only));
        }

        match (owner_instance, owner, row) {
            (Some(instance), Some(_), Some(row)) => {
                self.owned(id, spec, history, fresh, row, instance)
            }
            (None, Some(epoch), Some(row)) => {
                // Ownership without an instance: a launch that never happened (the
                // orchestrator crashed after assigning the owner) or an instance record that
                // vanished. Something may still run unobserved, so wait out its lease.
                if let Some(at) = self.lease_end(row) {
                    return Decision::Wait(
                        format!(
                            "owner {epoch} has no instance; waiting for its lease to run out at {at}"
                        ),
                        Some(at),
                    );
                }
                Decision::Place(self.start(id, spec, Some(epoch), StartReason::Failover))
            }
            _ => Decision::Place(self.start(id, spec, None, StartReason::New)),
        }
    }

    /// What to do about an alive instance that does not own the processor.
    fn settle(
        &self,
        id: &ProcessorId,
        owner: Option<&Instance>,
        stray: &Instance,
        only: bool,
    ) -> Action {
        if only
            && let Some(owner) = owner
            && owner.phase.is_alive()
            // Rolling needs both instances to answer; with either node down, terminating the
            // stray is the step both rolls start or end with, and the rest follows from the
            // owner's own rules (resume, failover).
            && self.is_ready(&owner.node)
            && self.is_ready(&stray.node)
        {
            if stray.epoch < owner.epoch {
                return Action::RollForward {
                    processor: id.clone(),
                    owner: owner.epoch,
                    old: stray.epoch,
                };
            }
            if matches!(stray.phase, Phase::Starting | Phase::Standby) {
                return Action::RollBack {
                    processor: id.clone(),
                    owner: owner.epoch,
                    replacement: stray.epoch,
                };
            }
        }
        Action::Terminate {
            processor: id.clone(),
            epoch: stray.epoch,
            release: false,
        }
    }

    /// The owner instance exists (alive, stopping or ended) and nothing else is alive.
    fn owned(
        &self,
        id: &'a ProcessorId,
        spec: &'a ProcessorSpec,
        history: &RestartHistory,
        fresh: bool,
        row: &Ownership,
        instance: &'a Instance,
    ) -> Decision<'a> {
        let idx = self.nodes.find(&instance.node);
        // An instance that said it exited has ended wherever it ran; anything else on a
        // node that is down may still be running there.
        if !matches!(instance.phase, Phase::Exited { .. }) {
            match self.health(idx) {
                Health::Ready => {}
                Health::Down(at) => {
                    return Decision::Wait(
                        format!(
                            "node {} is not ready; {} fails over if it is still down at {at}",
                            instance.node, instance.epoch
                        ),
                        Some(at),
                    );
                }
                Health::Lost(why) => {
                    // Failover: the one Start allowed while the owner may still be alive, so
                    // only once its lease (plus the margin) is over.
                    if let Some(at) = self.lease_end(row) {
                        return Decision::Wait(
                            format!(
                                "node {} {why}; waiting for {}'s lease to run out at {at}",
                                instance.node, instance.epoch
                            ),
                            Some(at),
                        );
                    }
                    return Decision::Place(self.start(
                        id,
                        spec,
                        Some(instance.epoch),
                        StartReason::Failover,
                    ));
                }
            }
        }
        match &instance.phase {
            Phase::Exited { .. } | Phase::Failed { .. } => {
                self.ended(id, spec, history, fresh, row, instance)
            }
            Phase::Terminating => {
                Decision::Wait(format!("waiting for {} to stop", instance.epoch), None)
            }
            Phase::Starting => Decision::Nothing,
            // Nothing else is alive, so nothing will resume it but this.
            Phase::Frozen | Phase::Standby => Decision::Act(Action::Resume {
                processor: id.clone(),
                epoch: instance.epoch,
            }),
            Phase::Running => match idx {
                Some(idx) => self.running(id, spec, instance, self.nodes.node(idx)),
                None => Decision::Nothing,
            },
        }
    }

    /// The owner instance has ended: the restart policy, the crash-loop breaker and the
    /// backoff decide.
    fn ended(
        &self,
        id: &'a ProcessorId,
        spec: &'a ProcessorSpec,
        history: &RestartHistory,
        fresh: bool,
        row: &Ownership,
        instance: &Instance,
    ) -> Decision<'a> {
        let failed = match instance.phase {
            Phase::Exited { code } => code != 0,
            _ => true,
        };
        let policy = &spec.restart;
        let restart = match policy.mode {
            RestartMode::Never => false,
            RestartMode::OnFailure => failed,
            RestartMode::Always => true,
        };
        if !restart {
            let mode = match policy.mode {
                RestartMode::Never => "never",
                RestartMode::OnFailure => "on-failure",
                RestartMode::Always => "always",
            };
            return Decision::Wait(
                format!(
                    "{} {}; restart policy {mode} leaves it stopped",
                    instance.epoch, instance.phase
                ),
                None,
            );
        }
        let mut ready_at = self.now;
        let mut note = String::new();
        if !fresh {
            let window = policy.crash_loop_window;
            let failures = history
                .recent_failures
                .iter()
                .filter(|t| self.now.since(**t) < window)
                .count();
            if failures >= policy.crash_loop_failures as usize {
                return Decision::Act(Action::MarkFailed {
                    processor: id.clone(),
                    reason: format!(
                        "crash loop: {failures} failures within {window:?} (last: {} {})",
                        instance.epoch, instance.phase
                    ),
                });
            }
            let since = history
                .recent_failures
                .iter()
                .max()
                .copied()
                .unwrap_or(instance.started_at);
            let until = since.plus(backoff(spec, history.restarts));
            if until > ready_at {
                ready_at = until;
                note = format!(
                    "restart backoff until {until} (restart {})",
                    history.restarts.saturating_add(1)
                );
            }
        }
        // The store hands ownership on only once the old lease has run out (a crashed instance
        // may be cut off rather than dead), so a restart waits for it too.
        if let Some(at) = self.lease_end(row)
            && at > ready_at
        {
            ready_at = at;
            note = format!(
                "waiting for {}'s lease to run out at {at} before restarting",
                instance.epoch
            );
        }
        if ready_at > self.now {
            return Decision::Wait(note, Some(ready_at));
        }
        Decision::Place(self.start(id, spec, Some(instance.epoch), StartReason::Restart))
    }

    /// A running owner on a ready node: interruption, cordon, pin, spec change and move-back,
    /// in that order.
    fn running(
        &self,
        id: &'a ProcessorId,
        spec: &'a ProcessorSpec,
        instance: &Instance,
        node: &Node,
    ) -> Decision<'a> {
        let from = instance.epoch;
        let candidate = |class, kind, target| Candidate {
            id,
            spec,
            class,
            deadline: None,
            kind,
            target,
            wake: None,
        };
        let anywhere = match &spec.pin {
            Some(pin) => Target::PinFirst(pin),
            None => Target::Spread,
        };
        if let Some(interruption) = &node.interruption {
            let reason = interruption.reason.clone();
            let deadline = interruption.deadline;
            let evacuate = deadline
                .is_some_and(|d| d <= self.now || d.since(self.now) < self.config.min_move_time);
            let mut c = if evacuate {
                candidate(Class::Urgent, Kind::Evacuate { from, reason }, anywhere)
            } else {
                let reason = MoveReason::Interruption(reason);
                let mut c = candidate(Class::Urgent, Kind::Move { from, reason }, anywhere);
                c.wake = deadline.map(|d| d.minus(self.config.min_move_time));
                c
            };
            c.deadline = deadline;
            return Decision::Place(c);
        }
        if !node.schedulable || self.desired.cordoned.contains(&node.id) {
            let kind = Kind::Move {
                from,
                reason: MoveReason::Cordon,
            };
            return Decision::Place(candidate(Class::Urgent, kind, anywhere));
        }
        let spec_changed = || instance.revision != spec.revision();
        if let Some(pin) = &spec.pin {
            if *pin != instance.node {
                // The fit is checked when the move is placed; a node that cannot take anything
                // is reported here without using a place in the queue.
                if let Err(note) = self.pin_node(pin, None) {
                    return Decision::Wait(note, None);
                }
                let kind = Kind::Move {
                    from,
                    reason: MoveReason::Pin,
                };
                return Decision::Place(candidate(Class::Pin, kind, Target::Pin(pin)));
            }
            if spec_changed() {
                let kind = Kind::Move {
                    from,
                    reason: MoveReason::SpecChange,
                };
                return Decision::Place(candidate(Class::SpecChange, kind, Target::Pin(pin)));
            }
            return Decision::Nothing;
        }
        if spec_changed() {
            // The target may be the node it runs on: its free room already counts the old
            // instance, so a fit there has room for both during the move.
            let kind = Kind::Move {
                from,
                reason: MoveReason::SpecChange,
            };
            return Decision::Place(candidate(Class::SpecChange, kind, Target::Spread));
        }
        if !spec.site.prefers(node.site) {
            if self.nodes.has_stable(spec.site) {
                let kind = Kind::Move {
                    from,
                    reason: MoveReason::MoveBack,
                };
                return Decision::Place(candidate(Class::MoveBack, kind, Target::Stable));
            }
            let at = self.nodes.next_stable(spec.site);
            let why = match at {
                Some(at) => format!("it is not stable until {at}"),
                None => "it has no usable node".to_string(),
            };
            return Decision::Wait(
                format!(
                    "running on fallback site {}; preferred site {}: {why}",
                    node.site,
                    site_name(spec.site)
                ),
                at,
            );
        }
        Decision::Nothing
    }

    fn start(
        &self,
        id: &'a ProcessorId,
        spec: &'a ProcessorSpec,
        expected: Option<Epoch>,
        reason: StartReason,
    ) -> Candidate<'a> {
        let class = match reason {
            StartReason::Failover => Class::Failover,
            StartReason::New | StartReason::Restart => Class::Start,
        };
        Candidate {
            id,
            spec,
            class,
            deadline: None,
            kind: Kind::Start { expected, reason },
            target: match &spec.pin {
                Some(pin) => Target::Pin(pin),
                None => Target::Spread,
            },
            wake: None,
        }
    }

    /// The node for a candidate, or why there is none.
    fn resolve(&self, candidate: &Candidate<'_>) -> Result<usize, String> {
        let spec = candidate.spec;
        let need = spec.resources;
        let pinned = |pin: &NodeId| self.pin_node(pin, Some(need));
        let spread = || {
            self.nodes
                .choose(spec.site, spec.fallback, need)
                .ok_or_else(|| {
                    let site = match (spec.site, spec.fallback) {
                        (SitePreference::Any, _) => String::new(),
                        (site, true) => {
                            format!(" (preferred site {} or any other)", site_name(site))
                        }
                        (site, false) => format!(" on site {} (no fallback)", site_name(site)),
                    };
                    format!("no node has room for {}{site}", describe(need))
                })
        };
        match candidate.target {
            Target::Spread => spread(),
            Target::Pin(pin) => pinned(pin),
            Target::PinFirst(pin) => pinned(pin).or_else(|_| spread()),
            Target::Stable => self.nodes.choose_stable(spec.site, need).ok_or_else(|| {
                format!(
                    "running outside its preferred site; no stable {} node has room for {}",
                    site_name(spec.site),
                    describe(need)
                )
            }),
        }
    }

    /// The pin node, if it can take new instances (and `need`, when given), else why not.
    fn pin_node(&self, pin: &NodeId, need: Option<Resources>) -> Result<usize, String> {
        let Some(idx) = self.nodes.find(pin) else {
            return Err(format!("pinned to {pin}, which does not exist"));
        };
        let node = self.nodes.node(idx);
        if let Some(why) = unusable_reason(node, self.desired.cordoned.contains(pin)) {
            return Err(format!("pinned to {pin}, which is {why}"));
        }
        match need {
            Some(need) if !self.nodes.fits(idx, need) => Err(format!(
                "pinned to {pin}, which has no room for {}",
                describe(need)
            )),
            _ => Ok(idx),
        }
    }

    fn health(&self, idx: Option<usize>) -> Health {
        let Some(idx) = idx else {
            return Health::Lost("no longer exists".into());
        };
        let node = self.nodes.node(idx);
        if node.ready {
            return Health::Ready;
        }
        // Lost once not ready for strictly longer than the grace period.
        let lost_at = node
            .ready_since
            .plus(self.config.node_lost_grace)
            .plus(Duration::from_millis(1));
        if self.now >= lost_at {
            Health::Lost(format!("has not been ready since {}", node.ready_since))
        } else {
            Health::Down(lost_at)
        }
    }

    fn is_ready(&self, node: &NodeId) -> bool {
        self.nodes
            .find(node)
            .is_some_and(|idx| self.nodes.node(idx).ready)
    }

    /// When the owner's lease plus the margin runs out, if that is still ahead. A row without
    /// a lease counts as expired.
    fn lease_end(&self, row: &Ownership) -> Option<Timestamp> {
        row.lease_expires
            .map(|t| t.plus(self.config.lease_margin))
            .filter(|at| *at > self.now)
    }
}

/// `items` by `key`, strictly ascending: the first of equal keys is kept.
///
/// The inputs are documented as sorted; checking costs one comparison per item when they are,
/// and sorting anyway keeps the plan deterministic when a backend gets the order wrong.
fn sorted_unique<'a, T>(
    items: &'a [T],
    key: impl Fn(&'a T) -> (&'a ProcessorId, Epoch),
) -> Vec<&'a T> {
    let mut sorted: Vec<&T> = items.iter().collect();
    if !sorted.is_sorted_by(|a, b| key(a) < key(b)) {
        sorted.sort_by(|a, b| key(a).cmp(&key(b)));
        sorted.dedup_by(|a, b| key(a) == key(b));
    }
    sorted
}

/// Joins the sorted specs, instances and ownership rows into one entry per processor.
fn merge<'a>(
    specs: &[&'a ProcessorSpec],
    instances: &[&'a Instance],
    rows: &[&'a Ownership],
) -> Vec<Entry<'a>> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let mut entries = Vec::with_capacity(specs.len().max(rows.len()));
    let (mut s, mut i, mut r) = (0, 0, 0);
    loop {
        // Two comparisons find the smallest head and which lists share it; string comparisons
        // are most of what this loop costs.
        let spec = specs.get(s).copied();
        let instance = instances.get(i).copied();
        let row = rows.get(r).copied();
        let (mut id, mut has_spec, mut has_instance) = match (spec, instance) {
            (None, None) => (None, false, false),
            (Some(a), None) => (Some(&a.id), true, false),
            (None, Some(b)) => (Some(&b.processor), false, true),
            (Some(a), Some(b)) => match a.id.cmp(&b.processor) {
                Less => (Some(&a.id), true, false),
                Equal => (Some(&a.id), true, true),
                Greater => (Some(&b.processor), false, true),
            },
        };
        let mut has_row = false;
        if let Some(c) = row {
            match id.map_or(Less, |m| c.processor.cmp(m)) {
                Less => {
                    (id, has_spec, has_instance, has_row) = (Some(&c.processor), false, false, true)
                }
                Equal => has_row = true,
                Greater => {}
            }
        }
        let Some(id) = id else { break };
        let start = i;
        if has_instance {
            i += 1;
            while instances.get(i).is_some_and(|x| x.processor == *id) {
                i += 1;
            }
        }
        s += has_spec as usize;
        r += has_row as usize;
        entries.push(Entry {
            id,
            spec: spec.filter(|_| has_spec),
            instances: (start, i),
            ownership: row.filter(|_| has_row),
        });
    }
    entries
}

/// The restart delay: exponential from `backoff_initial`, capped at `backoff_max`, plus up to
/// a quarter of it as jitter from a hash of (processor, restarts), so processors that failed
/// together do not restart in lockstep while the plan stays reproducible.
pub(super) fn backoff(spec: &ProcessorSpec, restarts: u32) -> Duration {
    let policy = &spec.restart;
    let delay = if restarts >= 32 {
        policy.backoff_max
    } else {
        policy
            .backoff_initial
            .saturating_mul(1u32 << restarts.min(31))
            .min(policy.backoff_max)
    };
    let quarter = (delay.as_millis() / 4) as u64;
    let jitter = if quarter == 0 {
        0
    } else {
        xxhash_rust::xxh3::xxh3_64_with_seed(spec.id.as_str().as_bytes(), u64::from(restarts))
            % quarter
    };
    delay + Duration::from_millis(jitter)
}

fn describe(r: Resources) -> String {
    format!("{}m CPU and {} MiB", r.cpu_millis, r.memory_mib)
}

fn site_name(site: SitePreference) -> &'static str {
    match site {
        SitePreference::Edge => "edge",
        SitePreference::Cloud => "cloud",
        SitePreference::Any => "any",
    }
}
