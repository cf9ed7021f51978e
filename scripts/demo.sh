#!/usr/bin/env bash
# Dory on the embedded default, end to end, on this machine: builds the `dory` binary, the
# Rust counter and the `dory` Python wheel, starts an orchestrator over three virtual nodes
# (two cloud, one edge) with a Rust and a Python processor, lets them run, drains the node
# they run on and shows them moving with their state intact and no gap in their output,
# then stops everything. It finishes by itself (in under a minute once built); Ctrl-C stops it
# early and cleans up the same way.
#
#   bash scripts/demo.sh            # keep nothing
#   DORY_DEMO_DIR=/tmp/d bash scripts/demo.sh   # keep the config, database, logs and output
#
# No PostgreSQL or RabbitMQ needed: state, status and leadership live in one SQLite file,
# output in JSON-lines files, instances are processes in sessions of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dory/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
venv="${DORY_DEMO_VENV:-$(dirname "$CARGO_TARGET_DIR")/demo-venv}"
maturin_version=1.16.0

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building dory, the Rust counter and the Python wheel (once; later runs reuse the build)"
cargo build --release --locked --quiet -p dory-cli -p dory-example-counter
if [ ! -x "$venv/bin/maturin" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin==$maturin_version"
fi
wheels=$(mktemp -d)
"$venv/bin/maturin" build --quiet --release --locked -m dory-python/Cargo.toml -o "$wheels" 2>&1 | grep -v '^📦\|^🔗\|^🐍\|^📡' || true
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheels"/dory-*.whl
rm -rf "$wheels"

dory="$CARGO_TARGET_DIR/release/dory"
counter="$CARGO_TARGET_DIR/release/dory-example-counter"
work="${DORY_DEMO_DIR:-$(mktemp -d /tmp/dory-demo.XXXXXX)}"
mkdir -p "$work"
config="$work/dory.toml"
cat >"$config" <<EOF
# The demo's config: three virtual nodes on this machine and two processors.
[orchestrator]
listen = "127.0.0.1:0"
state_dir = "state"
lease = "2s"
lease_margin = "500ms"
node_lost_grace = "5s"
stabilisation = "10s"
min_move_time = "5s"
resync_interval = "1s"
stop_grace = "10s"

[placement]
kind = "local"
[[placement.nodes]]
id = "cloud-1"
site = "cloud"
[[placement.nodes]]
id = "cloud-2"
site = "cloud"
[[placement.nodes]]
id = "edge-1"
site = "edge"

# A Rust processor: counts 1, 2, 3, ... (examples/counter).
[processors.counter]
site = "cloud"
checkpoint_interval = 1000
config = { interval_ms = 100 }
[processors.counter.workload]
command = ["$counter"]

# A Python processor: running statistics of a simulated sensor (examples/temperature).
[processors.temperature]
site = "cloud"
checkpoint_interval = 1000
config = { interval = 0.1 }
[processors.temperature.workload]
command = ["$venv/bin/python", "-m", "dory", "run", "temperature:Temperature"]
env = { PYTHONPATH = "$repo/examples/temperature" }
EOF

orchestrator_pid=""
cleanup() {
  set +e
  if [ -n "$orchestrator_pid" ]; then
    kill -TERM "$orchestrator_pid" 2>/dev/null && wait "$orchestrator_pid" 2>/dev/null
  fi
  for node in cloud-1 cloud-2 edge-1; do
    "$dory" --config "$config" node kill "$node" >/dev/null 2>&1
  done
  if [ -z "${DORY_DEMO_DIR:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting the orchestrator (log: $work/orchestrator.log)"
"$dory" --config "$config" orchestrator >"$work/orchestrator.log" 2>&1 &
orchestrator_pid=$!

running() {
  "$dory" --config "$config" status --output json 2>/dev/null |
    "$venv/bin/python" -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for p in s if p["phase"]=="running"))' 2>/dev/null || echo 0
}
for _ in $(seq 1 120); do
  [ "$(running)" = 2 ] && break
  if ! kill -0 "$orchestrator_pid" 2>/dev/null; then
    echo "the orchestrator stopped:" >&2; tail -20 "$work/orchestrator.log" >&2; exit 1
  fi
  sleep 0.5
done
if [ "$(running)" != 2 ]; then
  echo "the processors did not start within a minute:" >&2
  "$dory" --config "$config" status >&2 || true
  tail -20 "$work/orchestrator.log" >&2
  exit 1
fi
"$dory" --config "$config" status
echo
"$dory" --config "$config" nodes

say "letting them work for 3 seconds"
sleep 3
"$dory" --config "$config" output counter --tail 3
"$dory" --config "$config" output temperature --tail 3

node=$("$dory" --config "$config" status --output json |
  "$venv/bin/python" -c 'import json,sys,collections; s=json.load(sys.stdin); print(collections.Counter(p["node"] for p in s).most_common(1)[0][0])')
say "draining $node: every processor on it moves make-before-break"
"$dory" --config "$config" drain "$node" --deadline 60s

say "after the move"
sleep 2
"$dory" --config "$config" status
echo
"$dory" --config "$config" nodes

say "their output, checked: every sequence once (no gap), the state continuous"
"$dory" --config "$config" output counter --tail 3 --check
"$dory" --config "$config" output temperature --tail 3 --check
# The state, not only the output, came through the move: the counter's count and the
# sensor's step (both kept in the state) equal each message's sequence, across both epochs.
for p in counter temperature; do
  "$dory" --config "$config" output "$p" --tail 1000000 --output json |
    "$venv/bin/python" -c '
import json, sys
out = json.load(sys.stdin)
name, msgs = out["processor"], out["messages"]
def step(m):
    p = m["payload"]
    return int(p) if p.isdigit() else json.loads(p)["step"]
bad = [m for m in msgs if step(m) != m["sequence"]]
epochs = sorted({m["epoch"] for m in msgs})
if bad:
    first = bad[0]["sequence"]
    sys.exit(f"{name}: the state lost or repeated a step at sequence {first}")
print(f"{name}: the state step equals the sequence in all {len(msgs)} messages, epochs {epochs}")
'
done

say "done: stopping the orchestrator and the instances"
