#!/usr/bin/env bash
# Builds every binary of the workspace in release, with one feature set.
#
# Every script that needs release binaries (up, the benchmarks, the drill)
# calls this, so they all resolve the same dependency features: switching
# from one script to another is then a no-op instead of a relink or a
# rebuild (building only `-p embark`, or only some `--bin`s, resolves other
# features and rebuilt for minutes each way).
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
cargo build --release --locked --workspace --bins
