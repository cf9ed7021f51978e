//! `DORY_ADDRESS_FILE`: the runtime reports the port it bound, for placements that start
//! instances on port 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dory_core::{Input, InstanceControl, LaunchMode, Phase, Publisher, StateStore};
use dory_runtime::{Runtime, RuntimeError, Settings};
use tokio::sync::Notify;

use crate::support::{Counter, World, instance_at};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dory-runtime-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn bind(
    world: &World,
    env: dory_core::InstanceEnv,
) -> Result<Runtime<Counter>, RuntimeError> {
    let store: Arc<dyn StateStore> = Arc::new(world.store.clone());
    let publisher: Arc<dyn Publisher> = Arc::new(world.publisher.clone());
    let counter = Counter {
        stuck: Arc::new(AtomicBool::new(false)),
        release: Arc::new(Notify::new()),
    };
    Runtime::bind(
        env,
        counter,
        store,
        publisher,
        None::<Arc<dyn Input>>,
        Settings::default().with_bind_host("127.0.0.1"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_address_is_written_before_the_instance_runs() {
    let world = World::new("reported").await;
    let epoch = world.claim(false).await;
    let dir = scratch("reported");
    let file = dir.join("address");
    let mut env = world.env(epoch, LaunchMode::Standby);
    env.address_file = Some(file.clone());
    assert_eq!(env.port, 0, "the test binds a free port");

    let runtime = bind(&world, env).await.unwrap();
    let bound = runtime.local_addr();
    assert_ne!(bound.port(), 0);
    // Written at bind, before anything runs: a placement may poll it at once.
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, bound.to_string());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["address"], "no temporary file is left behind");

    // The address written is the one that answers.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run_until(async move {
        let _ = stopped.await;
    }));
    let instance = instance_at(&world, epoch, written);
    world.until_phase(&instance, Phase::Standby).await;
    assert_eq!(world.control.health(&instance).await.unwrap().epoch, epoch);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_address_file_stops_the_start_naming_the_file() {
    let world = World::new("unwritable").await;
    let epoch = world.claim(false).await;
    let dir = scratch("unwritable");
    let file = dir.join("missing-dir").join("address");
    let mut env = world.env(epoch, LaunchMode::Standby);
    env.address_file = Some(file.clone());
    let err = match bind(&world, env).await {
        Ok(_) => panic!("binding succeeds although the address cannot be reported"),
        Err(e) => e,
    };
    assert!(matches!(err, RuntimeError::AddressFile { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
