#!/bin/sh
# Installs Debian's Chromium for the browser tests (Playwright drives it through
# executable_path=/usr/bin/chromium; Playwright's own browser download is not used).
# Idempotent: does nothing when /usr/bin/chromium exists or apt-get is not available.
set -e
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install Chromium yourself and set CHROMIUM=/path/to/chromium" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
