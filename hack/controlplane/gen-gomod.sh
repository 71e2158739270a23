#!/usr/bin/env bash
# Regenerates go.mod/go.sum for a new Kubernetes release: every staging module
# that k8s.io/kubernetes replaces with ./staging/... is pinned to its published
# v0.<minor>.<patch>. Run when bumping K8S_VERSION; commit the result.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
go mod init sprite-operator.dev/hack/controlplane >/dev/null 2>&1
gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
staging="v0.${K8S_VERSION#1.}"
while IFS= read -r m; do
  go mod edit -replace="$m=$m@$staging"
done < <(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod")
p=k8s.io/kubernetes/cmd
# The control plane of the tests, and the node binaries of the kind image.
cmds=()
for c in kube-apiserver kube-controller-manager kubectl kubelet kubeadm kube-proxy kube-scheduler; do
  cmds+=("$p/$c@v$K8S_VERSION")
done
go get "${cmds[@]}"
cp go.mod go.sum "$here/"
mkdir -p "$tmp/etcd" && cd "$tmp/etcd"
go mod init sprite-operator.dev/hack/controlplane/etcd >/dev/null 2>&1
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
mkdir -p "$here/etcd" && cp go.mod go.sum "$here/etcd/"
