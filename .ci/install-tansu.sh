#!/usr/bin/env bash
# Installs tansu 0.6.0, a Kafka-protocol broker (there is no Kafka package and no JVM Kafka here),
# into /usr/local/bin when it is missing or was built without the storage engines the tests use:
# built from crates.io with cargo, about 10-18 minutes on 2 cores, once. Used by .ci/test and
# the Kafka scripts (examples/kafka-demo.sh, bench/kafka.sh).
#
# Storage engines: `memory://` (dynostore) and `sqlite://FILE` (libsql). Consumer groups need
# sqlite: the memory engine answers a fetch from an offset inside a stored record batch with
# the NEXT batch, skipping the rest of that batch (tansu-storage 0.6.0 dynostore.rs,
# `offsets.split_off(&offset)`), so a group resuming from a committed offset mid-batch never
# sees those records. The sqlite engine stores records one by one and keeps them across a
# broker restart.
set -euo pipefail
features=dynostore,libsql
marker=/usr/local/share/tansu/features
if ! command -v tansu >/dev/null 2>&1 || [ "$(cat "$marker" 2>/dev/null)" != "$features" ]; then
  echo "installing tansu 0.6.0 ($features; a Kafka-protocol broker) with cargo; this takes a while, once"
  CARGO_TARGET_DIR="${TMPDIR:-/tmp}/tansu-build" cargo install tansu --version 0.6.0 --locked \
    --features "$features" --root /usr/local --force
  rm -rf "${TMPDIR:-/tmp}/tansu-build"
  mkdir -p "$(dirname "$marker")"
  echo "$features" > "$marker"
fi
