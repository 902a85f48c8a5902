#!/usr/bin/env bash
# Runs EmbArk on one machine: fetches the model weights (once), builds the
# release binary and starts `embark up` in the foreground (Ctrl-C stops it).
# Extra arguments go to `embark up` (see `embark up --help`).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
scripts/setup-models.sh
scripts/build-release.sh
exec "$CARGO_TARGET_DIR/release/embark" up "$@"
