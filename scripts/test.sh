#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (model weights, grpcurl, a Python client venv, the tansu broker) into ~/.cache/embark, checks
# formatting and lints, builds the binaries and runs every test.
#
# Build output goes to $CARGO_TARGET_DIR (default ~/.cache/embark/target) so a
# rerun, or a fresh clone, reuses it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export EMBARK_CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMBARK_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "setup: model weights, grpcurl, Python client, Kafka broker (tansu)"
scripts/setup-models.sh
scripts/install-grpcurl.sh >/dev/null
examples/python/setup.sh >/dev/null
EMBARK_TANSU="$(scripts/install-tansu.sh)"
export EMBARK_TANSU

step "format"
cargo fmt --all --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (binaries and tests, one feature set, so the tests reuse it)"
cargo build --workspace --all-targets --locked

step "docker-compose.yml (no Docker engine here: schema, scaling rules, flags)"
scripts/check-compose.sh "$CARGO_TARGET_DIR/debug"

step "tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary,
# the last of which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
