# Sourced by the scripts (not run): the project root as the working
# directory, and where its caches and build output live, defined once.
# shellcheck shell=bash
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export EMBARK_CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$EMBARK_CACHE/target}"

# Weights, the Kafka broker (tansu) and every release binary: what the
# programs that start the whole distributed stack need (benchmarks, drill).
prepare_release_stack() {
  scripts/setup-models.sh >/dev/null
  EMBARK_TANSU="$(scripts/install-tansu.sh)"
  export EMBARK_TANSU
  export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$EMBARK_CACHE/models}"
  scripts/build-release.sh
}
