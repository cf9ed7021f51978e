//! Launching: environment, logs, duplicates, exit codes, health-driven phases, sessions.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use dory_core::{Epoch, Error, Phase, Placement};
use dory_local::{InstanceRecord, ProcStat};

use crate::support::{
    REPORT_ADDRESS, Responder, Scratch, cloud, edge, ended, file, pid, request, running, spec,
    supervisor_pid, until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_gets_the_pod_environment_and_its_own_log_files() {
    let scratch = Scratch::new("env");
    let placement = scratch.open();
    let script = r#"
        echo "id=$DORY_PROCESSOR_ID epoch=$DORY_EPOCH mode=$DORY_MODE port=$DORY_PORT"
        echo "store=$DORY_STORE_URL publisher=$DORY_PUBLISHER_URL input=${DORY_INPUT_URL-unset}"
        echo "lease=$DORY_LEASE_MS interval=$DORY_CHECKPOINT_INTERVAL_MS config=$DORY_CONFIG"
        echo "extra=$EXTRA prefix=${DORY_TEST_PREFIX-none}"
        echo "token=$DORY_TOKEN"
        echo "address_file=$DORY_ADDRESS_FILE"
        echo "to stderr" >&2
    "#;
    let mut spec = spec("env-check", script, &[("EXTRA", "yes")]);
    spec.config = serde_json::json!({"k": 1});
    let launched = placement
        .launch(&request(&spec, 4, &cloud()))
        .await
        .unwrap();
    assert_eq!(launched.phase, Phase::Starting);
    assert_eq!(launched.node, cloud());
    assert_eq!(launched.revision, spec.revision());
    assert_eq!(
        ended(&placement, "env-check", 4).await,
        Phase::Exited { code: 0 }
    );

    let dir = placement.instance_dir(&pid("env-check"), Epoch(4));
    assert_eq!(dir, scratch.state_dir().join("instances/env-check-4"));
    let stdout = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
    let record = InstanceRecord::load(&dir).unwrap();
    for line in [
        "id=env-check epoch=4 mode=standby port=0",
        "store=sqlite:///nowhere.db publisher=file:///nowhere input=unset",
        r#"lease=1500 interval=10000 config={"k":1}"#,
        // The node's exec prefix ran in front of the command.
        "extra=yes prefix=cloud",
        &format!("token={}", record.token),
        &format!("address_file={}", dir.join("address").display()),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} not in {stdout}"
        );
    }
    assert_eq!(record.token.len(), 32);
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(stderr.contains("to stderr"), "{stderr}");
    let exit = std::fs::read_to_string(dir.join("exit")).unwrap();
    assert!(exit.contains(r#""status":"exited""#), "{exit}");

    // The registry holds the token: only its owner may read it.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("instance.json")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    // The record's Debug output does not show the token.
    assert!(!format!("{record:?}").contains(&record.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_launch_conflicts_and_starts_nothing() {
    let scratch = Scratch::new("duplicate");
    let placement = scratch.open();
    let spec = spec("dup", "echo started; exec sleep 30", &[]);
    placement.launch(&request(&spec, 1, &edge())).await.unwrap();
    let dir = placement.instance_dir(&pid("dup"), Epoch(1));
    file(&dir.join("stdout.log")).await;
    let first = supervisor_pid(&placement, "dup", 1);

    let err = placement
        .launch(&request(&spec, 1, &cloud()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert!(err.to_string().contains("dup"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        supervisor_pid(&placement, "dup", 1),
        first,
        "the record is untouched"
    );
    assert!(running(first));
    let stdout = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
    assert_eq!(stdout.lines().count(), 1, "started once: {stdout}");

    // Other refusals, each with its meaning.
    let unknown = dory_core::NodeId::new("nowhere");
    let err = placement
        .launch(&request(&spec, 2, &unknown))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(_)) && err.to_string().contains("nowhere"),
        "{err}"
    );
    let mut empty = spec.clone();
    empty.workload.command.clear();
    let err = placement
        .launch(&request(&empty, 3, &edge()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(_)) && err.to_string().contains("workload.command"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_signals_are_reported() {
    let scratch = Scratch::new("exits");
    let placement = scratch.open();
    let mut changes = placement.changes();
    placement
        .launch(&request(&spec("three", "exit 3", &[]), 1, &edge()))
        .await
        .unwrap();
    placement
        .launch(&request(&spec("killed", "kill -KILL $$", &[]), 1, &edge()))
        .await
        .unwrap();
    placement
        .launch(&request(&spec("missing", "", &[]), 1, &edge()))
        .await
        .unwrap();
    assert_eq!(
        ended(&placement, "three", 1).await,
        Phase::Exited { code: 3 }
    );
    // A signal is reported as a shell reports it: 128 + the signal.
    assert_eq!(
        ended(&placement, "killed", 1).await,
        Phase::Exited { code: 137 }
    );
    assert_eq!(
        ended(&placement, "missing", 1).await,
        Phase::Exited { code: 0 }
    );
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .expect("launches and exits nudge the subscription");

    // A program that cannot be started is a failure, with the reason.
    let mut bad = spec("no-such-program", "", &[]);
    bad.workload.command = vec!["/nonexistent/program".into()];
    placement.launch(&request(&bad, 1, &edge())).await.unwrap();
    match ended(&placement, "no-such-program", 1).await {
        Phase::Failed { reason } => assert!(reason.contains("/nonexistent/program"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_follow_the_instance_health_once_it_has_an_address() {
    let scratch = Scratch::new("health");
    let placement = scratch.open();
    let responder = Responder::start(2, Phase::Standby).await;
    let script = format!("sleep 0.3; {REPORT_ADDRESS}; exec sleep 30");
    let spec = spec("healthy", &script, &[("ADDR", &responder.address)]);
    placement.launch(&request(&spec, 2, &edge())).await.unwrap();
    // No address yet: starting, with no endpoint.
    let starting = crate::support::instance(&placement, "healthy", 2)
        .await
        .unwrap();
    assert_eq!(starting.phase, Phase::Starting);
    assert!(starting.endpoint.is_none());

    let standby = until(&placement, "healthy", 2, "standby", |i| {
        i.phase == Phase::Standby
    })
    .await;
    let endpoint = standby.endpoint.unwrap();
    assert_eq!(endpoint.address, responder.address);
    let record = InstanceRecord::load(&placement.instance_dir(&pid("healthy"), Epoch(2))).unwrap();
    assert_eq!(endpoint.token, record.token);

    let mut changes = placement.changes();
    responder.set(Phase::Running);
    tokio::time::timeout(Duration::from_secs(2), changes.changed())
        .await
        .expect("a phase change nudges");
    until(&placement, "healthy", 2, "running", |i| {
        i.phase == Phase::Running
    })
    .await;
    responder.set(Phase::Frozen);
    until(&placement, "healthy", 2, "frozen", |i| {
        i.phase == Phase::Frozen
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_runs_in_its_own_session_led_by_its_supervisor() {
    let scratch = Scratch::new("session");
    let placement = scratch.open();
    let spec = spec(
        "session",
        "echo $$ > \"$PIDFILE\"; exec sleep 30",
        &[(
            "PIDFILE",
            &scratch.dir.join("program.pid").display().to_string(),
        )],
    );
    placement.launch(&request(&spec, 1, &edge())).await.unwrap();
    let program: u32 = file(&scratch.dir.join("program.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    let supervisor = supervisor_pid(&placement, "session", 1);
    let mine = ProcStat::read(std::process::id()).unwrap().unwrap();
    let sup = ProcStat::read(supervisor).unwrap().unwrap();
    let prog = ProcStat::read(program).unwrap().unwrap();
    // The supervisor leads a new session and process group; the program is in both, so a
    // Ctrl-C at the orchestrator's terminal does not reach it and killpg reaches all of it.
    assert_eq!(sup.session, supervisor);
    assert_eq!(sup.pgrp, supervisor);
    assert_ne!(sup.session, mine.session);
    assert_eq!(prog.session, supervisor);
    assert_eq!(prog.pgrp, supervisor);
}
