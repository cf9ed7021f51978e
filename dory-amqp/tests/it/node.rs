//! A private RabbitMQ node for the tests that disrupt the broker (closing every connection,
//! restarting the app): its own node name, ports and data folder, started for one test and
//! stopped when it is dropped, so the shared broker the other tests use is never touched.
//!
//! The node runs the machine's `rabbitmq-server`, which drops to the `rabbitmq` user, so its
//! folder is handed to that user; `rabbitmqctl` reaches it through the same user's Erlang
//! cookie. Without `rabbitmq-server` on the machine a test prints a skip line, unless
//! `CI=true`, where it fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to accept AMQP connections (about 6 s on a small machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running private node; stopped, and its folder removed, on drop.
pub(crate) struct PrivateNode {
    /// `name@localhost`, for `rabbitmqctl -n`.
    pub(crate) name: String,
    /// The AMQP URL of the node, guest user, default vhost.
    pub(crate) url: String,
    dir: PathBuf,
}

impl PrivateNode {
    /// Starts a node for `test`, or returns `None` after printing a skip line when RabbitMQ is
    /// not installed here (a failure under `CI=true`).
    pub(crate) fn start(test: &str) -> Option<PrivateNode> {
        if !Path::new("/usr/sbin/rabbitmq-server").exists() {
            let problem = "rabbitmq-server is not installed";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {problem} and CI=true"
            );
            eprintln!("SKIP {test}: {problem}");
            return None;
        }
        reap_orphans();
        let base = format!("dory-it-{}-{}", std::process::id(), test.replace('_', "-"));
        let dir = std::env::temp_dir().join(&base);
        let name = format!("{base}@localhost");
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["data", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        let amqp_port = free_port();
        let dist_port = free_port();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{amqp_port}\n"),
        )
        .unwrap_or_else(|e| panic!("write node config: {e}"));
        std::fs::write(dir.join("enabled_plugins"), "[].\n")
            .unwrap_or_else(|e| panic!("write plugins file: {e}"));
        run(Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir));

        let node = PrivateNode {
            url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            name,
            dir,
        };
        let d = |sub: &str| node.dir.join(sub);
        run(Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d("data"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d("pid")));
        node.await_running(START_TIMEOUT);
        Some(node)
    }

    /// Closes every client connection on the node, as an operator or a failing load balancer
    /// would.
    pub(crate) fn close_all_connections(&self) {
        self.ctl(&["close_all_connections", "dory fault test"]);
    }

    /// Stops the RabbitMQ application (the Erlang node stays up), then starts it again after
    /// `down`: every connection is lost and refused until the app is back.
    pub(crate) fn restart_app(&self, down: Duration) {
        self.ctl(&["stop_app"]);
        std::thread::sleep(down);
        self.ctl(&["start_app"]);
        self.await_running(START_TIMEOUT);
    }

    fn await_running(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let out = ctl_output(&self.name, &["await_startup", "--timeout", "10"]);
            if out.status.success() {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "private RabbitMQ node {} did not start within {timeout:?}: {}; log folder {}",
                self.name,
                String::from_utf8_lossy(&out.stderr),
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn ctl(&self, args: &[&str]) {
        let out = ctl_output(&self.name, args);
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let _ = ctl_output(&self.name, &["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the nodes of test processes that died without stopping theirs (killed by a timeout,
/// say), found by their folders, and removes the folders.
fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("dory-it-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ctl_output(&format!("{name}@localhost"), &["stop"]);
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn ctl_output(node: &str, args: &[&str]) -> Output {
    Command::new("rabbitmqctl")
        .arg("-n")
        .arg(node)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run rabbitmqctl: {e}"))
}

fn run(command: &mut Command) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port free right now (the node binds it a moment later; a clash fails the start
/// loudly rather than testing the wrong broker).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("find a free port: {e}"))
}
