//! Integration tests of `dory-k8s` against the fake API server.
mod kubelet;
mod lease;
mod manifests;
mod nodes;
mod placement;
mod scenarios;
mod support;
