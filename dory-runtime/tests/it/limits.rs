//! The runtime's limits: a snapshot body over the limit, and a shutdown whose grace period
//! runs out in user code.

use std::sync::Arc;
use std::time::Duration;

use dory_core::{
    Epoch, Input, Instance, InstanceControl, LaunchMode, Phase, Publisher, StateStore,
};
use dory_runtime::{Context, Exit, Processor, Runtime, RuntimeError, Settings, StepError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{TOKEN, World, instance_at};

/// Counts, and after `stop_after` steps never returns from a step again.
struct Hangs {
    stop_after: u64,
}

#[async_trait::async_trait]
impl Processor for Hangs {
    type State = u64;

    async fn step(&mut self, count: &mut u64, _ctx: &mut Context) -> Result<(), StepError> {
        if *count >= self.stop_after {
            std::future::pending::<()>().await;
        }
        *count += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(())
    }
}

/// A running `Hangs` instance of `world`'s processor, the sender that shuts it down, and its
/// run.
struct Launched {
    instance: Instance,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Exit, RuntimeError>>,
}

async fn launch(world: &World, epoch: Epoch, mode: LaunchMode, settings: Settings) -> Launched {
    let store: Arc<dyn StateStore> = Arc::new(world.store.clone());
    let publisher: Arc<dyn Publisher> = Arc::new(world.publisher.clone());
    let runtime = Runtime::bind(
        world.env(epoch, mode),
        Hangs { stop_after: 20 },
        store,
        publisher,
        None::<Arc<dyn Input>>,
        settings.with_bind_host("127.0.0.1"),
    )
    .await
    .unwrap();
    let instance = instance_at(world, epoch, runtime.local_addr().to_string());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run_until(async move {
        let _ = stopped.await;
    }));
    Launched {
        instance,
        stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_the_body_limit_is_refused_and_the_instance_stands_by() {
    let world = World::new("limited").await;
    let _owner = world.claim(true).await;
    let epoch = world.claim(false).await;
    let Launched {
        instance,
        stop,
        task,
    } = launch(
        &world,
        epoch,
        LaunchMode::Standby,
        Settings::default().with_body_limit(1024),
    )
    .await;
    world.until_phase(&instance, Phase::Standby).await;

    let err = world
        .control
        .load(&instance, &vec![0u8; 4096])
        .await
        .expect_err("4 KiB over a 1 KiB limit");
    let text = err.to_string();
    assert!(text.contains("too_large"), "{text}");
    assert!(!text.contains(TOKEN), "the token never shows: {text}");
    let health = world.control.health(&instance).await.unwrap();
    assert_eq!(health.phase, Phase::Standby, "nothing was loaded");

    let _ = stop.send(());
    let exit = task.await.unwrap().unwrap();
    assert_eq!(
        exit,
        Exit::Saved { sequence: None },
        "a standby instance saves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stuck_in_user_code_ends_at_the_grace_period_without_saving() {
    let world = World::new("hanging").await;
    let epoch = world.claim(true).await;
    let Launched {
        instance,
        stop,
        task,
    } = launch(
        &world,
        epoch,
        LaunchMode::Restore,
        Settings::default().with_grace(Duration::from_millis(300)),
    )
    .await;
    // Twenty steps (about 40 ms), then a step that never returns: by then user code holds
    // the run loop.
    world.until_phase(&instance, Phase::Running).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed_before = world.committed();

    let started = tokio::time::Instant::now();
    let _ = stop.send(());
    let exit = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the runtime ends soon after its grace period")
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::GraceExceeded);
    assert_eq!(exit.code(), 4);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited the grace period for a safe point"
    );
    assert_eq!(
        world.committed(),
        committed_before,
        "nothing saved after the grace period"
    );
}
