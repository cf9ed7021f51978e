//! Integration tests of `dory-connect` against the real Postgres and RabbitMQ (and the
//! embedded backends on temporary files), gathered into one binary (one link on a small
//! machine).
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), the broker `DORY_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). When either cannot be reached a test prints a
//! skip line and passes, except under `CI=true`, where it fails. Each test works in a schema
//! and a queue of its own.

mod connect;
