#!/usr/bin/env bash
# Builds the base images of Dockerfile.local without any container registry:
# a Debian rootfs from debootstrap (packages from the Debian mirror, the only
# network access), imported into docker.
#   sprite-operator-base:bookworm      minbase + ca-certificates (controller, relay)
#   sprite-operator-base-sim:bookworm  the above + python3, python3-venv (sim)
# Needs root, debootstrap (apt-get install debootstrap) and a running dockerd.
# Usage: hack/image-base.sh [operator|sim|all]   (default: all)
# Env: SUITE (bookworm), MIRROR (http://deb.debian.org/debian), TAG_PREFIX.
set -euo pipefail
which=${1:-all}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
prefix=${TAG_PREFIX:-sprite-operator-base}
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

build() { # tag, extra packages (comma-separated)
  local tag=$1 include=$2
  # Global (not local): the EXIT trap runs after this function has returned.
  root=$(mktemp -d)
  # Runs on exit or failure of this function's shell only (subshell below).
  trap 'rm -rf "$root"' EXIT
  echo "[image-base] debootstrap $suite -> $tag" >&2
  debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  # The image's non-root user (uid/gid 65532, like distroless' nonroot), the
  # simulator's mount point and data dir, and no apt lists or caches.
  chroot "$root" groupadd -g 65532 nonroot
  chroot "$root" useradd -K UID_MAX=65535 -K GID_MAX=65535 -u 65532 -g 65532 -d /home/nonroot -m -s /usr/sbin/nologin nonroot
  mkdir -p "$root/workspace" "$root/var/lib/sprite-sim"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >&2
  echo "$tag"
}

case $which in
  operator) (build "$prefix:$suite" ca-certificates) ;;
  sim) (build "$prefix-sim:$suite" ca-certificates,python3,python3-venv) ;;
  all)
    (build "$prefix:$suite" ca-certificates)
    (build "$prefix-sim:$suite" ca-certificates,python3,python3-venv)
    ;;
  *) echo "usage: $0 [operator|sim|all]" >&2; exit 2 ;;
esac
