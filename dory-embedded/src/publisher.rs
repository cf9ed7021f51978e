//! [`FilePublisher`]: output as durable JSON-lines files, one per processor, and
//! [`read_output`] to read them back.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine as _;
use dory_core::{Epoch, Error, OutputMessage, ProcessorId, Publisher, Result, Sequence};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::db::TARGET;
use crate::error::{Error as SetupError, map_io};

/// How many requests may wait for the writer: a publisher that outruns the disk waits here
/// instead of growing memory without bound.
const QUEUE: usize = 8192;

/// The most lines one group commit writes before it `fsync`s and answers.
const MAX_BATCH: usize = 4096;

/// The file extension of output files.
const EXTENSION: &str = "jsonl";

/// One line of an output file: one message, as a JSON object.
///
/// ```json
/// {"id":"counter:3:17","processor":"counter","epoch":3,"sequence":17,"routing_key":null,"payload":"17"}
/// {"id":"blob:1:2","processor":"blob","epoch":1,"sequence":2,"routing_key":"raw","payload_base64":"AAH/"}
/// ```
///
/// A payload that is valid UTF-8 is written as text in `payload`, so the files read well with
/// `tail -f` and `jq`; any other payload is written as standard base64 (with padding) in
/// `payload_base64`. Exactly one of the two is present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// The message id consumers deduplicate by ([`OutputMessage::message_id`]).
    pub id: String,
    /// The processor that wrote it.
    pub processor: ProcessorId,
    /// The writing instance's epoch.
    pub epoch: Epoch,
    /// The processor's sequence for this message.
    pub sequence: Sequence,
    /// The routing key, if the message named one.
    pub routing_key: Option<String>,
    /// The payload, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl OutputRecord {
    /// The record of `message`.
    pub fn of(message: &OutputMessage) -> OutputRecord {
        let (payload, payload_base64) = match std::str::from_utf8(&message.payload) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            ),
        };
        OutputRecord {
            id: message.message_id(),
            processor: message.processor.clone(),
            epoch: message.epoch,
            sequence: message.sequence,
            routing_key: message.routing_key.clone(),
            payload,
            payload_base64,
        }
    }

    /// The message this record holds; fails when the payload fields are missing, both
    /// present, or not base64.
    pub fn into_message(self) -> std::result::Result<OutputMessage, String> {
        let payload = match (self.payload, self.payload_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| format!("field `payload_base64`: {e}"))?,
            (Some(_), Some(_)) => {
                return Err("both `payload` and `payload_base64` are present".into());
            }
            (None, None) => return Err("neither `payload` nor `payload_base64` is present".into()),
        };
        Ok(OutputMessage {
            processor: self.processor,
            epoch: self.epoch,
            sequence: self.sequence,
            routing_key: self.routing_key,
            payload,
        })
    }
}

/// The output file of `processor` in `dir`: `<dir>/<processor>.jsonl`.
pub fn output_path(dir: &Path, processor: &ProcessorId) -> PathBuf {
    dir.join(format!("{processor}.{EXTENSION}"))
}

/// A line of an output file that is not a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedLine {
    /// Its line number (1-based).
    pub line: usize,
    /// Whether it is the file's last line and has no newline: a write cut short by a crash
    /// (or one still in progress). A torn line was never confirmed to its publisher.
    pub torn: bool,
    /// Why it is not a message.
    pub reason: String,
}

/// What [`read_output`] found in one output file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputLog {
    /// The messages, in file (and so publish) order.
    pub messages: Vec<OutputMessage>,
    /// Lines that are not messages, skipped: a torn last line after a crash, or a line
    /// damaged or written by hand.
    pub damaged: Vec<DamagedLine>,
}

/// Reads the output file of `processor` in `dir` (see [`FilePublisher`]). A missing file is
/// an empty log (the processor has published nothing). Lines that are not messages are
/// skipped and listed in [`OutputLog::damaged`], never a panic: in particular a torn last
/// line, left by a crash in the middle of a write, which the writer also sets apart with a
/// newline before it appends again.
///
/// Copies of a message (a retry after an error, or a failover replaying output) are all
/// returned; consumers drop them by `(processor, sequence)`, the higher epoch winning.
pub fn read_output(dir: &Path, processor: &ProcessorId) -> Result<OutputLog> {
    let path = output_path(dir, processor);
    let what = || format!("read output of {processor} from {}", path.display());
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OutputLog::default()),
        Err(e) => return Err(map_io(&e).context(what())),
    };
    let mut log = OutputLog::default();
    let ends_with_newline = bytes.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // `split` yields an empty piece after a final newline; it is no line.
    let count = if ends_with_newline {
        lines.len() - 1
    } else {
        lines.len()
    };
    for (i, line) in lines.iter().take(count).enumerate() {
        let torn = i + 1 == count && !ends_with_newline;
        if line.is_empty() && !torn {
            continue;
        }
        let parsed = serde_json::from_slice::<OutputRecord>(line)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                if &record.processor != processor {
                    return Err(format!("record of processor {}", record.processor));
                }
                record.into_message()
            });
        match parsed {
            Ok(message) if !torn => log.messages.push(message),
            // A last line without its newline was never confirmed, even when it parses.
            Ok(_) => log.damaged.push(DamagedLine {
                line: i + 1,
                torn,
                reason: "the last line has no newline: its write was cut short".into(),
            }),
            Err(reason) => log.damaged.push(DamagedLine {
                line: i + 1,
                torn,
                reason,
            }),
        }
    }
    if !log.damaged.is_empty() {
        tracing::warn!(target: TARGET, path = %path.display(), damaged = log.damaged.len(), "output file has damaged lines, skipped");
    }
    Ok(log)
}

/// Where a request's outcome goes.
type Answer = oneshot::Sender<Result<()>>;

/// What the writer thread is asked to do.
enum Request {
    /// Append `line` (a JSON object and a newline) to `processor`'s file; answer once it is
    /// on disk.
    Write {
        processor: ProcessorId,
        line: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
    /// Answer once everything sent before is on disk.
    Flush { done: oneshot::Sender<Result<()>> },
}

/// A [`Publisher`] writing each processor's output to `<dir>/<processor>.jsonl`, one
/// [`OutputRecord`] (a JSON object) per line: for when no broker is configured.
///
/// # Durability
///
/// [`publish`](Publisher::publish) resolves only once its line is on disk (`fsync`ed), as the
/// contract asks. So that throughput is not one `fsync` per message, a writer thread does
/// group commit: it takes every request waiting (up to 4096), appends each file's lines with
/// one write, `fsync`s each file touched (and, for a new file, the directory, so the file
/// itself survives a crash), then answers every waiter of the batch. While it syncs, the next
/// batch gathers. A failed write or sync fails the whole batch (those messages may or may not
/// be on disk: a retry may duplicate one, which consumers drop by message id) and the file is
/// reopened before its next write.
///
/// # Several writers
///
/// A processor's file may be appended to by two processes (the old and the new instance
/// around a failover), so each batch is written under an exclusive `flock` of the file, in
/// one `write` to a file opened for appending. A crash in the middle of a write leaves a torn
/// last line; before appending, the writer checks that the file ends with a newline and adds
/// one if not, so the torn fragment stays a line of its own that [`read_output`] reports
/// and skips, and the next record is whole.
///
/// Messages of one processor are written in publish order. The writer thread stops when the
/// publisher is dropped, after writing what was sent.
pub struct FilePublisher {
    dir: PathBuf,
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for FilePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePublisher")
            .field("dir", &self.dir)
            .finish()
    }
}

impl FilePublisher {
    /// A publisher writing into `dir`, created (with its parents) if missing.
    pub fn open(dir: impl AsRef<Path>) -> std::result::Result<FilePublisher, SetupError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SetupError::Io { what, path, source }
        };
        let dir = std::path::absolute(dir.as_ref())
            .map_err(io("resolve the output directory", dir.as_ref()))?;
        std::fs::create_dir_all(&dir).map_err(io("create the output directory", &dir))?;
        let (requests, received) = mpsc::channel(QUEUE);
        let writer = Writer {
            dir: dir.clone(),
            files: BTreeMap::new(),
        };
        std::thread::Builder::new()
            .name("dory-file-publisher".into())
            .spawn(move || writer.run(received))
            .map_err(io("start the writer thread for", &dir))?;
        tracing::info!(target: TARGET, dir = %dir.display(), "file publisher ready");
        Ok(FilePublisher { dir, requests })
    }

    /// The output directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until everything published so far is on disk; the same as
    /// [`flush`](Publisher::flush), for symmetry with the broker publisher's `close` at exit.
    pub async fn close(&self) -> Result<()> {
        self.flush().await
    }

    async fn ask(&self, request: Request, answer: oneshot::Receiver<Result<()>>) -> Result<()> {
        let gone = || {
            Error::unavailable(format!(
                "file publisher in {}: the writer thread has stopped",
                self.dir.display()
            ))
        };
        self.requests.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

#[async_trait]
impl Publisher for FilePublisher {
    async fn publish(&self, message: OutputMessage) -> Result<()> {
        let record = OutputRecord::of(&message);
        // Encoded here, on the caller's task, so the writer thread only writes.
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| Error::invalid(format!("publish {}: encode: {e}", record.id)))?;
        line.push(b'\n');
        let (done, answer) = oneshot::channel();
        self.ask(
            Request::Write {
                processor: message.processor,
                line,
                done,
            },
            answer,
        )
        .await
        .map_err(|e| e.context(format!("publish {}", record.id)))
    }

    async fn flush(&self) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.ask(Request::Flush { done }, answer).await
    }
}

/// The writer thread's state: the open output files.
struct Writer {
    dir: PathBuf,
    files: BTreeMap<ProcessorId, File>,
}

impl Writer {
    fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(first) = requests.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        tracing::debug!(target: TARGET, dir = %self.dir.display(), "file publisher stopped");
    }

    /// Writes a batch, syncs it and answers every waiter.
    fn commit(&mut self, batch: Vec<Request>) {
        // Lines per file, in arrival order; answers per file.
        let mut lines: BTreeMap<ProcessorId, (Vec<u8>, Vec<Answer>)> = BTreeMap::new();
        let mut flushes = Vec::new();
        for request in batch {
            match request {
                Request::Write {
                    processor,
                    line,
                    done,
                } => {
                    let (buf, waiters) = lines.entry(processor).or_default();
                    buf.extend_from_slice(&line);
                    waiters.push(done);
                }
                Request::Flush { done } => flushes.push(done),
            }
        }
        let mut failed = None;
        for (processor, (buf, waiters)) in lines {
            let result = self.append(&processor, &buf);
            if let Err(e) = &result {
                tracing::warn!(target: TARGET, %processor, error = %e, "output write failed");
                // After a failed write or sync the kernel may have dropped the dirty pages:
                // start again from a fresh handle (and a newline check).
                self.files.remove(&processor);
                failed = Some(e.clone());
            }
            for done in waiters {
                let _ = done.send(result.clone());
            }
        }
        // A flush vouches for everything before it: it fails if any of that failed.
        let flushed = failed.map_or(Ok(()), Err);
        for done in flushes {
            let _ = done.send(flushed.clone());
        }
    }

    /// Appends `buf` to `processor`'s file under its lock and syncs it.
    fn append(&mut self, processor: &ProcessorId, buf: &[u8]) -> Result<()> {
        let path = output_path(&self.dir, processor);
        let what = |step: &str| format!("{step} {}", path.display());
        if !self.files.contains_key(processor) {
            let existed = path.exists();
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)
                .map_err(|e| map_io(&e).context(what("open")))?;
            if !existed {
                // The new file's name must survive a crash too.
                sync_dir(&self.dir)
                    .map_err(|e| map_io(&e).context(what("sync the directory of")))?;
            }
            self.files.insert(processor.clone(), file);
        }
        let Some(file) = self.files.get_mut(processor) else {
            return Err(Error::unavailable(what("no handle for")));
        };
        file.lock().map_err(|e| map_io(&e).context(what("lock")))?;
        let written = write_whole(file, buf).map_err(|e| map_io(&e).context(what("write")));
        // Unlocked whatever happened; closing the handle after an error unlocks too.
        let _ = file.unlock();
        written
    }
}

/// Writes `buf` after a newline if the file's last line is torn, then syncs.
fn write_whole(file: &mut File, buf: &[u8]) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    let mut out = Vec::with_capacity(buf.len() + 1);
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            out.push(b'\n');
        }
    }
    out.extend_from_slice(buf);
    // Opened for appending: the write goes to the end whatever the read position.
    file.write_all(&out)?;
    file.sync_data()
}

/// Syncs a directory, so a file created in it is found after a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_utf8_as_text_and_the_rest_as_base64() {
        let p = ProcessorId::new("p").unwrap();
        let message = |payload: Vec<u8>| OutputMessage {
            processor: p.clone(),
            epoch: Epoch(2),
            sequence: Sequence(9),
            routing_key: Some("r".into()),
            payload,
        };
        let text = OutputRecord::of(&message(b"hello".to_vec()));
        assert_eq!(text.payload.as_deref(), Some("hello"));
        assert_eq!(text.payload_base64, None);
        assert_eq!(text.id, "p:2:9");
        let line = serde_json::to_string(&text).unwrap();
        assert!(!line.contains("payload_base64"), "{line}");
        let binary = OutputRecord::of(&message(vec![0, 1, 0xff]));
        assert_eq!(binary.payload_base64.as_deref(), Some("AAH/"));
        assert_eq!(binary.into_message().unwrap(), message(vec![0, 1, 0xff]));
        let mut both = OutputRecord::of(&message(Vec::new()));
        both.payload_base64 = Some(String::new());
        assert!(both.into_message().is_err());
    }
}
