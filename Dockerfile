# syntax=docker/dockerfile:1
# The `loader` CLI as a container; the default command is `loader run` (ingest + transform until
# SIGTERM, which drains gracefully). Configure it with environment variables (docs/configuration.md): DATABASE_URL, SQS_QUEUE, AWS_REGION, credentials from the task/pod role.
#
#   docker build -t loader .
#   docker run --rm -e DATABASE_URL=... -e SQS_QUEUE=... loader            # loader run
#   docker run --rm -e DATABASE_URL=... loader migrate                      # any subcommand
#
# Checked offline by scripts/check-deploy.sh (there is no Docker engine on the dev machine).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Only what the build reads: build.rs embeds sql/ and migrations/ into the binary; cargo wants
# every target the manifest names, the benchmarks' example too.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY examples ./examples
COPY sql ./sql
COPY migrations ./migrations
# Cache mounts keep the registry and compiled dependencies between builds (BuildKit); the binary
# is copied out because the target/ mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin loader && \
    install -m 0755 target/release/loader /usr/local/bin/loader

# Same Debian release as the builder, so the glibc the binary links against is there.
FROM debian:bookworm-slim
# The AWS SDK's rustls client trusts the system roots (rustls-native-certs): without
# ca-certificates every SQS call fails TLS. sqlx uses its own webpki roots (RDS: sslrootcert).
RUN apt-get update && \
    apt-get install -y --no-install-recommends ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin loader
COPY --from=build /usr/local/bin/loader /usr/local/bin/loader
# Not a terminal, so json is the default anyway; set explicitly for log shippers.
ENV LOADER_LOG_FORMAT=json
# Prometheus metrics, when LOADER_METRICS_ADDR is set: bind 0.0.0.0 inside a container (a
# loopback address there is unreachable from outside it), e.g. LOADER_METRICS_ADDR=0.0.0.0:9464.
EXPOSE 9464
# A `.env` in the working directory is read when present (mount one here if you must).
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["loader"]
CMD ["run"]
