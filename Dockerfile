# sprite-operator images, for machines that can pull from a registry.
# (Without registry access use Dockerfile.local and `make image`, see
# docs/deploy.md.)
#
#   docker build -t sprite-operator:0.1.0 .                  # controller + relay
#   docker build -t sprite-operator-sim:0.1.0 --target sim .  # the simulator
#
# Only classic Dockerfile syntax (no BuildKit mounts or COPY --chmod), so that
# the legacy builder builds it too.
#
# Stages:
#   build     compiles one static binary for x86_64-unknown-linux-musl (ring's
#             C code needs musl-gcc, hence musl-tools)
#   operator  (default) distroless/static: CA certificates, /etc/passwd with
#             the nonroot user, nothing else; runs as uid 65532
#   wheels    downloads the wheelhouse of the runtime's requirements with the
#             same Python the sim stage runs (decision 15)
#   sim       the simulator: the same binary plus python3, venv and the
#             wheelhouse, because the simulated VMs really run the runtime's
#             `python3 -m venv` and `pip install --no-index --find-links
#             /opt/wheelhouse`, and pods in a cluster may have no route to a
#             package index. It runs as root: each simulated VM is a mount and
#             a network namespace (the chart grants only this container
#             privileged, or SYS_ADMIN + NET_ADMIN).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS build
ENV TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$TARGET"
WORKDIR /src
# Dependencies first, in their own layer: it survives source-only changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/sim_client.rs \
 && cargo build --release --locked --target "$TARGET" \
 && rm -rf src benches
COPY src src
COPY sprite sprite
COPY benches benches
# The embedded runtime (include_dir) is read at compile time from sprite/.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target "$TARGET" --bin sprite-operator \
 && cp "target/$TARGET/release/sprite-operator" /sprite-operator \
 && /sprite-operator --version

FROM ${RUNTIME_IMAGE} AS operator
COPY --from=build /sprite-operator /usr/local/bin/sprite-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sprite-operator"]
CMD ["controller"]

FROM ${DEBIAN_IMAGE} AS wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY sprite/requirements.txt /tmp/requirements.txt
RUN python3 -m venv /tmp/venv \
 && /tmp/venv/bin/pip download --only-binary=:all: -d /opt/wheelhouse -r /tmp/requirements.txt \
 || /tmp/venv/bin/pip download -d /opt/wheelhouse -r /tmp/requirements.txt

FROM ${DEBIAN_IMAGE} AS sim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /workspace /var/lib/sprite-sim
COPY --from=wheels /opt/wheelhouse /opt/wheelhouse
COPY --from=build /sprite-operator /usr/local/bin/sprite-operator
ENTRYPOINT ["/usr/local/bin/sprite-operator"]
CMD ["sim", "--listen=0.0.0.0:7070", "--data-dir=/var/lib/sprite-sim"]

# The default target: the last stage is what `docker build .` produces, so
# name the operator image again here.
FROM operator
