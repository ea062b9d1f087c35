# syntax=docker/dockerfile:1
# docker-socket-proxy, built from source: the ONLINE path, for people with a registry.
#
#   docker build -f docker/socket-proxy.Dockerfile -t <you>/docker-socket-proxy .
#
# Run from the repository root (the build context). The final image is FROM scratch: one static
# binary. It needs base images from a registry, so on machines that cannot pull (this project's
# test machines) scripts/images builds the same image, local/docker-socket-proxy, from a binary
# compiled on the host. Keep the two in step. BuildKit reads
# docker/socket-proxy.Dockerfile.dockerignore, which keeps target/ and .git out of the context.
#
# How to deploy it next to the bridge: docs/security.md, "The Docker socket".

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# A static glibc binary (crt-static) runs in an empty image.
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p docker-socket-proxy \
 && mkdir -p /out /rootfs/etc /rootfs/run/docker-socket-proxy \
 && cp target/x86_64-unknown-linux-gnu/release/docker-socket-proxy /out/ \
 && printf 'root:x:0:0:root:/:/sbin/nologin\n' > /rootfs/etc/passwd \
 && printf 'root:x:0:\n' > /rootfs/etc/group

FROM scratch AS docker-socket-proxy
COPY --from=build /rootfs/ /
COPY --from=build /out/docker-socket-proxy /usr/bin/docker-socket-proxy
ENV PATH=/usr/bin NO_COLOR=1
# Root: it opens the engine's socket (root:docker 0660), and nothing else.
USER 0
ENTRYPOINT ["/usr/bin/docker-socket-proxy"]
