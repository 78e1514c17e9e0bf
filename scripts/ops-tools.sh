#!/usr/bin/env bash
# Make sure the Prometheus tools the alert tests run are installed (Debian packages).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[ops-tools] installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "[ops-tools] missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
