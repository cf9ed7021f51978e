//! Postgres backends for Dory: config source with LISTEN/NOTIFY, status, fenced state store, leadership (being written).
