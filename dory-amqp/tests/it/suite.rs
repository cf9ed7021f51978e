//! The shared publisher behaviour suite, read back from a bound queue.

use dory_amqp::AmqpPublisher;
use lapin::ExchangeKind;
use tokio::sync::Mutex;

use crate::broker::{QueueLog, broker};

#[tokio::test]
async fn publisher_suite() {
    let Some(broker) = broker("publisher_suite").await else {
        return;
    };
    // A fanout exchange hands every routing key to the one queue the log reads.
    let exchange = broker.exchange("suite", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange).with_routing_key("default"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let log = QueueLog {
        broker: &broker,
        queue,
        seen: Mutex::new(Vec::new()),
    };
    dory_core::testing::publisher_suite(&publisher, &log).await;
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}
