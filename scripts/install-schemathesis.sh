#!/usr/bin/env bash
# Installs schemathesis (PyPI; it checks the REST API against its own
# OpenAPI document, property-based) once into a venv under the cache, and
# prints the path of its command. The REST test (tests/tests/rest.rs) runs
# it against a live `embark up`. A no-op afterwards.
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VERSION=4.32.5
VENV="$CACHE/venv-schemathesis"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $VERSION\$"; then
  echo "installing schemathesis $VERSION into $VENV (once)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$VERSION" >&2
fi
echo "$VENV/bin/schemathesis"
