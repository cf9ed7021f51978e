#!/usr/bin/env bash
# Tests the `dory` wheel as a user gets it: builds it from source with maturin into a fresh
# virtualenv, checks that its stubs match the module (mypy's stubtest), then runs the pytest
# suites against the real PostgreSQL and RabbitMQ: dory-python/tests (Python and Rust
# processors as real processes) and examples/wordcount/tests.
#
#   bash dory-python/scripts/test-python.sh [pytest arguments...]
#
# The virtualenv is $DORY_PYTHON_VENV (default: python-venv beside the shared cargo target
# directory), recreated on every run; the wheel is built in the release profile into that
# target directory. DORY_TEST_DATABASE_URL and DORY_TEST_AMQP_URL point the tests at other
# servers; an unreachable server skips tests, and fails them under CI=true.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dory/target}"
venv="${DORY_PYTHON_VENV:-$(dirname "$CARGO_TARGET_DIR")/python-venv}"
python="${PYTHON:-python3}"
maturin_version=1.16.0

step() { printf '=== %s\n' "$1"; }

step "virtualenv $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin==$maturin_version"

step "wheel"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --release --locked -m dory-python/Cargo.toml -o "$wheels"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheels"/dory-*.whl \
  -r dory-python/tests/requirements.txt

step "counter binary (the Rust processor, and the orchestrator's subcommands)"
cargo build --release --locked --quiet -p dory-example-counter
export DORY_COUNTER_BIN="$CARGO_TARGET_DIR/release/dory-example-counter"

step "stubtest"
# From outside the checkout, so that the installed package is checked, not the sources.
(cd "$wheels" && "$venv/bin/python" -m mypy.stubtest dory \
  --allowlist "$repo/dory-python/tests/stubtest-allowlist.txt")

step "pytest"
# Two runs, each suite with its own conftest.py on the shared fixtures; both run, and the
# script fails if either did.
status=0
"$venv/bin/python" -m pytest -p no:cacheprovider dory-python/tests "$@" || status=$?
"$venv/bin/python" -m pytest -p no:cacheprovider examples/wordcount/tests "$@" || status=$?
exit "$status"
