# The Tern image: the `tern` binary on a minimal base (glibc and libgcc, nothing else), run as
# a non-root user (65532). The binary is built first and copied in, so the workspace is not
# compiled twice:
#
#   cargo build --release
#   docker build -t tern .
#
# On a machine without a registry, make a base from this machine's own libraries first and
# pass it in (this is what the tests do):
#
#   deploy/docker/base-image.sh target/release/tern tern-base:local
#   docker build --build-arg BASE=tern-base:local -t tern .
#
# Running it needs io_uring allowed and a memlock limit (docs/operations.md):
#   docker run --security-opt seccomp=deploy/docker/seccomp.json --ulimit memlock=-1:-1 tern
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
ARG BINARY=target/release/tern
COPY ${BINARY} /usr/local/bin/tern
COPY --chown=65532:65532 deploy/docker/var-lib-tern/ /var/lib/tern/
USER 65532:65532
ENV TERN_LISTEN=0.0.0.0:7070 \
    TERN_ADMIN_LISTEN=0.0.0.0:9644 \
    TERN_DATA_DIR=/var/lib/tern/data
EXPOSE 7070 9644
VOLUME ["/var/lib/tern"]
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/tern", "probe", "readyz"]
ENTRYPOINT ["/usr/local/bin/tern"]
CMD ["serve"]
