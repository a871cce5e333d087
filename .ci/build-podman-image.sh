#!/bin/sh
# Build the local podman image used by the executor_local container-mode tests.
#
# No container registry is reachable on the development and CI machines, so the image is built
# from Debian packages: `debootstrap --variant=minbase` into a directory, then `podman import`.
# The image holds only a minimal Debian; the tests bind-mount the host's Python virtual
# environment (with the pip-shipped tritonserver from nvidia-pytriton) into the container and
# run that real tritonserver inside it.
#
# Usage: .ci/build-podman-image.sh [--force]      (idempotent: exits at once if the image exists)
# Environment: BIOENGINE_TEST_IMAGE (default localhost/bioengine-triton-test:latest),
#              DEBIAN_SUITE (default bookworm), DEBIAN_MIRROR (default: the host's apt mirror).
set -eu

IMAGE="${BIOENGINE_TEST_IMAGE:-localhost/bioengine-triton-test:latest}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ "${1:-}" != "--force" ] && podman image exists "$IMAGE" 2>/dev/null; then
    echo "image $IMAGE already exists"
    exit 0
fi

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "installing $2 (needs apt and root)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $2 >/dev/null
}
need podman "podman runc"
need debootstrap debootstrap

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/bioengine-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT INT TERM

echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -20 "$ROOTFS.log"; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# Keep the image small: package caches and docs are not needed to run tritonserver.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc "$ROOTFS"/usr/share/man "$ROOTFS"/usr/share/locale

echo "podman import -> $IMAGE"
tar -C "$ROOTFS" -c . | podman import \
    --change 'CMD ["/bin/sh"]' \
    --message "bioengine test image: minimal Debian $SUITE" - "$IMAGE"
podman image exists "$IMAGE"
echo "built $IMAGE"
