//! The deterministic simulator: many seeds pass, a seed replays byte for byte, and planted
//! protocol bugs are caught.

use std::process::Command;

use dory_core::orchestrator::PlantedFault;
use dory_mock::sim::{SimConfig, SimReport, run_seed, run_seeds};

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
