//! Shared behaviour suites for backends (to be written).
