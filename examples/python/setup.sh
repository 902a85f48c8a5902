#!/usr/bin/env bash
# A venv with grpcio and numpy, and Python stubs generated from the .proto
# contracts, both cached outside the checkout. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VENV="$CACHE/venv-client"
STUBS="${EMBARK_PY_STUBS:-$CACHE/py-stubs}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import grpc, grpc_tools, numpy' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'grpcio>=1.60' 'grpcio-tools>=1.60' 'numpy>=1.26'
fi
mkdir -p "$STUBS"
"$VENV/bin/python" -m grpc_tools.protoc -I "$root/proto/proto" --python_out="$STUBS" --grpc_python_out="$STUBS" \
  "$root/proto/proto/embark/v1/embark.proto" "$root/proto/proto/retina/v1/retina.proto"
touch "$STUBS/embark/__init__.py" "$STUBS/embark/v1/__init__.py" "$STUBS/retina/__init__.py" "$STUBS/retina/v1/__init__.py"
echo "$VENV/bin/python"
