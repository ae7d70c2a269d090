#!/usr/bin/env bash
# Installs what the browser test (tests/app/test_browser.py) needs: Debian's chromium, chromium-driver and
# fonts-liberation, and Playwright's Python package into .venv. Playwright drives /usr/bin/chromium, so
# its own browser download (`playwright install`) is never needed.
#
# Usage: scripts/install-browser.sh            (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_PIP=${VENV_PIP:-.venv/bin/pip}
PLAYWRIGHT=${PLAYWRIGHT:-playwright>=1.45}

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-browser: run as root or install sudo" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation
fi

if [ -x "$VENV_PIP" ]; then
  if "$VENV_PIP" show playwright >/dev/null 2>&1; then
    echo "playwright: already installed in .venv"
  else
    "$VENV_PIP" install --quiet "$PLAYWRIGHT"
  fi
else
  echo "install-browser: $VENV_PIP not found; create the virtualenv first (make install-dev)" >&2
  exit 1
fi
