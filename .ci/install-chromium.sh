#!/bin/sh
# Install Debian's Chromium for the real-browser tests (tests/test_web_page.py drive it through
# Playwright with executable_path, so `playwright install` and its downloads are never needed).
# Idempotent; needs root.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
echo "install-chromium: installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
