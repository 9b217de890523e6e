#!/usr/bin/env bash
# Installs tansu 0.6.0, the Apache-Kafka-compatible broker written in Rust that the delivery
# scenarios in tests/broker_faults.rs run against, when it is missing. It builds from crates.io
# with two storage engines: `dynostore` (in memory) and `libsql` (SQLite, so that a broker
# restart keeps its topics), at optimisation level 1: the tests need a correct broker, not a
# fast one. 8.5 minutes on 2 cores (the default level took 24, on cores shared with other
# builds). Once per machine; the binary goes to its own folder, away from any tansu already on
# the PATH:
#   ${GRIDWATCH_TOOLS:-$HOME/.local/share/gridwatch}/tansu-0.6.0/bin/tansu
# Prints the path of the binary on its last line.
set -euo pipefail

version="0.6.0"
root="${GRIDWATCH_TOOLS:-$HOME/.local/share/gridwatch}/tansu-$version"
bin="$root/bin/tansu"

installed() {
  [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"
}

if ! installed; then
  echo "install-tansu.sh: building tansu $version (dynostore, libsql) from crates.io into $root; about 9 minutes on 2 cores" >&2
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
    cargo install tansu --version "$version" --locked --features dynostore,libsql \
    --root "$root" --quiet >&2
fi
installed || { echo "install-tansu.sh: $bin is not tansu $version" >&2; exit 1; }
echo "$bin"
