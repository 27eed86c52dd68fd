#!/usr/bin/env bash
# The payments demo on Kafka: installs the tansu broker if missing (.ci/install-tansu.sh), starts
# one on a free 127.0.0.1 port (in memory), runs `payments-demo --broker kafka` against it with
# the local PostgreSQL, and stops it. Exit status: the demo's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tansu.sh
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ --silent >/dev/null 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
DEMO_KAFKA="127.0.0.1:$port" cargo run -q -p tidings-examples --features kafka --bin payments-demo -- --broker kafka
