//! The file publisher: the shared suite, durability, group commit, two writers on one file
//! and a torn last line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use dory_core::testing::{PublishedLog, publisher_suite, unique_processor};
use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Result, Sequence};
use dory_embedded::{FilePublisher, output_path, read_output};

/// Reads deliveries back from the files, as a consumer would.
struct Files(PathBuf);

#[async_trait]
impl PublishedLog for Files {
    async fn published(&self, processor: &ProcessorId) -> Result<Vec<OutputMessage>> {
        let log = read_output(&self.0, processor)?;
        assert!(log.damaged.is_empty(), "{processor}: {:?}", log.damaged);
        Ok(log.messages)
    }
}

fn message(p: &ProcessorId, epoch: u64, s: u64, payload: &[u8]) -> OutputMessage {
    OutputMessage {
        processor: p.clone(),
        epoch: Epoch(epoch),
        sequence: Sequence(s),
        routing_key: None,
        payload: payload.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_suite_passes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let publisher = FilePublisher::open(dir.path().join("output")).expect("open");
    publisher_suite(&publisher, &Files(dir.path().join("output"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_is_in_the_file_when_publish_returns() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let publisher = FilePublisher::open(dir.path()).expect("open");
    let p = unique_processor("durable");
    let binary = message(&p, 2, 1, &[0, 159, 146, 150]);
    publisher.publish(binary.clone()).await.expect("publish");
    // No flush: publish itself waited for the line to be written and synced.
    let log = read_output(dir.path(), &p).expect("read");
    assert_eq!(log.messages, vec![binary]);
    let text = std::fs::read_to_string(output_path(dir.path(), &p)).expect("read the file");
    assert!(text.contains("\"payload_base64\":\"AJ+Slg==\""), "{text}");
    assert!(text.ends_with('\n'), "{text}");
    // The publisher gone and a new one opened, as after a restart: both lines stay.
    drop(publisher);
    let again = FilePublisher::open(dir.path()).expect("reopen");
    again
        .publish(message(&p, 2, 2, b"two"))
        .await
        .expect("publish");
    assert_eq!(read_output(dir.path(), &p).expect("read").messages.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_publishes_are_committed_in_groups() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let publisher = Arc::new(FilePublisher::open(dir.path()).expect("open"));
    let processors: Vec<ProcessorId> = (0..4).map(|_| unique_processor("group")).collect();
    const EACH: u64 = 500;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = processors
        .iter()
        .cloned()
        .map(|p| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                // Each processor publishes in order, many in flight at once.
                let sends = (1..=EACH).map(|s| {
                    let publisher = publisher.clone();
                    let m = message(&p, 1, s, format!("{s}").as_bytes());
                    async move { publisher.publish(m).await }
                });
                let mut in_flight = tokio::task::JoinSet::new();
                for send in sends {
                    in_flight.spawn(send);
                }
                while let Some(r) = in_flight.join_next().await {
                    r.expect("task").expect("publish");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher task");
    }
    publisher.flush().await.expect("flush");
    let elapsed = started.elapsed();
    for p in &processors {
        let log = read_output(dir.path(), p).expect("read");
        assert!(log.damaged.is_empty(), "{:?}", log.damaged);
        let mut seqs: Vec<u64> = log.messages.iter().map(|m| m.sequence.0).collect();
        seqs.sort();
        assert_eq!(
            seqs,
            (1..=EACH).collect::<Vec<_>>(),
            "{p}: each message once"
        );
    }
    // 2000 messages at one fsync each would take seconds on most disks; batches take far
    // fewer. Generous, so a slow machine does not fail it.
    assert!(
        elapsed < std::time::Duration::from_secs(30),
        "2000 publishes took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_reported_and_the_next_record_is_whole() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let p = unique_processor("torn");
    let publisher = FilePublisher::open(dir.path()).expect("open");
    publisher
        .publish(message(&p, 1, 1, b"one"))
        .await
        .expect("publish");
    drop(publisher);
    // A crash in the middle of the next write leaves half a line.
    let path = output_path(dir.path(), &p);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    file.write_all(br#"{"id":"torn:1:2","processor":"#)
        .expect("write half a line");
    drop(file);

    let log = read_output(dir.path(), &p).expect("a torn file reads");
    assert_eq!(log.messages.len(), 1, "the whole line");
    assert_eq!(log.damaged.len(), 1, "{:?}", log.damaged);
    assert!(log.damaged[0].torn, "{:?}", log.damaged);
    assert_eq!(log.damaged[0].line, 2);

    // The restarted instance publishes on: the torn fragment stays a line of its own.
    let publisher = FilePublisher::open(dir.path()).expect("reopen");
    publisher
        .publish(message(&p, 1, 2, b"two"))
        .await
        .expect("publish");
    let log = read_output(dir.path(), &p).expect("read");
    let seqs: Vec<u64> = log.messages.iter().map(|m| m.sequence.0).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(log.damaged.len(), 1, "{:?}", log.damaged);
    assert!(!log.damaged[0].torn, "no longer the last line");

    // A whole line that lost only its newline was never confirmed either.
    std::fs::write(
        &path,
        serde_json::to_string(&dory_embedded::OutputRecord::of(&message(&p, 1, 3, b"x")))
            .expect("encode"),
    )
    .expect("write");
    let log = read_output(dir.path(), &p).expect("read");
    assert!(log.messages.is_empty() && log.damaged[0].torn, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_lines_are_skipped_never_a_panic() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let p = unique_processor("garbage");
    let other = unique_processor("other");
    let path = output_path(dir.path(), &p);
    let good = serde_json::to_string(&dory_embedded::OutputRecord::of(&message(&p, 1, 1, b"ok")))
        .expect("encode");
    let foreign = serde_json::to_string(&dory_embedded::OutputRecord::of(&message(
        &other, 1, 1, b"x",
    )))
    .expect("encode");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"\n\xff\xfe not json\n{}\n");
    bytes.extend_from_slice(foreign.as_bytes());
    bytes.extend_from_slice(b"\n\n{\"id\":\"x\",\"processor\":\"");
    bytes.extend_from_slice(p.as_str().as_bytes());
    bytes.extend_from_slice(
        b"\",\"epoch\":1,\"sequence\":2,\"routing_key\":null,\"payload_base64\":\"!!\"}\n",
    );
    std::fs::write(&path, bytes).expect("write");
    let log = read_output(dir.path(), &p).expect("read");
    assert_eq!(log.messages.len(), 1);
    let lines: Vec<usize> = log.damaged.iter().map(|d| d.line).collect();
    assert_eq!(lines, [2, 3, 4, 6], "{:?}", log.damaged);
    assert!(log.damaged.iter().all(|d| !d.torn));
    // Nothing published yet is an empty log.
    assert_eq!(
        read_output(dir.path(), &unique_processor("silent")).expect("read"),
        Default::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_on_one_file_write_whole_lines() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let p = unique_processor("two");
    // The old and the new instance around a failover, in two processes.
    let (a, b) = (
        FilePublisher::open(dir.path()).expect("open a"),
        FilePublisher::open(dir.path()).expect("open b"),
    );
    async fn send(publisher: &FilePublisher, p: &ProcessorId, epoch: u64) {
        for s in 1..=200 {
            publisher
                .publish(message(p, epoch, s, &vec![b'x'; 3000]))
                .await
                .expect("publish");
        }
    }
    tokio::join!(send(&a, &p, 1), send(&b, &p, 2));
    let log = read_output(dir.path(), &p).expect("read");
    assert!(log.damaged.is_empty(), "{:?}", log.damaged);
    assert_eq!(log.messages.len(), 400);
    for epoch in [1, 2] {
        let seqs: Vec<u64> = log
            .messages
            .iter()
            .filter(|m| m.epoch == Epoch(epoch))
            .map(|m| m.sequence.0)
            .collect();
        assert_eq!(
            seqs,
            (1..=200).collect::<Vec<_>>(),
            "epoch {epoch} in order"
        );
    }
}
