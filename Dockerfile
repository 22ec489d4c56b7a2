# syntax=docker/dockerfile:1
# metadata-service image: a static-ish Rust binary on distroless (glibc, CA
# certificates, no shell, uid 65532). Build from the repository root:
#   docker build -t ghcr.io/example/metadata-service:0.1.0 \
#     --build-arg METADATA_GIT_REVISION="$(git rev-parse --short=12 HEAD)" .
# The proto files are compiled by protox in build.rs: no protoc needed.

# Keep at or above rust-version in Cargo.toml (.ci/check-helm checks it).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Only what the build reads; tests/, fuzz/ and docs stay out of the context's
# cache key so that editing them does not rebuild the binary.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# The workspace's other member: cargo reads its manifest and targets to
# load the workspace, though this build compiles none of it.
COPY bench ./bench
# .git stays out of the context (.dockerignore), so build.rs cannot ask git
# which commit this is: `--version` and metadata_build_info say "unknown"
# unless the build argument names it.
ARG METADATA_GIT_REVISION=""
# Cache mounts keep the crate registry and incremental target/ between
# builds (BuildKit); the binary is copied out of the cached target/.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin metadata-service \
    && install -D -m 0755 target/release/metadata-service /out/metadata-service

# Same Debian release as the builder (glibc), nothing but the C runtime.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/metadata-service /usr/local/bin/metadata-service
# The binary defaults to loopback; in a container listen on all interfaces.
# 50051: gRPC; 9090: plain HTTP /metrics, /healthz and /readyz (also the
# probes when gRPC uses TLS; METADATA_METRICS_LISTEN=off turns it off).
ENV METADATA_LISTEN=0.0.0.0:50051 \
    METADATA_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 50051 9090
# distroless "nonroot", numerically: Kubernetes runAsNonRoot can only verify a
# numeric user (the Helm chart runs as 65532 too).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/metadata-service"]
CMD ["serve"]
