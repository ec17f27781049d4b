"""Where the device runtime lives, and how a process is started on it.

The device runtime is MicroPython v1.28.0's unix port built like the ESP32
port of the same release (32-bit, single-precision floats, threads under a
GIL) with the charger image's modules frozen in, plus the v1.28.0 mpy-cross
that makes the ``.mpy`` files a charger loads. ``make runtime``
(tools/setup/device-runtime.sh) builds both into ``build/device-runtime/``.
"""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIME_DIR = REPO / "build" / "device-runtime"
MICROPYTHON = RUNTIME_DIR / "micropython"
MPY_CROSS = RUNTIME_DIR / "mpy-cross"


def _built(path: Path) -> str:
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; build the device runtime with `make runtime` "
                         "(make test, make sim and make deploy do it first)")
    return str(path)


def micropython_cmd() -> str:
    """Path of the device runtime's ``micropython`` (SystemExit when not built)."""
    return _built(MICROPYTHON)


def mpy_cross_cmd() -> str:
    """Path of mpy-cross v1.28.0 (SystemExit when not built)."""
    return _built(MPY_CROSS)


def device_env() -> dict:
    """Environment of a device-runtime process: only the frozen modules on
    the module path, so the firmware that runs is the image's."""
    return dict(os.environ, MICROPYPATH=".frozen")


def compile_mpy(src: Path, dst: Path, source_name: str) -> bytes:
    """Compile ``src`` (a .py file) to ``dst`` with mpy-cross v1.28.0 and
    return the ``.mpy`` bytes. ``source_name`` is the name kept in tracebacks
    (e.g. ``firmware/core/charger.py``). Raises RuntimeError with mpy-cross's message
    when the source does not compile."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([mpy_cross_cmd(), "-s", source_name, "-o", str(dst), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mpy-cross failed on {src}: {r.stderr.strip() or r.stdout.strip()}")
    return dst.read_bytes()
