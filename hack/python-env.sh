#!/usr/bin/env bash
# Prepares the Python side used by tests, the demo and the simulator's VMs:
#   - a venv with the runtime's requirements and test tools (for pytest), and
#   - a wheelhouse of sprite/requirements.txt, so that VMs bootstrap with
#     `pip install --no-index --find-links WHEELHOUSE` and need no index.
# Both are cached outside the checkout, keyed by the requirements' hash.
# Prints two lines: VENV=<dir> and WHEELHOUSE=<dir>.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SPRITE_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sprite-operator}
python=${PYTHON:-python3}
# The venv also holds the official sprites-py SDK for the simulator's conformance suite.
reqs=("$here/sprite/requirements.txt" "$here/sprite/requirements-dev.txt" "$here/tests/conformance/requirements.txt")
key=$(cat "${reqs[@]}" | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
wheels="$cache/wheelhouse-$key"
if [ ! -x "$venv/bin/pytest" ]; then
  echo "[python-env] creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  args=()
  for r in "${reqs[@]}"; do args+=(-r "$r"); done
  "$venv/bin/pip" install -q "${args[@]}" >&2
fi
if [ ! -f "$wheels/.complete" ]; then
  echo "[python-env] downloading wheelhouse into $wheels" >&2
  rm -rf "$wheels"
  "$venv/bin/pip" download -q -d "$wheels" -r "$here/sprite/requirements.txt" >&2
  touch "$wheels/.complete"
fi
echo "VENV=$venv"
echo "WHEELHOUSE=$wheels"
