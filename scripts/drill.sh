#!/usr/bin/env bash
# The fault drill (not a unit test): named scenarios end to end on real
# processes (tansu, the CQL test server, retina, kfc, embark serve), each
# printing misses sent, vectors filled, keys lost, duplicates embedded,
# Lookup errors, time until every service is ready again and peak RSS.
# Exits non-zero if a scenario lost a key or saw a Lookup error.
#   scripts/drill.sh [--short] [--only kfc-kill-9,poison] [--keys 400] [--outage-secs 30]
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
"$CARGO_TARGET_DIR/release/drill" "$@"
