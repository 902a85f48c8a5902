#!/usr/bin/env bash
# Installs the Kafka-protocol broker tansu (crates.io, with its in-memory
# storage engine) once under the cache, and prints the binary's path. The
# tests start one broker per test on a free loopback port with it.
#
# About 10 minutes on 2 cores the first time; a no-op afterwards.
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
ROOT="$CACHE/tansu-0.6.0"
if [ ! -x "$ROOT/bin/tansu" ]; then
  echo "installing tansu 0.6.0 into $ROOT (once)" >&2
  # Its own target dir so it never fights the workspace build for a lock.
  # A test broker needs no link-time optimisation: opt-level 1 without LTO
  # and with parallel codegen builds in a fraction of the time of tansu's
  # release profile and is still far faster than the tests need.
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
  CARGO_PROFILE_RELEASE_STRIP=true \
  CARGO_TARGET_DIR="$CACHE/tansu-build" cargo install tansu --locked --version 0.6.0 \
    --features dynostore --root "$ROOT" >&2
  rm -rf "$CACHE/tansu-build"
fi
echo "$ROOT/bin/tansu"
