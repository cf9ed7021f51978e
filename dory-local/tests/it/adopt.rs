//! A restarted orchestrator: a new placement on the same state directory re-adopts what runs
//! and learns what ended while it was away. Nothing is restarted, nothing is lost.

use std::time::Duration;

use dory_core::{Phase, Placement};
use rustix::process::Signal;

use crate::support::{
    REPORT_ADDRESS, Responder, Scratch, edge, ended, file, gone, instance, pid, request, running,
    spec, supervisor_pid, until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_placement_re_adopts_running_instances_and_reports_exits_that_happened_meanwhile() {
    let scratch = Scratch::new("adopt");
    let gate = scratch.dir.join("gate");
    let responder = Responder::start(1, Phase::Running).await;
    let first = scratch.open();
    let long = spec(
        "long",
        &format!("echo started; {REPORT_ADDRESS}; exec sleep 30"),
        &[("ADDR", &responder.address)],
    );
    // Exits with 7 once the gate file appears: while no placement is open.
    let short = spec(
        "short",
        "echo started; while [ ! -e \"$GATE\" ]; do sleep 0.05; done; exit 7",
        &[("GATE", &gate.display().to_string())],
    );
    let doomed_pidfile = scratch.dir.join("doomed.pid");
    let doomed = spec(
        "doomed",
        "echo started; echo $$ > \"$PIDFILE\"; exec sleep 30",
        &[("PIDFILE", &doomed_pidfile.display().to_string())],
    );
    for s in [&long, &short, &doomed] {
        first.launch(&request(s, 1, &edge())).await.unwrap();
    }
    until(&first, "long", 1, "running", |i| i.phase == Phase::Running).await;
    for name in ["short", "doomed"] {
        file(
            &first
                .instance_dir(&pid(name), dory_core::Epoch(1))
                .join("stdout.log"),
        )
        .await;
    }
    let long_supervisor = supervisor_pid(&first, "long", 1);
    let doomed_supervisor = supervisor_pid(&first, "doomed", 1);
    let doomed_program: u32 = file(&doomed_pidfile).await.trim().parse().unwrap();
    drop(first);

    // While no orchestrator runs: one instance exits, another loses its supervisor.
    std::fs::write(&gate, b"").unwrap();
    let short_exit = first_exit(&scratch, "short").await;
    assert!(short_exit.contains("\"code\":7"), "{short_exit}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(doomed_supervisor as i32).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let second = scratch.open();
    let all = second.instances().await.unwrap();
    let names: Vec<_> = all.iter().map(|i| i.processor.as_str()).collect();
    assert_eq!(names, ["doomed", "long", "short"], "sorted, all found");
    // The first look already asked the running one for its health.
    let long_now = instance(&second, "long", 1).await.unwrap();
    assert_eq!(long_now.phase, Phase::Running);
    assert_eq!(
        long_now.endpoint.map(|e| e.address),
        Some(responder.address.clone())
    );
    assert_eq!(supervisor_pid(&second, "long", 1), long_supervisor);
    assert!(
        running(long_supervisor),
        "the instance outlived its orchestrator"
    );
    assert_eq!(ended(&second, "short", 1).await, Phase::Exited { code: 7 });
    match ended(&second, "doomed", 1).await {
        Phase::Failed { reason } => assert!(reason.contains("supervisor"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // What its supervisor left running is killed: a failed instance is gone.
    assert!(
        gone(doomed_program).await,
        "the unsupervised program was killed"
    );
    // Nothing was started again.
    for name in ["long", "short", "doomed"] {
        let log = std::fs::read_to_string(
            second
                .instance_dir(&pid(name), dory_core::Epoch(1))
                .join("stdout.log"),
        )
        .unwrap();
        assert_eq!(log.matches("started").count(), 1, "{name}: {log}");
    }

    // The adopted instance is managed like one of its own.
    second
        .terminate(&pid("long"), dory_core::Epoch(1), Duration::from_secs(5))
        .await
        .unwrap();
    // `exec sleep` dies of the forwarded SIGTERM.
    assert_eq!(ended(&second, "long", 1).await, Phase::Exited { code: 143 });
}

/// Waits for an instance's exit file with no placement open.
async fn first_exit(scratch: &Scratch, name: &str) -> String {
    file(&scratch.state_dir().join(format!("instances/{name}-1/exit"))).await
}

/// An orchestrator killed between starting an instance's supervisor and recording its pid
/// leaves a record without one. The next placement finds the supervisor by the instance's
/// token and adopts it, rather than declaring the instance failed while it runs on unseen,
/// out of reach of terminate and of a node kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_interrupted_before_its_supervisor_was_recorded_is_adopted() {
    let scratch = Scratch::new("interrupted");
    let pidfile = scratch.dir.join("program.pid");
    let first = scratch.open();
    let s = spec(
        "cut",
        "echo started; echo $$ > \"$PIDFILE\"; exec sleep 30",
        &[("PIDFILE", &pidfile.display().to_string())],
    );
    first.launch(&request(&s, 1, &edge())).await.unwrap();
    let program: u32 = file(&pidfile).await.trim().parse().unwrap();
    let supervisor = supervisor_pid(&first, "cut", 1);
    drop(first);
    // The record as the killed launcher left it: written before the supervisor started.
    let dir = scratch.state_dir().join("instances/cut-1");
    let path = dir.join("instance.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["supervisor"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    let second = scratch.open();
    let adopted = instance(&second, "cut", 1).await.unwrap();
    assert!(!adopted.phase.is_gone(), "{adopted:?}");
    assert_eq!(supervisor_pid(&second, "cut", 1), supervisor);

    // A node kill reaches it like any other instance.
    dory_local::LocalNodes::new(scratch.state_dir())
        .kill_node(&edge())
        .unwrap();
    match ended(&second, "cut", 1).await {
        Phase::Failed { reason } => assert!(reason.contains("killed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gone(program).await, "the program was killed with its node");
    assert!(
        gone(supervisor).await,
        "the supervisor was killed with its node"
    );
}
