# The gateway as a container image (SPEC §8): a release build in a builder
# stage, then a small Debian runtime with only the binary and CA roots,
# running as a non-root user, with /routes and /data as volumes.
#
#   docker build -t cognigy-gateway .          (or: podman build …)
#   docker run --rm -v "$PWD/routes:/routes:ro" -v "$PWD/schemas:/schemas:ro" \
#     cognigy-gateway validate /routes
#
# Route files reference schemas relative to themselves (`../schemas/…`), so
# mount the schema folder beside /routes as /schemas. compose.yaml runs two
# instances on one PostgreSQL.
#
# The base images are build arguments, for a registry mirror (and for the
# test that builds this file on a machine without Docker Hub).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole crate: Cargo.toml names the bench and test targets, so their
# files must exist for cargo to read the manifest (.dockerignore keeps
# target/, .git and node_modules out).
COPY . .
# The same command as .ci/run's release step: --locked builds what Cargo.lock pins.
RUN cargo build --release --locked --bin gateway \
 && install -D -m 0755 target/release/gateway /out/gateway

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: the system roots that https downstreams are checked against
# (a private CA is added per route with `tls.ca_file`).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /routes /data \
 && chown gateway:gateway /data
COPY --from=build /out/gateway /usr/local/bin/gateway
# Settings that need a restart come from GATEWAY_* (README, "serve settings").
# The public listener on every interface; the admin listener stays on
# loopback unless GATEWAY_ADMIN_LISTEN and GATEWAY_ADMIN_TOKEN are set (as
# compose.yaml does). The SQLite store on the /data volume: one instance.
ENV GATEWAY_ROUTES=/routes \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=127.0.0.1:9090 \
    GATEWAY_STORE=sqlite:///data/gateway.db \
    GATEWAY_LOG_FORMAT=json
USER gateway:gateway
WORKDIR /data
VOLUME ["/routes", "/data"]
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["serve"]
