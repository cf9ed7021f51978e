#!/usr/bin/env bash
# Runs the backend fault tests over and over: the killed config listener, two competing
# writers, two competing orchestrators, and the broker closing every connection or
# restarting under a publisher and a consumer. Each runs COUNT times (default 20), with the
# services required (CI=true), so a flaky fault path shows up before it lands.
#
#   bash scripts/fault-loop.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-20}"
export CI=true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dory/target}"

filter='test(=config::a_killed_listener_reconnects_and_nudges)'
filter+=' | test(=store::two_concurrent_writers_only_the_owner_writes)'
filter+=' | test(=leadership::a_terminated_leader_is_replaced_and_its_late_writes_refused)'
filter+=' | test(/^orchestrators::/)'
filter+=' | test(/^faults::/)'

started=$(date +%s)
cargo nextest run -p dory-pg -p dory-amqp --stress-count "$count" -E "$filter"
echo "fault loop: every fault test passed $count times in $(( $(date +%s) - started ))s"
