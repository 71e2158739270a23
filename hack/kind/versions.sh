# shellcheck shell=bash disable=SC2034  # sourced: the variables are used by the scripts
# Versions of everything the kind e2e builds, in one place. The node image's
# tag carries a hash of this file, so bumping a version rebuilds the image.
K8S_VERSION=${K8S_VERSION:-1.36.3}
KIND_VERSION=v0.33.0                   # pinned: cgroup v1 support is going away in kind
CONTAINERD_VERSION=v2.3.4              # what kind v0.33's base image ships
COREDNS_VERSION=v1.14.2                # what kubeadm v1.36 asks for (checked at build)
LOCAL_PATH_PROVISIONER_VERSION=v0.0.30
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
