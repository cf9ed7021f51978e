//! `dory-supervise --dir <instance dir> -- <program> [args...]`: runs one local instance in its
//! own session and records its exit status (see `dory_local::supervise`).

fn main() -> std::process::ExitCode {
    dory_local::supervise(std::env::args_os().skip(1))
}
