#!/usr/bin/env bash
# Installs tansu 0.6.0, a Kafka-protocol broker (there is no Kafka package and no JVM Kafka here),
# into /usr/local/bin when it is missing: built from crates.io with cargo, about 10-18 minutes on
# 2 cores, once. Used by .ci/test and examples/kafka-demo.sh.
set -euo pipefail
if ! command -v tansu >/dev/null 2>&1; then
  echo "installing tansu 0.6.0 (a Kafka-protocol broker) with cargo; this takes a while, once"
  CARGO_TARGET_DIR="${TMPDIR:-/tmp}/tansu-build" cargo install tansu --version 0.6.0 --locked \
    --features dynostore --root /usr/local
  rm -rf "${TMPDIR:-/tmp}/tansu-build"
fi
