#!/usr/bin/env bash
# Make sure headless Chromium and chromedriver (Debian packages) are installed for the
# performance page's browser test. Never downloads a browser of its own.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[browser-tools] installing chromium chromium-driver"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "[browser-tools] missing chromium/chromedriver; install with:" \
        "sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
fi
