//! `[placement] kind = "kubernetes"`: the example deployment's `dory.toml` validates, config
//! errors name line and key, the commands that only make sense on one machine refuse, and the
//! daemon, pointed at an in-process fake API server through KUBECONFIG, takes the Lease and
//! creates a processor's pod.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dory_k8s_fake::{FakeApiServer, ResourceId};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::support::{dory, dory_bin};

/// The `dory.toml` the example ConfigMap (`examples/kubernetes/config.yaml`) embeds: the
/// block scalar under `dory.toml: |`, its indentation taken off.
fn example_dory_toml() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/config.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = yaml.lines();
    let key = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("dory.toml: |"))
        .expect("config.yaml has a `dory.toml: |` block");
    let key_indent = key.len() - key.trim_start().len();
    let mut block: Vec<&str> = Vec::new();
    let mut indent = None;
    for line in lines {
        let this = line.len() - line.trim_start().len();
        if line.trim().is_empty() {
            block.push("");
            continue;
        }
        if this <= key_indent {
            break;
        }
        let indent = *indent.get_or_insert(this);
        assert!(
            this >= indent,
            "config.yaml: a block line indented less than the first"
        );
        block.push(&line[indent..]);
    }
    assert!(
        !block.is_empty(),
        "config.yaml: the dory.toml block is empty"
    );
    block.join("\n") + "\n"
}

#[test]
fn validate_accepts_the_example_deployments_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = example_dory_toml();
    assert!(text.contains("kind = \"kubernetes\""), "{text}");
    std::fs::write(dir.path().join("dory.toml"), &text).unwrap();
    let (code, out, err) = dory(&["validate", "dory.toml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("kubernetes placement in namespace dory, lease dory/dory-orchestrator"),
        "{out}"
    );

    // The same file with a misspelt kubernetes key is refused at its line.
    let line = text
        .lines()
        .position(|l| l.starts_with("sdk_port"))
        .expect("the example sets sdk_port")
        + 1;
    std::fs::write(
        dir.path().join("dory.toml"),
        text.replace("sdk_port", "sdk_prot"),
    )
    .unwrap();
    let (code, _, err) = dory(&["validate", "dory.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("line {line}")) && err.contains("sdk_prot"),
        "{err}"
    );
}

/// A kubernetes placement on the Postgres store and RabbitMQ publisher; `extra` is more
/// `[placement]` keys from line 3 on.
fn kube_config(extra: &str) -> String {
    format!(
        "[placement]\nkind = \"kubernetes\"\n{extra}\n[store]\nkind = \"postgres\"\nurl = \"postgres://dory@db:5432/dory?schema=dory\"\n[publisher]\nkind = \"rabbitmq\"\nurl = \"amqp://dory@mq:5672/%2f?exchange=dory\"\n"
    )
}

#[test]
fn kubernetes_config_errors_name_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dory.toml");
    for (extra, line, names) in [
        ("namespace = 7\n", 3, "namespace"),
        ("[placement.signals]\ncordon_is_drain = \"yes\"\n", 4, "yes"),
        (
            "[placement.lease]\nname = \"l\"\nholdr = \"me\"\n",
            5,
            "holdr",
        ),
        (
            "[placement.instance]\nlease = \"3s\"\n",
            4,
            "orchestrator.lease",
        ),
        (
            "[[placement.nodes]]\nid = \"n1\"\nsite = \"cloud\"\n",
            3,
            "nodes",
        ),
    ] {
        std::fs::write(&path, kube_config(extra)).unwrap();
        let (code, _, err) = dory(&["validate"], dir.path());
        assert_eq!(code, 2, "{extra}: {err}");
        assert!(
            err.contains("dory.toml")
                && err.contains(&format!("line {line}"))
                && err.contains(names),
            "{extra}: {err}"
        );
    }
    // The embedded store is a file on the orchestrator's machine: pods cannot reach it.
    std::fs::write(&path, "[placement]\nkind = \"kubernetes\"\n").unwrap();
    let (code, _, err) = dory(&["validate"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("store.kind") && err.contains("postgres"),
        "{err}"
    );
}

#[test]
fn local_only_commands_refuse_a_kubernetes_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dory.toml"), kube_config("")).unwrap();
    // Fault plays on virtual nodes: never on the local placement's files instead.
    let (code, _, err) = dory(&["node", "kill", "n1"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kubectl"), "{err}");
    assert!(
        !dir.path().join(".dory").exists(),
        "a local state directory was made"
    );
    // A pin with the file config source would land in this machine's database, which the
    // orchestrator's pod never reads.
    let (code, _, err) = dory(&["move", "p", "--to", "n1"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("config.source"), "{err}");
    // A cordon the orchestrator is told to ignore would drain nothing.
    std::fs::write(
        dir.path().join("dory.toml"),
        kube_config("[placement.signals]\ncordon_is_drain = false\n"),
    )
    .unwrap();
    let (code, _, err) = dory(&["drain", "n1"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cordon_is_drain"), "{err}");
}

/// A kubeconfig whose current context is the fake API server (plain HTTP, no credentials).
fn kubeconfig(dir: &Path, server: &FakeApiServer) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: dory\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            server.url()
        ),
    )
    .unwrap();
    path
}

/// The orchestrator, killed when the test ends however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for<T>(
    what: &str,
    log: &Path,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}; the orchestrator's log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_takes_the_lease_and_creates_a_processors_pod() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The store is Postgres: a pod cannot reach an embedded one.
    let Some(schema) = runtime.block_on(dory_pg::testing::TestSchema::create("k8s", 2)) else {
        return;
    };
    let server = runtime
        .block_on(FakeApiServer::builder().namespace("dory").start())
        .expect("start the fake API server");
    server
        .add_node("node-1", &[("dory.io/site", "cloud")])
        .unwrap();
    server
        .modify_value(&ResourceId::nodes(), None, "node-1", |node| {
            node["status"]["allocatable"] = serde_json::json!({"cpu": "4", "memory": "8Gi"});
        })
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store_url = format!(
        "{}{}schema={}",
        dory_pg::testing::test_database_url(),
        if dory_pg::testing::test_database_url().contains('?') {
            '&'
        } else {
            '?'
        },
        schema.config.schema
    );
    let config = dir.path().join("dory.toml");
    std::fs::write(
        &config,
        format!(
            "[orchestrator]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\nlease = \"2s\"\nlease_margin = \"500ms\"\nnode_lost_grace = \"4s\"\nresync_interval = \"500ms\"\nstart_timeout = \"8s\"\n\n[placement]\nkind = \"kubernetes\"\nnamespace = \"dory\"\ndefault_image = \"dory-example-counter:test\"\n[placement.lease]\nduration = \"3s\"\nrenew_every = \"1s\"\nrenew_deadline = \"2s\"\nretry_every = \"500ms\"\n\n[store]\nkind = \"postgres\"\nurl = {store_url:?}\n\n[publisher]\nkind = \"rabbitmq\"\nurl = \"amqp://guest@127.0.0.1:5672/%2f?exchange=dory-it-k8s\"\n\n[processors.counter]\nsite = \"cloud\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("orchestrator.log");
    let child = Command::new(dory_bin())
        .args(["orchestrator", "--config"])
        .arg(&config)
        .env("KUBECONFIG", kubeconfig(dir.path(), &server))
        .env("POD_NAME", "dory-orchestrator-test-0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("DORY_LOG", "info,dory=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the orchestrator");
    let mut daemon = Daemon(child);

    // It leads through the Lease, held as its pod's name.
    let holder = wait_for("the Lease", &log, Duration::from_secs(60), || {
        let lease: Lease = server.get(Some("dory"), "dory-orchestrator").ok()??;
        lease.spec?.holder_identity
    });
    assert_eq!(holder, "dory-orchestrator-test-0");

    // It places the processor: a pod named by processor and epoch, pinned to the node, with
    // its token in a Secret the pod owns, under the PodDisruptionBudget.
    let pod = wait_for("the processor's pod", &log, Duration::from_secs(60), || {
        let pods: Vec<Pod> = server.list(Some("dory")).ok()?;
        pods.into_iter().find(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(dory_k8s::LABEL_PROCESSOR))
                .is_some_and(|id| id == "counter")
        })
    });
    let name = pod.metadata.name.clone().unwrap_or_default();
    assert!(name.starts_with("counter-"), "{name}");
    let spec = pod.spec.expect("a pod spec");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("dory-example-counter:test")
    );
    let env: Vec<(String, Option<String>)> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), v.value.clone()))
        .collect();
    assert!(
        env.contains(&("DORY_STORE_URL".into(), Some(store_url.clone()))),
        "the pod is not given the store: {env:?}"
    );
    wait_for(
        "the pod's token Secret",
        &log,
        Duration::from_secs(20),
        || server.get::<Secret>(Some("dory"), &name).ok()?,
    );
    let pdb: Option<PodDisruptionBudget> = server.get(Some("dory"), "dory-processors").unwrap();
    assert!(pdb.is_some(), "no PodDisruptionBudget");

    // The operator commands see the cluster: its node with Dory's pod on it (pinned there,
    // not yet scheduled: the fake runs no scheduler), and cordon the node itself.
    let kubeconfig = dir.path().join("kubeconfig");
    let operator = |args: &[&str]| {
        let out = Command::new(dory_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run dory");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = operator(&["nodes", "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["node"]["id"], "node-1", "{rows}");
    assert_eq!(rows[0]["node"]["site"], "cloud", "{rows}");
    assert_eq!(rows[0]["node"]["capacity"]["cpu_millis"], 4000, "{rows}");
    assert_eq!(rows[0]["node"]["ready"], true, "{rows}");
    assert_eq!(rows[0]["instances"][0], "counter@1", "{rows}");
    let cordoned = || {
        let node: k8s_openapi::api::core::v1::Node = server.get(None, "node-1").unwrap().unwrap();
        node.spec.and_then(|s| s.unschedulable).unwrap_or(false)
    };
    let (code, out, err) = operator(&["drain", "node-1", "--no-wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("cordoned node-1") && out.contains("counter"),
        "{out}"
    );
    assert!(cordoned(), "drain did not cordon the node");
    let (code, out, err) = operator(&["uncordon", "node-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!cordoned(), "uncordon left the node cordoned");
    let (code, out, err) = operator(&["drain", "node-9", "--no-wait"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("there is no node node-9"), "{err}");

    // SIGTERM: it stops, giving the Lease back so another replica takes over at once.
    let pid = daemon.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    wait_for(
        "the orchestrator to exit",
        &log,
        Duration::from_secs(30),
        || daemon.0.try_wait().ok()?,
    );
    let lease: Lease = server
        .get(Some("dory"), "dory-orchestrator")
        .unwrap()
        .expect("the Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "the Lease was not given back; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(daemon);
    runtime.block_on(server.shutdown());
    drop(schema);
}
