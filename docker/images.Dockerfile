# syntax=docker/dockerfile:1
# The stack's images, built from source: the ONLINE path, for people with a registry.
#
#   docker build -f docker/images.Dockerfile --target swarm-registrator  -t <you>/swarm-registrator .
#   docker build -f docker/images.Dockerfile --target replset-reconciler -t <you>/replset-reconciler .
#   docker build -f docker/images.Dockerfile --target replset-demo-app   -t <you>/replset-demo-app .
#   docker build -f docker/images.Dockerfile --target mongo-sim          -t <you>/mongo-sim .
#   docker build -f docker/images.Dockerfile --target etcd               -t <you>/etcd .
#
# Run from the repository root (the build context). One builder stage compiles every binary,
# so building the targets one after another compiles once. The final images are FROM scratch:
# one static binary each, plus /etc/nsswitch.conf ("hosts: files dns") so that glibc resolves
# swarm names (`etcd`, `tasks.mongo`) from the /etc/hosts and /etc/resolv.conf Docker mounts.
#
# This file needs base images from a registry, so it cannot be built on machines that cannot
# pull (this project's test machines): there, scripts/images builds the same images from
# binaries compiled on the host. Keep the two in step. It needs BuildKit (the default from
# Docker 23; DOCKER_BUILDKIT=1 before) for the cache mounts and for
# docker/images.Dockerfile.dockerignore, which keeps target/ and .git out of the context.

# ---------------------------------------------------------------- builder
FROM rust:1-bookworm AS build
# etcd-client compiles its protobufs at build time; busybox-static gives mongo-sim its /bin/sh.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler busybox-static \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A static glibc binary (crt-static) runs in an empty image.
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
        -p swarm-registrator -p replset-reconciler -p replset-demo-app -p replset-sim \
 && mkdir -p /out \
 && cp target/x86_64-unknown-linux-gnu/release/swarm-registrator \
       target/x86_64-unknown-linux-gnu/release/replset-reconciler \
       target/x86_64-unknown-linux-gnu/release/replset-demo-app \
       target/x86_64-unknown-linux-gnu/release/replset-sim /out/
# The small rootfs every image shares.
RUN mkdir -p /rootfs/etc /rootfs/tmp \
 && chmod 1777 /rootfs/tmp \
 && printf 'hosts: files dns\nnetworks: files\n' > /rootfs/etc/nsswitch.conf \
 && printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\nmongodb:x:999:999:mongodb:/:/sbin/nologin\n' > /rootfs/etc/passwd \
 && printf 'root:x:0:\nnogroup:x:65534:\nmongodb:x:999:\n' > /rootfs/etc/group \
 && mkdir -p /data/db /data/configdb

# ---------------------------------------------------------------- etcd (Debian's, as scripts/images)
FROM debian:bookworm-slim AS etcd-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /etcd-root/usr/bin /etcd-root/var/lib/etcd \
 && cp /usr/bin/etcd /usr/bin/etcdctl /etcd-root/usr/bin/ \
 && for lib in $(ldd /usr/bin/etcd /usr/bin/etcdctl | grep -o '/[^ :]*' | sort -u); do \
        mkdir -p "/etcd-root$(dirname "$lib")" && cp -L "$lib" "/etcd-root$lib"; \
    done

# ---------------------------------------------------------------- final images
# NO_COLOR: plain logs for `docker service logs`. No EXPOSE for the metrics ports (off by
# default): the bridge would publish an exposed port of these services' own tasks.
FROM scratch AS swarm-registrator
COPY --from=build /rootfs/ /
COPY --from=build /out/swarm-registrator /usr/bin/swarm-registrator
ENV PATH=/usr/bin:/bin NO_COLOR=1
# Root: it reads the Docker socket.
USER 0
ENTRYPOINT ["/usr/bin/swarm-registrator"]

FROM scratch AS replset-reconciler
COPY --from=build /rootfs/ /
COPY --from=build /out/replset-reconciler /usr/bin/replset-reconciler
ENV PATH=/usr/bin:/bin NO_COLOR=1
USER 65534
ENTRYPOINT ["/usr/bin/replset-reconciler"]

FROM scratch AS replset-demo-app
COPY --from=build /rootfs/ /
COPY --from=build /out/replset-demo-app /usr/bin/replset-demo-app
ENV PATH=/usr/bin:/bin NO_COLOR=1
USER 65534
ENTRYPOINT ["/usr/bin/replset-demo-app"]
CMD ["serve"]

# The replica-set simulator as a mongod stand-in: NOT MongoDB, for tests and demos. As in the
# mongo image, the command starts with `mongod`; /data/db and /data/configdb belong to its user
# (mongodb, 999, as there),
# so that the stack's fresh named volumes there are writable. /bin/sh (busybox-static) runs the
# stack's shell-form healthcheck, MONGO_HEALTHCHECK="mongod --sim-probe --port 27017".
FROM scratch AS mongo-sim
COPY --from=build /rootfs/ /
COPY --from=build --chown=999:999 /data/ /data/
COPY --from=build /bin/busybox /bin/sh
COPY --from=build /out/replset-sim /usr/bin/mongod
ENV PATH=/usr/bin:/bin NO_COLOR=1
# The mongo image's mongodb user (999), which the stack's secrets are given to.
USER 999
EXPOSE 27017
CMD ["mongod", "--bind_ip_all", "--dbpath", "/data/db"]

FROM scratch AS etcd
COPY --from=build /rootfs/ /
COPY --from=etcd-build /etcd-root/ /
ENV PATH=/usr/bin:/bin \
    ETCDCTL_API=3 \
    ETCD_DATA_DIR=/var/lib/etcd \
    ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \
    ETCD_ADVERTISE_CLIENT_URLS=http://etcd:2379
EXPOSE 2379 2380
ENTRYPOINT ["/usr/bin/etcd"]
