//! The `dory` binary end to end: its command line, and real orchestrators moving real
//! processor processes on the embedded default and on the Postgres store with the RabbitMQ
//! publisher, one node of them cut off from the network; and the daemon and the operator
//! commands on the Kubernetes placement against an in-process fake API server.

mod cli;
mod config_changes;
mod e2e;
mod faults;
mod kubernetes;
mod partition;
mod snapshots;
mod support;
