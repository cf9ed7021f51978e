//! The simulator's command line, shared by the `dory-sim` binary and `dory sim`.
//!
//! ```text
//! dory-sim --seeds 0..500 [--jobs N] [--steps N] [--planted NAME]
//! dory-sim --seed 42 [--trace] [--planted NAME]
//! ```
//!
//! `--seeds` ends with a line `N passed, N failed`; `--seed` ends with `trace-hash: <hex>`,
//! identical on every run of that seed. A failing seed prints the command that replays it.

use std::process::ExitCode;
use std::time::Instant;

use dory_core::orchestrator::PlantedFault;

use super::{PreCopyStats, SimConfig, SimReport, run_seed};

/// `parse_args`' answer to `--help`: print the usage and succeed.
const HELP: &str = "\u{0}help";

const USAGE: &str =
    "usage: {prog} (--seeds A..B | --seed S) [--jobs N] [--steps N] [--planted NAME] [--trace]
  --seeds A..B   run seeds A (inclusive) to B (exclusive); ends with `N passed, N failed`
  --seed S       run one seed; ends with `trace-hash: <hex>`
  --jobs N       threads for --seeds (default: the number of cores)
  --steps N      steps per seed (default 1000)
  --planted NAME plant a protocol bug: resume-before-commit, skip-freeze,
                 failover-without-waiting, roll-back-after-commit
  --trace        print the seed's full trace (with --seed)";

struct Args {
    seeds: Option<std::ops::Range<u64>>,
    seed: Option<u64>,
    jobs: usize,
    steps: Option<u64>,
    planted: PlantedFault,
    trace: bool,
}

fn parse_args(argv: impl IntoIterator<Item = String>, _prog: &str) -> Result<Args, String> {
    let mut args = Args {
        seeds: None,
        seed: None,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        steps: None,
        planted: PlantedFault::None,
        trace: false,
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seeds" => {
                let v = value("--seeds")?;
                let (a, b) = v
                    .split_once("..")
                    .ok_or_else(|| format!("--seeds {v:?}: expected A..B"))?;
                let a: u64 = a
                    .parse()
                    .map_err(|_| format!("--seeds {v:?}: {a:?} is not a number"))?;
                let b: u64 = b
                    .parse()
                    .map_err(|_| format!("--seeds {v:?}: {b:?} is not a number"))?;
                if b <= a {
                    return Err(format!("--seeds {v:?}: the range is empty"));
                }
                args.seeds = Some(a..b);
            }
            "--seed" => {
                let v = value("--seed")?;
                args.seed = Some(
                    v.parse()
                        .map_err(|_| format!("--seed {v:?} is not a number"))?,
                );
            }
            "--jobs" => {
                let v = value("--jobs")?;
                args.jobs = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--jobs {v:?} is not a positive number"))?;
            }
            "--steps" => {
                let v = value("--steps")?;
                args.steps = Some(
                    v.parse()
                        .map_err(|_| format!("--steps {v:?} is not a number"))?,
                );
            }
            "--planted" => {
                let v = value("--planted")?;
                args.planted = PlantedFault::ALL
                    .into_iter()
                    .find(|p| p.to_string() == v)
                    .ok_or_else(|| format!("--planted {v:?}: unknown planted fault"))?;
            }
            "--trace" => args.trace = true,
            "-h" | "--help" => return Err(HELP.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.seeds.is_some() == args.seed.is_some() {
        return Err("give exactly one of --seeds and --seed".into());
    }
    Ok(args)
}

fn print_failure(report: &SimReport) {
    println!("seed {} FAILED:", report.seed);
    for v in &report.violations {
        println!("  {v}");
    }
    println!("  replay: {}", report.replay_command());
}

/// Runs the simulator's command line: `argv` without the program name, `prog` the name to
/// show in usage and replay lines. Exit code 0 when every seed passed, 1 when one failed, 2
/// on a usage error.
pub fn main(argv: impl IntoIterator<Item = String>, prog: &str) -> ExitCode {
    let usage = USAGE.replace("{prog}", prog);
    let args = match parse_args(argv, prog) {
        Ok(a) => a,
        Err(e) if e == HELP => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{prog}: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    let mut config = SimConfig {
        planted: args.planted,
        keep_trace: args.trace,
        ..SimConfig::default()
    };
    if let Some(steps) = args.steps {
        config.steps = steps;
        config.quiet_steps = config.quiet_steps.min(steps / 2);
    }
    if let Some(seed) = args.seed {
        let report = run_seed(&config, seed);
        for line in &report.trace {
            println!("{line}");
        }
        println!(
            "seed {seed}: {} faults, {} moves, {} publishes, {} duplicates resolved, largest failover loss {} steps",
            report.faults,
            report.moves,
            report.stats.publishes,
            report.stats.resolved_duplicates,
            report.stats.largest_loss
        );
        println!("seed {seed}: {}", precopy_summary(&report.precopy));
        if !report.passed() {
            print_failure(&report);
        }
        println!("trace-hash: {:016x}", report.trace_hash);
        return if report.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let seeds = args.seeds.unwrap_or(0..0);
    let started = Instant::now();
    let total = seeds.end - seeds.start;
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let reports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.jobs.min(total as usize) {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    let report = run_seed(&config, seed);
                    if !report.passed() {
                        print_failure(&report);
                    }
                    reports
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(report);
                }
            });
        }
    });
    let reports = reports.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed = reports.iter().filter(|r| !r.passed()).count();
    let elapsed = started.elapsed().as_secs_f64();
    let moves: u64 = reports.iter().map(|r| r.moves).sum();
    let faults: u64 = reports.iter().map(|r| r.faults).sum();
    println!(
        "{total} seeds in {elapsed:.1}s on {} threads ({:.0} seeds/min; {faults} faults, {moves} moves)",
        args.jobs,
        total as f64 / elapsed * 60.0
    );
    let precopy = reports
        .iter()
        .fold(PreCopyStats::default(), |sum, r| sum + r.precopy);
    println!("{}", precopy_summary(&precopy));
    println!("{} passed, {failed} failed", reports.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One line on the pre-copy moves: how many sent a delta, and how often the whole state had
/// to go instead.
fn precopy_summary(p: &PreCopyStats) -> String {
    format!(
        "pre-copy: {} stored ({} declined, {} answers lost), {} delta moves, {} deltas refused by the replacement, {} by the store, {} restores read a delta",
        p.precopies,
        p.declined,
        p.lost_answers,
        p.delta_moves,
        p.deltas_refused,
        p.delta_commits_refused,
        p.delta_restores
    )
}
