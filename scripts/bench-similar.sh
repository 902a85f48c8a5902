#!/usr/bin/env bash
# Benchmark (not a test): Similar's HNSW index against exact search and
# NumPy on 100k clustered vectors: recall@10, queries/s, build time, memory.
#   scripts/bench-similar.sh [--vectors 100000] [--dim 384] [--queries 1000] [--out FILE]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
# The NumPy peer runs in the Python client's venv (numpy only).
examples/python/setup.sh >/dev/null
export EMBARK_BENCH_PYTHON="${EMBARK_BENCH_PYTHON:-$EMBARK_CACHE/venv-client/bin/python}"
scripts/build-release.sh
"$CARGO_TARGET_DIR/release/similar-bench" "$@"
