#!/usr/bin/env bash
# Regenerates the committed tests/fixtures/photos/ (see make_photo_fixtures.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
VENV="${EMBARK_CACHE:-$HOME/.cache/embark}/venv-reference"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet 'numpy==2.*' 'pillow==11.*'
"$VENV/bin/python" "$here/make_photo_fixtures.py"
