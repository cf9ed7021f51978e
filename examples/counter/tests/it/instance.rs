//! One `dory-example-counter` child process: started with an instance environment, read
//! through its stdout lines, stopped with SIGTERM, and killed when dropped so a failing test
//! leaves nothing running.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dory_core::{
    ControlEndpoint, Epoch, Instance, LaunchMode, NodeId, Phase, ProcessorId, Timestamp,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::eventually;

/// What an instance is started with, besides the store and publisher.
pub(crate) struct Launch<'a> {
    pub(crate) processor: &'a ProcessorId,
    pub(crate) epoch: Epoch,
    pub(crate) mode: LaunchMode,
    pub(crate) store_url: &'a str,
    pub(crate) publisher_url: &'a str,
    pub(crate) lease: Duration,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) config: serde_json::Value,
}

type Lines = Arc<Mutex<Vec<String>>>;

pub(crate) struct Running {
    pub(crate) name: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// The orchestrator's view of it, for `HttpControl`.
    pub(crate) instance: Instance,
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line);
        }
    });
    lines
}

impl Running {
    /// Starts the binary and waits (bounded) until it reports its endpoint address.
    pub(crate) async fn start(name: &str, launch: Launch<'_>) -> Running {
        let token = format!("token-{name}-{}", launch.epoch.0);
        let mode = match launch.mode {
            LaunchMode::Restore => "restore",
            LaunchMode::Standby => "standby",
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_dory-example-counter"))
            .env("DORY_PROCESSOR_ID", launch.processor.to_string())
            .env("DORY_EPOCH", launch.epoch.0.to_string())
            .env("DORY_MODE", mode)
            .env("DORY_TOKEN", &token)
            .env("DORY_PORT", "0")
            .env("DORY_STORE_URL", launch.store_url)
            .env("DORY_PUBLISHER_URL", launch.publisher_url)
            .env("DORY_LEASE_MS", launch.lease.as_millis().to_string())
            .env(
                "DORY_CHECKPOINT_INTERVAL_MS",
                launch.checkpoint_interval.as_millis().to_string(),
            )
            .env("DORY_CONFIG", launch.config.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        let mut running = Running {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            instance: Instance {
                processor: launch.processor.clone(),
                epoch: launch.epoch,
                node: NodeId::new("local"),
                phase: Phase::Starting,
                revision: 0,
                started_at: Timestamp(0),
                endpoint: None,
            },
        };
        let address = eventually(
            &format!("{name} to report its address"),
            Duration::from_secs(30),
            || {
                let found = running.line_after("listening on ");
                let exited = running.child.try_wait().ok().flatten();
                async move {
                    if let Some(status) = exited {
                        panic!("{name} exited before listening: {status}");
                    }
                    found
                }
            },
        )
        .await;
        let port = address
            .rsplit(':')
            .next()
            .unwrap_or_else(|| panic!("{name}: no port in {address:?}"));
        running.instance.endpoint = Some(ControlEndpoint {
            address: format!("127.0.0.1:{port}"),
            token,
        });
        running
    }

    /// The rest of the first stdout line starting with `prefix`.
    pub(crate) fn line_after(&self, prefix: &str) -> Option<String> {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    }

    /// Sends SIGTERM (the runtime owns it: freeze, save, flush, exit).
    pub(crate) fn terminate(&self) {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("{} has already been reaped", self.name));
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -TERM {pid}: {e}"));
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }

    /// Waits (bounded) for the process to exit; returns its status and its `exit: …` line.
    pub(crate) async fn exited(&mut self, within: Duration) -> (ExitStatus, String) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {within:?}", self.name))
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
        // The pipe may still hold the last line when the process is reaped.
        let line = eventually(
            &format!("the exit line of {}", self.name),
            Duration::from_secs(5),
            || {
                let line = self.line_after("exit: ");
                async move { line }
            },
        )
        .await;
        (status, line)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // `kill_on_drop` kills the process; show what it logged when the test failed.
        if std::thread::panicking() {
            let out = self.stdout.lock().unwrap_or_else(PoisonError::into_inner);
            let err = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!(
                "---- {} stdout ----\n{}\n---- {} stderr ----\n{}",
                self.name,
                out.join("\n"),
                self.name,
                err.join("\n")
            );
        }
    }
}
