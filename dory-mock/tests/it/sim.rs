//! The deterministic simulator: many seeds pass, a seed replays byte for byte, moves pre-copy
//! and fall back to the whole state, and planted protocol bugs are caught.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dory_core::orchestrator::PlantedFault;
use dory_core::snapshot::{self, Encoder, Limits, SnapshotKind};
use dory_core::{
    Clock, Epoch, Error, Instance, InstanceControl, LaunchMode, LaunchRequest, Leadership, Node,
    NodeId, Phase, Placement, ProcessorId, ProcessorSpec, Resources, Sequence, Site, StateStore,
    StoredSnapshot, Timestamp, TokioClock,
};
use dory_mock::sim::{
    CounterState, PreCopyStats, SimCluster, SimConfig, SimReport, run_seed, run_seeds,
};
use dory_mock::{MemoryLeadership, MemoryPublisher, MemoryStore};

/// `DORY_SIM_SEEDS=N` runs seeds `0..N` (CI runs at least 500 in a release build).
fn seed_count(default: u64) -> u64 {
    std::env::var("DORY_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs seeds on every core; the reports come back in seed order.
fn run_parallel(config: &SimConfig, seeds: std::ops::Range<u64>) -> Vec<SimReport> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut reports: Vec<SimReport> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..jobs)
            .map(|j| {
                let seeds = seeds.clone();
                s.spawn(move || {
                    seeds
                        .filter(|seed| seed % jobs == j)
                        .map(|seed| run_seed(config, seed))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    reports.sort_by_key(|r| r.seed);
    reports
}

#[test]
fn every_seed_keeps_every_invariant() {
    let n = seed_count(16);
    let reports = run_parallel(&SimConfig::default(), 0..n);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| {
            format!(
                "seed {}:\n  {}\n  replay: {}",
                r.seed,
                r.violations.join("\n  "),
                r.replay_command()
            )
        })
        .collect();
    let moves: u64 = reports.iter().map(|r| r.moves).sum();
    let faults: u64 = reports.iter().map(|r| r.faults).sum();
    println!(
        "{} passed, {} failed ({faults} faults, {moves} moves)",
        reports.len() - failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(moves > 0, "the scenario made no move at all");
    assert!(faults > 0, "the scenario injected no fault at all");
}

#[test]
fn a_seed_replays_byte_for_byte() {
    let config = SimConfig {
        keep_trace: true,
        ..SimConfig::default()
    };
    for seed in [0, 1, 12345] {
        let a = run_seed(&config, seed);
        let b = run_seed(&config, seed);
        assert_eq!(a.trace, b.trace, "seed {seed}: traces differ");
        assert_eq!(a.trace_hash, b.trace_hash);
        assert!(
            a.trace.len() > 100,
            "seed {seed}: the trace is suspiciously short"
        );
    }
    assert_ne!(
        run_seed(&config, 0).trace_hash,
        run_seed(&config, 1).trace_hash,
        "different seeds should differ"
    );
}

#[test]
fn the_binary_prints_the_same_trace_hash_on_every_run() {
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_dory-sim"))
            .args(["--seed", "3", "--steps", "400"])
            .output()
            .expect("dory-sim runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}");
        stdout
            .lines()
            .find(|l| l.starts_with("trace-hash: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no trace-hash line in {stdout}"))
    };
    assert_eq!(run(), run());
}

#[test]
fn the_binary_reports_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_dory-sim"))
        .args(["--seeds", "5..2"])
        .output()
        .expect("dory-sim runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the range is empty"));
}

/// The standard scenario exercises pre-copy: over a fixed set of seeds replacements take
/// deltas and resume from them, and the moves also fall back to the whole state, both when a
/// replacement refuses the delta and when the store refuses to commit it.
#[test]
fn moves_send_deltas_and_fall_back_to_the_whole_state() {
    let config = SimConfig::default();
    let reports = run_parallel(&config, 0..32);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| {
            format!(
                "seed {}: {:?}\n  replay: {}",
                r.seed,
                r.violations,
                r.replay_command()
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let moves: u64 = reports.iter().map(|r| r.moves).sum();
    let p = reports
        .iter()
        .fold(PreCopyStats::default(), |sum, r| sum + r.precopy);
    println!("{moves} moves; {p:?}");
    assert!(
        p.delta_moves * 3 >= moves,
        "only {} of {moves} moves resumed from a delta",
        p.delta_moves
    );
    assert!(p.declined > 0, "no pre-copy was ever declined");
    assert!(p.lost_answers > 0, "no pre-copy answer was ever lost");
    assert!(
        p.deltas_refused > 0,
        "no replacement ever refused a delta: the fallback to the whole state at the load never ran"
    );
    assert!(
        p.delta_commits_refused > 0,
        "the store never refused a delta: the fallback to the whole state at the commit never ran"
    );
    // The trace says so too, line by line.
    let traced = run_seed(
        &SimConfig {
            keep_trace: true,
            ..config
        },
        0,
    );
    for note in [
        "pre-copied ",
        "fetched delta ",
        "loaded delta ",
        "from a delta",
    ] {
        assert!(
            traced.trace.iter().any(|l| l.contains(note)),
            "seed 0's trace has no {note:?} line"
        );
    }
}

/// Ticks the cluster every 100 ms for `steps` steps.
async fn run_for(cluster: &SimCluster, steps: u32) {
    for _ in 0..steps {
        cluster.tick().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn record(cluster: &SimCluster, epoch: Epoch) -> Instance {
    cluster
        .instance_records()
        .into_iter()
        .find(|i| i.epoch == epoch)
        .expect("the instance is listed")
}

/// A simulated instance pre-copies as the runtime does: only while running, as a stored full
/// checkpoint; its freeze then sends a delta, which a standby takes only onto that very
/// snapshot, and a restore reads a committed delta beside its stored base.
#[tokio::test(start_paused = true)]
async fn a_simulated_instance_pre_copies_as_the_runtime_does() {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(Timestamp(5_000_000)));
    let store = MemoryStore::new(clock.clone());
    let nodes = ["n1", "n2", "n3"]
        .into_iter()
        .map(|id| {
            let mut n = Node::new(id, Site::Cloud, Resources::new(1000, 1000));
            n.ready_since = clock.now();
            n
        })
        .collect();
    let timing = SimConfig::default().timing;
    let lease = timing.lease;
    let cluster = SimCluster::standalone(
        nodes,
        clock.clone(),
        store.clone(),
        Arc::new(MemoryPublisher::new()),
        timing,
    );
    let p = ProcessorId::new("p").unwrap();
    let mut spec = ProcessorSpec::new(p.clone());
    // No periodic checkpoint: the pre-copy's is the one the delta is taken against.
    spec.checkpoint_interval = Duration::from_secs(600);
    let launch = |epoch: Epoch, node: &str, mode: LaunchMode| LaunchRequest {
        spec: spec.clone(),
        epoch,
        node: NodeId::new(node),
        mode,
    };
    let leadership = MemoryLeadership::new(&store);
    let term = leadership.acquire().await.unwrap();
    let e1 = store.claim_epoch(&p, term).await.unwrap();
    store.assign_owner(&p, None, e1, lease, term).await.unwrap();
    cluster
        .launch(&launch(e1, "n1", LaunchMode::Restore))
        .await
        .unwrap();
    run_for(&cluster, 10).await;
    let old = record(&cluster, e1);
    assert_eq!(old.phase, Phase::Running);
    let e2 = store.claim_epoch(&p, term).await.unwrap();
    cluster
        .launch(&launch(e2, "n2", LaunchMode::Standby))
        .await
        .unwrap();
    run_for(&cluster, 5).await;
    let new = record(&cluster, e2);
    assert_eq!(new.phase, Phase::Standby);

    let timeout = Duration::from_secs(1);
    let refused = cluster.precopy(&new, timeout).await;
    assert!(
        matches!(refused, Err(Error::Conflict(_))),
        "a standby pre-copied: {refused:?}"
    );
    let base = cluster.precopy(&old, timeout).await.unwrap();
    let base_header = snapshot::verify(&base).unwrap();
    assert_eq!(base_header.kind, SnapshotKind::Full);
    assert_eq!(
        store.ownership_now(&p).and_then(|o| o.committed),
        Some((e1, base_header.sequence)),
        "the pre-copy is stored as a checkpoint"
    );
    // The processor stepped right after its pre-copy: the freeze sends what changed since.
    cluster.freeze(&old, timeout).await.unwrap();
    let delta = cluster.fetch(&old).await.unwrap();
    let delta_header = snapshot::verify(&delta).unwrap();
    assert_eq!(delta_header.kind, SnapshotKind::Delta);
    assert!(delta_header.sequence > base_header.sequence);

    // Without a full snapshot loaded the delta is refused, and nothing is loaded.
    let refused = cluster.load(&new, &delta).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    let refused = cluster.resume(&new).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    // Onto another full snapshot it is refused as naming another base; what was loaded stays.
    let other = CounterState::default().step(&p);
    let other_bytes = Encoder::default()
        .encode_state(&p, e1, Sequence(other.seq), &other)
        .unwrap();
    cluster.load(&new, &other_bytes).await.unwrap();
    let refused = cluster.load(&new, &delta).await;
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    assert_eq!(
        cluster.health(&new).await.unwrap().sequence,
        Sequence(other.seq)
    );
    // The whole state is there on demand: the same state, as a full snapshot.
    let full = cluster.fetch_full(&old).await.unwrap();
    let (full_header, full_state) =
        snapshot::decode_state::<CounterState>(&full, &Limits::default()).unwrap();
    assert_eq!(
        (full_header.kind, full_header.sequence),
        (SnapshotKind::Full, delta_header.sequence)
    );
    // Onto the pre-copied snapshot it applies: the same state as the whole one.
    cluster.load(&new, &base).await.unwrap();
    cluster.load(&new, &delta).await.unwrap();
    assert_eq!(
        cluster.health(&new).await.unwrap().sequence,
        Sequence(full_state.seq)
    );

    // The store commits the delta beside its base; the replacement resumes from it.
    let mut committed = StoredSnapshot::from_encoded(delta.clone(), clock.now()).unwrap();
    committed.meta.epoch = e2;
    store
        .commit_move(e1, &committed, lease, term)
        .await
        .unwrap();
    cluster.resume(&new).await.unwrap();
    cluster.terminate(&p, e1, Duration::ZERO).await.unwrap();
    // It dies before the full checkpoint it owes after its first step: a failover restores
    // the committed delta, read beside its base.
    cluster.crash_instance(&p, e2);
    tokio::time::sleep(lease * 2).await;
    let e3 = store.claim_epoch(&p, term).await.unwrap();
    store
        .assign_owner(&p, Some(e2), e3, lease, term)
        .await
        .unwrap();
    cluster
        .launch(&launch(e3, "n3", LaunchMode::Restore))
        .await
        .unwrap();
    run_for(&cluster, 5).await;
    assert_eq!(record(&cluster, e3).phase, Phase::Running);

    let stats = cluster.precopy_stats();
    assert_eq!(
        (
            stats.precopies,
            stats.deltas_fetched,
            stats.deltas_refused,
            stats.deltas_loaded,
            stats.full_fetches,
            stats.delta_moves,
            stats.delta_restores
        ),
        (1, 1, 2, 1, 1, 1, 1),
        "{stats:?}"
    );
    assert!(
        cluster.violations().is_empty(),
        "{:?}",
        cluster.violations()
    );
}

/// A planted bug must be caught within this many seeds.
const PLANTED_SEED_BOUND: u64 = 200;

fn assert_caught(fault: PlantedFault) {
    let config = SimConfig {
        planted: fault,
        ..SimConfig::default()
    };
    let reports = run_seeds(&config, 0..PLANTED_SEED_BOUND, 1);
    let caught = reports.iter().find(|r| !r.passed());
    match caught {
        Some(r) => println!(
            "{fault} caught at seed {} ({} seeds run): {}\n  replay: {}",
            r.seed,
            reports.len(),
            r.violations[0],
            r.replay_command()
        ),
        None => panic!("planted bug {fault} went unnoticed over {PLANTED_SEED_BOUND} seeds"),
    }
}

#[test]
fn planted_resume_before_commit_is_caught() {
    assert_caught(PlantedFault::ResumeBeforeCommit);
}

#[test]
fn planted_skip_freeze_is_caught() {
    assert_caught(PlantedFault::SkipFreeze);
}

/// Failing over without waiting out the old owner's lease is refused by the store itself
/// (`assign_owner` checks the lease in the same atomic step), so even an orchestrator with
/// this bug keeps every invariant.
#[test]
fn planted_failover_without_waiting_is_stopped_by_the_store() {
    let config = SimConfig {
        planted: PlantedFault::FailoverWithoutWaiting,
        ..SimConfig::default()
    };
    let reports = run_seeds(&config, 0..60, 1);
    let failed: Vec<_> = reports.iter().filter(|r| !r.passed()).collect();
    assert!(
        failed.is_empty(),
        "the store let a failover through before the lease ran out: {:?}\nreplay: {}",
        failed[0].violations,
        failed[0].replay_command()
    );
}

#[test]
fn planted_roll_back_after_commit_is_caught() {
    assert_caught(PlantedFault::RollBackAfterCommit);
}
