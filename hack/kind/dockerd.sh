#!/usr/bin/env bash
# A Docker daemon for the kind e2e.
#
#   eval "$(hack/kind/dockerd.sh start)"   # exports DOCKER_HOST (and a marker)
#   hack/kind/dockerd.sh stop              # stops it, if `start` started it
#   hack/kind/dockerd.sh check-stopped     # exit 1 if our daemon still runs
#
# `start` uses the daemon that `docker` already reaches, if any. Otherwise it
# starts a private one: its own socket, data-root, exec-root, pidfile and
# config under the cache directory, so it never meets a system daemon's state,
# and the images it keeps (the node image, the base images) survive between
# runs. Where the host's capability bounding set lacks CAP_SYS_RESOURCE (as on
# this machine kind), runc cannot start the --privileged containers kind makes,
# and files/runc-nosysres becomes the daemon's default runtime.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/kind/versions.sh
. "$here/versions.sh"
cache=${SPRITE_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sprite-operator}
root="$cache/kind-$KIND_VERSION/docker"
sock="$root/docker.sock"
pidfile="$root/dockerd.pid"
log() { printf '[dockerd] %s\n' "$*" >&2; }

# CAP_SYS_RESOURCE is capability 24.
lacks_sys_resource() {
  local bnd
  bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
  (( ((16#$bnd) >> 24 & 1) == 0 ))
}

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  if [ -z "${SPRITE_E2E_PRIVATE_DOCKERD:-}" ] && docker info >/dev/null 2>&1; then
    log "using the Docker daemon docker already reaches (${DOCKER_HOST:-default socket})"
    lacks_sys_resource && log "warning: CAP_SYS_RESOURCE is missing here; if kind's --privileged containers fail, unset DOCKER_HOST and stop that daemon so that a private one with runc-nosysres starts (docs/kind-e2e.md)"
    echo "export SPRITE_E2E_DOCKERD=external"
    return
  fi
  command -v dockerd >/dev/null || { log "dockerd is missing: apt-get install docker.io"; exit 1; }
  mkdir -p "$root/data" "$root/exec"
  if pid=$(running_pid); then
    log "private dockerd already running (pid $pid)"
  else
    local runtime_cfg=""
    if lacks_sys_resource; then
      command -v jq >/dev/null || { log "jq is missing: apt-get install jq"; exit 1; }
      sed "s#@RUNC@#$(command -v runc)#" "$here/files/runc-nosysres" >"$root/runc-nosysres"
      chmod 0755 "$root/runc-nosysres"
      runtime_cfg=$(printf ',\n  "runtimes": {"runc-nosysres": {"path": "%s"}},\n  "default-runtime": "runc-nosysres"' "$root/runc-nosysres")
      log "CAP_SYS_RESOURCE is not in the bounding set: default runtime runc-nosysres"
    fi
    cat >"$root/daemon.json" <<EOF
{
  "hosts": ["unix://$sock"],
  "data-root": "$root/data",
  "exec-root": "$root/exec",
  "pidfile": "$pidfile",
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"},
  "features": {"buildkit": false}$runtime_cfg
}
EOF
    rm -f "$sock"
    # setsid: the daemon must outlive this script's process group (make,
    # the e2e script) until `stop` is called, and not get their signals.
    setsid dockerd --config-file "$root/daemon.json" >"$root/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
      DOCKER_HOST="unix://$sock" docker info >/dev/null 2>&1 && break
      [ "$i" = 120 ] && { log "dockerd did not come up; its log:"; tail -30 "$root/dockerd.log" >&2; exit 1; }
      sleep 0.5
    done
    log "private dockerd up (pid $(cat "$pidfile"), data in $root/data)"
  fi
  echo "export DOCKER_HOST=unix://$sock SPRITE_E2E_DOCKERD=private"
}

stop() {
  local pid i
  pid=$(running_pid) || { log "no private dockerd running"; return 0; }
  kill -TERM "$pid"
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    [ "$i" = 60 ] && { log "dockerd ignored SIGTERM for 30s: SIGKILL"; kill -KILL "$pid"; }
    sleep 0.5
  done
  log "private dockerd stopped"
}

check_stopped() {
  if pid=$(running_pid); then
    log "private dockerd still running (pid $pid)"
    return 1
  fi
  if pgrep -f "containerd.*$root/exec" >/dev/null; then
    log "its containerd still runs: $(pgrep -af "containerd.*$root/exec")"
    return 1
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  check-stopped) check_stopped ;;
  *) echo "usage: $0 start|stop|check-stopped" >&2; exit 2 ;;
esac
