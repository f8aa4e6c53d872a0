#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet
# (apt-get, as root or through sudo). Shared by the test-tool installers.
#
#   scripts/apt-install.sh clang lld
set -euo pipefail

say() { echo "apt-install.sh: $*"; }
die() { echo "apt-install.sh: error: $*" >&2; exit 1; }

missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  say "Debian packages already installed: $*"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} (or equivalents) by hand"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot install ${missing[*]}"
  sudo=(sudo)
fi
say "running: apt-get update"
"${sudo[@]}" apt-get update -q
say "running: apt-get install -y --no-install-recommends ${missing[*]}"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
