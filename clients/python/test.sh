#!/usr/bin/env bash
# Installs embark-client into a cached venv and runs its tests against a
# live `embark up` (the debug binary). Arguments go to pytest; pytest's exit
# status is this script's.
#
#   EMBARK_BIN_DIR   where `embark` is (default: $CARGO_TARGET_DIR/debug,
#                    else ${EMBARK_CACHE:-~/.cache/embark}/target/debug)
#   EMBARK_MODELS_DIR  the weights (default: $EMBARK_CACHE/models)
#
# Fast on a rerun: the package is reinstalled only when its sources changed
# (dependencies are fetched only when missing), so the tests run the
# installed package as a user gets it, never a stale copy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VENV="$CACHE/venv-client-pkg"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
# The build backend lives in the venv, so that a reinstall needs no build
# isolation (which would fetch setuptools from the index on every run);
# from 71 on it builds wheels without the `wheel` package.
if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 71)' 2>/dev/null; then
  "$PY" -m pip install --quiet 'setuptools>=71'
fi

stamp="$VENV/embark-client.sha256"
sum="$(cd "$here" && find pyproject.toml README.md src -type f ! -name '*.pyc' -print0 | sort -z |
  xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ] || ! "$PY" -c 'import embark_client, pytest, grpc_tools' 2>/dev/null; then
  # Built from a copy: setuptools would otherwise leave build/ and
  # *.egg-info/ in the checkout. Dependencies already satisfied are not
  # fetched again; only the package itself is rebuilt.
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$build/"
  "$PY" -m pip install --quiet --no-build-isolation "$build[dev]"
  echo "$sum" >"$stamp"
  rm -rf "$build"
  trap - EXIT
fi

if [ -z "${EMBARK_BIN_DIR:-}" ]; then
  EMBARK_BIN_DIR="${CARGO_TARGET_DIR:-$CACHE/target}/debug"
fi
export EMBARK_BIN_DIR
export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$CACHE/models}"
cd "$here"
# Nothing written into the checkout: no .pytest_cache/, no __pycache__/.
export PYTHONDONTWRITEBYTECODE=1
exec "$PY" -m pytest -p no:cacheprovider "$@"
