//! Integration tests of `dory-runtime`: real runtimes on loopback ports, driven by the real
//! `HttpControl` client, over dory-mock's in-memory store and publisher.

mod address;
mod lifecycle;
mod limits;
mod precopy;
mod safety;
mod support;
