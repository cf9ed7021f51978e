# The `dory` binary (crate dory-cli): the orchestrator daemon and the operator commands.
#
#   docker build -f docker/orchestrator.Dockerfile -t dory:0.1.0 .
#
# Built from the repository root (the whole workspace is the build context; .dockerignore
# leaves out target/ and .git). Not built on the machine this was written on: see
# examples/kubernetes/README.md.

# Debian 12 (bookworm) in both stages, so the binary links against the glibc it runs with.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock. Every C dependency (SQLite, zstd,
# ring) is built from source with the image's gcc; TLS is rustls, so no OpenSSL.
RUN cargo build --release --locked -p dory-cli \
 && cp target/release/dory /usr/local/bin/dory

# glibc and libgcc (which Rust binaries need) plus CA certificates, no shell; runs as the
# `nonroot` user (65532), as examples/kubernetes/orchestrator.yaml expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/dory /usr/local/bin/dory
USER 65532:65532
# /healthz, /metrics and /status (`[orchestrator] listen`).
EXPOSE 9180
ENTRYPOINT ["/usr/local/bin/dory"]
CMD ["orchestrator", "--config", "/etc/dory/dory.toml"]
