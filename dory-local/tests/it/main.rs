//! Integration tests of `dory-local` with real processes: small `sh` scripts as instance
//! programs, started through the real `dory-supervise` binary.

mod adopt;
mod launch;
mod nodes;
mod registry;
mod support;
mod terminate;
