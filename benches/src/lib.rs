//! Shared helpers for Dory benchmarks.
