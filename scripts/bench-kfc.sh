#!/usr/bin/env bash
# Benchmark (not a test): KFC's fill throughput (Kafka -> KFC -> Retina ->
# CQL store) against Retina alone on the same texts, in one run. Release
# builds; a real broker (tansu, installed once under the cache).
#   scripts/bench-kfc.sh [--misses 5000] [--workers 4] [--embed-batch 32]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
prepare_release_stack
"$CARGO_TARGET_DIR/release/kfc-fill" "$@"
