#!/usr/bin/env bash
# Benchmark (not a test): EmbArk Lookup vs Redis MGET vs a gRPC echo vs a
# raw stream of the same bytes, over loopback TCP and a Unix socket, in one
# run; latency-vs-throughput curves and memory per cached entry; then the
# miss-to-fill latency of `embark up` next to each model's time. Installs
# Debian's redis-server and fonts-dejavu-core (for the plot) if missing.
#   scripts/bench-lookup.sh [--keys 100000] [--clients 32] [--batch 64]
#                           [--dist zipf|uniform] [--seconds 10] [--out DIR]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "installing ${need[*]} (Debian packages)" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
    || { $sudo apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
# A redis-server started by the package's service is not used: the
# benchmark starts its own on a free port and socket.
scripts/build-release.sh
scripts/setup-models.sh >/dev/null
export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$EMBARK_CACHE/models}"
"$CARGO_TARGET_DIR/release/lookup-bench" --redis-server "$(command -v redis-server)" "$@"
# Miss-to-fill on `embark up`, next to each model's own inference time.
"$CARGO_TARGET_DIR/release/miss-to-fill"
