#!/usr/bin/env bash
# Installs the Kafka-protocol broker tansu 0.6.0 (crates.io, with its
# in-memory storage engine) once under the cache, and prints the binary's
# path. The tests start one broker per test on a free loopback port with it.
#
# Two defects of tansu are patched first (scripts/patch-tansu.py says
# what and why): a Fetch from inside a record batch skipped the rest of
# the batch (a consumer resuming from a committed offset lost misses), and
# its answer for a topic it does not know killed librdkafka 2.12.1 clients
# (SIGSEGV). Both made our tests fail now and then for tansu's reasons.
#
# About 10 minutes on 2 cores the first time; a no-op afterwards.
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VERSION=0.6.0
ROOT="$CACHE/tansu-$VERSION-embark2"
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$ROOT/bin/tansu" ]; then
  echo "installing tansu $VERSION (patched) into $ROOT (once)" >&2
  BUILD="$CACHE/tansu-build"
  rm -rf "$BUILD"
  mkdir -p "$BUILD/fetch/src"
  # The two crates' sources, as published: a throwaway package that
  # depends on them, fetched, then their .crate archives unpacked.
  cat >"$BUILD/fetch/Cargo.toml" <<EOF
[package]
name = "fetch-tansu"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
tansu = { version = "=$VERSION", default-features = false }
tansu-storage = { version = "=$VERSION", default-features = false }
EOF
  echo 'fn main() {}' >"$BUILD/fetch/src/main.rs"
  (cd "$BUILD/fetch" && cargo fetch -q >&2)
  for crate in tansu tansu-storage; do
    archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$VERSION.crate" | head -1)"
    tar -xzf "$archive" -C "$BUILD"
  done
  python3 "$HERE/patch-tansu.py" "$BUILD/tansu-storage-$VERSION"
  printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' "$VERSION" \
    >>"$BUILD/tansu-$VERSION/Cargo.toml"
  # Built with the lock file tansu was published with (cargo only swaps
  # the patched crate's source in it). A test broker needs no link-time
  # optimisation: opt-level 1 without LTO and with parallel codegen builds
  # in a fraction of the time of tansu's release profile and is still far
  # faster than the tests need.
  (cd "$BUILD/tansu-$VERSION" &&
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=true \
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --features dynostore --bin tansu >&2)
  mkdir -p "$ROOT/bin"
  cp "$BUILD/target/release/tansu" "$ROOT/bin/tansu.tmp"
  mv "$ROOT/bin/tansu.tmp" "$ROOT/bin/tansu"
  rm -rf "$BUILD"
fi
echo "$ROOT/bin/tansu"
