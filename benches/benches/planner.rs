//! Planner cost: one full plan for 1k, 10k and 100k processors on 100 and 1k nodes.
//!
//! The world is a steady state with the usual trouble mixed in: 2% of the nodes are being
//! reclaimed (half with a deadline too short for a move, so they evacuate), 1% are lost (their
//! processors fail over), 1% are cordoned, 1% of the processors are missing (new starts), 0.5%
//! have crashed (restarts), 1% run on their fallback site while the preferred one is healthy
//! (move-backs). The move bound is lifted, so every one of those needs a node: the node choice
//! is part of what is measured, not skipped by a full budget.
//!
//! `cargo bench -p dory-benches --bench planner` runs criterion, then a short pass that prints
//! a growth table (time per processor at each size), a cold start (nothing runs yet, default
//! move bound: a waiting note per processor) and what `ProcessorSpec::revision` alone costs.
//! The goal is 100k processors on 1k nodes under 100 ms, growing no worse than n log n.
//! `DORY_PLANNER_TABLE_ONLY=1` skips criterion and prints only the table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dory_core::planner::{self, Action, Observed, Plan, PlannerConfig};
use dory_core::{
    DesiredState, Epoch, Instance, Interruption, InterruptionReason, Node, Ownership, Phase,
    ProcessorId, ProcessorSpec, Resources, Site, SitePreference, Timestamp,
};

const NOW: Timestamp = Timestamp(1_000_000_000);
const MINUTE: u64 = 60_000;

struct World {
    processors: usize,
    nodes: usize,
    desired: DesiredState,
    observed: Observed,
    config: PlannerConfig,
}

impl World {
    fn plan(&self) -> Plan {
        planner::plan(&self.desired, &self.observed, NOW, &self.config)
    }
}

fn node_id(i: usize) -> String {
    format!("node-{i:05}")
}

fn world(processors: usize, nodes: usize) -> World {
    let need = Resources::new(100, 256);
    // Room for twice the average load: edge nodes carry more (they take every edge-preferring
    // processor), so they end up nearly full, the cloud about half full.
    let per_node = processors.div_ceil(nodes) as u64 * 2;
    let capacity = Resources::new(need.cpu_millis * per_node, need.memory_mib * per_node);
    let is_edge = |i: usize| i.is_multiple_of(5);
    let node_list: Vec<Node> = (0..nodes)
        .map(|i| {
            let mut n = Node::new(
                node_id(i),
                if is_edge(i) { Site::Edge } else { Site::Cloud },
                capacity,
            );
            n.ready_since = Timestamp(NOW.0 - 60 * MINUTE);
            match i % 100 {
                1 | 51 => {
                    n.interruption = Some(Interruption {
                        reason: InterruptionReason::SpotReclaim,
                        // Alternately too close for a full move and comfortably far.
                        deadline: Some(NOW.plus(Duration::from_secs(if i % 100 == 1 {
                            10
                        } else {
                            120
                        }))),
                    });
                }
                2 => {
                    n.ready = false;
                    n.ready_since = Timestamp(NOW.0 - 10 * MINUTE);
                }
                3 => n.schedulable = false,
                _ => {}
            }
            n
        })
        .collect();
    let edge_nodes: Vec<usize> = (0..nodes).filter(|i| is_edge(*i)).collect();
    let cloud_nodes: Vec<usize> = (0..nodes).filter(|i| !is_edge(*i)).collect();

    let mut desired = DesiredState::default();
    let mut observed = Observed {
        nodes: node_list,
        ..Observed::default()
    };
    for j in 0..processors {
        let id = ProcessorId::new(format!("proc-{j:06}")).expect("valid id");
        let mut spec = ProcessorSpec::new(id.clone());
        spec.resources = need;
        let edge_pref = j.is_multiple_of(10);
        if edge_pref {
            spec.site = SitePreference::Edge;
        }
        let revision = spec.revision();
        desired.processors.push(spec);
        if j % 100 == 7 {
            continue; // missing: a new start
        }
        let node = if edge_pref && j % 100 != 10 {
            edge_nodes[(j / 10) % edge_nodes.len()]
        } else if edge_pref {
            cloud_nodes[(j / 10) % cloud_nodes.len()] // on its fallback site: a move-back
        } else {
            j % nodes
        };
        let lost = observed.nodes[node].ready_since.0 == NOW.0 - 10 * MINUTE;
        let phase = if j % 200 == 9 {
            Phase::Exited { code: 1 } // crashed a while ago: a restart
        } else {
            Phase::Running
        };
        observed.instances.push(Instance {
            processor: id.clone(),
            epoch: Epoch(3),
            node: observed.nodes[node].id.clone(),
            phase,
            revision,
            started_at: Timestamp(NOW.0 - 30 * MINUTE),
            endpoint: None,
        });
        observed.ownership.push(Ownership {
            processor: id,
            owner: Some(Epoch(3)),
            highest_epoch: Epoch(3),
            lease_expires: Some(if lost {
                Timestamp(NOW.0 - 9 * MINUTE)
            } else {
                NOW.plus(Duration::from_secs(5))
            }),
            committed: None,
            committed_at: None,
        });
    }
    World {
        processors,
        nodes,
        desired,
        observed,
        config: PlannerConfig {
            max_concurrent_moves: usize::MAX,
            ..PlannerConfig::default()
        },
    }
}

/// Bring-up: nothing runs yet, the default move bound lets 8 start and queues the rest (each
/// queued processor gets its waiting note).
fn cold_world(processors: usize, nodes: usize) -> World {
    let mut w = world(processors, nodes);
    w.observed.instances.clear();
    w.observed.ownership.clear();
    w.config = PlannerConfig::default();
    w
}

/// A one-line census of a plan, so a change in what the world asks for is visible beside the
/// timings.
fn census(plan: &Plan) -> String {
    let count = |f: fn(&Action) -> bool| plan.actions.iter().filter(|a| f(a)).count();
    format!(
        "{} actions (start {}, move {}, evacuate {}, other {}), {} waiting",
        plan.actions.len(),
        count(|a| matches!(a, Action::Start { .. })),
        count(|a| matches!(a, Action::Move { .. })),
        count(|a| matches!(a, Action::Evacuate { .. })),
        count(|a| !a.is_move()),
        plan.waiting.len()
    )
}

const SIZES: [(usize, usize); 6] = [
    (1_000, 100),
    (10_000, 100),
    (100_000, 100),
    (1_000, 1_000),
    (10_000, 1_000),
    (100_000, 1_000),
];

fn bench(c: &mut Criterion, worlds: &[World]) {
    let mut group = c.benchmark_group("planner/full_plan");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for w in worlds {
        group.throughput(Throughput::Elements(w.processors as u64));
        group.bench_with_input(
            BenchmarkId::new(format!("{}_nodes", w.nodes), w.processors),
            w,
            |b, w| b.iter(|| black_box(w.plan())),
        );
    }
    group.finish();
}

/// The fastest and the median wall time of one plan. The fastest is the steadier figure on a
/// shared machine: interference only ever adds time.
fn plan_times(w: &World) -> (Duration, Duration) {
    let runs = (200_000 / w.processors).clamp(7, 200);
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let _ = black_box(w.plan());
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[0], times[runs / 2])
}

fn row(w: &World, previous: Option<Duration>, note: &str) -> Duration {
    let (best, median) = plan_times(w);
    let growth = previous
        .map(|p| format!("{:.1}", best.as_secs_f64() / p.as_secs_f64()))
        .unwrap_or_else(|| "-".into());
    println!(
        "{:>11} {:>6} {:>9.2} {:>9.2} {:>13.0} {:>15}  {note}",
        w.processors,
        w.nodes,
        best.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        best.as_nanos() as f64 / w.processors as f64,
        growth
    );
    best
}

fn growth_table(worlds: &[World]) {
    println!();
    println!("planner growth (repeated full plans, move bound lifted):");
    println!(
        "{:>11} {:>6} {:>9} {:>9} {:>13} {:>15}",
        "processors", "nodes", "best ms", "median ms", "ns/processor", "x per 10x procs"
    );
    for nodes in [100, 1_000] {
        let mut previous: Option<Duration> = None;
        for w in worlds.iter().filter(|w| w.nodes == nodes) {
            previous = Some(row(w, previous, ""));
        }
    }
}

/// How much of a plan is [`ProcessorSpec::revision`], which the planner calls once per
/// running owner to spot spec changes: it serializes the spec each time.
fn revision_cost(w: &World) {
    let mut best = Duration::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for spec in &w.desired.processors {
            black_box(spec.revision());
        }
        best = best.min(start.elapsed());
    }
    println!(
        "ProcessorSpec::revision for {} specs: {:.2} ms, {:.0} ns per spec",
        w.processors,
        best.as_secs_f64() * 1e3,
        best.as_nanos() as f64 / w.processors as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // `cargo test --benches` runs this without `--bench`: criterion then runs each benchmark
    // once; the table is left out.
    let full = has("--bench") && !has("--test") && !has("--list");
    let table_only = full && std::env::var_os("DORY_PLANNER_TABLE_ONLY").is_some();
    let worlds: Vec<World> = SIZES.iter().map(|&(p, n)| world(p, n)).collect();
    for w in &worlds {
        let plan = w.plan();
        // Every world has work in it: an empty plan means the binary measures some other
        // planner (a stale build), and its figures would be meaningless.
        assert!(
            !plan.actions.is_empty(),
            "an empty plan for a world with work in it"
        );
        println!(
            "planner {} processors on {} nodes: {}",
            w.processors,
            w.nodes,
            census(&plan)
        );
    }
    if !table_only {
        let mut c = Criterion::default().configure_from_args();
        bench(&mut c, &worlds);
        c.final_summary();
    }
    if full {
        growth_table(&worlds);
        let cold = cold_world(100_000, 1_000);
        println!(
            "planner cold start, 100000 processors on 1000 nodes: {}",
            census(&cold.plan())
        );
        row(&cold, None, "cold start, default move bound");
        // The planner reads every spec, instance and ownership row once: at 10k they fit in a
        // last-level cache, at 100k they do not, which shows as time per processor.
        let (spec, instance, row) = (
            std::mem::size_of::<ProcessorSpec>(),
            std::mem::size_of::<Instance>(),
            std::mem::size_of::<Ownership>(),
        );
        for w in worlds.iter().filter(|w| w.nodes == 1_000) {
            let bytes = w.processors * (spec + instance + row);
            println!(
                "inputs for {} processors: {:.1} MiB inline (spec {spec} B, instance {instance} B, ownership {row} B each) plus their strings",
                w.processors,
                bytes as f64 / (1 << 20) as f64
            );
        }
        // The planner hashes every running owner's spec to spot spec changes; this is that
        // share of the plan.
        for w in worlds.iter().filter(|w| w.nodes == 1_000) {
            revision_cost(w);
        }
    }
}
