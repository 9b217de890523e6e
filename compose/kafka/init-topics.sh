#!/usr/bin/env bash
# One-shot: waits for the broker and creates the topics gridwatch and the simulator use.
# Runs in the apache/kafka image (compose service `init-topics`); idempotent (--if-not-exists),
# so it is safe on every `docker compose up`.
set -euo pipefail

bootstrap="${BOOTSTRAP:-kafka:9092}"
topics_sh=/opt/kafka/bin/kafka-topics.sh

echo "init-topics: waiting for $bootstrap"
for attempt in $(seq 1 60); do
  if "$topics_sh" --bootstrap-server "$bootstrap" --list >/dev/null 2>&1; then
    break
  fi
  if [ "$attempt" -eq 60 ]; then
    echo "init-topics: $bootstrap did not answer within 120 s" >&2
    exit 1
  fi
  sleep 2
done

# create NAME PARTITIONS [--config KEY=VALUE ...]
create() {
  local name="$1" partitions="$2"
  shift 2
  "$topics_sh" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$name" --partitions "$partitions" --replication-factor 1 "$@"
}

# Readings (ReadingBatch, keyed by cell): one consumer-group partition per cell is ideal.
create readings 6
# Spatial-node records keyed by node id; every gridwatch instance folds the whole topic.
create spatial-nodes 1 --config cleanup.policy=compact
# AnomalyEvent records keyed by cell.
create anomalies 6
# Dead letters, with gridwatch.reason and gridwatch.source.* headers.
create gridwatch-dlq 1
# The judge's per-cell state keyed by cell ([detect.changelog]); every instance reads all of it.
create gridwatch-judge-state 1 --config cleanup.policy=compact

# --topic is a regular expression when describing.
"$topics_sh" --bootstrap-server "$bootstrap" --describe \
  --topic 'readings|spatial-nodes|anomalies|gridwatch-dlq|gridwatch-judge-state' | grep -E '^Topic:' || true
echo "init-topics: done"
