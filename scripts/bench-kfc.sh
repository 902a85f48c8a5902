#!/usr/bin/env bash
# Benchmark (not a test): KFC's fill throughput (Kafka -> KFC -> Retina ->
# CQL store) against Retina alone on the same texts, in one run. Release
# builds; a real broker (tansu, installed once under the cache).
#   scripts/bench-kfc.sh [--misses 5000] [--workers 4] [--embed-batch 32]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export EMBARK_CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMBARK_CACHE/target}"
scripts/setup-models.sh >/dev/null
EMBARK_TANSU="$(scripts/install-tansu.sh)"
export EMBARK_TANSU
export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$EMBARK_CACHE/models}"
scripts/build-release.sh
"$CARGO_TARGET_DIR/release/kfc-fill" "$@"
