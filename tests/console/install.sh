#!/usr/bin/env bash
# Installs what the web console test needs, on Debian 12 (bookworm), for
# developers and CI alike. Installs only what is missing; safe to run again.
#
#   - Debian packages: chromium (the browser the test drives headless), and
#     nodejs + npm when Node.js is not installed yet;
#   - npm: playwright-core, the exact version of package-lock.json (it drives
#     Debian's chromium; it downloads no browser of its own).
#
# Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "tests/console/install.sh: $*"; }

packages=(chromium)
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
bash ../../scripts/apt-install.sh "${packages[@]}"

if [ -f node_modules/playwright-core/package.json ] &&
   [ "$(node -p 'require("./node_modules/playwright-core/package.json").version')" = \
     "$(node -p 'require("./package-lock.json").packages["node_modules/playwright-core"].version')" ]; then
  say "playwright-core already installed"
else
  say "running: npm ci"
  npm ci --no-audit --no-fund
fi
