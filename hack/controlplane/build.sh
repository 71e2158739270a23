#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries used by the integration tests and
# `make demo` (kube-apiserver, kube-controller-manager, kubectl, etcd; helm on
# request) from their Go modules, into a cache keyed by version outside the
# checkout. Prints the bin directory on stdout; progress goes to stderr.
#
#   hack/controlplane/build.sh            # apiserver, controller-manager, kubectl, etcd
#   hack/controlplane/build.sh helm       # ... and helm
#   hack/controlplane/build.sh node       # ... and kubelet, kubeadm, kube-proxy,
#                                         # kube-scheduler (the kind node image)
#
# KUBEBUILDER_ASSETS pointing at a folder that already holds the binaries skips
# the build (the envtest convention).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}   # the etcd client version k8s 1.36.3 pins
HELM_VERSION=${HELM_VERSION:-v3.21.4}
here=$(cd "$(dirname "$0")" && pwd)
cache=${SPRITE_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sprite-operator}
bin="$cache/k8s-$K8S_VERSION/bin"
want_helm=false want_node=false
for arg in "$@"; do
  case $arg in
    helm) want_helm=true ;;
    node) want_node=true ;;
    *) echo "usage: $0 [helm] [node]" >&2; exit 2 ;;
  esac
done

log() { printf '[controlplane] %s\n' "$*" >&2; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && ! $want_node; then
  for b in kube-apiserver etcd; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] || { log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks $b"; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$bin"

have() { [ -x "$bin/$1" ]; }

k8s_build() { # what to say, then the commands under k8s.io/kubernetes/cmd
  local what=$1 start work minor ld
  shift
  start=$(date +%s)
  work="$cache/k8s-$K8S_VERSION/mod"
  mkdir -p "$work"
  # The committed go.mod/go.sum pin every staging module to its published
  # version; go refuses `go install` of k8s.io/kubernetes because of its
  # replace directives, so we build from a module of our own instead.
  cp "$here/go.mod" "$here/go.sum" "$work/"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ld="-s -w"
  for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $v.gitVersion=v$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
  done
  log "building $* v$K8S_VERSION ($what)"
  (cd "$work" && go build -trimpath -tags selinux,notest -ldflags "$ld" -o "$bin/" \
      "${@/#/k8s.io/kubernetes/cmd/}")
  log "$* built in $(( $(date +%s) - start ))s"
}

if ! have kube-apiserver || ! have kube-controller-manager || ! have kubectl; then
  k8s_build "cold: about 8 minutes on 2 cores" kube-apiserver kube-controller-manager kubectl
fi

if $want_node && { ! have kubelet || ! have kubeadm || ! have kube-proxy || ! have kube-scheduler; }; then
  k8s_build "about 1-2 minutes once kube-apiserver's packages are cached" kubelet kubeadm kube-proxy kube-scheduler
fi

if ! have etcd; then
  start=$(date +%s)
  work="$cache/etcd-$ETCD_VERSION/mod"
  mkdir -p "$work"
  cp "$here/etcd/go.mod" "$here/etcd/go.sum" "$work/"
  log "building etcd $ETCD_VERSION"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
  log "etcd built in $(( $(date +%s) - start ))s"
fi

if $want_helm && ! have helm; then
  start=$(date +%s)
  log "building helm $HELM_VERSION"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  log "helm built in $(( $(date +%s) - start ))s"
fi

echo "$bin"
