#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (libFuzzer), each for a fixed time, and reports what they
# found:
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]    SECONDS per target, default 300; default all targets
#
#   reading_datum      plain `Reading` datum: schema::fast::read_reading never panics and agrees
#                      with apache-avro (Codec + Reading::from_value) whenever apache-avro accepts
#   batch_datum        the same for `ReadingBatch` (schema::fast::read_batch, batch_from_value)
#   confluent_framing  Confluent-framed payloads through decode::Decoder, both payload kinds,
#                      direct and resolving schema ids: errors are fine, panics are not
#   node_record        spatial-node records (key, payload, tombstone) through registry::Registry
#
# Installs cargo-fuzz when missing (needs the nightly toolchain: `rustup toolchain install
# nightly`). Each target keeps its corpus in fuzz/corpus/TARGET (seeded, when empty, with a few
# valid datums written below), crashes go to fuzz/artifacts/TARGET/, and the libFuzzer output to
# fuzz/artifacts/logs/TARGET.log. Reproduce a crash with
# `cargo +nightly fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...`, minimise it
# with `cargo +nightly fuzz tmin --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...`.
#
# `--sanitizer none`: the default AddressSanitizer build fails. cc-rs passes -fsanitize=address on
# to the C code it compiles (zstd-sys), and librdkafka's configure script (rdkafka-sys, a
# dependency of gridwatch) then cannot link its libzstd check without the ASan runtime. The
# decoders under test are safe Rust, so the targets look for panics, failed assertions and
# differential mismatches; debug assertions and overflow checks stay on, as cargo-fuzz sets them.
#
# Builds and runs at low priority (nice 15, one build job) into fuzz/target, apart from the main
# build. The first build takes several minutes (librdkafka).
# Exit status: 0 when no target found anything, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${1:-300}"
shift || true
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=(reading_datum batch_datum confluent_framing node_record)
fi
if ! [[ $SECONDS_PER_TARGET =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi

export CARGO_TARGET_DIR="$ROOT/fuzz/target"
export CARGO_BUILD_JOBS=1
FUZZ_FLAGS=(--sanitizer none)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz."
    nice -n 15 cargo install cargo-fuzz --locked -j 1
fi

# Writes the bytes given as hex to a file.
seed() {
    local file="$1" hex="$2"
    # shellcheck disable=SC2059 # the format is the escaped bytes themselves
    printf "$(sed 's/../\\x&/g' <<<"$hex")" >"$file"
}

# A few valid datums, hand-encoded (Avro binary), so that libFuzzer starts past the framing.
# READING: node_id "n1", event_time 1000, values {current: 1.5, t: 61.5}, sequence 3.
READING=046e31d00f040e63757272656e74000000000000f83f02740000000000c04e40000206
# READING_NULL: node_id "n2", event_time 0, values {}, sequence null.
READING_NULL=046e32000000
# READING_V0: the version without `sequence`: node_id "n1", event_time 1000, {current: 1.5}.
READING_V0=046e31d00f020e63757272656e74000000000000f83f00
BATCH="04${READING}${READING_NULL}00"
# NODE_COORDS: node_id "p1" at (34.05, -118.25), kind "pump", channel current [A].
NODE_COORDS=047031026666666666064140020000000000905dc00000000870756d70020e63757272656e74024100
# NODE_CELL: node_id "p2", cell_id "line-1", kind "motor", no channels.
NODE_CELL=04703200000000020c6c696e652d310a6d6f746f7200

seed_corpus() {
    local target="$1" dir="$2"
    case "$target" in
        reading_datum)
            seed "$dir/seed-reading" "$READING"
            seed "$dir/seed-reading-null" "$READING_NULL"
            ;;
        batch_datum)
            seed "$dir/seed-batch" "$BATCH"
            seed "$dir/seed-batch-empty" 00
            ;;
        confluent_framing)
            seed "$dir/seed-id1-reading" "0000000001${READING}"
            seed "$dir/seed-id2-batch" "0000000002${BATCH}"
            seed "$dir/seed-id3-reading-v0" "0000000003${READING_V0}"
            ;;
        node_record)
            # First byte: key length (0xff: no key), then the key, then the payload.
            seed "$dir/seed-coords" "027031${NODE_COORDS}"
            seed "$dir/seed-cell" "027032${NODE_CELL}"
            seed "$dir/seed-no-key" "ff${NODE_CELL}"
            ;;
    esac
}

cd "$ROOT/fuzz"
echo "Building the fuzz targets."
nice -n 15 cargo +nightly fuzz build "${FUZZ_FLAGS[@]}"

mkdir -p artifacts/logs
found=0
summary=()
for target in "${TARGETS[@]}"; do
    corpus="corpus/$target"
    mkdir -p "$corpus" "artifacts/$target"
    if [[ -z "$(ls -A "$corpus")" ]]; then
        seed_corpus "$target" "$corpus"
    fi
    before="$(find "artifacts/$target" -type f | wc -l)"
    log="artifacts/logs/$target.log"
    echo "Fuzzing $target for ${SECONDS_PER_TARGET}s (log: fuzz/$log)."
    status=0
    nice -n 15 cargo +nightly fuzz run "${FUZZ_FLAGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    time_s="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    new=$(($(find "artifacts/$target" -type f | wc -l) - before))
    if [[ $status -ne 0 || $new -gt 0 ]]; then
        found=1
        result="FOUND: exit status $status, $new new file(s) in fuzz/artifacts/$target/"
        grep -m 3 -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | sed 's/^/    /' || true
    else
        result="nothing found"
    fi
    summary+=("$(printf '%-18s %12s execs  %5ss  %s' "$target" "${execs:-?}" "${time_s:-?}" "$result")")
done

echo
printf '%s\n' "${summary[@]}"
exit "$found"
