#!/usr/bin/env bash
# Headless Chromium and its WebDriver from the distribution (Debian's `chromium`, `chromium-driver`):
# the review-report test opens the MLflow UI in a real browser to check that the plots are displayed.
# Browser downloads by playwright/puppeteer need internet access that CI does not have; apt works.
# Idempotent: nothing to do when both binaries are there. Used by scripts/test.sh.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver
if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
  exit 0
fi
echo "[browser] installing chromium + chromium-driver with apt-get ..."
SUDO=""
[ "$(id -u)" = "0" ] || SUDO="sudo"   # CI runs as root; a developer machine may not
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
[ -x "$CHROMIUM" ] && [ -x "$DRIVER" ] || { echo "[browser] ERROR: $CHROMIUM or $DRIVER still missing" >&2; exit 1; }
echo "[browser] ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
