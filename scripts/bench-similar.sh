#!/usr/bin/env bash
# Benchmark (not a test): Similar's graph (USearch, f32/f16/i8) against the
# hnsw_rs index it replaced, faiss-cpu's HNSW, exact search and NumPy on
# 100k clustered vectors: recall@10, queries/s, build time, memory.
#   scripts/bench-similar.sh [--vectors 100000] [--dim 384] [--queries 1000] [--out FILE]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
# The NumPy peer runs in the Python client's venv (numpy only).
examples/python/setup.sh >/dev/null
export EMBARK_BENCH_PYTHON="${EMBARK_BENCH_PYTHON:-$EMBARK_CACHE/venv-client/bin/python}"
# The faiss-cpu peer (HNSW, same M and threads) in a venv of its own, once.
FAISS_VENV="$EMBARK_CACHE/venv-faiss"
if ! "$FAISS_VENV/bin/python" -c 'import faiss, numpy' 2>/dev/null; then
  python3 -m venv "$FAISS_VENV"
  "$FAISS_VENV/bin/pip" install --quiet 'faiss-cpu==1.15.1' 'numpy>=1.26'
fi
export EMBARK_BENCH_FAISS_PYTHON="${EMBARK_BENCH_FAISS_PYTHON:-$FAISS_VENV/bin/python}"
scripts/build-release.sh
"$CARGO_TARGET_DIR/release/similar-bench" "$@"
