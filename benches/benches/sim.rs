//! Simulator throughput: seeds per minute of the standard scenario (20 processors, 5 nodes,
//! 1,000 steps) on one core, against the same scenario with no faults injected as the
//! baseline (what the simulated cluster and a quiet orchestrator cost on their own).
//!
//! Run: `cargo bench -p dory-benches --bench sim`

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use dory_mock::sim::{SimConfig, run_seed};

fn seeds_per_minute(config: &SimConfig, seeds: u64) -> f64 {
    let started = Instant::now();
    for seed in 0..seeds {
        let report = run_seed(config, seed);
        assert!(report.passed(), "seed {seed}: {:?}", report.violations);
    }
    seeds as f64 / started.elapsed().as_secs_f64() * 60.0
}

fn bench(c: &mut Criterion) {
    let standard = SimConfig::default();
    let quiet = SimConfig {
        fault_rate: 0.0,
        ..SimConfig::default()
    };
    let mut group = c.benchmark_group("sim");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    let mut seed = 0;
    group.bench_function("standard scenario, one seed", |b| {
        b.iter(|| {
            seed += 1;
            run_seed(&standard, seed)
        })
    });
    group.bench_function("no faults (baseline), one seed", |b| {
        b.iter(|| {
            seed += 1;
            run_seed(&quiet, seed)
        })
    });
    group.finish();

    let with_faults = seeds_per_minute(&standard, 200);
    let baseline = seeds_per_minute(&quiet, 200);
    println!(
        "sim throughput (one core, 20 processors, 5 nodes, 1000 steps): {with_faults:.0} seeds/min with faults, {baseline:.0} seeds/min without (baseline); ratio {:.2}",
        with_faults / baseline
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
