#!/usr/bin/env bash
# Test-only engines for the "Scaling out" tests (tests/e2e/test_gateway.py, tests/e2e/test_jupyterhub.py).
#
# * Jupyter Enterprise Gateway pins jupyter_client<7 and jupyter_server<2, which cannot share
#   the project's venv (jupyter_server 2.x), so it gets its own venv: .venv/cluster/gateway.
#   Its kernels still run the project's .venv python (they need handoff_magic), exactly like a
#   real gateway whose kernel image has jupyter-handoff installed.
# * JupyterHub's proxy, configurable-http-proxy, comes from the npm registry into
#   .venv/cluster/node (JupyterHub itself is in the project's `test` extra).
# Idempotent and quiet when everything is already there. Usage: bash scripts/install-cluster-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
ROOT=.venv/cluster
EG_VERSION='jupyter_enterprise_gateway>=3.2,<4'
CHP_VERSION='configurable-http-proxy@^4.6'

mkdir -p "$ROOT"
if ! "$ROOT/gateway/bin/jupyter-enterprisegateway" --version >/dev/null 2>&1; then
  echo "installing Jupyter Enterprise Gateway into $ROOT/gateway" >&2
  rm -rf "$ROOT/gateway"
  "$PY" -m venv "$ROOT/gateway"
  "$ROOT/gateway/bin/python" -m pip install -q --upgrade pip
  "$ROOT/gateway/bin/python" -m pip install -q "$EG_VERSION"
fi

if ! [ -x "$ROOT/node/node_modules/.bin/configurable-http-proxy" ]; then
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian nodejs + npm (JupyterHub's proxy is an npm package)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm is missing: install Node.js and npm (Debian: apt-get install nodejs npm) to run the JupyterHub test" >&2
    exit 1
  fi
  echo "installing configurable-http-proxy into $ROOT/node" >&2
  mkdir -p "$ROOT/node"
  npm install --silent --no-audit --no-fund --prefix "$ROOT/node" "$CHP_VERSION" >/dev/null
fi
