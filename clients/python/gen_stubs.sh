#!/usr/bin/env bash
# Regenerates the gRPC stubs committed in src/embark_client/_pb/ from the
# contract in proto/proto/embark/v1/embark.proto.
#
# The stubs are committed rather than generated at install time so that
# `pip install ./clients/python` needs no protoc and works offline. One
# pinned grpcio-tools makes the output byte-for-byte reproducible, which is
# what tests/test_stubs.py checks. The pin is deliberately not the newest
# release: generated code requires grpcio >= the generator's version and
# protobuf >= its protoc's, so an older generator is a lower floor for users
# (pyproject.toml states that floor).
#
# Usage: PYTHON=/path/to/python gen_stubs.sh [OUT_DIR]   (default: the package)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$here/src/embark_client/_pb}"
PYTHON="${PYTHON:-python3}"
GRPCIO_TOOLS_VERSION=1.66.2

have="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [ "$have" != "$GRPCIO_TOOLS_VERSION" ]; then
  echo "gen_stubs.sh: needs grpcio-tools==$GRPCIO_TOOLS_VERSION in $PYTHON (found: ${have:-none});" \
    "run: $PYTHON -m pip install grpcio-tools==$GRPCIO_TOOLS_VERSION" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m grpc_tools.protoc -I "$root/proto/proto" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$root/proto/proto/embark/v1/embark.proto"

# protoc writes an absolute import (`from embark.v1 import embark_pb2`),
# which would need a top-level `embark` package on sys.path; inside
# embark_client the messages are a sibling module.
gen="$tmp/embark/v1"
sed 's/^from embark\.v1 import embark_pb2 as /from . import embark_pb2 as /' "$gen/embark_pb2_grpc.py" >"$tmp/grpc.py"
if grep -q '^from embark\.v1 ' "$tmp/grpc.py" || ! grep -q '^from \. import embark_pb2 as ' "$tmp/grpc.py"; then
  echo "gen_stubs.sh: the generated import of embark_pb2 changed shape; update the sed rule" >&2
  exit 1
fi
mkdir -p "$out"
cp "$gen/embark_pb2.py" "$gen/embark_pb2.pyi" "$out/"
cp "$tmp/grpc.py" "$out/embark_pb2_grpc.py"
