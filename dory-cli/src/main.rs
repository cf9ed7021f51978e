//! `dory`: the orchestrator daemon, the operator commands and the simulator.
//!
//! Every command reads the same `dory.toml` (`--config`, default `./dory.toml`): which
//! placement, config source, state store and publisher to use, the virtual nodes of the local
//! placement or the Kubernetes placement's settings, the orchestrator's tunables, and (for the
//! file config source) the processors.
//!
//! Exit codes: 0 success, 1 the operation failed (a drain missed its deadline, a config has
//! invalid processors, …), 2 usage or config file errors, 3 a backend could not be reached.

mod backends;
mod cluster;
mod commands;
mod config;
mod daemon;
mod duration;
mod metrics;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dory_core::{Clock as _, Epoch, NodeId, ProcessorId, Sequence};

use crate::commands::{OperationFailed, Output};
use crate::config::{ConfigError, Loaded};

/// Keeps long-running, stateful processors alive and moves them between nodes without losing
/// their in-memory state.
#[derive(Parser)]
#[command(name = "dory", version, about, long_about = None)]
struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "dory.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator daemon: take leadership and keep every processor running in the
    /// right place. Serves /healthz, /metrics and /status on `orchestrator.listen`.
    Orchestrator {
        /// Log lines for people or for a log pipeline.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Show every processor: phase, node, site, epoch, checkpoint age, last move pause, last
    /// error.
    Status {
        /// How to print it.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the nodes: site, readiness, cordons, interruptions and the instances on each.
    ///
    /// On Kubernetes: the cluster's nodes and Dory's pods, read through KUBECONFIG (or the
    /// pod's service account).
    Nodes {
        /// How to print it.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Cordon a node and wait while the orchestrator moves every processor off it.
    ///
    /// On Kubernetes this cordons the node itself (`spec.unschedulable`, as `kubectl cordon`
    /// does, through KUBECONFIG), which the orchestrator takes as a drain; it evicts nothing.
    /// Once Dory's processors are off, `kubectl drain` the node for everything else: until
    /// then Dory's PodDisruptionBudget makes its evictions of Dory pods wait.
    Drain {
        /// The node.
        node: String,
        /// Give up waiting after this long (the cordon stays).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        deadline: Duration,
        /// Record the cordon and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Let processors be placed on a node again.
    ///
    /// On Kubernetes this uncordons the node itself, as `kubectl uncordon` does.
    Uncordon {
        /// The node.
        node: String,
    },
    /// Pin a processor to a node; the orchestrator moves it there make-before-break and keeps
    /// it there across restarts.
    Move {
        /// The processor.
        processor: String,
        /// The node to run on.
        #[arg(long, required_unless_present = "unpin")]
        to: Option<String>,
        /// Remove the processor's pin instead.
        #[arg(long, conflicts_with = "to")]
        unpin: bool,
        /// Give up waiting after this long (the pin stays).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        deadline: Duration,
        /// Record the pin and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// A processor's snapshots in the state store.
    Snapshots {
        /// The processor.
        processor: String,
        #[command(subcommand)]
        action: Option<SnapshotAction>,
    },
    /// A processor's output from the file publisher, deduplicated by sequence (the higher
    /// epoch wins), with any gap reported.
    Output {
        /// The processor.
        processor: String,
        /// Fail (exit 1) if a sequence is missing.
        #[arg(long)]
        check: bool,
        /// Print at most this many of the latest messages.
        #[arg(long, default_value_t = 10)]
        tail: usize,
        /// How to print it.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Fault operations on a local placement's virtual node (not on Kubernetes: there the
    /// nodes are real; use kubectl or the cloud's tools).
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Check a config file and every processor in it.
    Validate {
        /// The file (default: --config).
        file: Option<PathBuf>,
    },
    /// Run the deterministic simulator (`dory sim --help`).
    #[command(disable_help_flag = true)]
    Sim {
        /// The simulator's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start an instance under supervision (used by the local placement).
    #[command(hide = true, disable_help_flag = true)]
    Supervise {
        /// The supervisor's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// List the stored snapshots, newest first.
    List {
        /// How to print it.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Verify one snapshot and show its header (default: the latest): its kind, and for a
    /// delta the base it applies to (epoch, sequence) and whether that is still stored.
    Inspect {
        #[command(flatten)]
        at: SnapshotAt,
        /// How to print it.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write one snapshot, verified, to a file (default: the latest). Always a full snapshot:
    /// a delta is put together with its base from the store first.
    Export {
        #[command(flatten)]
        at: SnapshotAt,
        /// The file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Make a snapshot file the processor's state; its next start restores it. Offline: no
    /// orchestrator may be leading and no instance may hold the processor. Takes a full
    /// snapshot (as `export` writes); a delta is refused.
    Import {
        /// The snapshot file (from `export`).
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(clap::Args)]
struct SnapshotAt {
    /// The epoch the snapshot is filed under.
    #[arg(long, requires = "sequence")]
    epoch: Option<u64>,
    /// Its sequence.
    #[arg(long, requires = "epoch")]
    sequence: Option<u64>,
}

impl SnapshotAt {
    fn get(&self) -> Option<(Epoch, Sequence)> {
        Some((Epoch(self.epoch?), Sequence(self.sequence?)))
    }
}

#[derive(Subcommand)]
enum NodeAction {
    /// SIGKILL every instance on the node and mark it not ready until `revive`.
    Kill {
        /// The node.
        node: String,
    },
    /// Bring a killed node back.
    Revive {
        /// The node.
        node: String,
    },
    /// Mark the node cut off from the network: not ready (its processors fail over once
    /// the grace period and their leases are over), its instances left running. It does not
    /// touch the network itself.
    Partition {
        /// The node.
        node: String,
    },
    /// Mark a cut-off node reachable again: its instances that lost their processors are
    /// terminated.
    Heal {
        /// The node.
        node: String,
    },
    /// Announce a spot reclamation: the node is killed when the deadline passes.
    Spot {
        /// The node.
        node: String,
        /// Time until the node goes.
        #[arg(long = "in", default_value = "2m", value_parser = parse_duration)]
        within: Duration,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse_duration(text)
}

fn processor_id(text: &str) -> Result<ProcessorId> {
    ProcessorId::new(text).map_err(|e| anyhow::Error::new(UsageError(e.to_string())))
}

/// A bad argument value (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DORY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or pipeline would get the escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How the local placement starts instances: this binary's hidden `supervise` command.
fn supervisor() -> Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    Ok(vec![exe.display().to_string(), "supervise".into()])
}

async fn run(cli: Cli) -> Result<()> {
    let load = || Loaded::read(&cli.config);
    match cli.command {
        Command::Orchestrator { log_format } => {
            init_logs(log_format);
            daemon::run(load()?, supervisor()?).await
        }
        Command::Status { output } => commands::status(&load()?, output).await,
        Command::Nodes { output } => commands::nodes(&load()?, output, supervisor()?).await,
        Command::Drain {
            node,
            deadline,
            no_wait,
        } => {
            commands::drain(
                &load()?,
                &NodeId::new(node),
                deadline,
                !no_wait,
                supervisor()?,
            )
            .await
        }
        Command::Uncordon { node } => commands::uncordon(&load()?, &NodeId::new(node)).await,
        Command::Move {
            processor,
            to,
            unpin: _,
            deadline,
            no_wait,
        } => {
            let to = to.map(NodeId::new);
            commands::pin(
                &load()?,
                &processor_id(&processor)?,
                to.as_ref(),
                deadline,
                !no_wait,
                supervisor()?,
            )
            .await
        }
        Command::Snapshots { processor, action } => {
            let loaded = load()?;
            let p = processor_id(&processor)?;
            match action.unwrap_or(SnapshotAction::List {
                output: Output::Table,
            }) {
                SnapshotAction::List { output } => {
                    commands::snapshots_list(&loaded, &p, output).await
                }
                SnapshotAction::Inspect { at, output } => {
                    commands::snapshots_inspect(&loaded, &p, at.get(), output).await
                }
                SnapshotAction::Export { at, to } => {
                    commands::snapshots_export(&loaded, &p, at.get(), &to).await
                }
                SnapshotAction::Import { from } => {
                    commands::snapshots_import(&loaded, &p, &from).await
                }
            }
        }
        Command::Output {
            processor,
            check,
            tail,
            output,
        } => commands::output(&load()?, &processor_id(&processor)?, check, tail, output),
        Command::Node { action } => {
            let loaded = load()?;
            if let Some(k) = loaded.kube() {
                return Err(anyhow::Error::new(UsageError(format!(
                    "`dory node` plays faults on the local placement's virtual nodes; {} uses the kubernetes placement (namespace {}), whose nodes are real: use kubectl (cordon, taint) or the cloud's tools",
                    loaded.path.display(),
                    k.kube.namespace
                ))));
            }
            let nodes = dory_local::LocalNodes::new(&loaded.config.orchestrator.state_dir);
            match action {
                NodeAction::Kill { node } => {
                    let killed = nodes.kill_node(&NodeId::new(&node))?;
                    println!("killed node {node} ({} instance(s))", killed.len());
                }
                NodeAction::Revive { node } => {
                    nodes.revive_node(&NodeId::new(&node))?;
                    println!("revived node {node}");
                }
                NodeAction::Partition { node } => {
                    nodes.partition(&NodeId::new(&node))?;
                    println!("node {node} is cut off (not ready); its instances run on");
                }
                NodeAction::Heal { node } => {
                    nodes.heal(&NodeId::new(&node))?;
                    println!("node {node} is reachable again");
                }
                NodeAction::Spot { node, within } => {
                    let deadline = dory_core::SystemClock.now().plus(within);
                    nodes.spot_notice(&NodeId::new(&node), deadline)?;
                    println!(
                        "spot notice on {node}: it goes in {}",
                        duration::format_duration(within)
                    );
                }
            }
            Ok(())
        }
        Command::Validate { file } => {
            commands::validate(file.as_deref().unwrap_or(&cli.config)).await
        }
        Command::Sim { .. } | Command::Supervise { .. } => unreachable!("handled before"),
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<ConfigError>()
            || cause.is::<UsageError>()
            || cause.is::<dory_connect::ConnectError>()
        {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<dory_core::Error>() {
            return match e {
                dory_core::Error::Unavailable(_) => 3,
                _ => 1,
            };
        }
        if cause.is::<OperationFailed>() {
            return 1;
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These two hand their arguments to their own parsers and need no runtime of ours.
    match &cli.command {
        Command::Sim { args } => return dory_mock::sim::cli::main(args.clone(), "dory sim"),
        Command::Supervise { args } => return dory_local::supervise(args.clone()),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dory: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dory: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
