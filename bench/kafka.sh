#!/usr/bin/env bash
# The drain benchmark with its Kafka rows: installs the tansu broker if missing, starts one on a
# free 127.0.0.1 port (in memory), runs the drain part (raw PostgreSQL, null sink, NATS, and Kafka
# beside its own raw produce rate, in one run), and stops the broker. Extra arguments go to the
# bench (e.g. --json target/bench-kafka.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tansu.sh
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ --silent >/dev/null 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
cargo run --release -q -p tidings-bench --features kafka -- --only drain --kafka "127.0.0.1:$port" "$@"
