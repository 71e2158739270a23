#!/usr/bin/env bash
# Builds the operator or the simulator image from local parts only, with
# Dockerfile.local and the legacy builder: the Debian base images come from
# hack/image-base.sh (debootstrap, built once and kept by the daemon), the
# binary is the debug build (decision 14), the sim's wheelhouse comes from
# hack/python-env.sh. Nothing is pulled.
#
#   hack/image.sh operator sprite-operator:dev
#   hack/image.sh sim sprite-operator-sim:dev
# Env: IMAGE_BASE, IMAGE_BASE_SIM (default: the images hack/image-base.sh makes).
set -euo pipefail
which=${1:?usage: $0 operator|sim TAG}
tag=${2:?usage: $0 operator|sim TAG}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
base=${IMAGE_BASE:-sprite-operator-base:bookworm}
base_sim=${IMAGE_BASE_SIM:-sprite-operator-base-sim:bookworm}
log() { printf '[image] %s\n' "$*" >&2; }
docker info >/dev/null 2>&1 ||
  { log "no Docker daemon reachable; start one with: eval \"\$(hack/kind/dockerd.sh start)\""; exit 1; }

ensure_base() { # image, hack/image-base.sh argument
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  [[ $1 == sprite-operator-base* ]] || { log "base image $1 is missing"; exit 1; }
  log "building base image $1 (debootstrap, about a minute)"
  hack/image-base.sh "$2" >/dev/null
}
ensure_base "$base" operator
[ "$which" = sim ] && ensure_base "$base_sim" sim

cargo build --quiet --bin sprite-operator
ctx="target/image-context/$which"
rm -rf "$ctx" && mkdir -p "$ctx"
cp target/debug/sprite-operator Dockerfile.local "$ctx/"
if [ "$which" = sim ]; then
  eval "$(hack/python-env.sh)"
  cp -r "$WHEELHOUSE" "$ctx/wheelhouse"
fi
case $which in
  operator | sim) ;;
  *) log "unknown image $which (operator or sim)"; exit 2 ;;
esac
# Classic builder: no BuildKit here (Debian's docker.io has no buildx).
DOCKER_BUILDKIT=0 docker build -q -f "$ctx/Dockerfile.local" --target "$which" \
  --build-arg IMAGE_BASE="$base" --build-arg IMAGE_BASE_SIM="$base_sim" -t "$tag" "$ctx" >/dev/null
log "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
