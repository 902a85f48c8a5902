#!/usr/bin/env bash
# Benchmark (not a test): EfficientNet-Lite0 images/s on Retina's candle
# and ONNX engines against onnxruntime (Python, graph optimisations on) and
# PyTorch (fastest of eager and BatchNorm-folded channels_last, inference
# mode) on CPU: same weights, same machine, same thread count, same run.
# Installs torch and onnxruntime into a venv under the cache on first use
# (large: PyPI's Linux torch wheel).
#   scripts/bench-retina.sh [--batches 1,16] [--seconds 5] [--threads 2]
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
scripts/setup-models.sh
scripts/setup-example-model.sh
EMBARK_ONNXRUNTIME_LIB="$(scripts/setup-onnxruntime.sh | tail -n 1)"
export EMBARK_ONNXRUNTIME_LIB
VENV="$EMBARK_CACHE/venv-torch"
if ! "$VENV/bin/python" -c 'import torch, numpy, PIL, onnxruntime' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch 'numpy==2.*' 'pillow==11.*' 'onnxruntime==1.32.0'
fi
scripts/build-release.sh
TORCH_PYTHON="$VENV/bin/python" "$CARGO_TARGET_DIR/release/retina-images" "$@"
