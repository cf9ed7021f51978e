//! Terminate with a grace period, then kill; forget.

use std::time::{Duration, Instant};

use dory_core::{Epoch, Error, Phase, Placement};

use crate::support::{
    Scratch, edge, ended, file, gone, instance, pid, request, running, spec, until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_asks_first_and_kills_after_the_grace_period() {
    let scratch = Scratch::new("terminate");
    let placement = scratch.open();
    let pidfile = scratch.dir.join("stubborn.pid");
    // One stops when asked; the other ignores SIGTERM (and so do its children).
    let polite = spec(
        "polite",
        "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done",
        &[],
    );
    let stubborn = spec(
        "stubborn",
        "trap '' TERM; echo $$ > \"$PIDFILE\"; while :; do sleep 0.05; done",
        &[("PIDFILE", &pidfile.display().to_string())],
    );
    placement
        .launch(&request(&polite, 1, &edge()))
        .await
        .unwrap();
    placement
        .launch(&request(&stubborn, 1, &edge()))
        .await
        .unwrap();
    let program: u32 = file(&pidfile).await.trim().parse().unwrap();
    file(
        &placement
            .instance_dir(&pid("polite"), Epoch(1))
            .join("stdout.log"),
    )
    .await;

    placement
        .terminate(&pid("polite"), Epoch(1), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        ended(&placement, "polite", 1).await,
        Phase::Exited { code: 0 }
    );
    let log = std::fs::read_to_string(
        placement
            .instance_dir(&pid("polite"), Epoch(1))
            .join("stdout.log"),
    )
    .unwrap();
    assert!(log.contains("bye"), "the program got SIGTERM: {log}");

    let grace = Duration::from_millis(600);
    let asked = Instant::now();
    placement
        .terminate(&pid("stubborn"), Epoch(1), grace)
        .await
        .unwrap();
    assert_eq!(
        instance(&placement, "stubborn", 1).await.unwrap().phase,
        Phase::Terminating
    );
    // Idempotent, and a longer grace does not postpone the kill.
    placement
        .terminate(&pid("stubborn"), Epoch(1), Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(running(program), "still within the grace period");
    assert_eq!(
        instance(&placement, "stubborn", 1).await.unwrap().phase,
        Phase::Terminating
    );
    assert_eq!(
        ended(&placement, "stubborn", 1).await,
        Phase::Exited { code: 137 }
    );
    assert!(asked.elapsed() >= grace);
    assert!(gone(program).await, "the whole process group was killed");
    // Terminating an ended instance is fine; an unknown one is not found.
    placement
        .terminate(&pid("stubborn"), Epoch(1), grace)
        .await
        .unwrap();
    let err = placement
        .terminate(&pid("stubborn"), Epoch(9), grace)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_removes_only_ended_instances() {
    let scratch = Scratch::new("forget");
    let placement = scratch.open();
    placement
        .launch(&request(&spec("alive", "exec sleep 30", &[]), 1, &edge()))
        .await
        .unwrap();
    placement
        .launch(&request(&spec("done", "exit 0", &[]), 1, &edge()))
        .await
        .unwrap();
    ended(&placement, "done", 1).await;
    let err = placement.forget(&pid("alive"), Epoch(1)).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    placement.forget(&pid("done"), Epoch(1)).await.unwrap();
    assert!(!placement.instance_dir(&pid("done"), Epoch(1)).exists());
    assert!(instance(&placement, "done", 1).await.is_none());
    // Idempotent.
    placement.forget(&pid("done"), Epoch(1)).await.unwrap();
    placement
        .terminate(&pid("alive"), Epoch(1), Duration::ZERO)
        .await
        .unwrap();
    until(&placement, "alive", 1, "killed at once", |i| {
        i.phase.is_gone()
    })
    .await;
}
