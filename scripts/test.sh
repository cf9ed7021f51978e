#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what is missing, starts the
# services that are down, then formatting, lints, unit and integration tests, the simulator
# seeds and the examples. Prints each phase's time.
set -euo pipefail
cd "$(dirname "$0")/.."

# One shared target directory for every build (cargo, examples, benches, the wheel), kept
# outside the checkout so a fresh clone on the same machine reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dory/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
: "${DORY_SIM_SEEDS:=500}"
export DORY_SIM_SEEDS

phase_start=0
phase() {
  local now; now=$(date +%s)
  if [ "$phase_start" -ne 0 ]; then
    printf '=== phase %s took %ss\n' "$phase_name" "$((now - phase_start))"
  fi
  phase_name="$1"; phase_start=$now
  [ "$phase_name" = done ] || printf '=== phase %s\n' "$phase_name"
}
total_start=$(date +%s)

phase tools
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

phase fmt
cargo fmt --all -- --check

phase clippy
cargo clippy --workspace --all-targets --locked -- -D warnings

phase test
cargo nextest run --workspace --locked --no-fail-fast

phase doctest
cargo test --workspace --doc --locked

phase done
printf '=== total %ss\n' "$(( $(date +%s) - total_start ))"
