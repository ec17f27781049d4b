#!/usr/bin/env bash
# The system packages a make target needs, installed with apt-get when they
# are missing and we are root; otherwise stop with the exact command to run.
# Usage: tools/setup/system-packages.sh mosquitto nodejs
# (names are Debian packages; each is checked by the command it provides).
set -euo pipefail

have() {
  case "$1" in
    mosquitto) command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] ;;
    nodejs) command -v node >/dev/null ;;
    *) dpkg -s "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for pkg in "$@"; do
  have "$pkg" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing system packages: ${missing[*]}" >&2
  echo "install them with:  sudo sh -c '$cmd'" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "error: missing system packages: ${missing[*]}, and no apt-get here; install them with your package manager" >&2
  exit 1
fi
echo "installing ${missing[*]} with apt-get"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
