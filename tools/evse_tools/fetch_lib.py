"""Install the device-side third-party libraries listed in ``lib/manifest.json``.

Each entry names a package of micropython-lib at the commit that MicroPython
v1.28.0 pins as its submodule: the exact code the ESP32 image freezes. The
files are taken from the MicroPython source tree that the device runtime is
built from (``build/micropython-1.28.0``, unpacked by
``tools/setup/device-runtime.sh``), checked against the SHA-256 pinned in the
manifest, and copied into ``lib/``. Nothing is written when a hash does not
match or a file is missing.

``lib/`` serves two cases only: the CPython run of the firmware tests, and
``make deploy`` onto a MicroPython image that lacks umqtt.simple (the release
image freezes it, and a frozen module is never shadowed by ``/lib``).
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "build" / "micropython-1.28.0"
"""MicroPython v1.28.0 sources with their micropython-lib submodule."""


def fetch_package(pkg: dict, lib_dir: Path, sources: Path = SOURCES) -> list[Path]:
    """Copy one manifest entry's verified files into ``lib_dir``.

    ``pkg``: ``{"micropython-lib": "micropython/umqtt.simple", "version":
    "1.7.0", "commit": "<40 hex>", "files": {"umqtt/simple.py": "<sha256>"}}``.
    Returns the paths written. Raises RuntimeError when the source tree or a
    file is missing, or a file's SHA-256 differs from the manifest."""
    base = sources / "lib" / "micropython-lib" / pkg["micropython-lib"]
    name = f"{pkg['micropython-lib']} {pkg['version']} (micropython-lib {pkg['commit'][:10]})"
    staged = {}
    for rel, want in pkg["files"].items():
        src = base / rel
        if not src.is_file():
            raise RuntimeError(f"{name}: {src} is missing; build the device runtime first "
                               "(make runtime)")
        data = src.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise RuntimeError(f"{name}: {rel} has SHA-256 {got}, manifest pins {want}")
        staged[rel] = data
    written = []
    for rel, data in staged.items():
        dst = lib_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_suffix(dst.suffix + ".part")
        part.write_bytes(data)
        os.replace(part, dst)
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="lib", help="lib/ directory holding manifest.json (default: lib)")
    ap.add_argument("--sources", default=str(SOURCES),
                    help="MicroPython v1.28.0 source tree (default: build/micropython-1.28.0)")
    args = ap.parse_args(argv)
    lib_dir = Path(args.lib)
    manifest = json.loads((lib_dir / "manifest.json").read_text())
    for pkg in manifest["packages"]:
        try:
            for path in fetch_package(pkg, lib_dir, Path(args.sources)):
                print(f"installed {path} ({pkg['micropython-lib']} {pkg['version']}, sha256 verified)")
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
