#!/usr/bin/env bash
# The browser tests drive Debian's Chromium at /usr/bin/chromium (Playwright never downloads a browser
# here). Install it when it is missing and this user may (root, or sudo without a password); otherwise
# stop at once with the one command that fixes it, before any test runs.
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}   # overridable only so a test can see the refusal
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "error: Chromium is missing at $CHROMIUM (the browser tests need it): run 'sudo apt-get install -y chromium', then 'make test' again" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: Chromium is missing at $CHROMIUM and this machine has no apt-get: install Debian's or your distribution's chromium package so that $CHROMIUM exists, then 'make test' again" >&2
    exit 1
fi
echo "Installing Debian's chromium for the browser tests (missing at $CHROMIUM)..."
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
[ -x "$CHROMIUM" ] || { echo "error: apt-get installed chromium but $CHROMIUM is still missing" >&2; exit 1; }
