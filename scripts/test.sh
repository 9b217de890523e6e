#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: unit tests, the model-contract tests,
# the pipeline tests on librdkafka's in-process mock cluster, and the delivery scenarios on a
# real broker process (tansu, installed by scripts/install-tansu.sh; tests/broker_faults.rs
# starts and stops it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# A full disk shows up deep in the build as a linker crash; say it plainly first.
need_mib=3072
free_mib="$(df -Pm "$root" | awk 'NR == 2 { print $4 }')"
if [ "$free_mib" -lt "$need_mib" ]; then
    echo "test.sh: only ${free_mib} MiB free under $root; a test build needs about ${need_mib} MiB" >&2
    exit 1
fi
scripts/setup.sh
GRIDWATCH_TANSU="$(scripts/install-tansu.sh | tail -n 1)"
export GRIDWATCH_TANSU
# The benchmarks are not tests, but README's commands run them: build them (test profile, no
# run) so a change that breaks them fails here.
cargo test --locked --no-run --benches
cargo test --locked "$@"
