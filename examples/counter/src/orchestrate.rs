//! The orchestrator's part for runs by hand and for tests that drive real processes (the
//! pytest suite of `dory-python` uses them for Python processors too): the subcommands
//! `claim` and `commit-move`. Each takes the leadership term for the time of one write, so
//! it must not run beside a real orchestrator on the same schema.
//!
//! - `claim`: claims the processor's next epoch, makes it the owner (waiting for a previous
//!   owner's lease to run out) and prints it: start an instance with it in `restore` mode.
//! - `claim --standby`: only claims the next epoch and prints it: start a replacement with it
//!   in `standby` mode, then `commit-move` makes it the owner.
//! - `commit-move --from-epoch N [--to-epoch M] [--snapshot PATH | --latest]`: the commit of a
//!   move, as the orchestrator makes it between `PUT /state` into the replacement and
//!   `POST /state/resume`: ownership moves from epoch `N` to `M` (default: the highest claimed
//!   epoch) and the snapshot becomes `M`'s first checkpoint, in one term-fenced write. The
//!   snapshot is the body `GET /state` answered, read from `PATH` or, by default or with
//!   `-`, from stdin. `--latest` commits the latest committed checkpoint instead, without
//!   freezing anyone: the owner, if it still runs, is fenced off at its next store write.
//!   Prints `M`.
//!
//! Both read `DORY_STORE_URL` and `DORY_PROCESSOR_ID`, and `DORY_LEASE_MS` (default 15 s) for
//! the new owner's lease.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use dory_core::{
    Clock, Epoch, Error, Leadership, ProcessorId, StateStore, StoredSnapshot, SystemClock, Term,
};
use dory_pg::{PgLeadership, PgStore};

/// The usage line of the subcommands.
pub(crate) const USAGE: &str = "usage: dory-example-counter [claim [--standby] | commit-move \
     --from-epoch N [--to-epoch M] [--snapshot PATH|- | --latest]]";

/// Runs the subcommand in `args` (the arguments after the program name); returns the epoch
/// to print.
pub(crate) async fn run(args: &[String]) -> anyhow::Result<Epoch> {
    let (command, flags) = args.split_first().context(USAGE)?;
    match command.as_str() {
        "claim" => {
            let standby = match flags {
                [] => false,
                [flag] if flag == "--standby" => true,
                _ => bail!("unknown arguments {flags:?}; {USAGE}"),
            };
            let (store, processor, lease) = connect().await?;
            with_term(&store, |term| {
                claim(&store, &processor, lease, term, !standby)
            })
            .await
        }
        "commit-move" => {
            let args = MoveArgs::parse(flags)?;
            let (store, processor, lease) = connect().await?;
            // Read before taking the term, so a slow writer on stdin holds up nobody.
            let bytes = match &args.snapshot {
                Source::Latest => None,
                Source::Stdin => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .context("reading the snapshot from stdin")?;
                    Some(bytes)
                }
                Source::File(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("reading the snapshot from {path}"))?,
                ),
            };
            with_term(&store, |term| {
                commit_move(&store, &processor, lease, term, &args, bytes)
            })
            .await
        }
        other => bail!("unknown command {other:?}; {USAGE}"),
    }
}

/// The store, processor and lease from the environment.
async fn connect() -> anyhow::Result<(PgStore, ProcessorId, Duration)> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let processor = ProcessorId::new(var(dory_core::env::PROCESSOR_ID)?)?;
    let lease = match std::env::var(dory_core::env::LEASE_MS) {
        Ok(ms) => Duration::from_millis(
            ms.parse()
                .with_context(|| format!("{} is not a number", dory_core::env::LEASE_MS))?,
        ),
        Err(_) => Duration::from_secs(15),
    };
    let store_config = dory_connect::store_config(&var(dory_core::env::STORE_URL)?)?;
    let store = PgStore::connect(&store_config)
        .await
        .with_context(|| format!("connecting the state store ({store_config:?})"))?;
    Ok((store, processor, lease))
}

/// Runs `write` under the leadership term, resigning it afterwards whatever the outcome.
async fn with_term<F, Fut>(store: &PgStore, write: F) -> anyhow::Result<Epoch>
where
    F: FnOnce(Term) -> Fut,
    Fut: Future<Output = anyhow::Result<Epoch>>,
{
    let leadership = PgLeadership::new(store, "dory-example-counter");
    let term = tokio::time::timeout(Duration::from_secs(30), leadership.acquire())
        .await
        .context("another orchestrator holds the leadership")??;
    let result = write(term).await;
    leadership.resign(term).await?;
    result
}

/// Claims the next epoch and, when `assign`, makes it the owner.
async fn claim(
    store: &PgStore,
    processor: &ProcessorId,
    lease: Duration,
    term: Term,
    assign: bool,
) -> anyhow::Result<Epoch> {
    let epoch = store.claim_epoch(processor, term).await?;
    if !assign {
        return Ok(epoch);
    }
    let deadline = tokio::time::Instant::now() + lease * 2 + Duration::from_secs(5);
    loop {
        let owner = store.ownership(processor).await?.and_then(|r| r.owner);
        match store
            .assign_owner(processor, owner, epoch, lease, term)
            .await
        {
            Ok(()) => return Ok(epoch),
            // The previous owner's lease has not run out yet.
            Err(Error::Conflict(why)) if tokio::time::Instant::now() < deadline => {
                tracing::info!("waiting for the previous owner's lease: {why}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::from(e)),
        }
    }
}

/// Where `commit-move` takes the snapshot from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Stdin,
    File(String),
    Latest,
}

/// The arguments of `commit-move`.
#[derive(Debug, PartialEq, Eq)]
struct MoveArgs {
    from: Epoch,
    to: Option<Epoch>,
    snapshot: Source,
}

impl MoveArgs {
    fn parse(flags: &[String]) -> anyhow::Result<MoveArgs> {
        let epoch = |flag: &str, value: Option<&String>| -> anyhow::Result<Epoch> {
            let value = value.with_context(|| format!("{flag} needs a value; {USAGE}"))?;
            Ok(Epoch(value.parse().with_context(|| {
                format!("{flag} {value:?} is not an epoch number")
            })?))
        };
        let (mut from, mut to, mut snapshot) = (None, None, Source::Stdin);
        let mut flags = flags.iter();
        while let Some(flag) = flags.next() {
            match flag.as_str() {
                "--from-epoch" => from = Some(epoch(flag, flags.next())?),
                "--to-epoch" => to = Some(epoch(flag, flags.next())?),
                "--latest" => snapshot = Source::Latest,
                "--snapshot" => {
                    let path = flags
                        .next()
                        .with_context(|| format!("--snapshot needs a path; {USAGE}"))?;
                    snapshot = if path == "-" {
                        Source::Stdin
                    } else {
                        Source::File(path.clone())
                    };
                }
                other => bail!("unknown argument {other:?}; {USAGE}"),
            }
        }
        Ok(MoveArgs {
            from: from.with_context(|| format!("--from-epoch is required; {USAGE}"))?,
            to,
            snapshot,
        })
    }
}

/// Commits the move: ownership `from` → `to` with the snapshot as `to`'s first checkpoint.
async fn commit_move(
    store: &PgStore,
    processor: &ProcessorId,
    lease: Duration,
    term: Term,
    args: &MoveArgs,
    bytes: Option<Vec<u8>>,
) -> anyhow::Result<Epoch> {
    let to = match args.to {
        Some(to) => to,
        None => {
            store
                .ownership(processor)
                .await?
                .with_context(|| format!("processor {processor} has no ownership row"))?
                .highest_epoch
        }
    };
    let mut snapshot = match bytes {
        Some(bytes) => StoredSnapshot::from_encoded(bytes, SystemClock.now())
            .context("the snapshot is not a valid encoded snapshot")?,
        None => store
            .latest(processor)
            .await?
            .with_context(|| format!("processor {processor} has no committed checkpoint"))?,
    };
    if snapshot.meta.processor != *processor {
        bail!(
            "the snapshot is of processor {}, not {processor}",
            snapshot.meta.processor
        );
    }
    // The header names the epoch that took it; the store files it under the new owner's.
    snapshot.meta.epoch = to;
    store
        .commit_move(args.from, &snapshot, lease, term)
        .await
        .with_context(|| {
            format!(
                "committing the move of {processor} from epoch {} to {to}",
                args.from
            )
        })?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<MoveArgs> {
        MoveArgs::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn move_arguments() {
        assert_eq!(
            parse(&["--from-epoch", "3"]).unwrap(),
            MoveArgs {
                from: Epoch(3),
                to: None,
                snapshot: Source::Stdin
            }
        );
        assert_eq!(
            parse(&[
                "--from-epoch",
                "3",
                "--to-epoch",
                "5",
                "--snapshot",
                "/tmp/s"
            ])
            .unwrap(),
            MoveArgs {
                from: Epoch(3),
                to: Some(Epoch(5)),
                snapshot: Source::File("/tmp/s".into())
            }
        );
        assert_eq!(
            parse(&["--latest", "--from-epoch", "1"]).unwrap().snapshot,
            Source::Latest
        );
        assert_eq!(
            parse(&["--from-epoch", "1", "--snapshot", "-"])
                .unwrap()
                .snapshot,
            Source::Stdin
        );
        assert!(parse(&[]).is_err(), "--from-epoch is required");
        assert!(parse(&["--from-epoch"]).is_err());
        assert!(parse(&["--from-epoch", "x"]).is_err());
        assert!(parse(&["--from-epoch", "1", "--bogus"]).is_err());
    }
}
