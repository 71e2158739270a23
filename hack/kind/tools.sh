#!/usr/bin/env bash
# Builds the Go tools of the kind e2e from their modules into a cache keyed by
# version, and prints the bin directory: kind itself, and what goes into the
# node image besides the Kubernetes binaries (containerd, coredns,
# local-path-provisioner) plus pause, compiled from the C source in the
# k8s.io/kubernetes module. No registry is involved, only the Go module proxy.
# `tools.sh kind` builds kind alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/kind/versions.sh
. "$here/versions.sh"
cache=${SPRITE_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sprite-operator}
bin="$cache/kind-$KIND_VERSION/bin"
mkdir -p "$bin"
export GOTOOLCHAIN=local CGO_ENABLED=0
log() { printf '[kind-tools] %s\n' "$*" >&2; }

install() { # binary name to check, then go install arguments
  local name=$1 start
  shift
  [ -x "$bin/$name" ] && return 0
  start=$(date +%s)
  log "go install $*"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "$@"
  log "$name built in $(( $(date +%s) - start ))s"
}

install kind "sigs.k8s.io/kind@$KIND_VERSION"
# `tools.sh kind`: only kind, for a published node image (KIND_NODE_IMAGE).
[ "${1:-}" = kind ] && { echo "$bin"; exit 0; }
# The build tags are those of kind's base image; containerd's own Makefile
# would also set its version through ldflags, which `containerd --version`
# then prints (cosmetic; the image tag says which version this is).
for c in containerd ctr containerd-shim-runc-v2; do
  install "$c" -tags "no_aufs no_zfs no_btrfs no_devmapper" \
    "github.com/containerd/containerd/v2/cmd/$c@$CONTAINERD_VERSION"
done
install coredns "github.com/coredns/coredns@$COREDNS_VERSION"
install local-path-provisioner "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION"

if [ ! -x "$bin/pause" ]; then
  src=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  log "gcc -static pause.c (k8s.io/kubernetes@v$K8S_VERSION)"
  gcc -Os -static -DVERSION="v$K8S_VERSION" -o "$bin/pause" "$src/build/pause/linux/pause.c"
  strip "$bin/pause"
fi
echo "$bin"
