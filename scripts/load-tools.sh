#!/usr/bin/env bash
# Make sure the load generator `make loadtest` drives is installed (Debian package `wrk`).
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[load-tools] installing wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
else
    echo "[load-tools] missing wrk; install with: sudo apt-get install -y wrk" >&2
    exit 1
fi
