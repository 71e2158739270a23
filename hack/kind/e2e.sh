#!/usr/bin/env bash
# The kind end-to-end test (`make e2e-kind`), fully offline:
#   Docker daemon (hack/kind/dockerd.sh) -> node image (hack/kind/node-image.sh,
#   or KIND_NODE_IMAGE) -> operator and sim images (hack/image.sh) -> kind
#   cluster -> helm install with the simulator -> tests/e2e (cargo test
#   --test e2e_kind) -> helm uninstall -> cluster deleted -> leak check.
# The cluster is deleted and a private daemon stopped also when a step fails;
# a failure first dumps the objects, the Events and the pods' logs.
#
# Env:
#   KIND_NODE_IMAGE=kindest/node:v1.36.x   use a published node image instead
#                                          of building one (needs a registry)
#   KIND_CLUSTER_NAME                      default sprite-operator-e2e
#   E2E_KEEP_CLUSTER=1                     leave the cluster for debugging
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
# shellcheck source=hack/kind/versions.sh
. "$here/versions.sh"
cluster=${KIND_CLUSTER_NAME:-sprite-operator-e2e}
release=sprite-operator
release_ns=sprite-system
images=(sprite-operator:e2e sprite-operator-sim:e2e)
started=$(date +%s)
phase() { printf '[e2e] %s (%ss)\n' "$1" "$(( $(date +%s) - started ))" >&2; }

# Host packages a fresh machine of this kind lacks (Debian): the Docker
# daemon, debootstrap for the images, jq for the runc wrapper and kind's spec.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
  phase "apt-get install ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sprite-e2e.XXXXXX")
export KUBECONFIG="$work/kubeconfig"
export HELM_CONFIG_HOME="$work/helm/config" HELM_CACHE_HOME="$work/helm/cache" HELM_DATA_HOME="$work/helm/data"
cluster_created=false
kind_network_existed=false

phase "Docker daemon"
eval "$("$here/dockerd.sh" start)"
docker network inspect kind >/dev/null 2>&1 && kind_network_existed=true

k8s_bin=$("$repo/hack/controlplane/build.sh" helm)
kubectl() { "$k8s_bin/kubectl" "$@"; }
helm() { "$k8s_bin/helm" "$@"; }

dump() {
  echo "[e2e] ---- diagnostics ----" >&2
  kubectl get nodes,pods -A -o wide >&2 || true
  kubectl get users.sprite-operator.dev,sprites.sprite-operator.dev -A -o yaml >&2 || true
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -60 >&2 || true
  for c in controller relay sim; do
    echo "[e2e] ---- $c logs ----" >&2
    kubectl -n "$release_ns" logs -l "app.kubernetes.io/component=$c" --all-containers --prefix --tail=150 >&2 || true
  done
}

finish() {
  local rc=$? leaks=0
  trap - EXIT
  if $cluster_created; then
    [ "$rc" -ne 0 ] && dump
    if [ -n "${E2E_KEEP_CLUSTER:-}" ]; then
      phase "keeping cluster $cluster (E2E_KEEP_CLUSTER): kind delete cluster --name $cluster"
    else
      "$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
  fi
  if [ -z "${E2E_KEEP_CLUSTER:-}" ]; then
    # kind leaves its bridge network behind; remove it if this run made it.
    $kind_network_existed || docker network rm kind >/dev/null 2>&1 || true
    local left
    left=$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$cluster" 2>/dev/null || true)
    [ -z "$left" ] || { echo "[e2e] leak: containers of $cluster remain: $left" >&2; leaks=1; }
    if ! $kind_network_existed && docker network inspect kind >/dev/null 2>&1; then
      echo "[e2e] leak: the kind network remains" >&2
      leaks=1
    fi
    if [ "${SPRITE_E2E_DOCKERD:-}" = private ]; then
      "$here/dockerd.sh" stop
      "$here/dockerd.sh" check-stopped || leaks=1
    fi
  fi
  rm -rf "$work"
  [ "$rc" -eq 0 ] && [ "$leaks" -ne 0 ] && rc=1
  if [ "$rc" -eq 0 ]; then phase "passed, nothing left behind"; else phase "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap finish EXIT

phase "kind and node image"
if [ -n "${KIND_NODE_IMAGE:-}" ]; then
  kind="$("$here/tools.sh" kind)/kind"
  node_image=$KIND_NODE_IMAGE
  docker image inspect "$node_image" >/dev/null 2>&1 || docker pull "$node_image"
else
  kind="$("$here/tools.sh")/kind"
  node_image=$("$here/node-image.sh")
fi

phase "operator and simulator images"
hack/image.sh operator "${images[0]}"
hack/image.sh sim "${images[1]}"

phase "kind create cluster $cluster ($node_image)"
"$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
cluster_created=true
"$kind" create cluster --name "$cluster" --image "$node_image" --config "$here/files/kind-config.yaml" \
  --kubeconfig "$KUBECONFIG" --wait 180s
"$kind" load docker-image --name "$cluster" "${images[@]}"

phase "helm install (with the simulator)"
helm install "$release" charts/sprite-operator --namespace "$release_ns" --create-namespace \
  --set image.repository=sprite-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --set sim.enabled=true --set sim.image.repository=sprite-operator-sim --set sim.image.tag=e2e \
  --set sim.image.pullPolicy=Never \
  --wait --timeout 5m

phase "e2e test"
E2E_RELEASE="$release" E2E_RELEASE_NAMESPACE="$release_ns" \
  cargo test --test e2e_kind -- --nocapture --test-threads=1

phase "helm uninstall"
helm uninstall "$release" --namespace "$release_ns" --wait --timeout 3m
if kubectl -n "$release_ns" get pods -l "app.kubernetes.io/instance=$release" -o name | grep -q .; then
  kubectl -n "$release_ns" wait --for=delete pods -l "app.kubernetes.io/instance=$release" --timeout=120s
fi
phase "e2e passed"
