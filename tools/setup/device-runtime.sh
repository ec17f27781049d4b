#!/usr/bin/env bash
# Build the device runtime into build/device-runtime/: mpy-cross v1.28.0 and
# MicroPython v1.28.0's unix port with the variant in device-runtime/ (32-bit,
# single-precision floats, threads under a GIL, the charger image's frozen
# modules). `make` calls this only when an input changed.
#
# Sources, in this order:
#   1. $MPY_SRC_TARBALL (default ../shared/micropython/micropython-1.28.0-src.tar.gz),
#      checked against its SHA-256;
#   2. otherwise a clone of tag v1.28.0 and the two submodules the build needs,
#      as a user without ../shared does.
# Needs gcc-multilib (make installs it, see tools/setup/system-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=$REPO/build/device-runtime
SRC=$REPO/build/micropython-1.28.0
TARBALL=${MPY_SRC_TARBALL:-$REPO/../shared/micropython/micropython-1.28.0-src.tar.gz}
TARBALL_SHA256=b2450ecb459fcb12f71ab44ebcbe21ecae78abfe08cfa6d76538c914c8b2911a
TAG_COMMIT=e0e9fbb17ed6fd06bb76e266ae554784c9c80804
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

if [ ! -f "$SRC/.complete" ]; then
  rm -rf "$SRC" "$SRC.part"
  mkdir -p "$SRC.part"
  if [ -f "$TARBALL" ]; then
    echo "device runtime: MicroPython v1.28.0 sources from $(basename "$TARBALL")"
    got=$(sha256sum "$TARBALL" | cut -d' ' -f1)
    if [ "$got" != "$TARBALL_SHA256" ]; then
      echo "error: $TARBALL has SHA-256 $got, expected $TARBALL_SHA256" >&2
      exit 1
    fi
    tar xzf "$TARBALL" -C "$SRC.part" --strip-components=1
  else
    echo "device runtime: no $TARBALL; cloning MicroPython v1.28.0 (about 1 minute)"
    git clone -q --depth 1 --branch v1.28.0 https://github.com/micropython/micropython "$SRC.part"
    got=$(git -C "$SRC.part" rev-parse HEAD)
    if [ "$got" != "$TAG_COMMIT" ]; then
      echo "error: tag v1.28.0 is $got, expected $TAG_COMMIT" >&2
      exit 1
    fi
    git -C "$SRC.part" submodule update -q --init --depth 1 lib/mbedtls lib/micropython-lib
  fi
  touch "$SRC.part/.complete"
  mv "$SRC.part" "$SRC"
fi

mkdir -p "$OUT"
t0=$(date +%s)
echo "device runtime: building mpy-cross"
make -s -C "$SRC/mpy-cross" -j"$JOBS" >"$OUT/mpy-cross.log" 2>&1 || { tail -30 "$OUT/mpy-cross.log" >&2; exit 1; }
cp "$SRC/mpy-cross/build/mpy-cross" "$OUT/mpy-cross.part" && mv "$OUT/mpy-cross.part" "$OUT/mpy-cross"
echo "device runtime: building the unix port, variant device-runtime/ (32-bit, float, GIL, frozen firmware)"
# The ceiling keeps the version header from reading this repository's git
# history (the extracted sources sit inside it): it then says v1.28.0.
GIT_CEILING_DIRECTORIES="$REPO/build" make -s -C "$SRC/ports/unix" -j"$JOBS" VARIANT_DIR="$REPO/device-runtime" BUILD="$OUT/unix" \
  >"$OUT/unix.log" 2>&1 || { tail -40 "$OUT/unix.log" >&2; exit 1; }
cp "$OUT/unix/micropython" "$OUT/micropython.part" && mv "$OUT/micropython.part" "$OUT/micropython"
echo "device runtime: built in $(( $(date +%s) - t0 )) s: $("$OUT/micropython" -c 'import sys; print(sys.implementation._build, sys.version, sys.implementation._thread)')"
