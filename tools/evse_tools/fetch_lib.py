"""Install the device-side third-party libraries listed in ``lib/manifest.json``.

PyPI's ``micropython-umqtt.simple`` is an old upip-format sdist that pip refuses
to install (DESIGN.md §6). ``pip download --no-clean`` with a private TMPDIR still
unpacks it, so we take the files from there, check each one against the SHA-256
pinned in the manifest, and copy them into ``lib/``. Nothing is written when a
hash does not match.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _find(root: Path, rel: str) -> Path | None:
    for dirpath, _dirs, files in os.walk(root):
        cand = Path(dirpath)
        if (cand / rel).is_file():
            return cand / rel
    return None


def fetch_package(pkg: dict, lib_dir: Path) -> list[Path]:
    """Download one manifest entry and copy its verified files into ``lib_dir``.

    Returns the paths written. Raises RuntimeError when pip cannot download the
    sdist or a file is missing or its SHA-256 differs from the manifest.
    """
    spec = f"{pkg['pypi']}=={pkg['version']}"
    with tempfile.TemporaryDirectory(prefix="evse-lib-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, TMPDIR=str(tmp / "t"))
        (tmp / "t").mkdir()
        # pip exits non-zero ("does not appear to be a Python project") after
        # unpacking; the unpacked tree is what we want, so the code is ignored.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-clean", "--disable-pip-version-check", "-d", str(tmp / "dl"), spec],
            env=env, capture_output=True, text=True)
        staged = {}
        for rel, want in pkg["files"].items():
            src = _find(tmp / "t", rel)
            if src is None:
                raise RuntimeError(f"{spec}: {rel} not found after pip download\n{proc.stderr[-2000:]}")
            got = hashlib.sha256(src.read_bytes()).hexdigest()
            if got != want:
                raise RuntimeError(f"{spec}: {rel} has SHA-256 {got}, manifest pins {want}")
            staged[rel] = src.read_bytes()
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
    args = ap.parse_args(argv)
    lib_dir = Path(args.lib)
    manifest = json.loads((lib_dir / "manifest.json").read_text())
    for pkg in manifest["packages"]:
        try:
            for path in fetch_package(pkg, lib_dir):
                print(f"installed {path} ({pkg['pypi']} {pkg['version']}, sha256 verified)")
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
