#!/usr/bin/env bash
# Builds kind's node image for Kubernetes $K8S_VERSION from local parts only
# (Debian packages and Go modules, no registry) and prints its tag. The image
# is kept by the Docker daemon (the private one keeps its data in the cache),
# so a second run finds it and prints the tag at once.
#
# The steps are those of kind's images/base/Dockerfile and `kind build
# node-image`, done without pulling anything:
#   1. Go binaries: hack/controlplane/build.sh node (kubelet, kubeadm, ...),
#      hack/kind/tools.sh (containerd, coredns, local-path-provisioner, pause)
#   2. a Debian rootfs from debootstrap, with kind's files from the pinned
#      sigs.k8s.io/kind module -> the base image
#   3. one image per component kubeadm and kind's manifests ask for, each a
#      tarball given to `docker import` under the exact tag they name
#   4. a container of the base image gets the Kubernetes binaries, kind's
#      manifests and those images (imported into its containerd), and is
#      committed as the node image
# Needs root, a Docker daemon (hack/kind/dockerd.sh), debootstrap, jq, gcc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=hack/kind/versions.sh
. "$here/versions.sh"
log() { printf '[node-image] %s\n' "$*" >&2; }

lacks_sys_resource() {
  local bnd
  bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
  (( ((16#$bnd) >> 24 & 1) == 0 ))
}

# The tag names what went in: these scripts, their files, the versions, and
# whether containerd must run with restrict_oom_score_adj (see below).
variant=std
lacks_sys_resource && variant=nosysres
key=$( { cat "$here/versions.sh" "$here/node-image.sh" "$here/tools.sh" "$here"/files/* \
  "$repo/hack/controlplane/go.sum"; echo "$variant"; } | sha256sum | cut -c1-12)
tag="sprite-operator-kind-node:v$K8S_VERSION-$key"
if docker image inspect "$tag" >/dev/null 2>&1; then
  log "reusing $tag"
  echo "$tag"
  exit 0
fi

started=$(date +%s)
phase() { log "$1 ($(( $(date +%s) - started ))s)"; }
for t in debootstrap jq gcc; do
  command -v "$t" >/dev/null || { log "$t is missing (apt-get install debootstrap jq gcc)"; exit 1; }
done

phase "Go binaries"
k8s_bin=$("$repo/hack/controlplane/build.sh" node)
tools=$("$here/tools.sh")
kind_src=$(GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" |
  sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
kfiles="$kind_src/images/base/files"

work=$(mktemp -d "${TMPDIR:-/tmp}/kind-node.XXXXXX")
build_container=""
cleanup() {
  [ -n "$build_container" ] && docker rm -f "$build_container" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

phase "debootstrap $DEBIAN_SUITE"
root="$work/rootfs"
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,fuse-overlayfs,bash,ca-certificates,curl,jq,procps,e2fsprogs,runc,containernetworking-plugins \
  "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; exit 1; }

phase "base image"
# kind's files, with the modes its Dockerfile gives them (the module cache is
# read-only, hence install rather than cp).
install -m 0755 "$kfiles"/usr/local/bin/* "$root/usr/local/bin/"
mkdir -p "$root/kind/bin"
for f in "$kfiles"/kind/*; do [ -f "$f" ] && install -m 0644 "$f" "$root/kind/"; done
install -m 0755 "$kfiles"/kind/bin/* "$root/kind/bin/"
install -m 0644 "$kfiles"/etc/crictl.yaml "$root/etc/"
install -D -m 0644 -t "$root/etc/containerd" "$kfiles"/etc/containerd/*
install -D -m 0644 -t "$root/etc/default" "$kfiles"/etc/default/*
install -D -m 0644 -t "$root/etc/sysctl.d" "$kfiles"/etc/sysctl.d/*
install -m 0644 "$kfiles"/etc/systemd/system/*.service "$kfiles"/etc/systemd/system/*.slice "$root/etc/systemd/system/"
install -D -m 0644 -t "$root/etc/systemd/system/kubelet.service.d" \
  "$kfiles"/etc/systemd/system/kubelet.service.d/* "$here/files/12-cgroupv1-extra.conf"
# The clean-up of kind's Dockerfile: no units that fight the host, no kmsg.
find "$root/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
rm -f "$root"/lib/systemd/system/multi-user.target.wants/* "$root"/etc/systemd/system/*.wants/* \
  "$root"/lib/systemd/system/local-fs.target.wants/* "$root"/lib/systemd/system/sockets.target.wants/*udev* \
  "$root"/lib/systemd/system/sockets.target.wants/*initctl* "$root"/lib/systemd/system/basic.target.wants/*
echo "ReadKMsg=no" >>"$root/etc/systemd/journald.conf"
chroot "$root" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
chroot "$root" systemctl mask systemd-binfmt.service >/dev/null 2>&1
mkdir -p "$root/etc/kubernetes/manifests" "$root/opt/cni/bin"
# CNI plugins from Debian's containernetworking-plugins; containerd from its module.
for p in host-local loopback ptp portmap; do install -m 0755 "$root/usr/lib/cni/$p" "$root/opt/cni/bin/"; done
install -m 0755 "$tools/containerd" "$tools/ctr" "$tools/containerd-shim-runc-v2" "$root/usr/local/bin/"
"$tools/ctr" oci spec |
  jq '.hooks.createContainer += [{"path": "/kind/bin/mount-product-files.sh"}] | del(.process.rlimits)' \
    >"$root/etc/containerd/cri-base.json"
if [ "$variant" = nosysres ]; then
  # Lowering a sandbox's oom_score_adj needs CAP_SYS_RESOURCE; without it
  # every pod sandbox fails in runc ("failed to update /proc/self/oom_score_adj").
  sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$root/etc/containerd/config.toml"
  grep -q 'restrict_oom_score_adj = true' "$root/etc/containerd/config.toml" ||
    { log "kind's containerd config changed: restrict_oom_score_adj not found"; exit 1; }
fi
base="sprite-operator-kind-base:$key"
tar -C "$root" --numeric-owner -c . |
  docker import --change 'ENV container=docker' - "$base-imported" >/dev/null
# `docker import --change` takes no STOPSIGNAL, and systemd stops on SIGRTMIN+3.
mkdir -p "$work/stopsignal"
printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$base-imported" >"$work/stopsignal/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$base" "$work/stopsignal" >/dev/null
docker rmi "$base-imported" >/dev/null

phase "component images"
# What kubeadm, containerd's sandbox_image and kind's manifests will ask for.
mapfile -t wanted < <(
  "$k8s_bin/kubeadm" config images list --kubernetes-version "v$K8S_VERSION" 2>/dev/null
  sed -n 's/^[[:space:]]*sandbox_image = "\(.*\)"/\1/p' "$kfiles/etc/containerd/config.toml"
  "$here/files/kind-manifests.py" "$kind_src" --images
)
log "images: ${wanted[*]}"
# A rootfs for the components that need more than one static binary: iptables
# (kube-proxy), sh and coreutils (the kindnetd stand-in, local-path's helper),
# cut from the debootstrap tree with the libraries ldd names.
netutil="$work/netutil"
mkdir -p "$netutil"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,tmp,run,var}
for l in bin sbin lib lib64; do ln -s "usr/$l" "$netutil/$l"; done
chmod 1777 "$netutil/tmp"
progs=(/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/nft /usr/sbin/conntrack
  /usr/bin/ip /usr/bin/dash /usr/bin/cat /usr/bin/mkdir /usr/bin/rm /usr/bin/mv /usr/bin/sleep
  /usr/bin/chmod /usr/bin/ls)
libs_of() { # copies the libraries ldd names for a file of the rootfs
  chroot "$root" ldd "$1" | sed -n 's#.*=> \(/[^ ]*\) .*#\1#p; s#^[[:space:]]*\(/[^ ]*\) .*#\1#p' |
    while read -r lib; do
      real=$(chroot "$root" readlink -f "$lib")
      [ -e "$netutil$real" ] || install -D -m 0755 "$root$real" "$netutil$real"
      # /lib is a symlink to usr/lib here too: link only what is still missing
      # (the loader's /lib64 name, say), never a path onto itself.
      [ -e "$netutil$lib" ] || { mkdir -p "$netutil$(dirname "$lib")"; ln -s "$real" "$netutil$lib"; }
    done
}
for p in "${progs[@]}"; do
  [ -e "$root$p" ] || p=${p/\/usr\/bin\//\/usr\/sbin\/}
  install -D -m 0755 "$root$(chroot "$root" readlink -f "$p")" "$netutil$p"
  libs_of "$p"
done
# iptables dlopens its match and target modules, which need more libraries
# (libxt_statistic, used for Services with several endpoints, needs libm).
xt=/usr/lib/x86_64-linux-gnu/xtables
cp -a "$root$xt" "$netutil$xt"
for m in "$root$xt"/*.so; do libs_of "$xt/${m##*/}"; done
# Every program and module must resolve inside the cut tree itself.
for f in "${progs[@]}" "$root$xt"/*.so; do
  f=${f#"$root"}
  [ -e "$netutil$f" ] || f=${f/\/usr\/bin\//\/usr\/sbin\/}
  if chroot "$netutil" /lib64/ld-linux-x86-64.so.2 --list "$f" 2>&1 | grep -q 'not found'; then
    log "netutil: $f lacks libraries: $(chroot "$netutil" /lib64/ld-linux-x86-64.so.2 --list "$f" 2>&1 | grep 'not found' | tr -s ' \n' ' ')"
    exit 1
  fi
done
cp -a "$root/etc/protocols" "$root/etc/services" "$root/etc/ethertypes" "$netutil/etc/" 2>/dev/null || true
ln -s dash "$netutil/usr/bin/sh"
for t in iptables ip6tables; do
  for s in "" -save -restore; do
    ln -s xtables-nft-multi "$netutil/usr/sbin/$t$s"
    ln -s xtables-nft-multi "$netutil/usr/sbin/$t-nft$s"
    ln -s xtables-legacy-multi "$netutil/usr/sbin/$t-legacy$s"
  done
done

image() { # tag, tree dir, docker import --change arguments...
  local t=$1 dir=$2
  shift 2
  tar -C "$dir" --numeric-owner --owner=0 --group=0 -c . | docker import "$@" - "$t" >/dev/null
}
one_binary() { # tag, binary, name in the image, extra --change...
  local t=$1 src=$2 name=$3 d
  shift 3
  d=$(mktemp -d "$work/img.XXXXXX")
  install -D -m 0755 "$src" "$d/usr/local/bin/$name"
  image "$t" "$d" --change 'ENV PATH=/usr/local/bin' "$@"
}
with_netutil() { # tag, extra program, its path in the image, extra --change...
  local t=$1 src=$2 dst=$3 d
  shift 3
  d=$(mktemp -d "$work/img.XXXXXX")
  cp -a "$netutil/." "$d/"
  install -D -m 0755 "$src" "$d$dst"
  image "$t" "$d" --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin' "$@"
}
etcd_version=$("$k8s_bin/etcd" --version | sed -n 's/^etcd Version: //p')
coredns_ok=false
for img in "${wanted[@]}"; do
  case $img in
    */kube-apiserver:* | */kube-controller-manager:* | */kube-scheduler:*)
      n=${img##*/}; one_binary "$img" "$k8s_bin/${n%%:*}" "${n%%:*}" ;;
    */kube-proxy:*) with_netutil "$img" "$k8s_bin/kube-proxy" /usr/local/bin/kube-proxy ;;
    */etcd:*)
      [[ ${img##*:} == "$etcd_version"* ]] ||
        { log "kubeadm wants $img, the control-plane build has etcd $etcd_version"; exit 1; }
      one_binary "$img" "$k8s_bin/etcd" etcd ;;
    */coredns:*)
      [ "${img##*:}" = "$COREDNS_VERSION" ] ||
        { log "kubeadm wants $img; set COREDNS_VERSION in versions.sh"; exit 1; }
      one_binary "$img" "$tools/coredns" coredns --change 'ENTRYPOINT ["/usr/local/bin/coredns"]'
      coredns_ok=true ;;
    */pause:*) one_binary "$img" "$tools/pause" pause --change 'ENTRYPOINT ["/usr/local/bin/pause"]' --change 'USER 65535:65535' ;;
    */kindnetd:*) with_netutil "$img" "$here/files/kindnetd-standin.sh" /usr/local/bin/kindnetd \
      --change 'ENTRYPOINT ["/usr/local/bin/kindnetd"]' ;;
    */local-path-provisioner:*) one_binary "$img" "$tools/local-path-provisioner" local-path-provisioner ;;
    # The helper pods only run `sh -c` with mkdir, rm and chmod.
    */local-path-helper:*) image "$img" "$netutil" --change 'ENV PATH=/usr/sbin:/usr/bin' ;;
    *) log "no recipe for image $img"; exit 1 ;;
  esac
done
$coredns_ok || { log "kubeadm asked for no coredns image?"; exit 1; }

phase "node image"
build_container=$(docker run -d --entrypoint sleep --security-opt seccomp=unconfined "$base" infinity)
docker cp "$k8s_bin/kubeadm" "$build_container:/usr/bin/kubeadm"
docker cp "$k8s_bin/kubelet" "$build_container:/usr/bin/kubelet"
docker cp "$k8s_bin/kubectl" "$build_container:/usr/bin/kubectl"
docker exec "$build_container" sh -c "chown root:root /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl &&
  chmod 0755 /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl && mkdir -p /kind/manifests &&
  printf v$K8S_VERSION >/kind/version"
"$here/files/kind-manifests.py" "$kind_src" defaultCNIManifest |
  docker exec -i "$build_container" sh -c 'cat >/kind/manifests/default-cni.yaml'
"$here/files/kind-manifests.py" "$kind_src" defaultStorageManifest |
  docker exec -i "$build_container" sh -c 'cat >/kind/manifests/default-storage.yaml'
docker exec -d "$build_container" sh -c 'containerd >/var/log/containerd-build.log 2>&1'
for i in $(seq 1 60); do
  docker exec "$build_container" ctr version >/dev/null 2>&1 && break
  [ "$i" = 60 ] && { docker exec "$build_container" cat /var/log/containerd-build.log >&2; exit 1; }
  sleep 0.5
done
docker save "${wanted[@]}" |
  docker exec -i "$build_container" ctr -n k8s.io images import --label=io.cri-containerd.pinned=pinned \
    --all-platforms --no-unpack --digests - >/dev/null
docker exec "$build_container" sh -c 'pkill containerd; while pgrep -x containerd >/dev/null; do sleep 0.2; done; rm -f /var/log/containerd-build.log'
docker commit \
  --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
  --change 'ENV HTTP_PROXY="" HTTPS_PROXY="" NO_PROXY=""' \
  "$build_container" "$tag" >/dev/null
docker rm -f "$build_container" >/dev/null
build_container=""
# The component images live on inside the node image, and the base is its
# parent layer: drop their tags, and node images of earlier versions.
docker rmi "${wanted[@]}" "$base" >/dev/null
docker images --format '{{.Repository}}:{{.Tag}}' |
  grep -E '^sprite-operator-kind-(node|base):' | grep -vx "$tag" | xargs -r docker rmi >/dev/null || true
phase "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$tag"
