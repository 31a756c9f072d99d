#!/usr/bin/env bash
# Debian packages jupyter-handoff needs; idempotent, quiet when already there.
#   install-system-deps.sh          bubblewrap (the run kernels' sandbox) and chromium (browser tests)
#   install-system-deps.sh --demo   bubblewrap only (make demo)
set -euo pipefail
want=(bwrap:bubblewrap)
[ "${1:-}" = "--demo" ] || want+=(chromium:chromium)
missing=()
for item in "${want[@]}"; do
  command -v "${item%%:*}" >/dev/null 2>&1 || missing+=("${item#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${missing[*]}, and apt-get is not available: install them with your package manager" >&2
  echo "(without bubblewrap the server refuses remote runs; c.HandoffApp.sandbox = 'none' runs them unsandboxed)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
