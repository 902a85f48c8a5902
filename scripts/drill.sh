#!/usr/bin/env bash
# The fault drill (not a unit test): named scenarios end to end on real
# processes (tansu, the CQL test server, retina, kfc, embark serve), each
# printing misses sent, vectors filled, keys lost, duplicates embedded,
# Lookup errors, time until every service is ready again and peak RSS.
# Exits non-zero if a scenario lost a key or saw a Lookup error.
#   scripts/drill.sh [--short] [--only kfc-kill-9,poison] [--keys 400] [--outage-secs 30]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
prepare_release_stack
"$CARGO_TARGET_DIR/release/drill" "$@"
