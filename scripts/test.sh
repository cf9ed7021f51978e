#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what is missing, starts the
# services that are down, then formatting, lints, unit, integration, property and doc tests,
# the simulator seeds in a release build, and the examples. Prints each phase's time.
set -euo pipefail
cd "$(dirname "$0")/.."

# One shared target directory for every build (tests, examples, benches, later the wheel),
# kept outside the checkout so a fresh clone on the same machine reuses earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dory/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export DORY_TEST_DATABASE_URL="${DORY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export DORY_TEST_AMQP_URL="${DORY_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
sim_seeds="${DORY_SIM_SEEDS:-500}"

phase_name=""
phase_start=0
total_start=$(date +%s)
phase() {
  local now; now=$(date +%s)
  if [ -n "$phase_name" ]; then
    printf '=== phase %s: %ss\n' "$phase_name" "$((now - phase_start))"
  fi
  phase_name="$1"; phase_start=$now
  if [ "$phase_name" != done ]; then printf '=== phase %s\n' "$phase_name"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 60); do
    if port_open "$port"; then return 0; fi
    sleep 1
  done
  echo "error: $what is not answering on 127.0.0.1:$port" >&2
  return 1
}

phase tools
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
for component in clippy rustfmt; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

phase services
if ! port_open 5432; then
  echo "PostgreSQL is down: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
  wait_port 5432 PostgreSQL
fi
if ! port_open 5672; then
  echo "RabbitMQ is down: starting it"
  rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ
fi

phase fmt
cargo fmt --all -- --check

phase clippy
cargo clippy --workspace --all-targets --locked -- -D warnings

phase docs
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

phase test
# The `dory` end-to-end tests run the counter example as their processor.
cargo build --locked --quiet -p dory-example-counter
export DORY_COUNTER_BIN="$CARGO_TARGET_DIR/debug/dory-example-counter"
# The simulator's seeds run below in a release build; here a handful keep the debug run quick.
DORY_SIM_SEEDS=16 cargo nextest run --workspace --locked --no-fail-fast

phase doctest
cargo test --workspace --doc --locked

phase simulator
DORY_SIM_SEEDS="$sim_seeds" cargo nextest run --release --locked -p dory-mock -E 'test(/^sim::/)'

phase examples
cargo run --locked --quiet -p dory-example-embed

phase python
# The `dory` wheel built from source into a fresh virtualenv, its stubs checked against the
# module, and the pytest suites driving real Python and Rust processor processes.
bash dory-python/scripts/test-python.sh -q

phase done
printf '=== total %ss\n' "$(( $(date +%s) - total_start ))"
