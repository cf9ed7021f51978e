//! `dory-sim`: runs the deterministic simulator over seeds.
//!
//! ```text
//! dory-sim --seeds 0..500 [--jobs N] [--steps N] [--planted NAME]
//! dory-sim --seed 42 [--trace] [--planted NAME]
//! ```
//!
//! `--seeds` ends with a line `N passed, N failed`; `--seed` ends with `trace-hash: <hex>`,
//! identical on every run of that seed. A failing seed prints the command that replays it.

use std::process::ExitCode;

fn main() -> ExitCode {
    dory_mock::sim::cli::main(std::env::args().skip(1), "dory-sim")
}
