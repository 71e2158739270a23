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
#
# Then the footprint: how many 64 B cache lines of code and of data, and how
# many 4 KiB pages, a round trip touches (valgrind's lackey, every access,
# 100 and 400 round trips; a line counts when the extra 300 round trips
# touched it at least 270 times). Between two messages the kernel's TCP path
# and the other processes run, so what a proxy touches is mostly cold again:
# a count of instructions misses that, and it is how session 9 found a 69 KiB
# stack frame whose probes touched 17 pages per poll (docs/relay.md).
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
status: {ownedVm: {name: bench-bench-primary, id: bench-bench-primary}}
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

cat >"$work/lines.py" <<'EOF'
import json, sys
# lackey's trace (on a FIFO) -> accesses per 64 B line, code and data apart.
code, data = {}, {}
with open(sys.argv[1], "rb") as trace:
    for line in trace:
        kind = line[:2]
        if kind == b"I ":
            d = code
        elif kind in (b" L", b" S", b" M"):
            d = data
        else:
            continue
        a = int(line[3:].split(b",")[0], 16) >> 6
        d[a] = d.get(a, 0) + 1
json.dump({"code": code, "data": data}, open(sys.argv[2], "w"))
EOF
cat >"$work/footprint.py" <<'EOF'
import json, sys
# Lines touched at least 0.9 times per round trip over the extra 300.
a, b = (json.load(open(f)) for f in sys.argv[1:3])
hot = {k: {l for l, n in b[k].items() if (n - a[k].get(l, 0)) / 300 >= 0.9} for k in ("code", "data")}
pages = {int(l) >> 6 for k in hot for l in hot[k]}
print(f"{len(hot['code'])} / {len(hot['data'])} / {len(pages)}")
EOF
# lines N CMD... -> the lines CMD touches while a client makes N round trips.
lines() {
  local n=$1 url=$2 token=$3
  shift 3
  rm -f "$work/trace"
  mkfifo "$work/trace"
  python3 "$work/lines.py" "$work/trace" "$work/lines.$n" &
  local counter=$!
  valgrind --tool=lackey --trace-mem=yes --log-file="$work/trace" "$@" >"$work/proxy.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do (echo >/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.2; done
  "$VENV/bin/python" "$work/client.py" "$url" "$n" ${token:+"$token"}
  kill -TERM $pid
  wait $pid || true
  wait $counter
}
footprint() {
  lines 100 "$@"
  lines 400 "$@"
  python3 "$work/footprint.py" "$work/lines.100" "$work/lines.400"
}

# Both measures of one path, as one row.
row() {
  local name=$1
  shift
  printf '%-40s %12s %28s\n' "$name" "$(per_round_trip "$@")" "$(footprint "$@")"
}
printf '%-40s %12s %28s\n' path instructions "code / data lines / pages"
row nginx ws://127.0.0.1:18080/ "" "$nginx" -c "$work/nginx.conf"
row "tokio pipe" ws://127.0.0.1:18080/ "" "$bench" --tcp-pipe 127.0.0.1:18080 127.0.0.1:18765
row "mio pipe" ws://127.0.0.1:18080/ "" "$bench" --mio-pipe 127.0.0.1:18080 127.0.0.1:18765
for r in "${relays[@]}"; do
  row "relay ${r#"$here/"}" ws://127.0.0.1:18080/ws "$token" "$r" relay \
    --listen 127.0.0.1:18080 --dev-static "$work/directory.yaml" --dev-fixed-upstream ws://127.0.0.1:18765/
done
echo "(per 64 B round trip, user space; instructions by callgrind, lines and pages by lackey)"
