#!/usr/bin/env bash
# Checks the monitoring files in ops/monitoring/ (Grafana dashboard, Prometheus
# alert rules and scrape config) against Prometheus's own tools and against
# what the binaries really export:
#
#  1. promtool (from Debian's `prometheus` package, fetched with
#     `apt-get download` and unpacked into $EMBARK_CACHE/promtool once; no
#     system-wide install): `check rules` on the alert rules, `check config`
#     on prometheus.yml (which loads the rules), `test rules` on
#     embark-alerts.test.yml (the key alerts fire on synthetic failures and
#     stay silent on a healthy deployment);
#  2. the dashboard's structure (scripts/check_monitoring.py lint), and every
#     one of its queries parsed by promtool (written out as a rule file);
#  3. every metric name (and matched label) of the dashboard and the rules
#     against /metrics texts scraped from the real debug binaries after some
#     traffic: `embark up` (front, fill loop and Retina in one process, with
#     Lookups of texts and images, a 404, refused calls and a throttled
#     Invalidate) and `retina` alone (with a refused input). Both need no
#     external service. Metrics that only `kfc` or `embark serve` with Kafka
#     export, and metrics of events a healthy run does not have, are accepted
#     from the Rust source when ops/monitoring/unscraped-metrics.txt lists
#     them (the rule is in scripts/check_monitoring.py);
#     tests/tests/monitoring.rs scrapes the Kafka deployment too (broker,
#     CQL, retina, embark serve, kfc) and runs step 3 without that leeway
#     for the Kafka metrics.
#
# Usage: scripts/check-monitoring.sh [--bin-dir DIR] [--keep-scrapes DIR]
#        scripts/check-monitoring.sh --scrapes DIR [--without-kafka]
#   --bin-dir DIR       where the embark and retina binaries are
#                       (default $CARGO_TARGET_DIR/debug)
#   --keep-scrapes DIR  also keep the scraped /metrics texts in DIR
#   --scrapes DIR       check against these /metrics texts instead of
#                       starting the binaries (steps 1-2 run as well)
#   --without-kafka     with --scrapes: they come from runs without Kafka
#   --static            steps 1 and 2 only
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/common.sh"

bin_dir="$CARGO_TARGET_DIR/debug"
scrapes=""
keep=""
without_kafka=""
static=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --scrapes) scrapes="$2"; shift 2 ;;
    --keep-scrapes) keep="$2"; shift 2 ;;
    --without-kafka) without_kafka="--without-kafka"; shift ;;
    --static) static=1; shift ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

mon="$root/ops/monitoring"
step() { printf '== %s\n' "$*"; }

# ------------------------------------------------------------------ promtool
# The Debian package's promtool is a static Go binary: unpack it, cache it,
# reuse it. apt-get download needs no root; the index update (only when apt
# knows no candidate) does.
promtool_dir="$EMBARK_CACHE/promtool"
promtool="$promtool_dir/promtool"
if [ ! -x "$promtool" ]; then
  echo "fetching promtool (Debian package prometheus) into $promtool_dir" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update >/dev/null
  fi
  dl="$(mktemp -d)"
  chmod 755 "$dl" # readable by apt's sandbox user
  (cd "$dl" && apt-get download prometheus >/dev/null 2>&1) \
    || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update >/dev/null \
         && (cd "$dl" && apt-get download prometheus >/dev/null); }
  deb="$(ls "$dl"/prometheus_*.deb)"
  dpkg-deb -x "$deb" "$dl/x"
  mkdir -p "$promtool_dir"
  cp "$dl/x/usr/bin/promtool" "$promtool.partial"
  chmod 755 "$promtool.partial"
  dpkg-deb -f "$deb" Version >"$promtool_dir/VERSION"
  mv "$promtool.partial" "$promtool"
  rm -rf "$dl"
fi

step "promtool $(cat "$promtool_dir/VERSION" 2>/dev/null || echo '?'): alert rules, scrape config, rule unit tests"
"$promtool" check rules "$mon/prometheus/embark-alerts.yml"
"$promtool" check config "$mon/prometheus/prometheus.yml"
(cd "$mon/prometheus" && "$promtool" test rules embark-alerts.test.yml)

step "dashboard: structure, and every query through promtool's PromQL parser"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
python3 scripts/check_monitoring.py lint "$tmp/dashboard-queries.json"
"$promtool" check rules "$tmp/dashboard-queries.json"

if [ -n "$static" ]; then
  echo "monitoring: static checks passed"
  exit 0
fi

if [ -n "$scrapes" ]; then
  step "metric names of the dashboard and the rules against the scrapes in $scrapes"
  python3 scripts/check_monitoring.py names --scrapes "$scrapes" $without_kafka
  echo "monitoring: all checks passed"
  exit 0
fi

# ------------------------------------------------------------------ scrape
step "scrape: embark up and retina (debug binaries in $bin_dir), after some traffic"
for b in embark retina; do
  if [ ! -x "$bin_dir/$b" ]; then
    echo "$bin_dir/$b is not built: run \`cargo build --workspace --bins\` first (scripts/test.sh does)" >&2
    exit 1
  fi
done
export EMBARK_MODELS_DIR="${EMBARK_MODELS_DIR:-$EMBARK_CACHE/models}"
if [ ! -f "$EMBARK_MODELS_DIR/minilm-l6-v2/model.safetensors" ]; then
  echo "no model weights in $EMBARK_MODELS_DIR: run scripts/setup-models.sh" >&2
  exit 1
fi
grpcurl="$(scripts/install-grpcurl.sh)"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# GET url: prints the body, fails on a non-2xx answer or no answer (never
# through a proxy of the environment: the servers are on loopback).
http_get() {
  python3 -c 'import sys, urllib.request as u
sys.stdout.write(u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read().decode())' "$1"
}
wait_ready() { # NAME METRICS_ADDR PID LOG
  local deadline=$((SECONDS + 90))
  until http_get "http://$2/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$3" 2>/dev/null; then
      echo "$1 exited before it was ready; its log:" >&2
      tail -40 "$4" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "$1 not ready after 90 s; its log:" >&2
      tail -40 "$4" >&2
      exit 1
    fi
    sleep 0.2
  done
}
out="$tmp/scrapes"
mkdir -p "$out"

# Fixture images over loopback HTTP, for the image model's fetch path.
img_port="$(free_port)"
python3 -m http.server --bind 127.0.0.1 "$img_port" --directory tests/fixtures/images >"$tmp/images.log" 2>&1 &
pids+=($!)

# Tokens: `ranker` may Lookup, `ops` may also Invalidate.
"$bin_dir/embark" dev-certs --out "$tmp/certs" --token ranker=read --token ops=admin >/dev/null 2>&1
ranker="authorization: Bearer $(cat "$tmp/certs/ranker.token")"
ops="authorization: Bearer $(cat "$tmp/certs/ops.token")"

up_grpc="127.0.0.1:$(free_port)"
up_metrics="127.0.0.1:$(free_port)"
RUST_LOG=warn "$bin_dir/embark" up --listen "$up_grpc" --metrics-listen "$up_metrics" \
  --data-dir "$tmp/data" --models minilm-l6-v2,efficientnet-lite0 \
  --fetch-allow-nets 127.0.0.0/8 --auth-tokens "$tmp/certs/tokens.toml" \
  --max-batch-keys 8 --invalidate-keys-per-second 1 >"$tmp/embark.log" 2>&1 &
up_pid=$!
pids+=("$up_pid")

retina_grpc="127.0.0.1:$(free_port)"
retina_metrics="127.0.0.1:$(free_port)"
RUST_LOG=warn "$bin_dir/retina" --listen "$retina_grpc" --metrics-listen "$retina_metrics" \
  --models minilm-l6-v2 --max-input-bytes 300 >"$tmp/retina.log" 2>&1 &
retina_pid=$!
pids+=("$retina_pid")

wait_ready "embark up" "$up_metrics" "$up_pid" "$tmp/embark.log"
wait_ready retina "$retina_metrics" "$retina_pid" "$tmp/retina.log"

call() { # ADDR METHOD JSON [HEADER]: the reply on stdout, fails on an error status
  local addr="$1" method="$2" body="$3" header="${4:-}"
  if [ -n "$header" ]; then
    "$grpcurl" -plaintext -H "$header" -d "$body" "$addr" "$method"
  else
    "$grpcurl" -plaintext -d "$body" "$addr" "$method"
  fi
}
texts='{"model": "minilm-l6-v2", "keys": ["a red running shoe", "a blue running shoe", "a red running shoe"]}'
images="{\"model\": \"efficientnet-lite0\", \"keys\": [\"http://127.0.0.1:$img_port/cat.jpg\", \"http://127.0.0.1:$img_port/missing.png\"]}"

# Misses, then the fills: texts and the image to STORE, the 404 to OOV_FAILED.
call "$up_grpc" embark.v1.EmbArk/Lookup "$texts" "$ranker" >/dev/null
call "$up_grpc" embark.v1.EmbArk/Lookup "$images" "$ranker" >/dev/null
deadline=$((SECONDS + 90))
while :; do
  replies="$(call "$up_grpc" embark.v1.EmbArk/Lookup "$texts" "$ranker"; call "$up_grpc" embark.v1.EmbArk/Lookup "$images" "$ranker")"
  if ! grep -q OOV_PENDING <<<"$replies"; then
    break
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "the misses were not filled within 90 s; embark's log:" >&2
    tail -40 "$tmp/embark.log" >&2
    exit 1
  fi
  sleep 0.5
done
call "$up_grpc" embark.v1.EmbArk/Lookup "$texts" "$ranker" >/dev/null # from the tier
# Refused calls: no token (unauthenticated), Invalidate with a read token
# (permission_denied), and a second Invalidate over the burst (throttled).
refused() { # like call, but the call must fail
  if call "$@" >/dev/null 2>&1; then
    echo "expected $2 to be refused" >&2
    exit 1
  fi
}
refused "$up_grpc" embark.v1.EmbArk/Lookup "$texts"
refused "$up_grpc" embark.v1.EmbArk/Invalidate '{"model": "minilm-l6-v2", "keys": ["k"]}' "$ranker"
eight='{"model": "minilm-l6-v2", "keys": ["k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"]}'
call "$up_grpc" embark.v1.EmbArk/Invalidate "$eight" "$ops" >/dev/null
refused "$up_grpc" embark.v1.EmbArk/Invalidate "$eight" "$ops"

# Retina alone: an input it embeds and one over --max-input-bytes.
long="$(printf 'p%.0s' $(seq 400))"
call "$retina_grpc" retina.v1.Retina/Embed "{\"model\": \"minilm-l6-v2\", \"inputs\": [\"hello\", \"$long\"]}" >/dev/null

http_get "http://$up_metrics/metrics" >"$out/embark-up.prom"
http_get "http://$retina_metrics/metrics" >"$out/retina.prom"
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  cp "$out"/*.prom "$keep/"
fi
for p in "$up_pid" "$retina_pid"; do
  kill -TERM "$p"
done
for p in "$up_pid" "$retina_pid"; do
  wait "$p" || true
done

step "metric names of the dashboard and the rules against the scrapes (no Kafka here)"
python3 scripts/check_monitoring.py names --scrapes "$out" --without-kafka
echo "monitoring: all checks passed"
