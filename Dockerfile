# syntax=docker/dockerfile:1.7
# One image for the three services (embark, kfc, retina) plus a small one
# that fetches the model weights into a volume. Build: `docker compose build`.

# --- build: the three release binaries ---------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Caches keep rebuilds incremental; the binaries are copied out of the cache
# mount because it is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin embark --bin retina --bin kfc \
 && mkdir -p /out \
 && cp target/release/embark target/release/retina target/release/kfc /out/

# --- models: fetches and verifies the weights (sha256-pinned) into /models ---
FROM python:3.11-slim-bookworm AS models
COPY scripts/setup-models.sh scripts/convert_legacy_pth.py /opt/embark/scripts/
ENV EMBARK_MODELS_DIR=/models EMBARK_CACHE=/tmp/embark-cache
ENTRYPOINT ["/opt/embark/scripts/setup-models.sh"]

# --- runtime: embark, kfc and retina -----------------------------------------
FROM debian:bookworm-slim AS runtime
# curl serves the health checks; ca-certificates lets Retina fetch https URLs.
# /certs belongs to the service user, so a named volume mounted there (the
# compose `certs` volume) starts with that owner and `embark dev-certs` can
# write its keys, mode 0600, for the other services (same user) to read.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/embark --create-home embark \
 && install -d -o embark -g embark -m 0700 /certs
COPY --from=build /out/ /usr/local/bin/
USER embark
WORKDIR /var/lib/embark
ENV EMBARK_MODELS_DIR=/models \
    EMBARK_DATA_DIR=/var/lib/embark \
    EMBARK_LOG_JSON=true \
    KFC_LOG_JSON=true \
    RETINA_LOG_JSON=true
# Each service's command is set in docker-compose.yml.
CMD ["embark", "--help"]
