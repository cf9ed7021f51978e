//! Integration tests of `dory-amqp` against a real RabbitMQ, gathered into one binary (one
//! link on a small machine), one module per area.
//!
//! The broker comes from `DORY_TEST_AMQP_URL` (default: a local RabbitMQ with the guest
//! user). Without a reachable broker a test prints a skip line and passes, unless `CI=true`,
//! where it fails: a CI run must never pass by testing nothing.

mod broker;
mod faults;
mod input;
mod node;
mod proxy;
mod publish;
mod reconnect;
mod suite;
mod tls;
mod window;
