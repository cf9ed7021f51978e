//! Processes as the kernel reports them (`/proc/<pid>/stat`), and signals sent only to the
//! process a registry record means.

use std::io;

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

/// A process identified beyond its pid: the pid and the start time the kernel gave it (clock
/// ticks after boot, field 22 of `/proc/<pid>/stat`). A pid is reused after its process is
/// reaped; the pair is not, so a record never mistakes another process for its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessRef {
    /// The process id.
    pub pid: u32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
}

/// The fields of `/proc/<pid>/stat` the placement uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter (`R`, `S`, `D`, `Z`, …).
    pub state: char,
    /// The process group.
    pub pgrp: u32,
    /// The session.
    pub session: u32,
    /// The start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Reads `/proc/<pid>/stat`; `None` when there is no such process.
    pub fn read(pid: u32) -> io::Result<Option<ProcStat>> {
        let path = format!("/proc/{pid}/stat");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // A process that ends while being read: as good as gone.
            Err(e) if e.raw_os_error() == Some(3) => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_stat(&text).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path} does not have the expected fields"),
            )
        })
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so the fields are counted after the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

impl ProcessRef {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> io::Result<Option<ProcessRef>> {
        Ok(ProcStat::read(pid)?.map(|s| ProcessRef {
            pid,
            start_time: s.start_time,
        }))
    }

    /// Whether this very process still runs: the pid exists with the same start time and is
    /// not a zombie (ended, not yet reaped by its parent).
    pub fn is_alive(&self) -> bool {
        match ProcStat::read(self.pid) {
            Ok(Some(s)) => s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X' | 'x'),
            Ok(None) => false,
            // Unreadable (not expected for our own processes): assume it runs, so nothing is
            // declared dead on a read error.
            Err(_) => true,
        }
    }

    fn pid(&self) -> io::Result<Pid> {
        i32::try_from(self.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a valid pid"))
    }

    /// Sends `signal` to this process if it still runs; `Ok(false)` when it is gone.
    pub fn signal(&self, signal: Signal) -> io::Result<bool> {
        if !self.is_alive() {
            return Ok(false);
        }
        match rustix::process::kill_process(self.pid()?, signal) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `signal` to the process group this process leads (the supervisor's session: the
    /// instance and everything it started), if the leader still runs; `Ok(false)` when it is
    /// gone. Only a live, verified leader is used, because a group id outlives nothing that
    /// proves whose group it is.
    pub fn signal_group(&self, signal: Signal) -> io::Result<bool> {
        if !self.is_alive() {
            return Ok(false);
        }
        match rustix::process::kill_process_group(self.pid()?, signal) {
            Ok(()) => Ok(true),
            // Not (yet) a group leader: the supervisor calls setsid() first thing; signal it
            // alone.
            Err(rustix::io::Errno::SRCH) => self.signal(signal),
            Err(e) => Err(e.into()),
        }
    }
}

/// The processes of session `session` whose environment holds `DORY_TOKEN=<token>`: what is
/// left of an instance whose supervisor died (the pid of a dead session leader can be reused,
/// but no other process has the instance's random token).
pub(crate) fn session_members(session: u32, token: &str) -> Vec<u32> {
    with_token(token, |_, stat| stat.session == session)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// The supervisor of an instance whose launch stopped between starting the supervisor and
/// recording its pid (the launching orchestrator was killed): the session leader whose
/// environment holds `DORY_TOKEN=<token>`. The placement starts the supervisor with the
/// instance's environment and the supervisor leads a session of its own, so this is the
/// process the record would have named; no other process has the instance's random token.
/// `None` when there is none (the launch never got that far, the supervisor has not called
/// `setsid` yet, or it ended).
pub(crate) fn find_supervisor(token: &str) -> Option<ProcessRef> {
    with_token(token, |pid, stat| {
        stat.session == pid && !matches!(stat.state, 'Z' | 'X' | 'x')
    })
    .into_iter()
    .next()
    .map(|(pid, stat)| ProcessRef {
        pid,
        start_time: stat.start_time,
    })
}

/// The processes that satisfy `keep` and whose environment holds `DORY_TOKEN=<token>`.
fn with_token(token: &str, keep: impl Fn(u32, &ProcStat) -> bool) -> Vec<(u32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let marker = format!("DORY_TOKEN={token}");
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = ProcStat::read(pid).ok().flatten()?;
            keep(pid, &stat).then_some((pid, stat))
        })
        .filter(|(pid, _)| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
        })
        .collect()
}

/// SIGKILLs everything of an instance: the process group of its supervisor if that still
/// runs, and any process left in its session that carries its token.
pub(crate) fn kill_all(supervisor: &ProcessRef, token: &str) -> io::Result<()> {
    supervisor.signal_group(Signal::KILL)?;
    for pid in session_members(supervisor.pid, token) {
        if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
            // Gone meanwhile is as good as killed.
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
    Ok(())
}

/// A signal's conventional name, for messages.
pub(crate) fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 4242);
        assert_eq!(stat.session, 4242);
        assert_eq!(stat.start_time, 987654);
        assert!(parse_stat("12 (x) S 1").is_none());
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessRef::of(std::process::id()).unwrap().unwrap();
        assert!(me.is_alive());
        let other = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive(), "a reused pid is another process");
    }
}
