//! Integration tests of `dory-control`: the real router on a loopback port, with a fake
//! instance behind it, driven by the real `HttpControl`.

mod auth;
mod failures;
mod limits;
mod roundtrip;
mod support;
