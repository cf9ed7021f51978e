//! RabbitMQ backends for Dory: confirmed publisher with backpressure, input consumer (being written).
