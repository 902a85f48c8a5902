#!/usr/bin/env bash
# Benchmark (not a test): EfficientNet-Lite0 images/s on candle vs eager
# PyTorch on CPU, same weights, same machine, same run. Installs torch into
# a venv under the cache on first use (large: PyPI's Linux wheel).
#   scripts/bench-retina.sh [--batches 1,8,16,32] [--seconds 5] [--threads 2]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
scripts/setup-models.sh
VENV="$EMBARK_CACHE/venv-torch"
if ! "$VENV/bin/python" -c 'import torch, numpy, PIL' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch 'numpy==2.*' 'pillow==11.*'
fi
scripts/build-release.sh
TORCH_PYTHON="$VENV/bin/python" "$CARGO_TARGET_DIR/release/retina-images" "$@"
