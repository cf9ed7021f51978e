//! The `dory` binary end to end: its command line, and real orchestrators moving real
//! processor processes on the embedded default.

mod cli;
mod config_changes;
mod e2e;
mod faults;
mod snapshots;
mod support;
