#!/usr/bin/env bash
# User-space instructions per relayed 64 B round trip, counted by callgrind,
# for the relay, the tokio pipe, the mio pipe and nginx: the same work as the relay bench's
# latency phase, as a count that does not move with the machine's load.
# Latency on a shared 2-core machine moves by several µs between runs; this
# count moves by a few instructions, so two builds can be compared exactly
# (docs/relay.md). Kernel time (the syscalls, the same three per message on
# every path) is not in it.
#
#   benches/relay-instructions.sh [RELAY_BINARY...]
#
# Each path is run twice under callgrind, with 500 and 2500 round trips; the
# difference over 2000 is the steady-state cost per round trip (start-up and
# connection set-up cancel out). Needs valgrind, nginx, and the Python venv
# of hack/python-env.sh (the client is the `websockets` library).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
nginx=$(command -v nginx || echo /usr/sbin/nginx)
eval "$(hack/python-env.sh)"
bench=$(cargo bench --bench relay --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "relay" and m.get("executable"):
        print(m["executable"])')
relays=("$@")
[ ${#relays[@]} -gt 0 ] || relays=("$here/target/release/sprite-operator")
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
export RUST_LOG=warn # as in the bench (at info the count is within a few instructions since session 8)

token=be0c4000111122223333444455556666
cat >"$work/directory.yaml" <<EOF
apiVersion: sprite-operator.dev/v1alpha1
kind: User
metadata: {name: bench, namespace: bench}
spec: {email: bench@example.com, subject: bench, tier: free}
status: {gatewayTokenSha256: "$(printf %s "$token" | sha256sum | cut -c1-64)"}
---
apiVersion: sprite-operator.dev/v1alpha1
kind: Sprite
metadata: {name: bench-primary, namespace: bench}
spec: {userRef: {name: bench}}
EOF
cat >"$work/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.log;
events {}
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server {
    listen 127.0.0.1:18080;
    location / {
      proxy_pass http://127.0.0.1:18765; proxy_http_version 1.1; proxy_buffering off;
      proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection "upgrade";
    }
  }
}
EOF
cat >"$work/client.py" <<'EOF'
import asyncio, sys, websockets
async def main(url, n, token):
    msg = '{"type":"ping","payload":"' + "x" * 36 + '"}'
    assert len(msg) == 64
    sub = ["sprite-relay.v1", token] if token else None
    async with websockets.connect(url, subprotocols=sub, compression=None) as ws:
        for _ in range(n):
            await ws.send(msg)
            assert await ws.recv() == msg
asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
EOF

"$bench" --echo-server 127.0.0.1:18765 >/dev/null 2>&1 &
sleep 0.5

# instructions N CMD... -> total Ir of CMD while a client makes N round trips.
instructions() {
  local n=$1 url=$2 token=$3
  shift 3
  rm -f "$work"/cg.*
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "$@" >"$work/proxy.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do (echo >/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.2; done
  "$VENV/bin/python" "$work/client.py" "$url" "$n" ${token:+"$token"}
  # TERM: a background job of a script ignores SIGINT.
  kill -TERM $pid
  wait $pid || true
  cat "$work"/cg.* | awk '/^summary:/ {s += $2} END {print s}'
}
per_round_trip() {
  local a b
  a=$(instructions 500 "$@")
  b=$(instructions 2500 "$@")
  echo $(((b - a) / 2000))
}

printf '%-40s %s\n' path "instructions per 64 B round trip (user space)"
printf '%-40s %s\n' nginx "$(per_round_trip ws://127.0.0.1:18080/ "" "$nginx" -c "$work/nginx.conf")"
printf '%-40s %s\n' "tokio pipe" "$(per_round_trip ws://127.0.0.1:18080/ "" "$bench" --tcp-pipe 127.0.0.1:18080 127.0.0.1:18765)"
printf '%-40s %s\n' "mio pipe" "$(per_round_trip ws://127.0.0.1:18080/ "" "$bench" --mio-pipe 127.0.0.1:18080 127.0.0.1:18765)"
for r in "${relays[@]}"; do
  printf '%-40s %s\n' "relay ${r#"$here/"}" "$(per_round_trip ws://127.0.0.1:18080/ws "$token" "$r" relay \
    --listen 127.0.0.1:18080 --dev-static "$work/directory.yaml" --dev-fixed-upstream ws://127.0.0.1:18765/)"
done
