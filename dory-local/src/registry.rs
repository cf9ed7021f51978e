//! The on-disk instance registry: one directory per instance under `<state_dir>/instances/`,
//! which is what lets instances outlive the orchestrator and a restarted one find them all.
//!
//! ```text
//! <state_dir>/instances/<processor>-<epoch>/
//!     instance.json   the registry record (InstanceRecord), mode 0600: it holds the token
//!     stdout.log      the instance's standard output
//!     stderr.log      its standard error (and the supervisor's few lines)
//!     address         host:port, written by the instance runtime once bound
//!     terminate       written by `terminate`: when SIGTERM was sent and when SIGKILL follows
//!     exit            the instance's fate (ExitRecord): written by the supervisor, or by the
//!                     placement when the supervisor could not (node killed, supervisor died)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dory_core::{Epoch, LaunchMode, NodeId, Phase, ProcessorId, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::LocalError;
use crate::process::{ProcessRef, signal_name};

/// The registry record file in an instance directory.
pub const RECORD_FILE: &str = "instance.json";
/// The instance's standard output.
pub const STDOUT_FILE: &str = "stdout.log";
/// The instance's standard error.
pub const STDERR_FILE: &str = "stderr.log";
/// The file the runtime writes its bound `host:port` to (`DORY_ADDRESS_FILE`).
pub const ADDRESS_FILE: &str = "address";
/// The instance's fate, once it has ended.
pub const EXIT_FILE: &str = "exit";
/// Written when the instance was asked to stop.
pub const TERMINATE_FILE: &str = "terminate";

/// The registry record of one instance (`instance.json`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The processor.
    pub processor: ProcessorId,
    /// The epoch.
    pub epoch: Epoch,
    /// The virtual node it runs on.
    pub node: NodeId,
    /// How it was launched.
    pub mode: LaunchMode,
    /// The spec revision it was launched with.
    pub revision: u64,
    /// Its bearer token for the state routes.
    pub token: String,
    /// When it was launched.
    pub started_at: Timestamp,
    /// The supervisor (the instance's session and process group leader); `None` only in the
    /// moment between creating the directory and starting the supervisor.
    pub supervisor: Option<ProcessRef>,
}

impl std::fmt::Debug for InstanceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceRecord")
            .field("processor", &self.processor)
            .field("epoch", &self.epoch)
            .field("node", &self.node)
            .field("mode", &self.mode)
            .field("revision", &self.revision)
            .field("token", &"<redacted>")
            .field("started_at", &self.started_at)
            .field("supervisor", &self.supervisor)
            .finish()
    }
}

impl InstanceRecord {
    /// Reads the record in instance directory `dir`; a file that does not parse is
    /// [`LocalError::Corrupt`] naming it.
    pub fn load(dir: &Path) -> Result<InstanceRecord, LocalError> {
        let path = dir.join(RECORD_FILE);
        let record: InstanceRecord = read_json(&path)?.ok_or_else(|| LocalError::Io {
            action: "read",
            path: path.clone(),
            source: io::ErrorKind::NotFound.into(),
        })?;
        let expected = instance_dir_name(&record.processor, record.epoch);
        if dir.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
            return Err(LocalError::Corrupt {
                path,
                reason: format!(
                    "it records instance {} of {}, which belongs in a directory named {expected}",
                    record.epoch, record.processor
                ),
            });
        }
        Ok(record)
    }
}

/// How an instance ended (`exit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// What happened.
    #[serde(flatten)]
    pub status: ExitStatus,
    /// When it was recorded.
    pub at: Timestamp,
}

/// What ended an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum ExitStatus {
    /// The program exited with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A signal ended the program.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// The instance ended without an exit status of its own: its node was killed, its
    /// supervisor died, or it could not be started.
    Failed {
        /// What happened.
        reason: String,
    },
}

impl ExitStatus {
    /// The phase this fate is reported as. A signal is reported as the exit code a shell (and
    /// Kubernetes) gives it, `128 + signal`, because the instance did end: the supervisor saw
    /// it go.
    pub fn phase(&self) -> Phase {
        match self {
            ExitStatus::Exited { code } => Phase::Exited { code: *code },
            ExitStatus::Signaled { signal } => Phase::Exited { code: 128 + signal },
            ExitStatus::Failed { reason } => Phase::Failed {
                reason: reason.clone(),
            },
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited { code } => write!(f, "exited with code {code}"),
            ExitStatus::Signaled { signal } => write!(f, "killed by {}", signal_name(*signal)),
            ExitStatus::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// A stop request (`terminate`): the instance got SIGTERM at `requested_at` and the placement
/// sends SIGKILL to its process group at `kill_at` if it still runs. Kept on disk so a
/// restarted orchestrator still reports it `Terminating` and still kills it in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateRecord {
    /// When SIGTERM was sent.
    pub requested_at: Timestamp,
    /// When SIGKILL follows.
    pub kill_at: Timestamp,
}

/// `<processor>-<epoch>`: the instance's directory name (epochs are numbers and processor ids
/// DNS labels, so the name is unique per pair).
pub fn instance_dir_name(processor: &ProcessorId, epoch: Epoch) -> String {
    format!("{processor}-{}", epoch.0)
}

/// Creates a directory only the owner can enter (the registry holds tokens); `AlreadyExists`
/// is an error, which is what makes a duplicate launch fail atomically.
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// Creates a directory and its parents, private to the owner.
pub(crate) fn create_private_dir_all(path: &Path) -> Result<(), LocalError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(path)
        .map_err(|e| LocalError::io("create", path, e))
}

/// Opens a log file for appending, private to the owner.
pub(crate) fn open_log(path: &Path) -> Result<File, LocalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LocalError::io("open", path, e))
}

/// A temporary name beside `path`, unique per write: several writers (the poll, an operator
/// command, a supervisor) may write the same file at once, from one process or several.
fn temp_path(path: &Path) -> PathBuf {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    PathBuf::from(name)
}

fn write_temp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = temp_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    // The record must survive a machine crash as well as the orchestrator's.
    file.sync_all()?;
    Ok(tmp)
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, renamed over
/// it), mode 0600: a reader sees the old content or the new, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let tmp = write_temp(path, bytes).map_err(|e| LocalError::io("write", path, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        LocalError::io("write", path, e)
    })
}

/// Writes `bytes` to `path` only if it does not exist yet, atomically (a temporary file
/// hard-linked into place, which fails if the name is taken). Returns whether it wrote.
/// The placement records an instance's fate this way, so it never overwrites the status its
/// supervisor recorded.
pub(crate) fn write_if_absent(path: &Path, bytes: &[u8]) -> Result<bool, LocalError> {
    let tmp = write_temp(path, bytes).map_err(|e| LocalError::io("write", path, e))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(LocalError::io("write", path, e)),
    }
}

/// Serialises `value` as JSON into `path` atomically.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), LocalError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| LocalError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("cannot encode: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// Reads JSON from `path`; `None` when the file does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, LocalError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LocalError::io("read", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| LocalError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Reads a small text file; `None` when it does not exist.
pub(crate) fn read_text(path: &Path) -> Result<Option<String>, LocalError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LocalError::io("read", path, e)),
    }
}

/// A fresh bearer token: 128 bits from the kernel's random source, as hex.
pub(crate) fn new_token() -> Result<String, LocalError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| LocalError::io("read", path, e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_reported_as_shell_exit_codes() {
        assert_eq!(
            ExitStatus::Signaled { signal: 9 }.phase(),
            Phase::Exited { code: 137 }
        );
        let json = serde_json::to_string(&ExitRecord {
            status: ExitStatus::Exited { code: 3 },
            at: Timestamp(5),
        })
        .unwrap();
        assert_eq!(json, r#"{"status":"exited","code":3,"at":5}"#);
    }

    #[test]
    fn tokens_are_fresh() {
        let a = new_token().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_token().unwrap());
    }
}
