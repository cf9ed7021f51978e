//! The supervisor every local instance is started through.
//!
//! It makes the instance independent of the orchestrator (its own session, so a Ctrl-C or a
//! hang-up of the orchestrator's terminal never reaches it) and records the instance's exit
//! status in a file even when no orchestrator is there to see it.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use dory_core::{Clock, SystemClock};
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};

use crate::registry::{self, EXIT_FILE, ExitRecord, ExitStatus};

/// The supervisor's arguments after parsing.
struct Args {
    dir: PathBuf,
    program: OsString,
    args: Vec<OsString>,
}

const USAGE: &str = "usage: dory-supervise --dir <instance dir> -- <program> [args...]";

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut args = args.into_iter();
    let mut dir = None;
    loop {
        let Some(arg) = args.next() else {
            return Err("missing `--` before the program".into());
        };
        match arg.to_str() {
            Some("--dir") => {
                dir = Some(PathBuf::from(
                    args.next().ok_or("`--dir` needs a directory")?,
                ));
            }
            Some("--") => break,
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    let dir = dir.ok_or("`--dir` is required")?;
    let program = args.next().ok_or("no program after `--`")?;
    Ok(Args {
        dir,
        program,
        args: args.collect(),
    })
}

/// Runs an instance program under supervision and returns the exit code to exit with.
///
/// `args` (without the supervisor's own name) are `--dir <instance dir> -- <program>
/// [args...]`. The supervisor
/// 1. calls `setsid()`, so it leads a new session and process group: a Ctrl-C on the
///    orchestrator's terminal does not reach the instance, and a `killpg` of the supervisor's
///    pid reaches the whole instance;
/// 2. starts the program with the supervisor's environment, standard output and error (the
///    placement points them at the instance's log files), standard input closed;
/// 3. forwards SIGTERM and SIGINT to the program;
/// 4. waits for it, writes `<dir>/exit` atomically (its exit code, or the signal that killed
///    it, as JSON: [`ExitRecord`]) and exits with the same code (`128 + signal` for a
///    signal).
///
/// A program that cannot be started is recorded as failed (exit code 127). The `dory` binary
/// calls this from its hidden `supervise` command; `dory-supervise` is the same as a binary of
/// its own. The few lines it prints go to standard error, the instance's `stderr.log`.
pub fn supervise<I, S>(args: I) -> ExitCode
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args = match parse(args.into_iter().map(Into::into)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("dory-supervise: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = rustix::process::setsid() {
        // Still supervise: the exit status matters more than the separate session.
        eprintln!("dory-supervise: setsid failed ({e}); the instance shares the caller's session");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dory-supervise: cannot start: {e}");
            return record(
                &args,
                ExitStatus::Failed {
                    reason: format!("the supervisor could not start: {e}"),
                },
            );
        }
    };
    let status = runtime.block_on(run(&args));
    record(&args, status)
}

/// Writes the exit file and turns the status into the supervisor's own exit code.
fn record(args: &Args, status: ExitStatus) -> ExitCode {
    let path = args.dir.join(EXIT_FILE);
    let fate = ExitRecord {
        status: status.clone(),
        at: SystemClock.now(),
    };
    let written = serde_json::to_vec(&fate)
        .map_err(|e| e.to_string())
        .and_then(|bytes| registry::write_atomic(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("dory-supervise: cannot record the exit status ({status}): {e}");
    }
    let code = match status {
        ExitStatus::Exited { code } => code,
        ExitStatus::Signaled { signal } => 128 + signal,
        ExitStatus::Failed { .. } => 127,
    };
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

async fn run(args: &Args) -> ExitStatus {
    // Handlers first: a SIGTERM that arrives while the program starts is forwarded, not fatal
    // to the supervisor (which would leave the program without anyone to record its exit).
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            return ExitStatus::Failed {
                reason: format!("the supervisor cannot handle signals: {e}"),
            };
        }
    };
    let mut child = match tokio::process::Command::new(&args.program)
        .args(&args.args)
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("dory-supervise: cannot start {:?}: {e}", args.program);
            return ExitStatus::Failed {
                reason: format!("cannot start {}: {e}", args.program.to_string_lossy()),
            };
        }
    };
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    let forward = |signal: Signal, name: &str| {
        if let Some(pid) = pid {
            eprintln!("dory-supervise: forwarding {name}");
            let _ = rustix::process::kill_process(pid, signal);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => match (status.code(), status.signal()) {
                        (Some(code), _) => ExitStatus::Exited { code },
                        (None, Some(signal)) => ExitStatus::Signaled { signal },
                        (None, None) => ExitStatus::Failed {
                            reason: format!("unknown wait status {status:?}"),
                        },
                    },
                    Err(e) => ExitStatus::Failed {
                        reason: format!("the supervisor lost its program: {e}"),
                    },
                };
            }
            Some(()) = term.recv() => forward(Signal::TERM, "SIGTERM"),
            Some(()) = int.recv() => forward(Signal::INT, "SIGINT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dir_and_command() {
        let args = parse(
            ["--dir", "/s/i", "--", "sh", "-c", "--dir"]
                .into_iter()
                .map(OsString::from),
        )
        .unwrap();
        assert_eq!(args.dir, PathBuf::from("/s/i"));
        assert_eq!(args.program, "sh");
        assert_eq!(args.args, ["-c", "--dir"]);
        for bad in [
            &["--dir", "/x"][..],
            &["--", "sh"],
            &["--dir", "/x", "--"],
            &["sh"],
        ] {
            assert!(parse(bad.iter().map(OsString::from)).is_err(), "{bad:?}");
        }
    }
}
