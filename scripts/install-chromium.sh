#!/usr/bin/env bash
# Installs Debian's Chromium (for the console's browser test,
# tests/tests/console.rs) if it is not on the machine, keeping the
# downloaded packages in the cache so a reinstall does not fetch them
# again, and prints the browser's path.
set -euo pipefail
CACHE="${EMBARK_CACHE:-$HOME/.cache/embark}"
if ! command -v chromium >/dev/null 2>&1; then
  archives="$CACHE/apt-archives"
  mkdir -p "$archives/partial"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  # The package lists: fetched once per machine (a fresh one has none).
  if ! apt-cache show chromium >/dev/null 2>&1; then
    $sudo apt-get update -qq >&2
  fi
  # (The cache belongs to this user: apt downloads as it, not as _apt.)
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o Dir::Cache::archives="$archives" \
    -o APT::Sandbox::User="$(id -un)" \
    chromium fonts-dejavu-core >&2
fi
command -v chromium
