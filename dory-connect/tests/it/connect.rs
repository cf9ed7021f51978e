//! `Backends::connect` against the real servers: all three backends from one environment,
//! and a clear error naming the variable when one cannot be reached.

use std::time::Duration;

use dory_connect::{Backends, BackendsConfig, ConnectError, PublisherConfig};
use dory_core::testing::unique_name;
use dory_core::{Epoch, InstanceEnv, LaunchMode, OutputMessage, ProcessorId, Sequence};
use dory_pg::testing::TestSchema;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

const WAIT: Duration = Duration::from_secs(10);

/// A store URL in a schema of its own, or `None` after a skip line.
async fn database(test: &str) -> Option<(TestSchema, String)> {
    let schema = TestSchema::create(test, 1).await?;
    let url = &schema.config.url;
    let separator = if url.contains('?') { '&' } else { '?' };
    let store_url = format!("{url}{separator}schema={}", schema.config.schema);
    Some((schema, store_url))
}

/// The test's own broker connection with a fresh queue, or `None` after a skip line.
struct Broker {
    url: String,
    queue: String,
    connection: Connection,
    channel: Channel,
}

async fn broker(test: &str) -> Option<Broker> {
    let (url, connection, channel) = dory_amqp::testing::connect(test).await?;
    let queue = unique_name("dory-it-connect");
    // Not exclusive (the input consumes it on a connection of its own); the broker drops it
    // a minute after its last use, even when the test panics before deleting it.
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
    Some(Broker {
        url,
        queue,
        connection,
        channel,
    })
}

impl Broker {
    async fn clean_up(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

fn env(store_url: &str, publisher_url: &str, input_url: Option<String>) -> InstanceEnv {
    InstanceEnv {
        processor: ProcessorId::new("connect-it").expect("valid id"),
        epoch: Epoch(1),
        mode: LaunchMode::Restore,
        token: "t".into(),
        port: 0,
        store_url: store_url.to_string(),
        publisher_url: Some(publisher_url.to_string()),
        input_url,
        lease: Duration::from_secs(15),
        checkpoint_interval: Duration::from_secs(1),
        config: serde_json::Value::Null,
        address_file: None,
    }
}

/// `url` with `params` added to its query.
fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_store_publisher_and_input_from_the_environment() {
    let test = "connects_all_three";
    let Some((_schema, store_url)) = database("connect_all").await else {
        return;
    };
    let Some(broker) = broker(test).await else {
        return;
    };
    // The publisher sends to the broker's default exchange, which routes by queue name,
    // straight into the queue the input consumes.
    let publisher_url = with_params(
        &broker.url,
        &format!("exchange=&routing_key={}", broker.queue),
    );
    let input_url = with_params(&broker.url, &format!("queue={}&prefetch=10", broker.queue));
    let env = env(&store_url, &publisher_url, Some(input_url));
    let backends = Backends::connect(&env).await.expect("connect all three");

    let amqp = backends.publisher.amqp().expect("the RabbitMQ publisher");
    assert_eq!(amqp.config().exchange, "");
    let input = backends.input.clone().expect("an input");
    assert_eq!(input.config().prefetch, 10);
    assert_eq!(input.config().checkpoint_interval, Duration::from_secs(1));
    assert!(
        backends
            .store
            .ownership(&env.processor)
            .await
            .expect("the store answers")
            .is_none(),
        "a fresh schema holds no ownership row"
    );

    backends
        .dyn_publisher()
        .publish(OutputMessage {
            processor: env.processor.clone(),
            epoch: Epoch(1),
            sequence: Sequence(1),
            routing_key: None,
            payload: b"hello".to_vec(),
        })
        .await
        .expect("publish");
    let dyn_input = backends.dyn_input().expect("an input");
    let message = tokio::time::timeout(WAIT, dyn_input.next())
        .await
        .expect("a message within the deadline")
        .expect("read the input");
    assert_eq!(message.payload, b"hello");
    let origin = message.origin.expect("a message from a Dory publisher");
    assert_eq!(
        (origin.producer.as_str(), origin.sequence),
        ("connect-it", 1)
    );
    dyn_input
        .release(dyn_input.mark())
        .await
        .expect("release after the (pretend) checkpoint");

    backends.close().await.expect("close");
    broker.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_names_its_variable() {
    let test = "an_unreachable_backend_names_its_variable";
    // Nothing listens on port 1: refused at once.
    let env = env(
        "postgres://postgres:hunter2@127.0.0.1:1/test?schema=nowhere",
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
        None,
    );
    let e = Backends::connect(&env)
        .await
        .expect_err("no database there");
    assert!(matches!(e, ConnectError::Store { .. }), "{e}");
    let text = e.to_string();
    assert!(text.starts_with("DORY_STORE_URL: cannot connect"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // With a real store, the publisher's broker is the one that is missing.
    let Some((_schema, store_url)) = database("connect_bad_host").await else {
        return;
    };
    let env = InstanceEnv {
        store_url: store_url.clone(),
        ..env
    };
    let mut config = BackendsConfig::from_env(&env).expect("valid variables");
    let PublisherConfig::Amqp(publisher) = config.publisher else {
        panic!("an amqp:// URL is the RabbitMQ publisher");
    };
    config.publisher = PublisherConfig::Amqp(
        publisher
            .with_connect_timeout(Duration::from_secs(3))
            .with_reconnect(0, Duration::from_millis(10), Duration::from_millis(10)),
    );
    let e = config.connect().await.expect_err("no broker there");
    assert!(
        matches!(
            e,
            ConnectError::Broker {
                var: "DORY_PUBLISHER_URL",
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with("DORY_PUBLISHER_URL: cannot connect the publisher"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // A reachable broker without the queue the input names.
    let Some(broker) = broker(test).await else {
        return;
    };
    let env = InstanceEnv {
        publisher_url: Some(broker.url.clone()),
        input_url: Some(with_params(
            &broker.url,
            "queue=dory-it-connect-no-such-queue",
        )),
        ..env
    };
    let e = Backends::connect(&env).await.expect_err("no such queue");
    assert!(
        matches!(
            e,
            ConnectError::Broker {
                var: "DORY_INPUT_URL",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("no-such-queue"), "{e}");
    broker.clean_up().await;
}

/// The no-install defaults: the embedded SQLite store and the file publisher, no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_the_embedded_store_and_the_file_publisher() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("state dir").join("dory.db");
    std::fs::create_dir_all(db.parent().expect("parent")).expect("state dir");
    let out = dir.path().join("output");
    // A space in the path, percent-encoded as a URL has it.
    let store_url = format!("sqlite://{}", db.display()).replace(' ', "%20");
    let publisher_url = format!("file://{}", out.display());
    let env = env(&store_url, &publisher_url, None);
    let backends = Backends::connect(&env).await.expect("connect local files");
    assert!(backends.publisher.file().is_some(), "{backends:?}");
    assert!(db.exists(), "the database file is created");
    assert_eq!(
        backends
            .store
            .ownership(&env.processor)
            .await
            .expect("the store answers"),
        None
    );
    let message = OutputMessage {
        processor: env.processor.clone(),
        epoch: Epoch(1),
        sequence: Sequence(1),
        routing_key: None,
        payload: b"hello".to_vec(),
    };
    backends
        .dyn_publisher()
        .publish(message.clone())
        .await
        .expect("publish");
    backends.close().await.expect("close");
    let log = dory_embedded::read_output(&out, &env.processor).expect("read the output");
    assert_eq!(log.messages, vec![message]);

    // A database whose directory is missing names the variable and the path.
    let missing = dir.path().join("nowhere").join("dory.db");
    let env = InstanceEnv {
        store_url: format!("sqlite://{}", missing.display()),
        ..env
    };
    let e = Backends::connect(&env)
        .await
        .expect_err("no such directory");
    assert!(
        matches!(
            e,
            ConnectError::Local {
                var: "DORY_STORE_URL",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nowhere"), "{e}");
    let core = dory_core::Error::from(e);
    assert!(core.to_string().contains("DORY_STORE_URL"), "{core}");
}
