#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (model weights, grpcurl, the Python venvs, promtool, the tansu broker)
# into ~/.cache/embark (and Debian's Chromium, system-wide, its packages
# cached there), checks formatting and lints, builds the binaries and runs
# every test: the Rust ones, then the Python client package's (pytest).
#
# Build output goes to $CARGO_TARGET_DIR (default ~/.cache/embark/target) so a
# rerun, or a fresh clone, reuses it.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# No incremental caches: a CI build from scratch gains nothing from them,
# and they grow the build cache by gigabytes per run.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n== %s\n' "$*"; }

step "setup: model weights, grpcurl, Python client, schemathesis, Chromium, Kafka broker (tansu)"
scripts/setup-models.sh
# A team's own model, served by configuration only (tests/tests/own_model.rs).
scripts/setup-example-model.sh
# ONNX Runtime for the ONNX engine (the library PyPI's wheel ships).
EMBARK_ONNXRUNTIME_LIB="$(scripts/setup-onnxruntime.sh)"
export EMBARK_ONNXRUNTIME_LIB
scripts/install-grpcurl.sh >/dev/null
examples/python/setup.sh >/dev/null
# schemathesis checks the REST API against its OpenAPI document (tests/tests/rest.rs).
EMBARK_SCHEMATHESIS="$(scripts/install-schemathesis.sh)"
export EMBARK_SCHEMATHESIS
# The web console is tested in a real browser (tests/tests/console.rs).
EMBARK_CHROMIUM="$(scripts/install-chromium.sh)"
export EMBARK_CHROMIUM
# tansu builds from source once (~10 min on 2 cores, its own target dir):
# let it run beside the lints and the build, and wait for it before the tests.
tansu_out="$(mktemp)"
tansu_log="$(mktemp)"
scripts/install-tansu.sh >"$tansu_out" 2>"$tansu_log" &
tansu_pid=$!
trap 'kill "$tansu_pid" 2>/dev/null || true' EXIT

step "format"
cargo fmt --all --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (binaries and tests, one feature set, so the tests reuse it)"
cargo build --workspace --all-targets --locked

step "docker-compose.yml (no Docker engine here: schema, scaling rules, flags)"
scripts/check-compose.sh "$CARGO_TARGET_DIR/debug"

step "monitoring: alert rules, their unit tests and the dashboard's queries (promtool)"
# The metric names themselves are checked against live scrapes by
# tests/tests/monitoring.rs, below.
scripts/check-monitoring.sh --static

step "Kafka broker for the tests (tansu)"
if ! wait "$tansu_pid"; then
  cat "$tansu_log" >&2
  echo "installing tansu failed" >&2
  exit 1
fi
EMBARK_TANSU="$(cat "$tansu_out")"
export EMBARK_TANSU
echo "$EMBARK_TANSU"
rm -f "$tansu_out" "$tansu_log"

step "tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

step "Python client package (clients/python) against a live embark up"
pylog="$(mktemp)"
trap 'rm -f "$log" "$pylog"' EXIT
EMBARK_BIN_DIR="$CARGO_TARGET_DIR/debug" clients/python/test.sh -q 2>&1 | tee "$pylog"
pystatus=${PIPESTATUS[0]}

step "the ranker example (examples/ranker): a CTR model on EmbArk's vectors, AUC with and without"
EMBARK_BIN_DIR="$CARGO_TARGET_DIR/debug" examples/ranker/test.sh -q 2>&1 | tee -a "$pylog"
rankerstatus=${PIPESTATUS[0]}
if [ "$pystatus" -eq 0 ]; then pystatus=$rankerstatus; fi
set -e
# --no-fail-fast: one flaky binary must not hide the others' results.
# One closing line for the whole run (cargo prints one per test binary,
# the last of which is often an empty doc-test run; pytest one summary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     /^=* *[0-9]+ (passed|failed)/ || /^[0-9]+ (passed|failed)/ {
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log" "$pylog"
if [ "$status" -eq 0 ]; then status=$pystatus; fi
exit "$status"
