#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), builds gridwatch in release mode and runs
# `gridwatch demo`: an embedded Kafka (librdkafka's mock cluster), a simulated plant with
# injected faults, and the detector. Extra arguments go to `gridwatch demo` (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo run --locked --release --quiet -- demo "$@"
