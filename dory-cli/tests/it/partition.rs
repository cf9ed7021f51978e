//! A virtual node cut off from the network while its processes keep running, on the Postgres
//! store and the RabbitMQ publisher: the node's instances run in a network namespace of their
//! own, joined to the host by a veth pair whose host end the test takes down.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    Backends, Cluster, NodeSpec, Received, all_running, counter_bin, counter_entry, now_ms,
};

const STEP_MS: u64 = 20;
const CHECKPOINT_MS: u64 = 400;
const LEASE_MS: u64 = 2000;
const MARGIN_MS: u64 = 500;
/// Steps an instance may take beyond one checkpoint interval before it notices that the
/// checkpoint cannot be stored: the step under way when it was due and the one after.
const LOSS_MARGIN_STEPS: u64 = 3;

/// Runs `ip` with `args`; the error names the command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to the host by a veth pair (`10.200.<net>.1/30` on the host,
/// `.2` inside, `lo` up inside); both removed on drop, even after a failure.
struct NetNs {
    name: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl NetNs {
    /// Creates one named after this process; `None` (a skip) when namespaces cannot be made
    /// here outside CI (not root, no `ip`), a failure under `CI=true`.
    fn create() -> Option<NetNs> {
        match NetNs::try_create() {
            Ok(ns) => Some(ns),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true and a network namespace cannot be made: {e}"
                );
                eprintln!("SKIP: a network namespace cannot be made here: {e}");
                None
            }
        }
    }

    fn try_create() -> Result<NetNs, String> {
        let pid = std::process::id();
        // A /30 no interface of this machine has yet (another run may hold one).
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map_err(|e| format!("ip addr: {e}"))?;
        let used = String::from_utf8_lossy(&used.stdout).into_owned();
        let net = (0..250u32)
            .map(|i| ((pid + i) % 250 + 1) as u8)
            .find(|n| !used.contains(&format!("10.200.{n}.")))
            .ok_or("no free 10.200.x.0/30")?;
        let ns = NetNs {
            name: format!("dory-it-{pid}"),
            host_veth: format!("dvh{pid}"),
            host_ip: Ipv4Addr::new(10, 200, net, 1),
            ns_ip: Ipv4Addr::new(10, 200, net, 2),
        };
        // From here on `ns` is dropped on every error: what was made is removed.
        let inner = format!("dvn{pid}");
        let (name, host) = (ns.name.as_str(), ns.host_veth.as_str());
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        ip(&["netns", "add", name])?;
        ip(&["link", "add", host, "type", "veth", "peer", "name", &inner])?;
        ip(&["link", "set", &inner, "netns", name])?;
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        exec(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &inner])?;
        exec(&["link", "set", &inner, "up"])?;
        exec(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes the host end of the veth down (`false`) or up (`true`): the namespace is cut off
    /// from everything on the host, and back.
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_veth, state]).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair; the second delete is
        // for a pair whose inner end never got there.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_veth]);
    }
}

/// Accepts on `listener` and forwards every connection to `upstream`: the services listen on
/// loopback only, which a namespace cannot reach.
async fn forward(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// `url` with its host and port (`127.0.0.1:<port>`) replaced by `host`'s, and the port.
fn via(url: &str, host: Ipv4Addr) -> (String, u16) {
    let after = url.split_once('@').map_or(url, |(_, rest)| rest);
    let authority = after.split(['/', '?']).next().unwrap_or_default();
    let (name, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url}: a test URL names its port"));
    assert!(
        name == "127.0.0.1" || name == "localhost",
        "{url}: the namespace reaches services on this machine's loopback only"
    );
    let port: u16 = port.parse().expect("port");
    (url.replacen(authority, &format!("{host}:{port}"), 1), port)
}

/// Whether a process with `DORY_TOKEN=<token>` in its environment runs (a zombie has none).
fn instance_process_alive(token: &str) -> bool {
    let marker = format!("DORY_TOKEN={token}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read(e.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
    })
}

#[test]
fn a_node_cut_off_from_the_network_fails_over_after_the_lease_and_its_instance_is_fenced() {
    let Some(counter) = counter_bin() else { return };
    let Some(ns) = NetNs::create() else { return };
    let (edge, cloud) = ("edge-1", "cloud-1");
    let nodes = [
        NodeSpec {
            id: edge,
            site: "edge",
        },
        NodeSpec {
            id: cloud,
            site: "cloud",
        },
    ];
    let id = "sensor";
    let processors = counter_entry(id, "edge", &counter, CHECKPOINT_MS, STEP_MS, "");
    // A stabilisation period longer than the test: no planned move back to the healed edge.
    let settings = [
        ("lease", "2s"),
        ("lease_margin", "500ms"),
        ("node_lost_grace", "3s"),
        ("stabilisation", "5m"),
    ];
    let ports = std::cell::Cell::new((0, 0));
    let Some(mut cluster) = Cluster::build_on(
        Backends::PostgresRabbitmq,
        &nodes,
        &settings,
        &processors,
        |node, urls| {
            if node != edge {
                return String::new();
            }
            let urls = urls.expect("service URLs");
            let (store, pg) = via(&urls.store, ns.host_ip);
            let (publisher, amqp) = via(&urls.publisher, ns.host_ip);
            ports.set((pg, amqp));
            format!(
                "exec_prefix = [\"ip\", \"netns\", \"exec\", {:?}]\nstore_url = {store:?}\npublisher_url = {publisher:?}\nreach_host = \"{}\"\n",
                ns.name, ns.ns_ip
            )
        },
    ) else {
        return;
    };
    let (pg, amqp) = ports.get();
    for port in [pg, amqp] {
        let listener = cluster
            .runtime
            .block_on(TcpListener::bind((ns.host_ip, port)))
            .unwrap_or_else(|e| panic!("listen on {}:{port}: {e}", ns.host_ip));
        cluster.runtime.spawn(forward(
            listener,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ));
    }

    cluster.start_orchestrator();
    let on_edge = cluster.wait_for("running on the edge", Duration::from_secs(20), |s| {
        all_running(s, &[id]) && s[id].node.as_ref().is_some_and(|n| n.as_str() == edge)
    });
    let old = on_edge[id].epoch.unwrap().0;
    // The orchestrator reaches it inside the namespace, and it publishes from there.
    cluster.wait_until("output from the edge", Duration::from_secs(10), || {
        (cluster.received(id).len() > 2 * (CHECKPOINT_MS / STEP_MS) as usize).then_some(())
    });

    // Cut: the link goes, and the node is seen not ready (as a cluster's node controller
    // would see a node that stopped answering).
    let cut_at = now_ms();
    ns.set_link(false);
    cluster.dory_ok(&["node", "partition", edge]);
    let lease_end = cluster
        .ownership(id)
        .and_then(|o| o.lease_expires)
        .expect("a leased owner")
        .0;
    let at_cut = cluster
        .received(id)
        .iter()
        .filter(|r| r.message.epoch.0 == old && r.at_ms <= cut_at)
        .map(|r| r.message.sequence.0)
        .max()
        .expect("output before the cut");

    let on_cloud = cluster.wait_for("failed over to the cloud", Duration::from_secs(20), |s| {
        all_running(s, &[id])
            && s[id].node.as_ref().is_some_and(|n| n.as_str() == cloud)
            && s[id].epoch.is_some_and(|e| e.0 > old)
    });
    let new = on_cloud[id].epoch.unwrap().0;
    let started = cluster
        .instance_started_at(id, new)
        .expect("the replacement's record");
    // Nothing arrives from the cut-off instance while the link is down (1 s of slack for
    // what was on its way at the cut).
    let received = cluster.received(id);
    let late: Vec<&Received> = received
        .iter()
        .filter(|r| r.message.epoch.0 == old && r.at_ms > cut_at + 1000)
        .collect();
    assert!(
        late.is_empty(),
        "the cut-off instance was heard through a link that is down: {late:?}"
    );
    // The replacement starts only once the old owner's lease (and margin) is over, in the
    // store's clock (Postgres on this machine) and in the placement's.
    assert!(
        started >= cut_at + LEASE_MS && started >= lease_end + MARGIN_MS,
        "replacement {new} started at {started}: {} ms after the cut, {} ms after the lease ran to {lease_end}\n{}",
        started.saturating_sub(cut_at),
        started as i64 - lease_end as i64,
        cluster.logs()
    );
    eprintln!(
        "cut at {cut_at}; the lease ran to +{} ms; the replacement started at +{} ms",
        lease_end as i64 - cut_at as i64,
        started - cut_at
    );
    let report = on_cloud[id]
        .last_failover
        .clone()
        .expect("a failover report");
    assert_eq!(report.lost_epoch.map(|e| e.0), Some(old), "{report:?}");

    // Heal: the old instance finds itself fenced (or is terminated) and goes.
    cluster.wait_until(
        "the replacement to count on",
        Duration::from_secs(10),
        || {
            cluster
                .received(id)
                .iter()
                .any(|r| r.message.epoch.0 == new)
                .then_some(())
        },
    );
    let healed_at = now_ms();
    ns.set_link(true);
    cluster.dory_ok(&["node", "heal", edge]);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            cluster
                .dir
                .path()
                .join(format!("state/instances/{id}-{old}/instance.json")),
        )
        .expect("the old instance's record"),
    )
    .expect("record json");
    let token = record["token"].as_str().expect("token").to_string();
    let exit_file = cluster
        .dir
        .path()
        .join(format!("state/instances/{id}-{old}/exit"));
    // Its fate, read while its directory is there (the orchestrator forgets it once ended).
    let mut fate = String::new();
    cluster.wait_until(
        "the old instance to be gone, the replacement alone and owning",
        Duration::from_secs(15),
        || {
            if let Ok(text) = std::fs::read_to_string(&exit_file) {
                fate = text;
            }
            let alive = cluster.alive_instances();
            let owner = cluster.ownership(id).and_then(|o| o.owner).map(|e| e.0);
            (alive.get(id).map(Vec::as_slice) == Some(&[(new, cloud.to_string())][..])
                && owner == Some(new)
                && !instance_process_alive(&token))
            .then_some(())
        },
    );
    let gone_at = now_ms();
    eprintln!(
        "old instance {old} gone {} ms after the heal; its fate: {fate}",
        gone_at - healed_at
    );

    // Let the replacement count on, then check the whole output.
    std::thread::sleep(Duration::from_millis(CHECKPOINT_MS));
    let received = cluster.received(id);
    let old_last = received
        .iter()
        .filter(|r| r.message.epoch.0 == old)
        .map(|r| r.message.sequence.0)
        .max()
        .unwrap_or(0);
    // What the old instance sent while cut off arrives, if at all, only with the link back.
    let old_late: Vec<(u64, u64)> = received
        .iter()
        .filter(|r| r.message.epoch.0 == old && r.at_ms > cut_at + 1000)
        .map(|r| (r.message.sequence.0, r.at_ms.saturating_sub(healed_at)))
        .collect();
    let first_new = received
        .iter()
        .filter(|r| r.message.epoch.0 == new)
        .map(|r| r.message.sequence.0)
        .min()
        .expect("the replacement's output");
    let restored = first_new - 1;
    eprintln!(
        "cut at #{at_cut}, the old instance reached #{old_last} (after the heal: {old_late:?}), the replacement restored #{restored}"
    );
    // It stopped within the lease: at its cadence, what it counted past the cut is less than
    // a lease's worth, and no more than one checkpoint interval past its last stored
    // checkpoint (the one the replacement restored), since it cannot publish further
    // without storing one.
    assert!(
        (old_last - at_cut) * STEP_MS < LEASE_MS,
        "the cut-off instance counted {} past the cut",
        old_last - at_cut
    );
    let bound = CHECKPOINT_MS / STEP_MS + LOSS_MARGIN_STEPS;
    assert!(
        old_last <= restored + bound,
        "the cut-off instance reached #{old_last}, {} past its stored checkpoint #{restored} (at most {bound})",
        old_last - restored
    );
    // Nothing from it once it was gone.
    assert!(
        old_late
            .iter()
            .all(|(_, after)| *after <= gone_at - healed_at),
        "{old_late:?}"
    );

    // After the deduplication rule (by sequence, the higher epoch wins): no gap, each payload
    // its count, and the replacement the only writer from where it restored.
    let mut by_sequence: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
    for r in &received {
        let m = &r.message;
        let keep = by_sequence
            .get(&m.sequence.0)
            .is_none_or(|(epoch, _)| *epoch < m.epoch.0);
        if keep {
            by_sequence.insert(m.sequence.0, (m.epoch.0, m.payload.clone()));
        }
    }
    let last = by_sequence.keys().last().copied().unwrap_or(0);
    assert!(last > old_last, "the replacement counted on: {last}");
    for seq in 1..=last {
        let (epoch, payload) = by_sequence
            .get(&seq)
            .unwrap_or_else(|| panic!("#{seq} missing after the deduplication rule"));
        assert_eq!(String::from_utf8_lossy(payload), seq.to_string(), "#{seq}");
        let expected = if seq <= restored { old } else { new };
        assert_eq!(*epoch, expected, "#{seq}");
    }
    let status = cluster.status();
    assert_eq!(status[id].epoch.map(|e| e.0), Some(new), "{:?}", status[id]);
}
