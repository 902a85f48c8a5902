#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine:
#  1. the Compose schema and references, with docker-compose (Debian's
#     package, installed here if missing): `docker-compose config -q`;
#  2. the deployment's own rules (scripts/check_compose.py): services that
#     scale have no container name and no fixed host port, every long-running
#     service has a health check, the weights come from the `models` volume;
#     only EmbArk's gRPC port is published, on 127.0.0.1 only; embark and
#     retina serve TLS with tokens (retina with client certificates), kfc
#     calls retina over TLS, and what mounts `certs` waits for it;
#  3. every flag the file passes to embark, kfc and retina is one the built
#     binaries accept (pass their directory as $1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="${1:-}"
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing docker-compose (Debian package) for the compose check" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends docker-compose >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update >/dev/null \
         && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends docker-compose >/dev/null; }
fi
cd "$root"
docker-compose -f docker-compose.yml config -q
# Debian's python3 carries PyYAML (a dependency of docker-compose).
docker-compose -f docker-compose.yml config | /usr/bin/python3 scripts/check_compose.py "$bin_dir"
