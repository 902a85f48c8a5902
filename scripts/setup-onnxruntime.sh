#!/usr/bin/env bash
# Installs ONNX Runtime for the ONNX engine (catalogue entries with
# `engine = "onnx"`, docs/models.md): the shared library PyPI's onnxruntime
# wheel ships, checked against a pinned SHA-256 and kept in the cache,
# where `--onnxruntime-lib` looks by default. Prints its path. Idempotent;
# nothing is fetched at build or run time.
#
#   EMBARK_CACHE   cache root (default ~/.cache/embark)
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
PYTHON="${PYTHON:-python3}"
WHEELS="$CACHE/wheels"
DIR="$CACHE/onnxruntime"
LIB="$DIR/libonnxruntime.so"
VERSION=1.32.0
WHEEL=onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
MEMBER=onnxruntime/capi/libonnxruntime.so.1.32.0
LIB_SHA=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f

if [ -f "$LIB" ] && [ "$(sha256sum "$LIB" | cut -d' ' -f1)" = "$LIB_SHA" ]; then
  echo "$LIB"
  exit 0
fi
echo "installing ONNX Runtime $VERSION into $DIR (once)" >&2
mkdir -p "$WHEELS" "$DIR"
# The wheel for this machine's platform, whatever the local Python is.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_x86_64 --dest "$WHEELS" "onnxruntime==$VERSION" >&2
if [ "$(sha256sum "$WHEELS/$WHEEL" | cut -d' ' -f1)" != "$WHEEL_SHA" ]; then
  echo "$WHEEL: unexpected sha256" >&2
  exit 1
fi
"$PYTHON" "$(dirname "$0")/wheel_member.py" "$WHEELS/$WHEEL" "$MEMBER" "$LIB_SHA" "$LIB.part"
mv "$LIB.part" "$LIB"
echo "$LIB"
