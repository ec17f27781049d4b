"""The device runtime is the charger's own MicroPython (issue 12): the same
frozen modules as the ESP32 image, from one manifest, and the ESP32's word
size, floats, threads and tick wrap. A firmware that passes only on a 64-bit
interpreter with a large heap is not proven."""
import subprocess
import sys

from evse_tools.charger_sim import SimCharger
from evse_tools.device_runtime import REPO, device_env, micropython_cmd

SRC = REPO / "build" / "micropython-1.28.0"
SIMBOARD = {"simboard/" + p.name for p in (REPO / "tools" / "simboard").glob("*.py")}


def frozen(manifest, port):
    """Target paths (set of str) the manifest freezes for ``port``, by
    MicroPython v1.28.0's own tools/manifestfile.py."""
    sys.path.insert(0, str(SRC / "tools"))
    try:
        import manifestfile
    finally:
        sys.path.pop(0)
    m = manifestfile.ManifestFile(manifestfile.MODE_FREEZE, {
        "MPY_DIR": str(SRC), "PORT_DIR": str(SRC / "ports" / port), "BOARD_DIR": None,
        "MPY_LIB_DIR": str(SRC / "lib" / "micropython-lib")})
    m.execute(str(manifest))
    return {f.target_path for f in m.files()}


def test_esp32_image_freezes_the_firmware_and_the_release_images_umqtt_but_no_simulator():
    esp32 = frozen(REPO / "image" / "manifest.py", "esp32")
    firmware = {p.relative_to(REPO).as_posix() for p in (REPO / "firmware").rglob("*.py")}
    assert "firmware/core/charger.py" in firmware and firmware <= esp32
    assert not [p for p in esp32 if p.startswith("simboard/")]
    # The release image's own: its boot script, asyncio, the two umqtt clients.
    assert {"_boot.py", "asyncio/core.py", "umqtt/simple.py", "umqtt/robust.py"} <= esp32


def test_device_runtime_freezes_what_the_image_freezes_so_tests_run_the_shipped_code():
    esp32 = frozen(REPO / "image" / "manifest.py", "esp32")
    runtime = frozen(REPO / "device-runtime" / "manifest.py", "unix")
    esp32_only = {p.name for p in (SRC / "ports" / "esp32" / "modules").glob("*.py")}
    # Everything but the ESP32's drivers (they import the esp32 module), plus
    # the simulated board and EV (the simboard package).
    assert "simboard/board.py" in SIMBOARD
    assert runtime == (esp32 - esp32_only) | SIMBOARD


def test_runtime_is_32_bit_single_precision_with_a_gil_and_ticks_wrapping_at_2_30():
    code = ("import sys, time; print(sys.maxsize, 1/3, sys.implementation._thread, "
            "time.ticks_add(0, -1), sys.version.split(';')[1].strip())")
    out = subprocess.run([micropython_cmd(), "-c", code], env=device_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:4] == ["2147483647", "0.33333334", "GIL", "1073741823"]
    assert out[4:6] == ["MicroPython", "v1.28.0"]


def test_simulated_charger_runs_the_frozen_firmware_not_the_repositorys_files(tmp_path):
    # The repository root holds firmware/*.py; a charger that imported them
    # would bypass the frozen code the image ships.
    with SimCharger({"charger_id": "t-1"}, tmp_path) as ch:
        ch.wait_ready()
        assert ch.ask({"cmd": "code"}, "code") == "frozen"


def test_steady_control_loop_allocates_nothing_so_the_gc_never_pauses_a_tick():
    # Issue 13, Build 4: gc.mem_alloc() across 1,000 steady ticks on the
    # device runtime, charging at 20 A from the server; then 400 iterations
    # of the whole loop (tick, write-behind, every edge) between two reports.
    # Both 0 bytes; only a report, every 5 s at most when nothing changes,
    # allocates (its JSON).
    fw = REPO / "tests" / "fw"
    out = subprocess.run([micropython_cmd(), "-X", "heapsize=256K", "-c",
                          "import steady; print(*steady.measure())"],
                         cwd=fw, env=dict(device_env(), MICROPYPATH=".frozen:" + str(fw)),
                         capture_output=True, text=True, check=True).stdout.split()
    tick_bytes, loop_bytes, report_bytes = (int(x) for x in out)
    assert (tick_bytes, loop_bytes) == (0, 0)
    assert 0 < report_bytes < 2048
