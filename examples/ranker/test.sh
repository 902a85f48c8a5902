#!/usr/bin/env bash
# Runs the ranker example's test (test_ranker.py) against a live `embark up`
# (the debug binary), in the Python client package's cached venv. Arguments
# go to pytest; pytest's exit status is this script's.
#
#   EMBARK_BIN_DIR     where `embark` is (default: $CARGO_TARGET_DIR/debug,
#                      else ${EMBARK_CACHE:-~/.cache/embark}/target/debug)
#   EMBARK_MODELS_DIR  the weights (default: $EMBARK_CACHE/models)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"

# The client package's script owns its venv: it creates it and reinstalls
# the package when its sources changed. Collecting its tests (no server is
# started) is enough to bring the venv up to date.
"$root/clients/python/test.sh" --collect-only -q >/dev/null

if [ -z "${EMBARK_BIN_DIR:-}" ]; then
  EMBARK_BIN_DIR="${CARGO_TARGET_DIR:-$CACHE/target}/debug"
fi
export EMBARK_BIN_DIR
export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$CACHE/models}"
cd "$here"
# Nothing written into the checkout: no .pytest_cache/, no __pycache__/.
export PYTHONDONTWRITEBYTECODE=1
exec "$CACHE/venv-client-pkg/bin/python" -m pytest -p no:cacheprovider "$@" test_ranker.py
