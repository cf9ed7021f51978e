//! Shared helpers for Dory benchmarks.

use std::future::Future;

/// Runs a benchmark that talks to a server on a two-thread tokio runtime. Its future gets
/// `full`: true under `cargo bench` (which passes `--bench`), false under
/// `cargo test --benches`, where a bench only makes a quick smoke run. A failure is printed
/// with the bench's `name` and ends the process with exit code 1.
pub fn run_server_bench<F, Fut, E>(name: &str, bench: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let full = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(bench(full)) {
        eprintln!("{name} bench failed: {e}");
        std::process::exit(1);
    }
}
