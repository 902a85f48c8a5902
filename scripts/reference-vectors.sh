#!/usr/bin/env bash
# Regenerates the committed reference vectors (tests/fixtures/*_reference.json)
# with independent Python implementations, in a venv cached outside the checkout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
VENV="$CACHE/venv-reference"
"$here/setup-models.sh"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet numpy==2.*
fi
"$VENV/bin/python" "$here/reference_minilm.py"
"$VENV/bin/pip" install --quiet 'numpy==2.*' 'pillow==11.*'
"$VENV/bin/python" "$here/make_image_fixtures.py"
"$VENV/bin/python" "$here/reference_efficientnet.py"
