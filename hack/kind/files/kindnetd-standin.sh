#!/bin/sh
# Stand-in for kindnetd in the offline node image: kindnetd is not published
# as a Go module, so this image takes its tag. It writes the CNI config that
# kindnetd writes for a single node (ptp + host-local over the pod subnet,
# portmap for hostPort), then idles. It sets up no routes to other nodes, so
# clusters built with it must have one node. Dual-stack is not supported.
set -eu
: "${POD_SUBNET:?POD_SUBNET is not set}"
case $POD_SUBNET in
  *,*) echo "kindnetd stand-in: one pod subnet only, got $POD_SUBNET" >&2; exit 1 ;;
esac
conf=/etc/cni/net.d/10-kindnet.conflist
cat >"$conf.tmp" <<CONF
{
  "cniVersion": "0.4.0",
  "name": "kindnet",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{"dst": "0.0.0.0/0"}],
        "ranges": [[{"subnet": "$POD_SUBNET"}]]
      },
      "mtu": 1500
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF
mv "$conf.tmp" "$conf"
echo "kindnetd stand-in: wrote $conf for $POD_SUBNET"
trap 'exit 0' TERM INT
while :; do
  sleep 3600 &
  wait $! || true
done
