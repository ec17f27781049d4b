#!/usr/bin/env bash
# Build the charger's ESP32 image: MicroPython v1.28.0 for ESP32_GENERIC with
# the firmware frozen in, from image/manifest.py (the manifest the device
# runtime freezes too). `make image` runs this; `make image DRY_RUN=1` (or
# --dry-run) prints the exact commands and runs nothing.
#
# It needs what an ESP-IDF build needs (about 3 GB of disk and 20-40 minutes
# the first time): git, cmake, ninja, python3-venv, and ESP-IDF itself, which
# the first step installs. The trimmed sources in ../shared/micropython have
# no ports/esp32 C code, so the full v1.28.0 tree is cloned.
#
# Environment: IDF_VERSION (default v5.5.2, the version the v1.28.0 esp32
# port's README recommends: check ports/esp32/README.md of the checkout),
# BOARD (default ESP32_GENERIC), WORK (default ~/.cache/evse-charger-image,
# outside build/ so that `make clean` does not throw 3 GB of ESP-IDF away).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
IDF_VERSION=${IDF_VERSION:-v5.5.2}
BOARD=${BOARD:-ESP32_GENERIC}
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/evse-charger-image}
IDF=$WORK/esp-idf
MPY=$WORK/micropython
VERSION=$(sed -n 's/^FW = "\(.*\)"$/\1/p' firmware/version.py)
mkdir -p "$REPO/build"
OUT=$REPO/build/evse-$BOARD-${VERSION:-dev}.bin

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY" = 1 ] || "$@"
}

echo "# 1. ESP-IDF $IDF_VERSION, with the esp32 toolchain"
[ -d "$IDF" ] && [ "$DRY" = 0 ] || run git clone -b "$IDF_VERSION" --recursive --depth 1 --shallow-submodules https://github.com/espressif/esp-idf.git "$IDF"
run "$IDF/install.sh" esp32
printf '+ . %q\n' "$IDF/export.sh"
# shellcheck disable=SC1091
[ "$DRY" = 1 ] || . "$IDF/export.sh"
echo "# 2. MicroPython v1.28.0 (the release the device runtime is built from)"
[ -d "$MPY" ] && [ "$DRY" = 0 ] || run git clone --depth 1 --branch v1.28.0 https://github.com/micropython/micropython "$MPY"
run make -C "$MPY/mpy-cross"
run make -C "$MPY/ports/esp32" BOARD="$BOARD" submodules
echo "# 3. the image, with image/manifest.py frozen (firmware + everything the release image freezes)"
run make -C "$MPY/ports/esp32" BOARD="$BOARD" FROZEN_MANIFEST="$REPO/image/manifest.py"
run cp "$MPY/ports/esp32/build-$BOARD/firmware.bin" "$OUT"
echo "# then: make flash IMAGE=$OUT PORT=/dev/ttyUSB0, make provision PORT=... ARGS=\"...\","
echo "#       make deploy PORT=... FROZEN=1 (boot.py and main.py only: the firmware is in the image)"
